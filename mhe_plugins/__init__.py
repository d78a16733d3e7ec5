"""mhe-plugins core: Multi-Head Encoding (MHP / MHC / MHS) for classifiers with 10^4-10^7 classes.

Data flow: label id -> ``LabelCodec`` digits -> head (``MHPHead`` | ``MHCHead`` | ``MHSHead``) -> loss in
training; features -> head ``topk`` / ``predict`` / ``log_prob`` -> global ids -> ``metrics`` at test.
"""

from . import metrics
from .checks import check_finite
from .codec import LabelCodec, group_split
from .decode import log_valid_mass, product_topk
from .heads import (
    HEADS,
    HeadOutput,
    LinearHead,
    LinearMultiLabelHead,
    MHCHead,
    MHCMultiLabelHead,
    MHCMultiLabelOutput,
    MHCOutput,
    MHEHead,
    MHPHead,
    MHSHead,
    MHSOutput,
    MultiLabelHead,
    build_head,
    pad_labels,
)
from .margins import ArcFaceMargin, CombinedMargin, CosFaceMargin

__version__ = "0.1.0"

__all__ = [
    "LabelCodec",
    "group_split",
    "product_topk",
    "log_valid_mass",
    "MHEHead",
    "HeadOutput",
    "MultiLabelHead",
    "LinearHead",
    "LinearMultiLabelHead",
    "HEADS",
    "build_head",
    "MHPHead",
    "MHCHead",
    "MHCOutput",
    "MHSHead",
    "MHSOutput",
    "MHCMultiLabelHead",
    "MHCMultiLabelOutput",
    "pad_labels",
    "metrics",
    "check_finite",
    "CombinedMargin",
    "ArcFaceMargin",
    "CosFaceMargin",
]
