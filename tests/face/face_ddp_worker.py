"""Run by tests/face/test_face_heads.py, either in-process (world 1) or under torchrun (world 2).

Trains a tiny linear "backbone" + sharded MHS-ArcFace for a few steps on a fixed global batch and saves what
the test compares: per-step losses, the backbone weight and this rank's head shard.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from insightface_ext.heads import MHSArcFace
from insightface_ext.optim import LazySGD, sum_allreduce_hook
from mhe_plugins.training.dist import (
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed_from_env,
)

HEAD_SIZES, NUM_CLASSES, IN_DIM, EMB, BATCH, STEPS = (7, 6), 40, 12, 8, 16, 3


def initial_state() -> dict:
    g = torch.Generator().manual_seed(1234)
    return {
        "backbone": torch.randn(EMB, IN_DIM, generator=g) * 0.3,
        "head": torch.randn(HEAD_SIZES[0], HEAD_SIZES[1] * EMB, generator=g),
        "x": [torch.randn(BATCH, IN_DIM, generator=g) for _ in range(STEPS)],
        # labels hit groups 0..5 only, so group 6 (padded: 7*6=42 > 40) is never sampled
        "y": [torch.randint(0, 36, (BATCH,), generator=g) for _ in range(STEPS)],
    }


def run(world: int, rank: int) -> dict:
    st = initial_state()
    backbone = nn.Linear(IN_DIM, EMB, bias=False)
    with torch.no_grad():
        backbone.weight.copy_(st["backbone"])
    head = MHSArcFace(EMB, NUM_CLASSES, head_sizes=HEAD_SIZES, margin=(1.0, 0.3, 0.1), scale=16.0)
    head.load_shards(
        [
            {
                "weight": st["head"],
                "group_start": 0,
                "group_end": HEAD_SIZES[0],
                "head_sizes": list(HEAD_SIZES),
                "num_classes": NUM_CLASSES,
            }
        ]
    )
    model: nn.Module = backbone
    if world > 1:
        model = DDP(backbone)
        model.register_comm_hook(None, sum_allreduce_hook)
    opt_b = torch.optim.SGD(backbone.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    opt_h = LazySGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    n = BATCH // world
    losses, sampled = [], []
    for x, y in zip(st["x"], st["y"]):
        xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        loss = head(model(xs), ys).loss
        opt_b.zero_grad()
        opt_h.zero_grad()
        loss.backward()
        opt_b.step()
        opt_h.step()
        losses.append(loss.item())
        sampled.append(head.last_num_sampled)
    return {
        "losses": losses,
        "sampled": sampled,
        "backbone": backbone.weight.detach().clone(),
        "head": head.shard_state(),
    }


if __name__ == "__main__":
    init_distributed_from_env()
    out = run(get_world_size(), get_rank())
    torch.save(out, f"{sys.argv[1]}/rank{get_rank()}.pt")
    cleanup_distributed()  # a gloo group left alive at exit can abort the rank (std::terminate)
