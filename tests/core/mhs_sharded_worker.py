"""Run by tests/core/test_mhs_sharded.py in-process (world 1) or under torchrun (world 2 gloo ranks).

One global batch and one full classifier; each rank feeds its slice of the batch to the core ``MHSHead``
(sharded over the world group when world > 1) and to the face wrapper, and saves the loss, the gradient of
its embeddings and the dense gradient of its block of groups.
"""

from __future__ import annotations

import math
import sys

import torch

from insightface_ext.heads import MHSArcFace
from mhe_plugins import CombinedMargin, LabelCodec, MHSHead
from mhe_plugins.training.dist import (
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed_from_env,
)

HEAD_SIZES, NUM_CLASSES, DIM, BATCH, M2, SCALE = (7, 6), 40, 8, 12, 0.3, 16.0

# name -> core MHSHead keyword arguments; all deterministic (every random draw covers all groups)
CONFIGS = {
    "union_arcface": dict(mode="batch_union", margin=(1.0, M2, 0.0)),
    "union_all_rate": dict(mode="batch_union", margin=(1.0, M2, 0.0), sample_rate=1.0),
    "union_dot": dict(mode="batch_union", margin=None),
    "per_sample_all": dict(mode="per_sample", margin=(1.0, M2, 0.05), sampled_groups=HEAD_SIZES[0]),
}


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, DIM, generator=g)
    y = torch.randint(
        0, 36, (BATCH,), generator=g
    )  # groups 0..5: group 6 (ids 36..41, 40/41 padded) unsampled
    w = torch.randn(HEAD_SIZES[0], HEAD_SIZES[1], DIM, generator=g)
    return x, y, w


def _build(kind: str, kw: dict, sharded: bool):
    kw = dict(kw)
    m = kw.pop("margin")
    if kind == "face":
        return MHSArcFace(
            DIM, NUM_CLASSES, HEAD_SIZES, margin=m, scale=SCALE, sparse=True, shard=sharded, **kw
        )
    margin = None if m is None else CombinedMargin(*m, s=SCALE)
    pg = torch.distributed.group.WORLD if sharded else None
    return MHSHead(DIM, LabelCodec(list(HEAD_SIZES), NUM_CLASSES), margin=margin, process_group=pg, **kw)


def run(world: int, rank: int) -> dict:
    x, y, w = inputs()
    n = BATCH // world
    xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
    out = {}
    for name, kw in CONFIGS.items():
        for kind in ("core", "face"):
            if kind == "face" and kw["margin"] is None:
                continue
            head = _build(kind, kw, world > 1)
            head.load_shards(
                [
                    {
                        "weight": w,
                        "group_start": 0,
                        "group_end": 7,
                        "head_sizes": [7, 6],
                        "num_classes": NUM_CLASSES,
                    }
                ]
            )
            xi = xs.clone().requires_grad_(True)
            loss = head(xi, ys).loss
            loss.backward()
            g = head.weight.grad
            out[f"{name}/{kind}"] = {
                "loss": loss.item(),
                "x_grad": xi.grad,
                "w_grad": g.to_dense() if g.is_sparse else g,
                "groups": (head.group_start, head.group_end),
                "finite": math.isfinite(loss.item()),
            }
    return out


def run_topk(world: int, rank: int, k: int = 5) -> dict:
    """Each rank's exact top-k over its own classes (``local_topk``) of the whole batch, global ids: plain
    rows, own + shared group rows, and scaled cosines; blocks of 2 groups so the block loop runs."""
    x, _, w = inputs()
    gw = torch.randn(HEAD_SIZES[0], DIM, generator=torch.Generator().manual_seed(8))
    out = {}
    for name, shared, margin in (
        ("plain", False, None),
        ("shared", True, None),
        ("cosine", True, (1.0, M2, 0.0)),
    ):
        head = MHSHead(
            DIM,
            LabelCodec(list(HEAD_SIZES), NUM_CLASSES),
            margin=None if margin is None else CombinedMargin(*margin, s=SCALE),
            group_shared=shared,
            process_group=torch.distributed.group.WORLD if world > 1 else None,
        )
        head.TOPK_CHUNK = 2 * HEAD_SIZES[1]
        shard = {
            "weight": w,
            "group_start": 0,
            "group_end": 7,
            "head_sizes": [7, 6],
            "num_classes": NUM_CLASSES,
        }
        head.load_shards([dict(shard, group_weight=gw)] if shared else [shard])
        with torch.no_grad():
            out[name] = head.local_topk(x, k)
    out["group_weight"] = gw
    return out


if __name__ == "__main__":
    init_distributed_from_env()
    torch.save(run(get_world_size(), get_rank()), f"{sys.argv[1]}/rank{get_rank()}.pt")
    torch.save(run_topk(get_world_size(), get_rank()), f"{sys.argv[1]}/topk-rank{get_rank()}.pt")
    cleanup_distributed()  # a gloo group left alive at exit can abort the rank (std::terminate)
