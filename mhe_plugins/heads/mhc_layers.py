"""Building blocks of the cascade head: node tables, the zero-started group MLP, its named outputs."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MHCOutput", "TiedNodeEmbedding"]


class TiedNodeEmbedding(nn.Module):
    """Label embeddings borrowed from elsewhere, e.g. a decoder's input embeddings (N, hidden), indexed
    by label id (the head maps tree positions to labels first)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return F.embedding(labels, self.weight)


def _residual_mlp(in_features: int, width: int, out_features: int) -> nn.Sequential:
    """Linear-GELU-Linear whose output layer starts at zero (adds nothing until trained)."""
    mlp = nn.Sequential(nn.Linear(in_features, width), nn.GELU(), nn.Linear(width, out_features))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


def _embedding(rows: int, width: int) -> tuple[nn.Embedding, nn.Embedding]:
    emb = nn.Embedding(rows, width)
    nn.init.xavier_uniform_(emb.weight)
    bias = nn.Embedding(rows, 1)
    nn.init.zeros_(bias.weight)
    return emb, bias


class MHCOutput(NamedTuple):
    logits: list[torch.Tensor]  # per level (rows_h, K + C_0 | C_h): sibling logits under the true prefix
    targets: list[torch.Tensor]  # per level (rows_h,): the ground-truth digit (root: position among K + C_0)
    rows: list[
        torch.Tensor | None
    ] = []  # per level: the items it covers (None: all; tail levels: tail items)


class _Paths(NamedTuple):
    root: torch.Tensor  # (B,) index among the K + C_0 root nodes
    rows: torch.Tensor | None  # tail items (None: all items are in the tail)
    digits: torch.Tensor  # (T, H) tail digits of the tail items
