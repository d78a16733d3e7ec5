"""timm model names for MHE variants (``resnet50_mhp``, ``convnext_tiny_mhs``, ...) via ``@register_model``.

Importing ``timm_ext`` registers them, so stock timm tools (``timm.create_model``, timm's ``train.py`` /
``validate.py`` through ``python -m timm_ext.stock``) build them by name; head options arrive as model
kwargs (``--model-kwargs head_sizes=[61,62] small_stem=True``). Their ``forward`` returns full-class
log-probabilities (B, N), so timm's own CrossEntropy / LabelSmoothing / SoftTarget (mixup) losses on them are
exactly the MHE product loss with per-head smoothing / mixed digits when prod C_h = N (renormalised over
the N valid ids when prod C_h > N). This materialises B x N scores: fine for 1k-100k classes; for extreme N
use ``mhe-timm-train``, which trains through ``compute_loss``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from timm.models import register_model

from .model import MHEClassifier, create_model

#: backbones registered out of the box (any other: ``register_mhe_variant(name, head)``)
BACKBONES = (
    "resnet10t",
    "resnet18",
    "resnet50",
    "convnext_atto",
    "convnext_tiny",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "efficientnet_b0",
    "mobilenetv3_large_100",
)
MHE_HEADS = ("mhp", "mhc", "mhs")


def register_mhe_variant(backbone: str, head: str) -> Callable[..., MHEClassifier]:
    """Register ``f"{backbone}_{head}"`` as a timm model name; returns the entrypoint."""
    if head not in MHE_HEADS:
        raise ValueError(f"head must be one of {MHE_HEADS}, got {head!r}")

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> MHEClassifier:
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        return create_model(backbone, head=head, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = f"{backbone}_{head}"
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm `{backbone}` with an MHE {head.upper()} head (see timm_ext.registry)."
    setattr(sys.modules[__name__], entrypoint.__name__, entrypoint)
    return register_model(entrypoint)


for _b in BACKBONES:
    for _h in MHE_HEADS:
        register_mhe_variant(_b, _h)
