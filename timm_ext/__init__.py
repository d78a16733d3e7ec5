"""timm integration of Multi-Head Encoding: MHE heads on any timm backbone, registered timm model names
(``resnet50_mhp`` ...), ``mhe-timm-train`` / ``mhe-timm-validate`` / ``mhe-timm-export`` and the glyph benchmark.

Importing this package registers the MHE model names with timm.
"""

from . import registry  # noqa: F401  (registers resnet50_mhp & co. with timm)
from .model import HEADS, MHEClassifier, build_head, create_model, use_small_input_stem
from .registry import register_mhe_variant

__all__ = [
    "HEADS",
    "MHEClassifier",
    "build_head",
    "create_model",
    "register_mhe_variant",
    "use_small_input_stem",
]
