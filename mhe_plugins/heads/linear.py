"""The dense baselines under the same contract: ``LinearHead`` (one softmax over N, the one-hot-encoding
baseline every toolkit compares against) and ``LinearMultiLabelHead`` (one-vs-all BCE over N, LightXML's
flat baseline), plus ``MultiLabelHead``, the sub-base of every multi-label head.

Multi-label targets are a padded ``LongTensor (B, L)`` of label ids with -1 as padding; ``label_bias``
(B, N) adds external per-label logits (e.g. a lexical score) in training and ranking alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import as_int, check_class_ids
from ..codec import LabelCodec
from ..decode import chunked_topk, in_graph_capture, valid_first_topk
from .base import HeadOutput, MHEHead, check_smoothing, reduce_loss, upcast

__all__ = ["LinearHead", "LinearMultiLabelHead", "MultiLabelHead"]


def _single_head_codec(codec: LabelCodec, name: str) -> LabelCodec:
    if codec.num_heads != 1 or codec.capacity != codec.num_labels:
        raise ValueError(f"{name} is one dense layer over N: its codec is [N], got {list(codec.head_sizes)}")
    return codec


class LinearHead(MHEHead):
    """``Linear(d, N)`` + softmax cross-entropy. ``target``: ids, or a soft (..., N) distribution (timm's
    Mixup output). Loss keywords: ``label_smoothing`` (``smoothing`` is moot: one softmax), ``reduction``,
    ``ignore_index``."""

    kind = "linear"

    def __init__(self, in_features: int, codec: LabelCodec, bias: bool = True):
        super().__init__(in_features, _single_head_codec(codec, "LinearHead"))
        self.fc = nn.Linear(in_features, codec.num_labels, bias=bias)

    def extra_repr(self) -> str:
        return f"num_labels={self.num_labels}"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self._cast(x))

    def _forward(
        self,
        x: torch.Tensor,
        target,
        label_smoothing: float = 0.0,
        smoothing: str = "head",
        reduction: str = "mean",
        ignore_index: int | None = None,
    ) -> HeadOutput:
        eps = check_smoothing(label_smoothing, smoothing)
        flat, lead = self._flat(x)
        lp = F.log_softmax(upcast(self.fc(flat)), -1)
        if (
            isinstance(target, torch.Tensor)
            and target.is_floating_point()
            and target.shape[-1:] == (self.num_labels,)
        ):
            q = target.reshape(-1, self.num_labels).to(lp.dtype)
            if eps:
                q = (1 - eps) * q + eps / self.num_labels
            loss = reduce_loss(-(q * lp).sum(-1), None, reduction)
            return HeadOutput(loss.reshape(lead) if reduction == "none" else loss, None)
        target = check_class_ids(target, self.num_labels, allow=ignore_index)
        tgt = target.reshape(-1)
        mask = None if ignore_index is None else tgt != ignore_index
        safe = tgt if mask is None else tgt.masked_fill(~mask, 0)
        own = lp.gather(1, safe[:, None]).squeeze(1)
        per = -(1 - eps) * own - eps * lp.mean(-1) if eps else -own
        loss = reduce_loss(per, mask, reduction)
        own = own if mask is None else own * mask
        return HeadOutput(
            loss.reshape(target.shape) if reduction == "none" else loss, own.reshape(target.shape)
        )

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(upcast(self.logits(x)), -1)

    #: classes per chunk of :meth:`topk` (above it, the top-k and the normaliser come from one chunked pass)
    TOPK_CHUNK = 4096

    def _topk_flat(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k log-probabilities. Up to ``TOPK_CHUNK`` classes (and in traced graphs): top-k of the
        logits minus their log-sum-exp. Above: top-k and log-sum-exp of each class chunk in one pass
        (:func:`~mhe_plugins.decode.chunked_topk`), so no B x N logits exist (1 GB at B = 256, N = 10^6); at
        10^6 classes, B = 128, d = 256 it took about as long as the full-logits path here (1.1-1.6 s each)."""
        if self.num_labels <= self.TOPK_CHUNK or in_graph_capture():
            z = upcast(self.fc(x))  # top-k of the logits, normalised after: no B x N log-softmax is written
            values, ids = z.topk(k, dim=-1)
            return values - torch.logsumexp(z, -1, keepdim=True), ids
        values, ids, lse = chunked_topk(
            x, self.fc.weight, k, bias=self.fc.bias, chunk=self.TOPK_CHUNK, with_logsumexp=True
        )
        return values - lse.unsqueeze(-1), ids


