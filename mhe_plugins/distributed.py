"""The few ``torch.distributed`` pieces the heads and trainers need; all degrade to no-ops in one process.

Launch with ``torchrun`` (it sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT); on CPU the
backend is gloo, on CUDA nccl.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = [
    "is_dist",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "init_distributed_from_env",
    "DEFAULT_TIMEOUT_S",
    "collective_timeout_guard",
    "wrap_ddp",
    "add_dist_timeout_arg",
    "cleanup_distributed",
    "barrier",
    "all_reduce_sum",
    "all_gather_with_grad",
    "all_gather_variable",
    "shard_range",
    "group_world_rank",
    "all_gather_batch",
    "dist_softmax_cross_entropy",
]


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


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


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns a new tensor; the input is left untouched)."""
    out = t.clone()
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _AllGatherGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns each rank its slice of the summed gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, differentiably."""
    if not is_dist() or get_world_size() == 1:
        return x
    return _AllGatherGrad.apply(x)


def all_gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose dim 0 differs between ranks (no gradient); e.g. eval predictions."""
    if not is_dist() or get_world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(get_world_size())]
    dist.all_gather(sizes, n)
    max_n = int(max(s.item() for s in sizes))
    padded = torch.zeros((max_n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)], 0)


# ---------------------------------------------------------------------------- class-sharded heads (MHS)
def shard_range(num_groups: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` block of classifier groups owned by ``rank`` (the first
    ``num_groups % world`` ranks get one more), so every rank stores a slice and nothing is replicated."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    base, extra = divmod(int(num_groups), int(world))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def group_world_rank(group=None) -> tuple[int, int]:
    """(world size, rank) of ``group`` (the default group when None); (1, 0) without torch.distributed."""
    if is_dist():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def all_gather_batch(x: torch.Tensor, group=None, grad: bool = True) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank of ``group``) along dim 0; differentiable when ``grad``.

    Like :func:`all_gather_with_grad` but for any process group: the backward sums the gradient over
    the group and returns each rank its own slice (the loss of a class-sharded head is a sum over ranks).
    """
    world, _ = group_world_rank(group)
    if world == 1:
        return x
    if grad and x.requires_grad:
        return _AllGatherGradGroup.apply(x, group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, 0)


class _AllGatherGradGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        world, rank = group_world_rank(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.n, ctx.group = rank, x.shape[0], group
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


class _DistSoftmaxCE(torch.autograd.Function):
    """Per-sample softmax cross-entropy whose class columns are split over the ranks of a group.

    ``logits`` (B, n_local) are this rank's columns (``-inf`` = not a class here); ``target`` (B,) is the
    local column of the true class or -1 when another rank owns it. Forward reduces the row max, the sum of
    exponentials and the target logit across ranks; backward is local (softmax - one-hot), which is the
    exact gradient of each rank's own columns.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group, distributed: bool) -> torch.Tensor:
        b, n = logits.shape
        if n > 0:
            row_max = logits.max(dim=1).values
        else:
            row_max = torch.full((b,), -torch.inf, dtype=logits.dtype, device=logits.device)
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = torch.exp(logits - row_max[:, None])
        denom = exp.sum(dim=1)
        owned = target >= 0
        tgt = torch.zeros(b, dtype=logits.dtype, device=logits.device)
        if n > 0:
            tgt = torch.where(owned, logits.gather(1, target.clamp_min(0)[:, None]).squeeze(1), tgt)
        if distributed:
            dist.all_reduce(denom, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(tgt, op=dist.ReduceOp.SUM, group=group)
        loss = torch.log(denom) + row_max - tgt
        exp.div_(denom[:, None])
        ctx.save_for_backward(exp, target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        prob, target = ctx.saved_tensors
        grad = prob.clone()
        owned = torch.nonzero(target >= 0).squeeze(1)
        if owned.numel():
            grad[owned, target[owned]] -= 1.0
        return grad.mul_(grad_loss[:, None]), None, None, None


def dist_softmax_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group=None, distributed: bool | None = None
) -> torch.Tensor:
    """Per-sample CE over classes whose columns are spread across the ranks of ``group``.

    Every rank must call it (it runs three all-reduces); on one process it equals
    ``F.cross_entropy(logits, target, reduction="none")``.
    """
    if distributed is None:
        distributed = group_world_rank(group)[0] > 1
    return _DistSoftmaxCE.apply(logits, target, group, distributed)
