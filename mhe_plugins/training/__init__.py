"""What every trainer shares, written once: atomic writes and checkpoints that resume after any kill, the
output-folder policy, seeding and RNG state, JSON-lines logs without duplicates, AMP, LR schedules and the
non-finite-loss guard. The trainers in ``timm_ext``, ``xmc`` and ``insightface_ext`` keep their own CLI shape
and call these.
"""

from .amp import Amp
from .atomic import atomic_copy, atomic_save, atomic_write_json, atomic_write_text, clean_stale_tmp
from .checkpoint import (
    CheckpointRef,
    LastBestCheckpoint,
    ShardedCheckpoint,
    latest_checkpoint,
    load_checkpoint,
)
from .guards import check_finite_loss
from .logs import JsonlLogger
from .rng import rng_state, seed_everything, set_rng_state
from .rundir import RunExistsError, prepare_output_dir
from .schedules import poly_warmup, warmup_linear_decay

__all__ = [
    "Amp",
    "atomic_copy",
    "atomic_save",
    "atomic_write_json",
    "atomic_write_text",
    "clean_stale_tmp",
    "CheckpointRef",
    "LastBestCheckpoint",
    "ShardedCheckpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "check_finite_loss",
    "JsonlLogger",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "RunExistsError",
    "prepare_output_dir",
    "poly_warmup",
    "warmup_linear_decay",
]
