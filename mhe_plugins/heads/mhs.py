"""MHS, multi-head sampling: the full classifier stored as (C_1, C_rest, d); a training step only computes
the classes of the sampled groups (group = head-0 digit). A drop-in for Partial FC's sampling.

- ``batch_union``: the groups hit by the batch (every positive is present, its siblings are the negatives),
  optionally topped up with random other groups up to ``sampled_groups`` (as Partial FC's sample_rate);
- ``per_sample``: each sample scores its own group plus ``sampled_groups - 1`` random other groups
  (the reference's image-classification MHS, vectorised).
With ``margin`` (``ArcFaceMargin``/``CombinedMargin``) logits are scaled cosines with the margin on the
target; without, plain dot products. Inference uses the full classifier (chunked over classes for top-k).
Ids >= N (when prod C_h > N) have rows but are masked out everywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..codec import LabelCodec
from ..margins import CombinedMargin
from .base import MHEHead, upcast

__all__ = ["MHSHead", "MHSOutput"]

MODES = ("batch_union", "per_sample")


class _GatherGroupsSparseGrad(torch.autograd.Function):
    """``weight[groups]`` whose weight gradient is a hybrid sparse COO tensor over the group dim, so an
    optimizer step (e.g. SGD, SparseAdam) touches only the sampled groups' rows."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(groups)
        ctx.shape = weight.shape
        return weight.index_select(0, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (groups,) = ctx.saved_tensors
        g = torch.sparse_coo_tensor(
            groups[None], grad.contiguous(), ctx.shape, check_invariants=False, is_coalesced=True
        )
        return g, None


class MHSOutput(NamedTuple):
    logits: torch.Tensor  # (B, S * C_rest) logits over the sampled classes
    target: torch.Tensor  # (B,) column of the true class in ``logits``
    groups: torch.Tensor  # (S,) batch_union or (B, S) per_sample: group ids behind the columns


class MHSHead(MHEHead):
    def __init__(
        self,
        in_features: int,
        codec: LabelCodec,
        mode: str = "batch_union",
        sampled_groups: int | None = None,
        margin: CombinedMargin | None = None,
        sparse_grad: bool = False,
        init_std: float = 0.01,
        chunk_size: int = 65536,
    ):
        super().__init__(in_features, codec)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        num_groups = codec.head_sizes[0]
        if mode == "per_sample" and sampled_groups is None:
            sampled_groups = min(4, num_groups)
        if sampled_groups is not None and not 1 <= sampled_groups <= num_groups:
            raise ValueError(f"sampled_groups must be in [1, {num_groups}], got {sampled_groups}")
        self.mode, self.sampled_groups, self.margin = mode, sampled_groups, margin
        self.sparse_grad, self.chunk_size = sparse_grad, int(chunk_size)
        self.group_size = codec.capacity // num_groups
        self.weight = nn.Parameter(torch.randn(num_groups, self.group_size, in_features) * init_std)
        # which (group, slot) rows are real classes (id < N)
        ids = torch.arange(codec.capacity).view(num_groups, self.group_size)
        self.register_buffer("valid", ids < codec.num_labels, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"head_sizes={list(self.codec.head_sizes)}, num_labels={self.num_labels}, mode={self.mode}, "
            f"sampled_groups={self.sampled_groups}"
        )

    # ------------------------------------------------------------------ sampling
    def _group_rows(self, groups: torch.Tensor) -> torch.Tensor:
        """Weights of the given sorted unique groups (G, C_rest, d); sparse gradient if ``sparse_grad``."""
        if self.sparse_grad:
            return _GatherGroupsSparseGrad.apply(self.weight, groups)
        return self.weight.index_select(0, groups)

    def _scores(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (B, d) against class rows w (M, d): cosines when a margin is used, else dot products."""
        if self.margin is not None:
            return F.linear(F.normalize(x, dim=-1), F.normalize(w, dim=-1))
        return F.linear(x, w)

    def sample_groups(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(groups, target column). batch_union: groups (S,), per_sample: groups (B, S)."""
        own = target // self.group_size
        local = target % self.group_size
        num_groups = self.weight.shape[0]
        if self.mode == "batch_union":
            groups = torch.unique(own)
            if self.sampled_groups is not None and groups.numel() < self.sampled_groups:
                noise = torch.rand(num_groups, device=target.device)
                noise[groups] = 2.0  # positives first
                groups = noise.topk(self.sampled_groups).indices.sort().values
            pos = torch.searchsorted(groups, own)
            return groups, pos * self.group_size + local
        b = target.shape[0]
        noise = torch.rand(b, num_groups, device=target.device)
        noise.scatter_(1, own[:, None], -1.0)  # never sample the own group as a negative
        negatives = noise.topk(self.sampled_groups - 1, dim=1).indices
        groups = torch.cat([own[:, None], negatives], 1)  # own group first -> target column = local
        return groups, local

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> MHSOutput:
        flat, _ = self._flat(x)
        target = target.reshape(-1)
        self.codec.check_ids(target)
        groups, col = self.sample_groups(target)
        if self.mode == "batch_union":
            w = self._group_rows(groups).reshape(-1, self.in_features)
            scores = self._scores(flat, w)
            valid = self.valid[groups].reshape(-1).expand_as(scores)
        else:
            uniq, inverse = torch.unique(groups, return_inverse=True)
            w = self._group_rows(uniq).reshape(-1, self.in_features)
            s_all = self._scores(flat, w).view(flat.shape[0], uniq.numel(), self.group_size)
            scores = s_all.gather(1, inverse[..., None].expand(-1, -1, self.group_size)).flatten(1)
            valid = self.valid[groups].flatten(1)
        if self.margin is not None:
            scores = self.margin(scores, col)
        scores = scores.masked_fill(~valid, float("-inf"))
        return MHSOutput(scores, col, groups)

    def loss(self, output: MHSOutput, reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
        logits = upcast(output.logits)
        if label_smoothing:
            # smoothing mass only over real classes (masked columns are -inf)
            logp = F.log_softmax(logits, -1)
            nll = -logp.gather(1, output.target[:, None]).squeeze(1)
            finite = torch.isfinite(logp)
            smooth = -(logp.masked_fill(~finite, 0).sum(-1)) / finite.sum(-1)
            per = (1 - label_smoothing) * nll + label_smoothing * smooth
            return per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per
        return F.cross_entropy(logits, output.target, reduction=reduction)

    def compute_loss(self, x: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.loss(self(x, target), **kwargs)

    # ------------------------------------------------------------------ inference (full classifier)
    def class_weights(self) -> torch.Tensor:
        """(N, d) view of the real classes."""
        return self.weight.reshape(-1, self.in_features)[: self.num_labels]

    def full_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., N) logits of every class (scaled cosines without margin when a margin is set)."""
        flat, lead = self._flat(x)
        out = self._scores(flat, self.class_weights())
        if self.margin is not None:
            out = out * self.margin.s
        return out.reshape(*lead, self.num_labels)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(upcast(self.full_logits(x)), -1)

    def _topk_flat(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of the full classifier's logits, chunked over classes (B x N scores never coexist).

        Values are logits (scaled cosines under a margin), like a dense classifier's ``topk``; the
        softmax normaliser would cost more than the matmul itself. ``log_prob`` gives normalised values.
        """
        w = self.class_weights()
        scale = self.margin.s if self.margin is not None else None
        best_v = best_i = None
        for start in range(0, self.num_labels, self.chunk_size):
            s = upcast(self._scores(x, w[start : start + self.chunk_size]))
            kk = min(k, s.shape[1])
            v, i = s.topk(kk, dim=1)
            i = i + start
            if best_v is None:
                best_v, best_i = v, i
            else:
                v, pos = torch.cat([best_v, v], 1).topk(min(k, best_v.shape[1] + kk), dim=1)
                best_i, best_v = torch.cat([best_i, i], 1).gather(1, pos), v
        return (best_v * scale if scale is not None else best_v), best_i
