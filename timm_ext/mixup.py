"""Mixup / CutMix for MHE heads: timm mixes the images, we mix one-hot *digits* per head.

For the product (ce_sum) loss this is exact: with t = lam*e_a + (1-lam)*e_b over the N classes,
-sum_y t_y log p(y) = sum_h -sum_c t_h[c] log p_h(c) where t_h = lam*e_{a_h} + (1-lam)*e_{b_h}, so no N-sized
target is ever built. Label smoothing is applied per head (timm's N-class smoothing on a product
distribution also equals per-head smoothing when prod C_h = N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import Mixup

from mhe_plugins import LabelCodec

SOFT_TARGET_HEADS = ("linear", "mhp")


def check_mixup_support(head: str, mixup: float, cutmix: float) -> None:
    if (mixup > 0 or cutmix > 0) and head not in SOFT_TARGET_HEADS:
        raise ValueError(
            f"--mixup/--cutmix are not supported with --head {head}: "
            + (
                "the MHC cascade is teacher-forced on one hard ground-truth path per sample"
                if head == "mhc"
                else "MHS samples the ground-truth group of one hard label per sample"
            )
            + f"; use one of {SOFT_TARGET_HEADS} or drop mixing"
        )


class DigitMixup(Mixup):
    """timm ``Mixup`` whose targets are H soft digit distributions (B, C_h) instead of (B, N)."""

    def __init__(self, codec: LabelCodec, **mixup_kwargs):
        mixup_kwargs.setdefault("num_classes", codec.num_labels)
        super().__init__(**mixup_kwargs)
        self.codec = codec

    def digit_targets(self, target: torch.Tensor, lam: float | torch.Tensor) -> list[torch.Tensor]:
        digits = self.codec.encode(target)
        out = []
        for h, c in enumerate(self.codec.head_sizes):
            eps = self.label_smoothing
            q = F.one_hot(digits[:, h], c).float() * (1 - eps) + eps / c
            out.append(q * lam + q.flip(0) * (1 - lam))  # timm pairs sample i with B-1-i in every mode
        return out

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        if len(x) % 2:
            raise ValueError(f"mixup/cutmix needs an even batch size, got {len(x)}")
        if self.mode == "elem":
            lam = self._mix_elem(x)
        elif self.mode == "pair":
            lam = self._mix_pair(x)
        else:
            lam = self._mix_batch(x)
        return x, self.digit_targets(target, lam)
