"""The shape every MHE head shares, modelled on ``nn.AdaptiveLogSoftmaxWithLoss``.

- ``compute_loss(x, target, **kw)``: forward + training loss in one call (what adapters use);
- ``log_prob(x)``: full (..., N) log-probabilities, for moderate N;
- ``topk(x, k)``: ``(values, indices)`` like ``torch.topk`` over the N global ids;
- ``predict(x)``: the top-1 global id.
Inputs may have any leading dims (B, d) or (B, T, d); outputs keep them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

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
        if int(in_features) < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.in_features = int(in_features)
        self.codec = codec

    @property
    def num_labels(self) -> int:
        return self.codec.num_labels

    def _flat(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected features with last dim {self.in_features}, got shape {tuple(x.shape)}"
            )
        return x.reshape(-1, self.in_features), x.shape[:-1]

    @abstractmethod
    def compute_loss(self, x: torch.Tensor, target, **kwargs) -> torch.Tensor: ...

    @abstractmethod
    def log_prob(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _topk_flat(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def _check_k(self, k: int) -> None:
        if not 1 <= int(k) <= self.num_labels:
            raise ValueError(f"k must be in [1, num_labels={self.num_labels}], got {k}")

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_k(k)
        flat, lead = self._flat(x)
        values, indices = self._topk_flat(flat, int(k))
        return values.reshape(*lead, k), indices.reshape(*lead, k)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.topk(x, 1)[1][..., 0]


def reduce_loss(per_item: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce per-item losses; ignored items (mask False) count neither in the sum nor in the mean."""
    if reduction == "none":
        return per_item if mask is None else per_item * mask
    if mask is not None:
        per_item = per_item * mask
        count = mask.sum().clamp_min(1)
    else:
        count = per_item.numel()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "mean":
        return per_item.sum() / count
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
