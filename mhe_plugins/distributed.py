"""The collectives the heads need (the sharded MHS, evaluation over ranks); all are no-ops in one process.

The trainer side (process-group init from torchrun's environment, collective timeouts, DDP wrapping) is
toolkit, in :mod:`mhe_plugins.training.dist`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "is_dist",
    "get_rank",
    "get_world_size",
    "is_main_process",
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
