"""Optimizers for sampled classifiers whose rows are mostly untouched in a step.

:class:`LazySGD` is SGD with momentum and weight decay that, for row-sparse gradients (``MHSHead(...,
sparse_grad=True)``), updates **only the rows present in the gradient**: a class group that was not sampled
keeps its weight and its momentum buffer unchanged (no decay, no momentum drift). Dense gradients touch every
row, i.e. plain ``torch.optim.SGD`` semantics (dampening 0).
"""

from __future__ import annotations

import torch

__all__ = ["LazySGD"]


class LazySGD(torch.optim.Optimizer):
    """Row-lazy SGD (momentum, optional Nesterov, L2 weight decay) for embedding-like parameters (dim 0 = rows)."""

    def __init__(
        self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"invalid LazySGD hyper-parameters lr={lr}, momentum={momentum}, weight_decay={weight_decay}"
            )
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        lr, mom, wd, nest = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
        flat = p.view(p.shape[0], -1)
        g = p.grad
        if g.is_sparse:
            idx, vals = g._indices()[0], g._values()
            # MHSHead's gradients have sorted unique rows already (autograd drops the coalesced flag):
            # coalescing would sort and copy every value for nothing
            if not g.is_coalesced() and not bool((idx[1:] > idx[:-1]).all()):
                g = g.coalesce()
                idx, vals = g.indices()[0], g.values()
            vals = vals.reshape(-1, flat.shape[1]).to(p.dtype)
        else:
            idx, vals = None, g.reshape(flat.shape)
        if idx is not None and idx.numel() == 0:
            return
        rows = flat if idx is None else flat.index_select(0, idx)
        if wd:
            vals = vals + wd * rows
        if mom:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"].view(flat.shape)
            if idx is None:
                buf.mul_(mom).add_(vals)
                b = buf
            else:
                b = buf.index_select(0, idx).mul_(mom).add_(vals)
                buf.index_copy_(0, idx, b)
            vals = vals + mom * b if nest else b
        if idx is None:
            flat.add_(vals, alpha=-lr)
        else:
            flat.index_add_(0, idx, vals, alpha=-lr)
