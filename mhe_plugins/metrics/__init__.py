"""Evaluation metrics every integration reports, so the numbers mean the same thing everywhere (and match
napkinxc / pyxclib for XMC and insightface for verification).

Report functions (:func:`topk_accuracy`, :func:`xmc_metrics`) return percent; the building blocks and the
verification functions return fractions, as napkinxc and insightface do. Ranked predictions are (n, k) ids
best first (negative ids pad short rows; duplicates are rejected); multi-label truth is a scipy.sparse
matrix or lists of ids, and *all* true labels are used. Modules: :mod:`.classification`, :mod:`.ranking`,
:mod:`.verification`; every public name is re-exported here.
"""

from __future__ import annotations

from ._common import ArrayLike as ArrayLike  # type aliases and _best_threshold: kept importable
from .classification import topk_accuracy
from .ranking import (
    Truth as Truth,
)
from .ranking import (
    jain_propensity,
    ndcg_at_k,
    precision_at_k,
    psndcg_at_k,
    psp_at_k,
    xmc_metrics,
)
from .verification import (
    VerificationResult,
    far_thresholds,
    pair_scores,
    tar_at_far,
    verification_accuracy_10fold,
)
from .verification import (
    _best_threshold as _best_threshold,
)

__all__ = [
    "topk_accuracy",
    "precision_at_k",
    "ndcg_at_k",
    "psp_at_k",
    "psndcg_at_k",
    "jain_propensity",
    "xmc_metrics",
    "pair_scores",
    "VerificationResult",
    "verification_accuracy_10fold",
    "far_thresholds",
    "tar_at_far",
]
