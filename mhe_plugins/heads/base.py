"""The one call contract every head shares, modelled on ``nn.AdaptiveLogSoftmaxWithLoss``.

- ``head(x, target, **loss_kw) -> HeadOutput(loss, target_log_prob)``: the training loss and the exact
  log p(target) per item (shaped like the target); ``compute_loss`` is ``head(...).loss``;
- ``log_prob(x)``: full (..., N) log-probabilities, for moderate N;
- ``target_log_prob(x, target)``: ``log_prob(x).gather(target)`` without materialising N where possible;
- ``topk(x, k)``: ``(values, indices)`` like ``torch.topk`` over the N global ids;
- ``predict(x)``: the top-1 global id.
Loss keywords every single-label head takes: ``label_smoothing`` (eps), ``smoothing`` (``"head"``: each
head's own cross-entropy is smoothed by eps, the paper's and the default; ``"label"``: the target keeps
exactly 1 - eps on the true label and spreads eps uniformly over the others, what a dense layer's
``label_smoothing`` means and what fairseq users expect; one head or one softmax: the two are the same),
``reduction`` (``mean``/``sum``/``none``). What a fast path needs (per-head logits, teacher-forced levels,
sampled logits) is a named method of each head, never ``forward``.
Inputs may have any leading dims (B, d) or (B, T, d); outputs keep them. Edge cases, on purpose:
- an empty batch (B = 0) gives a loss of 0 that is still connected to the graph (``backward`` works and
  gives zero gradients; ``F.cross_entropy`` would give NaN), and ``topk`` gives (0, k) tensors;
- float features of another dtype than the head (fp16/bf16 into an fp32 head without autocast) are cast
  to the head's dtype instead of failing in the matmul; integer features raise;
- NaN/inf features are not checked on every call (that syncs the device): call ``checks.check_finite``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..checks import as_int, check_class_ids
from ..codec import LabelCodec

__all__ = ["MHEHead", "HeadOutput", "reduce_loss", "upcast", "SMOOTHING"]

SMOOTHING = ("head", "label")


class HeadOutput:
    """``(loss, target_log_prob)`` of ``head(x, target)``, unpackable like a tuple.

    ``target_log_prob`` is exact; heads for which it costs a pass over all N classes (the sampled MHS)
    compute it only when it is first read, so training at 10^7 classes pays nothing for it. ``None`` for
    soft (mixup) targets, which have no single label.
    """

    __slots__ = ("loss", "_lp", "_compute")

    def __init__(
        self,
        loss: torch.Tensor,
        target_log_prob: torch.Tensor | None = None,
        compute: Callable[[], torch.Tensor] | None = None,
    ):
        self.loss, self._lp, self._compute = loss, target_log_prob, compute

    @property
    def target_log_prob(self) -> torch.Tensor | None:
        if self._lp is None and self._compute is not None:
            self._lp, self._compute = self._compute(), None
        return self._lp

    def __iter__(self):
        yield self.loss
        yield self.target_log_prob

    def __repr__(self) -> str:
        return f"HeadOutput(loss={self.loss!r}, target_log_prob={self._lp!r})"


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for softmax/loss math; fp32/fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class MHEHead(nn.Module, ABC):
    """Base of every head (see the module docstring); subclasses implement ``_forward``, ``log_prob`` and
    ``_topk_flat``, and may override ``target_log_prob`` with a cheaper exact version."""

    codec: LabelCodec
    kind: ClassVar[str] = ""

    def __init__(self, in_features: int, codec: LabelCodec):
        super().__init__()
        if not isinstance(codec, LabelCodec):
            raise TypeError(f"codec must be a LabelCodec, got {type(codec).__name__}")
        self.in_features = as_int(in_features, "in_features", minimum=1)
        self.codec = codec

    @property
    def num_labels(self) -> int:
        return self.codec.num_labels

    @staticmethod
    def codec_labels(num_labels: int, options: dict[str, Any]) -> int:
        """How many labels ``build_head`` sizes this head's codec for (all of them, unless a head covers
        some labels outside its codec, as MHC's short list)."""
        return num_labels

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        """Checked features (..., d) in the head's parameter dtype (under autocast the matmul recasts them)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(
                f"features must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}"
            )
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected features with last dim {self.in_features}, got shape {tuple(x.shape)}"
            )
        param = next((p for p in self.parameters() if p.is_floating_point()), None)
        return x if param is None or x.dtype == param.dtype else x.to(param.dtype)

    def _flat(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """(..., d) -> (B, d) in the head's dtype, and the leading shape (explicit B: -1 fails for 0 rows)."""
        x = self._cast(x)
        lead = x.shape[:-1]
        return x.reshape(math.prod(lead), self.in_features), lead

    def forward(self, x: torch.Tensor, target: Any, **loss_kwargs: Any) -> HeadOutput:
        """Training loss and exact log p(target): the one call every adapter makes."""
        return self._forward(x, target, **loss_kwargs)

    @abstractmethod
    def _forward(self, x: torch.Tensor, target: Any, **loss_kwargs: Any) -> HeadOutput: ...

    def compute_loss(self, x: torch.Tensor, target: Any, **loss_kwargs: Any) -> torch.Tensor:
        return self(x, target, **loss_kwargs).loss

    @abstractmethod
    def log_prob(self, x: torch.Tensor) -> torch.Tensor: ...

    def target_log_prob(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Exact log p(target) per item, shaped like ``target`` (default: through :meth:`log_prob`)."""
        target = check_class_ids(target, self.num_labels)
        return self.log_prob(x).gather(-1, target.unsqueeze(-1)).squeeze(-1)

    def classifier_parameters(self) -> int:
        """Parameters of the head (what replaces the d x N output layer)."""
        return sum(p.numel() for p in self.parameters())

    def init_as_output_embedding(self) -> None:
        """Initialise as fairseq initialises an untied output projection: every weight that reads a width-w
        vector ~ N(0, w^-0.5), biases 0 (a named hook, so adapters never touch a head's submodules)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=m.in_features**-0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @abstractmethod
    def _topk_flat(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def _check_k(self, k: int) -> int:
        if not 1 <= as_int(k, "k") <= self.num_labels:
            raise ValueError(f"k must be in [1, num_labels={self.num_labels}], got {k}")
        return int(k)

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._check_k(k)
        flat, lead = self._flat(x)
        values, indices = self._topk_flat(flat, k)
        return values.reshape(*lead, k), indices.reshape(*lead, k)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.topk(x, 1)[1][..., 0]


def check_smoothing(label_smoothing: float, smoothing: str) -> float:
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if smoothing not in SMOOTHING:
        raise ValueError(f"smoothing must be one of {SMOOTHING}, got {smoothing!r}")
    return float(label_smoothing)


def reduce_loss(per_item: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce per-item losses; ignored items (mask False) count neither in the sum nor in the mean.

    No item at all (empty batch, everything ignored): the mean is 0, still attached to the graph.
    """
    if reduction == "none":
        return per_item if mask is None else per_item * mask
    if mask is not None:
        per_item = per_item * mask
        count = mask.sum().clamp_min(1)
    else:
        count = max(per_item.numel(), 1)
    if reduction == "sum":
        return per_item.sum()
    if reduction == "mean":
        return per_item.sum() / count
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
