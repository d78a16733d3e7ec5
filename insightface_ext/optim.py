"""Optimizer pieces for a sharded, sampled classifier.

* :class:`LazySGD` — SGD with momentum and weight decay that, for row-sparse gradients (``sparse=True``
  heads), updates **only the rows present in the gradient**: a class-centre group that was not sampled in a
  step keeps its weight and its momentum buffer unchanged (no decay, no momentum drift).  Dense gradients
  are treated as touching every row, i.e. plain ``torch.optim.SGD`` semantics.
* :func:`sum_allreduce_hook` — a DDP communication hook that *sums* gradients over ranks.  The MHS head's
  loss is already the mean over the **global** batch, so each rank's backbone gradient is a partial sum;
  summing (instead of DDP's default averaging) makes N processes take exactly the single-process step.
"""

import torch
import torch.distributed as dist

__all__ = ["LazySGD", "sum_allreduce_hook"]


class LazySGD(torch.optim.Optimizer):
    """Row-lazy SGD (momentum, dampening 0, optional Nesterov, L2 weight decay) for embedding-like params."""

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
            lr, mom, wd, nest = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                flat = p.view(p.shape[0], -1)
                if g.is_sparse:
                    g = g.coalesce()
                    idx, vals = g.indices()[0], g.values().reshape(-1, flat.shape[1]).to(p.dtype)
                else:
                    idx, vals = None, g.reshape(flat.shape)
                rows = flat if idx is None else flat.index_select(0, idx)
                if wd:
                    vals = vals + wd * rows
                if mom:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(flat)
                    buf = state["momentum_buffer"]
                    old = buf if idx is None else buf.index_select(0, idx)
                    b = old * mom + vals
                    if idx is None:
                        buf.copy_(b)
                    else:
                        buf.index_copy_(0, idx, b)
                    vals = vals + mom * b if nest else b
                if idx is None:
                    flat.add_(vals, alpha=-lr)
                else:
                    flat.index_add_(0, idx, vals, alpha=-lr)
        return loss


def sum_allreduce_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce SUM (no division by world size); register with ``ddp.register_comm_hook(None, ...)``."""
    group = state if state is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