class MultiLabelHead(MHEHead):
    """Sub-base of the multi-label heads: the same contract, with padded label sets as targets.

    ``topk(x, k)`` gives (scores in [0, 1], global ids), -1 ids when fewer than k candidates exist;
    ``predict(x)`` the top-1 id; ``log_prob(x)`` the (B, N) log-scores; ``candidate_scores(x)`` the
    (scores, ids) a head ranks (every label for a dense head, the cascade's candidates for MHC), which
    callers mix with other signals (e.g. neighbour votes).
    """

    def _labels(self, target: torch.Tensor) -> torch.Tensor:
        target = check_class_ids(target, self.num_labels, name="labels", allow=-1)
        if target.dim() != 2:
            raise ValueError(
                f"multi-label targets are (B, L) padded with -1, got shape {tuple(target.shape)}"
            )
        return target

    def target_log_prob(self, x: torch.Tensor, target: torch.Tensor, **bias: Any) -> torch.Tensor:
        """log score of each target label (B, L), 0 on padding."""
        target = self._labels(target)
        lp = self.log_prob(x, **bias).gather(1, target.clamp_min(0))
        return lp.masked_fill(target < 0, 0.0)

    def multi_hot(self, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        target = self._labels(target)
        hot = torch.zeros(target.shape[0], self.num_labels + 1, device=target.device, dtype=dtype)
        hot.scatter_(1, torch.where(target >= 0, target, self.num_labels), 1.0)
        return hot[:, : self.num_labels]

    def candidate_scores(self, x: torch.Tensor, **bias: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int = 5, **bias: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k = as_int(k, "k", minimum=1)
        scores, ids = self.candidate_scores(x, **bias)
        return ranked_candidates(scores, ids, k)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, **bias: Any) -> torch.Tensor:
        return self.topk(x, 1, **bias)[1][:, 0]

    def _topk_flat(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.topk(x, k)


def ranked_candidates(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of (B, M) candidate scores with real ids (>= 0) first whatever the scores; -1 / -1.0 pads."""
    kk = min(k, scores.shape[1])
    vals, pos = valid_first_topk(scores.float(), ids < 0, kk)
    top = ids.gather(1, pos)
    vals = torch.where(top >= 0, vals, torch.full_like(vals, -1.0))
    if kk < k:
        vals = F.pad(vals, (0, k - kk), value=-1.0)
        top = F.pad(top, (0, k - kk), value=-1)
    return vals, top


class LinearMultiLabelHead(MultiLabelHead):
    """``Linear(d, N)`` + one-vs-all BCE (LightXML's flat baseline). Keywords: ``label_bias`` (B, N),
    ``candidate_loss`` (every label is a candidate: ``bce``, or ``softmax`` = per document the mean over
    its positives of -log softmax over all labels, documents without positives adding nothing)."""

    kind = "linear_multilabel"

    def __init__(self, in_features: int, codec: LabelCodec, bias: bool = True):
        super().__init__(in_features, _single_head_codec(codec, "LinearMultiLabelHead"))
        self.fc = nn.Linear(in_features, codec.num_labels, bias=bias)

    def logits(self, x: torch.Tensor, label_bias: torch.Tensor | None = None) -> torch.Tensor:
        z = self.fc(self._cast(x))
        return z if label_bias is None else z + label_bias.to(z.dtype)

    def _forward(
        self,
        x: torch.Tensor,
        target,
        label_bias: torch.Tensor | None = None,
        candidate_loss: str = "bce",
        reduction: str = "mean",
    ) -> HeadOutput:
        z = self.logits(x, label_bias)
        hot = self.multi_hot(target, z.dtype)
        if candidate_loss == "bce":
            loss = reduce_loss(
                F.binary_cross_entropy_with_logits(z, hot, reduction="none").mean(-1), None, reduction
            )
        elif candidate_loss == "softmax":
            npos = hot.sum(1)
            per_doc = -(F.log_softmax(upcast(z), -1) * hot).sum(1) / npos.clamp_min(1.0)
            loss = reduce_loss(per_doc, npos > 0, reduction)
        else:
            raise ValueError(f"candidate_loss must be 'bce' or 'softmax', got {candidate_loss!r}")
        return HeadOutput(loss, compute=lambda: self.target_log_prob(x, target, label_bias=label_bias))

    def log_prob(self, x: torch.Tensor, label_bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.logsigmoid(upcast(self.logits(x, label_bias)))

    def candidate_scores(
        self, x: torch.Tensor, label_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(upcast(self.logits(x, label_bias)))
        ids = torch.arange(self.num_labels, device=scores.device).expand_as(scores)
        return scores, ids
