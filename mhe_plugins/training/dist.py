"""The trainer side of ``torch.distributed``: process-group init from torchrun's environment, a timeout on
every collective with an error that names the stuck position, DDP wrapping. All degrade to no-ops in one
process. Launch with ``torchrun`` (it sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT); on
CPU the backend is gloo, on CUDA nccl.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..distributed import all_reduce_sum, get_rank, get_world_size, is_dist, is_main_process

__all__ = [
    "is_dist",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "all_reduce_sum",
    "init_distributed_from_env",
    "DEFAULT_TIMEOUT_S",
    "collective_timeout_guard",
    "wrap_ddp",
    "add_dist_timeout_arg",
    "cleanup_distributed",
    "barrier",
]


DEFAULT_TIMEOUT_S = 1800.0
"""How long a collective waits for a stuck rank before the job fails (torch's own default for gloo/nccl).
Long enough for a rank-0-only validation pass, short enough that a frozen rank does not hold the job forever."""


def init_distributed_from_env(
    backend: str | None = None, timeout_s: float | None = None
) -> tuple[int, int, torch.device]:
    """Initialise the default process group when launched by torchrun; return (rank, world_size, device).

    Without the torchrun variables (a plain ``python`` run) nothing is initialised and (0, 1, device) is
    returned, so the same training script runs single-process unchanged. ``timeout_s`` bounds every
    collective (default :data:`DEFAULT_TIMEOUT_S`): a rank that stops answering makes the others fail with
    a timeout instead of hanging (see :func:`collective_timeout_guard` for the message).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = float(DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
    if not timeout > 0:
        raise ValueError(f"distributed timeout must be > 0 seconds, got {timeout_s}")
    if world > 1 and not is_dist():
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"), timeout=datetime.timedelta(seconds=timeout)
        )
        _STATE["timeout_s"] = timeout
    return get_rank(), get_world_size(), device


_STATE: dict[str, float] = {}


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text or "connection closed by peer" in text


@contextmanager
def collective_timeout_guard(where: Callable[[], str]) -> Iterator[None]:
    """Turn a collective's timeout (or a peer that died) into an error naming this rank and ``where()``.

    Wrap a training loop with it; ``where`` reports the current position, e.g. ``lambda: f"step {step}"``.
    """
    try:
        yield
    except RuntimeError as exc:
        if not is_dist() or not _is_timeout(exc):
            raise
        t = _STATE.get("timeout_s", DEFAULT_TIMEOUT_S)
        raise TimeoutError(
            f"rank {get_rank()}/{get_world_size()}: a collective did not complete within {t:g} s at "
            f"{where()} - another rank is stuck or died (raise the timeout with --dist-timeout if a rank "
            f"legitimately works alone for longer, e.g. a long validation)"
        ) from exc


def add_dist_timeout_arg(parser) -> None:
    """The ``--dist-timeout SECONDS`` option every distributed CLI shares (argparse parser or group)."""
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"fail a collective after this long (a stuck or dead rank) instead of hanging "
        f"(default {DEFAULT_TIMEOUT_S:g})",
    )


def wrap_ddp(model: torch.nn.Module, device: torch.device, **kwargs) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when a process group is up, else ``model`` itself."""
    if get_world_size() <= 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **kwargs
    )


def cleanup_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()
