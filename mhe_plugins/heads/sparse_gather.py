"""Row gathers whose gradient is row-sparse: a training step of a sampled head touches only its rows."""

from __future__ import annotations

import torch

__all__ = ["gather_rows_sparse_grad"]


class _GatherRowsSparseGrad(torch.autograd.Function):
    """``weight[rows]`` for sorted unique ``rows`` whose weight gradient is a hybrid sparse COO tensor over
    dim 0, flagged coalesced (no sort or copy in the optimizer): contiguous blocks cost one memcpy each."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.shape = weight.shape
        return weight.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        g = torch.sparse_coo_tensor(
            rows[None], grad.contiguous(), ctx.shape, check_invariants=False, is_coalesced=True
        )
        return g, None


def gather_rows_sparse_grad(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``weight.index_select(0, rows)`` (``rows`` sorted, unique) with a row-sparse gradient."""
    return _GatherRowsSparseGrad.apply(weight, rows)
