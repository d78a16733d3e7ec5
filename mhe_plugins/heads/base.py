"""The shape every MHE head shares, modelled on ``nn.AdaptiveLogSoftmaxWithLoss``.

- ``compute_loss(x, target, **kw)``: forward + training loss in one call (what adapters use);
- ``log_prob(x)``: full (..., N) log-probabilities, for moderate N;
- ``topk(x, k)``: ``(values, indices)`` like ``torch.topk`` over the N global ids;
- ``predict(x)``: the top-1 global id.
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

import torch
from torch import nn

from ..checks import as_int
from ..codec import LabelCodec

__all__ = ["MHEHead", "reduce_loss", "upcast"]


def upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for softmax/loss math; fp32/fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class MHEHead(nn.Module, ABC):
    codec: LabelCodec

    def __init__(self, in_features: int, codec: LabelCodec):
        super().__init__()
        if not isinstance(codec, LabelCodec):
            raise TypeError(f"codec must be a LabelCodec, got {type(codec).__name__}")
        self.in_features = as_int(in_features, "in_features", minimum=1)
        self.codec = codec

    @property
    def num_labels(self) -> int:
        return self.codec.num_labels

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

    @abstractmethod
    def compute_loss(self, x: torch.Tensor, target, **kwargs) -> torch.Tensor: ...

    @abstractmethod
    def log_prob(self, x: torch.Tensor) -> torch.Tensor: ...

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
