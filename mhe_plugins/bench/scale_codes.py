"""Label codes learned from the data for the scale benchmark's MHE heads (``codes="pifa"``).

Why: an MHE head decides a label digit by digit, so which labels share a digit block decides how hard each
decision is. In id order (``codes="id"``) the blocks are random sets of classes; a real extreme task keeps
its labels in arbitrary order too. Parabel, Bonsai and XR-Linear build their label trees from PIFA
vectors (the mean input features of each label's training examples); here the same vectors go through
:func:`mhe_plugins.grouping.balanced_tree_order`, so blocks of the head's last digit are leaves of a
balanced 2-means tree over the labels (siblings that look alike share a group). The cost, one streaming
pass over the training set plus the clustering, is part of the run's training time.

The head trains and predicts in *code* space (the label's position in the order); :class:`LabelCodes`
maps labels to codes and back, and is saved with the run's checkpoint, so a resumed run never recomputes it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..grouping import balanced_tree_order, tree_levels
from .scale_data import TRAIN, ScaleData

__all__ = ["CODES", "LabelCodes", "pifa_vectors", "leaf_size_of"]

CODES = ("id", "pifa")


class LabelCodes(nn.Module):
    """``order[code] = label`` and its inverse as buffers (identity until :meth:`set`)."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.register_buffer("order", torch.arange(num_labels))
        self.register_buffer("code", torch.arange(num_labels))
        self.register_buffer("seconds", torch.zeros((), dtype=torch.float64))  # time spent learning them

    @property
    def learned(self) -> bool:
        return float(self.seconds) > 0

    def set(self, order: np.ndarray, seconds: float) -> None:
        order = torch.as_tensor(order, dtype=torch.long)
        if order.shape != self.order.shape or not torch.equal(
            torch.sort(order).values, torch.arange(len(order))
        ):
            raise ValueError(f"label codes must be a permutation of {len(self.order)} labels")
        self.order.copy_(order)
        self.code[order] = torch.arange(len(order))
        self.seconds.fill_(max(float(seconds), 1e-9))

    def to_codes(self, labels: torch.Tensor) -> torch.Tensor:
        return self.code[labels]

    def to_labels(self, codes: torch.Tensor) -> torch.Tensor:
        return self.order[codes]


def pifa_vectors(
    data: ScaleData, batch: int = 65536, rank: int = 0, world: int = 1, progress=None
) -> np.ndarray:
    """(N, D) mean input features of each label's training examples (labels as trained on, noise and
    all); a label without examples gets the mean of all. Each rank sums its share, then all-reduce."""
    n, d = data.num_classes, data.dim
    sums = torch.zeros(n, d, dtype=torch.float32)
    counts = torch.zeros(n, dtype=torch.float32)
    total = data.num_train
    for a in range(rank * batch, total, batch * world):
        x, y, _ = data.examples(TRAIN, np.arange(a, min(a + batch, total)))
        sums.index_add_(0, y, x)
        counts.index_add_(0, y, torch.ones(len(y)))
        if progress is not None:
            progress(len(y))
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    mean_all = sums.sum(0) / counts.sum().clamp(min=1)
    out = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], mean_all)
    return out.numpy()


def leaf_size_of(head_sizes: tuple[int, ...]) -> int:
    """The tree's leaf size: the head's last digit (a block of consecutive codes that share every other
    digit: MHS's group, MHC's last-level siblings, MHP's last head)."""
    return int(head_sizes[-1])


def learn_codes(
    codes: LabelCodes, data: ScaleData, head_sizes, seed: int, rank: int, world: int, say
) -> None:
    """Fill ``codes`` with the PIFA tree order (timed into ``codes.seconds``)."""
    from tqdm import tqdm

    start = time.perf_counter()
    with tqdm(total=data.num_train, unit="ex", unit_scale=True, disable=rank != 0, desc="PIFA vectors",
              mininterval=2.0) as bar:  # fmt: skip
        vectors = pifa_vectors(data, rank=rank, world=world, progress=bar.update)
    leaf = leaf_size_of(tuple(head_sizes))
    with tqdm(total=tree_levels(data.num_classes, leaf), unit="level", disable=rank != 0, desc="label tree",
              mininterval=2.0) as bar:  # fmt: skip
        order = balanced_tree_order(vectors, leaf, seed=seed, on_level=bar.update)
    codes.set(order, time.perf_counter() - start)
    if rank == 0:
        say(f"PIFA codes for {data.num_classes:,} labels in {float(codes.seconds):.0f} s")
