"""Evaluation metrics shared by every integration, vectorised with numpy / torch / scipy.sparse.

Why one package: the image, XMC and face plugins must report numbers that mean the same thing
everywhere (and that match the community's reference implementations, napkinxc / pyxclib for XMC
and insightface for face verification), so they all call these functions instead of re-deriving them.

Units: the two *report* functions, :func:`topk_accuracy` and :func:`xmc_metrics`, return percent
(0-100). The building blocks (:func:`precision_at_k`, :func:`ndcg_at_k`, :func:`psp_at_k`,
:func:`psndcg_at_k`) and the verification functions return fractions in [0, 1], as napkinxc and
insightface do.

Input conventions
-----------------
* Tensors may live on any device; they are detached and copied to host memory when numpy is needed
  (:func:`topk_accuracy` on logits stays on the tensor's device).
* Ranked predictions: an (n, k) integer array (best first). Rows with fewer than k valid ids are
  padded with ``-1`` (or any negative id); a list of ranked id lists of varying lengths is also
  accepted. Missing positions count as misses. Duplicate ids within a row are rejected (they would
  inflate P@k).
* Multi-label truth: a scipy.sparse matrix (n, L) whose non-zero entries mark relevant labels (it
  is converted to CSR, explicit zeros are dropped) or a list of n label-id lists. *All* true labels
  are used (no truncation to a fixed number of labels).

Modules: :mod:`.classification` (top-k accuracy), :mod:`.ranking` (P/nDCG/PSP@k, propensities),
:mod:`.verification` (10-fold accuracy, TAR@FAR, pair scores); every public name is re-exported here.
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
