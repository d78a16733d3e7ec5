"""Mid-run checkpoints of one scale-benchmark run: a killed multi-hour run continues where it was.

Why: at 10^7 classes one run trains for hours; the run store only keeps finished runs, so without this a
kill would restart the run from step 0. Every ``checkpoint_every`` seconds each rank writes its own file
(``ckpt-rank<r>.pt`` in the run's work dir, atomically): the encoder, the head (a rank's shard), the
optimizers, the RNG state and the run's counters. The data need no state: a batch is a pure function of
(seed, epoch, step). The work dir is named by the run's key hash, so a checkpoint is only ever resumed by a
run with the same settings. The orchestrator removes the files once the run's ok record is in the store (after
an oom they stay: a rerun continues from them).
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..training import atomic_save
from ..training.checkpoint import load_checkpoint
from ..training.rng import rng_state, set_rng_state

__all__ = ["Progress", "Checkpointer", "checkpoint_files"]


@dataclass
class Progress:
    """The counters of a run's training loop, carried over a resume (times in seconds)."""

    step: int = 0
    seen: int = 0
    t_model: float = 0.0
    t_data: float = 0.0
    cpu_s: float = 0.0
    elapsed_s: float = 0.0
    loss_sum: float = 0.0
    loss_n: int = 0
    last_loss: float | None = None
    budget_hit: bool = False
    epoch_s: list[float] = field(default_factory=list)
    peak_rss_bytes: int = 0
    resumes: int = 0


def _own_state(opt: torch.optim.Optimizer) -> None:
    """Give the optimiser's state tensors their own memory. ``load_state_dict`` keeps a loaded tensor of the
    right dtype as is, so under ``mmap=True`` the state stayed a view of the checkpoint file: at 10^7 classes
    its 2.9 GB mapping stayed resident beside the live tensors, and evaluation then hit the memory cap."""
    for st in opt.state.values():
        for k, v in list(st.items()):
            if torch.is_tensor(v):
                st[k] = v.clone()


def checkpoint_files(work: str | Path) -> list[Path]:
    return sorted(Path(work).glob("ckpt-rank*.pt"))


class Checkpointer:
    """Save/restore one rank's run state in ``work_dir`` (None: disabled) every ``every`` seconds."""

    def __init__(self, work_dir: str | Path | None, every: float, rank: int = 0, world: int = 1):
        self.path = None if not work_dir or every <= 0 else Path(work_dir) / f"ckpt-rank{rank}.pt"
        self.every, self.world = float(every), world

    def due(self, since_last: float) -> bool:
        """Whether to save now; every rank gets the same answer (they save at the same step)."""
        if self.path is None:
            return False
        flag = since_last >= self.every
        if self.world > 1:
            t = torch.tensor([1.0 if flag else 0.0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def save(self, progress: Progress, modules: dict, opts: list) -> None:
        state = {
            "progress": asdict(progress),
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "opts": [o.state_dict() for o in opts],
            "rng": rng_state(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)  # a rank on another machine may have no work dir
        atomic_save(state, self.path)

    def load(self, modules: dict, opts: list) -> Progress | None:
        """The saved progress after restoring every state, or None when there is no checkpoint (with
        several ranks: unless every rank has one, all start over)."""
        have = self.path is not None and self.path.is_file()
        if self.world > 1:
            t = torch.tensor([1.0 if have else 0.0])
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            have = bool(t.item() > 0)
        if not have:
            return None
        state = load_checkpoint(self.path, mmap=True)  # mapped, copied into the live tensors below
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        for o, s in zip(opts, state["opts"]):
            o.load_state_dict(s)
            _own_state(o)
        set_rng_state(state["rng"])
        progress = Progress(**state["progress"])
        progress.resumes += 1
        del state
        gc.collect()
        return progress
