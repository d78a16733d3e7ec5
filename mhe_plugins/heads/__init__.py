"""Every head under one contract (:mod:`.base`), built through :func:`build_head`."""

from .base import HeadOutput, MHEHead
from .linear import LinearHead, LinearMultiLabelHead, MultiLabelHead
from .mhc import MHCHead, MHCOutput
from .mhc_multilabel import MHCMultiLabelHead, MHCMultiLabelOutput, pad_labels
from .mhp import MHPHead
from .mhs import MHSHead, MHSOutput
from .registry import HEADS, build_head, codec_for, register_head

__all__ = [
    "MHEHead",
    "HeadOutput",
    "MultiLabelHead",
    "LinearHead",
    "LinearMultiLabelHead",
    "MHPHead",
    "MHCHead",
    "MHCOutput",
    "MHSHead",
    "MHSOutput",
    "MHCMultiLabelHead",
    "MHCMultiLabelOutput",
    "pad_labels",
    "HEADS",
    "build_head",
    "codec_for",
    "register_head",
]
