"""Run under torchrun by test_training.py: rank 1 freezes at step 3; rank 0 must fail with a timeout message."""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from mhe_plugins.training.dist import collective_timeout_guard, init_distributed_from_env

rank, world, _ = init_distributed_from_env(timeout_s=float(sys.argv[1]))
step = 0
with collective_timeout_guard(lambda: f"step {step}"):
    for step in range(6):
        if rank == 1 and step == 3:
            time.sleep(3600)  # a frozen rank: alive, never joins the collective
        t = torch.ones(4)
        dist.all_reduce(t)
print(f"rank {rank} finished", flush=True)
