"""Angular margins on cosine logits (ArcFace / CosFace / SphereFace-style combined), NaN-safe.

``CombinedMargin(m1, m2, m3, s)`` turns the target cosine cos(theta) into cos(m1*theta + m2) - m3 and scales
every logit by s (insightface's (m1, m2, m3) triple: ArcFace = (1, 0.5, 0), CosFace = (1, 0, 0.35)).
Cosines are clamped into [-1+eps, 1-eps] before ``acos`` so neither the value nor its gradient can be NaN.
When m1*theta + m2 would pass pi (the target cosine is no longer monotone there) the additive-margin
fallback ``cos(theta) - m3 - sin(pi - m2) * m2`` of arcface_torch is used.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CombinedMargin", "ArcFaceMargin", "CosFaceMargin"]


class CombinedMargin(nn.Module):
    def __init__(self, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, s: float = 64.0, eps: float = 1e-7):
        super().__init__()
        if s <= 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        if m1 <= 0:
            raise ValueError(f"m1 must be > 0, got {m1}")
        self.m1, self.m2, self.m3, self.s, self.eps = float(m1), float(m2), float(m3), float(s), eps

    def extra_repr(self) -> str:
        return f"m1={self.m1}, m2={self.m2}, m3={self.m3}, s={self.s}"

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        cos_t = cos_t.clamp(-1 + self.eps, 1 - self.eps)
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos_t - self.m3
        theta = torch.acos(cos_t)
        out = torch.cos(self.m1 * theta + self.m2) - self.m3
        if self.m2 > 0 or self.m1 != 1.0:
            limit = (math.pi - self.m2) / self.m1  # m1*theta + m2 <= pi
            fallback = cos_t - self.m3 - math.sin(math.pi - self.m2) * self.m2
            out = torch.where(theta <= limit, out, fallback)
        return out

    def forward(self, cosine: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
        """Cosines (B, K) and the target column per row (B,), -1 = target not among the columns."""
        has = target_index >= 0
        rows = torch.arange(cosine.shape[0], device=cosine.device)[has]
        cols = target_index[has]
        logits = cosine.clamp(-1.0, 1.0)
        if rows.numel():
            logits = logits.clone()
            logits[rows, cols] = self.target_logit(cosine[rows, cols])
        return logits * self.s


class ArcFaceMargin(CombinedMargin):
    def __init__(self, m: float = 0.5, s: float = 64.0):
        super().__init__(1.0, m, 0.0, s)


class CosFaceMargin(CombinedMargin):
    def __init__(self, m: float = 0.35, s: float = 64.0):
        super().__init__(1.0, 0.0, m, s)
