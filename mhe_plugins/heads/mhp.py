"""MHP, multi-head product: one ``Linear(d, sum C_h)``, one loss per head, exact product decoding.

Parameters d * sum(C_h) instead of d * N (N = 1M, two heads of 1000: 2000 outputs instead of 1M).
The model's distribution over ids is the product of the per-head softmaxes, so
log p(id) = sum_h log_softmax_h[digit_h] (renormalised over ids < N when prod C_h > N).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_class_ids, check_soft_target
from ..codec import LabelCodec
from ..decode import full_product_scores, log_valid_mass, product_topk
from .base import HeadOutput, MHEHead, check_smoothing, reduce_loss, upcast

__all__ = ["MHPHead", "LOSS_VARIANTS", "per_head_smoothing"]

LOSS_VARIANTS = ("ce_sum", "joint_softmax", "bce")


def per_head_smoothing(label_smoothing: float, num_heads: int) -> float:
    """eps_h = 1 - (1 - eps)^(1/H): H heads each keeping 1 - eps_h leave the true id exactly 1 - eps."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return 1.0 - (1.0 - float(label_smoothing)) ** (1.0 / int(num_heads))


class MHPHead(MHEHead):
    """Loss keywords: ``label_smoothing``, ``smoothing`` (see :mod:`.base`), ``variant`` (one of
    ``LOSS_VARIANTS``), ``ignore_index``, ``reduction``, ``head_weights``; ``target`` is ids or H soft
    per-head distributions (mixup/cutmix)."""

    kind = "mhp"

    def __init__(self, in_features: int, codec: LabelCodec, bias: bool = True):
        super().__init__(in_features, codec)
        self.proj = nn.Linear(in_features, sum(codec.head_sizes), bias=bias)

    def extra_repr(self) -> str:
        return f"head_sizes={list(self.codec.head_sizes)}, num_labels={self.num_labels}"

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-head logits, a tuple of H tensors (..., C_h): the fast path (decoders, exports)."""
        return tuple(self.proj(self._cast(x)).split(list(self.codec.head_sizes), dim=-1))

    def _forward(
        self,
        x: torch.Tensor,
        target,
        label_smoothing: float = 0.0,
        smoothing: str = "head",
        variant: str = "ce_sum",
        ignore_index: int | None = None,
        reduction: str = "mean",
        head_weights: Sequence[float] | None = None,
    ) -> HeadOutput:
        eps = check_smoothing(label_smoothing, smoothing)
        logits = self.logits(x)
        hard = isinstance(target, torch.Tensor)
        if smoothing == "label" and hard and variant == "ce_sum" and head_weights is None:
            loss = self.token_smoothed_loss(logits, target, eps, ignore_index, reduction)
        else:
            if smoothing == "label":  # H heads each keeping 1 - eps_h leave the true id 1 - eps
                eps = per_head_smoothing(eps, self.codec.num_heads)
            loss = self.loss_from_logits(logits, target, variant, eps, ignore_index, reduction, head_weights)
        lp = self.target_log_prob_from_logits(logits, target, ignore_index) if hard else None
        return HeadOutput(loss, lp)

    def target_log_prob_from_logits(
        self, logits: Sequence[torch.Tensor], target: torch.Tensor, ignore_index: int | None = None
    ) -> torch.Tensor:
        """Exact log p(target) under the renormalised product (0 where ``target == ignore_index``)."""
        target = check_class_ids(target, self.num_labels, allow=ignore_index)
        keep = None if ignore_index is None else target != ignore_index
        tgt = target if keep is None else target.masked_fill(~keep, 0)
        lps = [F.log_softmax(upcast(z), -1) for z in logits]
        digits = self.codec.encode(tgt)
        lp = sum(q.gather(-1, digits[..., h : h + 1]).squeeze(-1) for h, q in enumerate(lps))
        if self.codec.capacity > self.num_labels:
            lp = lp - log_valid_mass(lps, self.codec)
        return lp if keep is None else lp * keep

    def target_log_prob(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.target_log_prob_from_logits(self.logits(x), target)

    # ------------------------------------------------------------------ loss
    def digit_targets(
        self,
        target: torch.Tensor | Sequence[torch.Tensor],
        label_smoothing: float = 0.0,
        lead: tuple[int, ...] | None = None,
    ) -> list[torch.Tensor] | torch.Tensor:
        """Global ids -> digits (..., H); soft per-head targets are checked, smoothed, returned as a list.

        Each soft target must be ``lead + (C_h,)`` (``lead`` defaults to head 0's), non-negative, rows
        summing to 1: a wrong shape would broadcast and a row summing to 2 would silently double a loss.
        """
        if isinstance(target, torch.Tensor):
            return self.codec.encode(check_class_ids(target, self.num_labels))
        soft = list(target)
        if len(soft) != self.codec.num_heads:
            raise ValueError(f"expected {self.codec.num_heads} soft digit targets, got {len(soft)}")
        if lead is None:
            lead = tuple(getattr(soft[0], "shape", (0,))[:-1])
        for h, (q, c) in enumerate(zip(soft, self.codec.head_sizes)):
            check_soft_target(q, c, tuple(lead), f"soft target of head {h} (size {c})")
        if label_smoothing:
            soft = [(1 - label_smoothing) * q + label_smoothing / q.shape[-1] for q in soft]
        return soft

    def loss_from_logits(
        self,
        logits: Sequence[torch.Tensor],
        target: torch.Tensor | Sequence[torch.Tensor],
        variant: str = "ce_sum",
        label_smoothing: float = 0.0,
        ignore_index: int | None = None,
        reduction: str = "mean",
        head_weights: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Training loss from per-head ``logits`` (:meth:`logits`' output), each head smoothed by eps.

        ``target``: LongTensor (...) of global ids, or H soft digit distributions (..., C_h) (mixup/cutmix:
        mixing one-hot digits is exact for the product loss). Variants: ``ce_sum`` = sum_h CE_h (the paper),
        ``joint_softmax`` = one softmax over all sum C_h outputs against the multi-hot digit target (the
        reference's ImageNet loss), ``bce`` = sigmoid BCE averaged over the sum C_h outputs (its CIFAR loss).
        ``ignore_index`` (e.g. padding) items are dropped from sum and mean; ``reduction='none'`` returns
        per-item losses shaped like the target (0 where ignored).
        """
        if variant not in LOSS_VARIANTS:
            raise ValueError(f"variant must be one of {LOSS_VARIANTS}, got {variant!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        sizes = self.codec.head_sizes
        weights = list(head_weights) if head_weights is not None else [1.0] * len(sizes)
        if len(weights) != len(sizes):
            raise ValueError(f"head_weights needs {len(sizes)} values, got {len(weights)}")
        lead = logits[0].shape[:-1]
        rows = math.prod(lead)  # explicit: reshape(-1, C) fails on an empty batch
        flat_logits = [z.reshape(rows, z.shape[-1]) for z in logits]
        mask = None
        if isinstance(target, torch.Tensor):
            target = check_class_ids(target, self.num_labels, allow=ignore_index)
            if target.shape != lead:
                raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(lead)}")
            tgt = target.reshape(-1)
            if ignore_index is not None:
                mask = tgt != ignore_index
                tgt = torch.where(mask, tgt, torch.zeros_like(tgt))
            digits = self.codec.encode(tgt)  # validates ids (ignored items were replaced by 0)
            soft = None
        else:
            soft = [
                q.reshape(rows, q.shape[-1]) for q in self.digit_targets(target, label_smoothing, tuple(lead))
            ]
            digits = None

        if variant == "ce_sum":
            per = 0.0
            for h, (z, w) in enumerate(zip(flat_logits, weights)):
                if soft is None:
                    ce = F.cross_entropy(z, digits[:, h], reduction="none", label_smoothing=label_smoothing)
                else:
                    ce = -(soft[h] * F.log_softmax(z, -1)).sum(-1)
                per = per + w * ce
        else:
            cat = torch.cat(flat_logits, -1)
            if soft is None:
                soft = []
                for h, c in enumerate(sizes):
                    q = F.one_hot(digits[:, h], c).to(cat.dtype)
                    if label_smoothing:
                        q = (1 - label_smoothing) * q + label_smoothing / c
                    soft.append(q)
            q_cat = torch.cat([w * q for w, q in zip(weights, soft)], -1)
            if variant == "joint_softmax":
                per = -(q_cat * F.log_softmax(cat, -1)).sum(-1)
            else:
                per = F.binary_cross_entropy_with_logits(cat, q_cat.clamp(0, 1), reduction="none").mean(-1)
        out = reduce_loss(per, mask, reduction)
        return out.reshape(lead) if reduction == "none" else out

    # ------------------------------------------------------------------ inference
    def head_log_probs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.log_softmax(upcast(z), -1) for z in self.logits(x)]

    def log_prob_from_logits(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Full (..., N) log-probabilities from per-head logits (e.g. a decoder that returns logits)."""
        lps = [F.log_softmax(upcast(z), -1) for z in logits]
        return full_product_scores(lps, self.num_labels) - log_valid_mass(lps, self.codec).unsqueeze(-1)

    def topk_from_logits(self, logits: Sequence[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k (log-probs, ids) from per-head logits (B, C_h), without materialising N.

        Ranking by the sum of raw logits equals ranking by the sum of log-softmaxes (they differ by a
        per-row constant), so the search runs on the logits and the normaliser is subtracted at the end.
        """
        k = self._check_k(k)
        zs = [upcast(z) for z in logits]
        values, ids = product_topk(zs, self.codec, k)
        lse = [torch.logsumexp(z, -1) for z in zs]
        values = values - sum(lse).unsqueeze(-1)
        if self.codec.capacity > self.num_labels:
            lps = [z - c.unsqueeze(-1) for z, c in zip(zs, lse)]
            values = values - log_valid_mass(lps, self.codec).unsqueeze(-1)
        return values, ids

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Full (..., N) log-probabilities: outer sum of the per-head log-softmaxes (materialises N)."""
        return self.log_prob_from_logits(self.logits(x))

    def _topk_flat(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.topk_from_logits(self.logits(x), k)

    def token_smoothed_loss(
        self,
        logits: Sequence[torch.Tensor],
        target: torch.Tensor,
        label_smoothing: float = 0.0,
        ignore_index: int | None = None,
        reduction: str = "sum",
    ) -> torch.Tensor:
        """``ce_sum`` whose smoothing means token-level eps (what fairseq's criterion means).

        Head h's target keeps 1 - eps_h on the true digit and spreads eps_h evenly over the other C_h - 1
        digits (fairseq's ``label_smoothed_nll_loss`` per head), with eps_h = :func:`per_head_smoothing`;
        the product target then gives the true id exactly 1 - eps (``smoothing="head"`` gives every head
        the full eps, i.e. (1 - eps)^H to the true id). ``head(x, y, smoothing="label")`` calls this.
        """
        eps_h = per_head_smoothing(label_smoothing, self.codec.num_heads)
        target = check_class_ids(target, self.num_labels, allow=ignore_index)
        lead = logits[0].shape[:-1]
        if target.shape != lead:
            raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(lead)}")
        tgt = target.reshape(-1)
        mask = None
        if ignore_index is not None:
            mask = tgt != ignore_index
            tgt = torch.where(mask, tgt, torch.zeros_like(tgt))
        digits = self.codec.encode(tgt)
        per = 0.0
        for h, z in enumerate(logits):
            lp = F.log_softmax(upcast(z.reshape(-1, z.shape[-1])), -1)
            u = eps_h / (lp.shape[-1] - 1) if lp.shape[-1] > 1 else 0.0
            nll = -lp.gather(1, digits[:, h : h + 1]).squeeze(1)
            per = per + (1.0 - eps_h - u) * nll - u * lp.sum(-1)
        out = reduce_loss(per, mask, reduction)
        return out.reshape(lead) if reduction == "none" else out
