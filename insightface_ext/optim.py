"""Optimizer pieces of the face trainer.

* :class:`LazySGD` — the core's row-lazy SGD (:mod:`mhe_plugins.optim`), re-exported where face users
  found it;
* :func:`sum_allreduce_hook` — a DDP communication hook that *sums* gradients over ranks. The MHS head's
  loss is already the mean over the **global** batch, so each rank's backbone gradient is a partial sum;
  summing (instead of DDP's default averaging) makes N processes take exactly the single-process step.
"""

import torch
import torch.distributed as dist

from mhe_plugins.optim import LazySGD

__all__ = ["LazySGD", "sum_allreduce_hook"]


def sum_allreduce_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce SUM (no division by world size); register with ``ddp.register_comm_hook(None, ...)``."""
    group = state if state is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
