"""What every trainer shares, written once: atomic writes and checkpoints that resume after any kill, the
output-folder policy, seeding and RNG state, JSON-lines logs without duplicates (mirrored to TensorBoard and,
optionally, W&B by :class:`MetricLogger`), AMP, LR schedules and the non-finite-loss guard. The trainers in
``timm_ext``, ``xmc`` and ``insightface_ext`` keep their own CLI shape and call these.
"""

from .amp import Amp
from .atomic import (
    atomic_copy,
    atomic_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    clean_stale_tmp,
    write_error,
)
from .checkpoint import CheckpointRef, ShardedCheckpoint, latest_checkpoint, load_checkpoint
from .guards import check_finite_loss
from .logs import JsonlLogger
from .metric_log import TB_SUBDIR, MetricLogger, add_metric_log_args, numeric_tags, open_metric_logger
from .rng import rng_state, seed_everything, set_rng_state
from .rundir import RunExistsError, RunLockedError, lock_run_dir, prepare_output_dir, release_run_locks
from .schedules import poly_warmup, warmup_linear_decay
from .state import FileStatus, NothingToResumeError, RunDamagedError, RunStatus, TrainState

__all__ = [
    "Amp",
    "atomic_copy",
    "atomic_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "clean_stale_tmp",
    "write_error",
    "CheckpointRef",
    "TrainState",
    "RunStatus",
    "FileStatus",
    "RunDamagedError",
    "NothingToResumeError",
    "ShardedCheckpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "check_finite_loss",
    "JsonlLogger",
    "MetricLogger",
    "TB_SUBDIR",
    "add_metric_log_args",
    "numeric_tags",
    "open_metric_logger",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "RunExistsError",
    "prepare_output_dir",
    "RunLockedError",
    "lock_run_dir",
    "release_run_locks",
    "poly_warmup",
    "warmup_linear_decay",
]
