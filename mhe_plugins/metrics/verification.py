"""Face-verification metrics: pair cosine scores, LFW-protocol 10-fold accuracy, TAR at a FAR.

Why here: insightface's evaluation conventions (folds, thresholds) are reproduced once, exactly, so the
face trainer, its eval CLI and the benchmark all report the same numbers (fractions in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from ._common import ArrayLike, _check_k, _to_numpy

__all__ = [
    "pair_scores",
    "VerificationResult",
    "verification_accuracy_10fold",
    "far_thresholds",
    "tar_at_far",
]


def pair_scores(embeddings1: ArrayLike, embeddings2: ArrayLike) -> np.ndarray:
    """Cosine similarity of paired rows (higher = more similar).

    Equivalent to insightface's squared L2 distance of normalised embeddings (d² = 2 - 2 cos), with
    the sign flipped so every verification function here thresholds "score >= t means same".
    """
    e1 = _to_numpy(embeddings1, "embeddings1").astype(np.float64)
    e2 = _to_numpy(embeddings2, "embeddings2").astype(np.float64)
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise ValueError(
            f"embeddings must be two (n, d) arrays of one shape, got {tuple(e1.shape)} and {tuple(e2.shape)}"
        )
    n1 = np.linalg.norm(e1, axis=1)
    n2 = np.linalg.norm(e2, axis=1)
    zero = (n1 == 0) | (n2 == 0)
    if zero.any():
        raise ValueError(
            f"embedding pair {int(np.nonzero(zero)[0][0])} has a zero vector; cosine is undefined"
        )
    return np.einsum("nd,nd->n", e1, e2) / (n1 * n2)


def _check_pairs(scores: Any, issame: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _to_numpy(scores, "scores").astype(np.float64).ravel()
    same = _to_numpy(issame, "issame").ravel()
    if s.size != same.size:
        raise ValueError(f"scores has {s.size} entries but issame has {same.size}")
    if same.dtype != bool:
        if not np.all(np.isin(same, (0, 1))):
            raise ValueError(f"issame must be boolean (or 0/1), got values {np.unique(same)[:5]}")
        same = same.astype(bool)
    bad = ~np.isfinite(s)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise ValueError(f"score of pair {i} is not finite: {s[i]}")
    return s, same


class VerificationResult(NamedTuple):
    """Result of :func:`verification_accuracy_10fold` (fractions, as insightface reports them)."""

    accuracy_mean: float
    accuracy_std: float
    thresholds: np.ndarray  # (nfolds,) best threshold chosen on each fold's training part
    fold_accuracies: np.ndarray  # (nfolds,) held-out accuracy of each fold


def _best_threshold(s: np.ndarray, same: np.ndarray) -> float:
    """Threshold maximising accuracy of 'score >= t' over all distinct cut points (exact, O(n log n)).

    Cut points are mid-points between consecutive distinct scores (plus ±inf), so no score sits on a
    threshold. Among equally accurate cuts the lowest is taken (as insightface's argmax over its
    ascending grid does).
    """
    order = np.argsort(s, kind="stable")
    ss, yy = s[order], same[order]
    n = ss.size
    # cut i predicts 'same' for ss[i:]; correct = impostors below + genuines at/above
    imp_below = np.concatenate([[0], np.cumsum(~yy)])
    gen_above = yy.sum() - np.concatenate([[0], np.cumsum(yy)])
    correct = imp_below + gen_above
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = ss[1:] > ss[:-1]
    i = int(np.argmax(np.where(valid, correct, -1)))
    if i == 0:
        return -np.inf
    if i == n:
        return np.inf
    return float((ss[i - 1] + ss[i]) / 2.0)


def verification_accuracy_10fold(
    scores_or_embeddings1: ArrayLike,
    embeddings2: ArrayLike | None = None,
    issame: ArrayLike | None = None,
    nfolds: int = 10,
) -> VerificationResult:
    """LFW-protocol 1:1 verification accuracy (insightface ``evaluate``): k contiguous folds, the best
    threshold is chosen on the other k-1 folds and applied to the held-out one.

    Pass either pair similarity scores and ``issame`` (``f(scores, issame)`` works too), or two (n, d)
    embedding arrays and ``issame`` (cosine similarity is used). Unlike insightface's fixed 0.01 distance grid, the threshold
    search is exact over all cut points. Folds are contiguous like ``sklearn.model_selection.KFold``
    without shuffling (LFW pair files are ordered by fold).
    """
    if (
        issame is None
        and embeddings2 is not None
        and np.ndim(_to_numpy(scores_or_embeddings1, "scores")) == 1
    ):
        embeddings2, issame = None, embeddings2  # called as (scores, issame)
    if issame is None:
        raise ValueError("verification_accuracy_10fold: issame is required")
    if embeddings2 is None:
        s = scores_or_embeddings1
    else:
        s = pair_scores(scores_or_embeddings1, embeddings2)
    s, same = _check_pairs(s, issame)
    nfolds = _check_k(nfolds, "nfolds")
    if nfolds < 2 or nfolds > s.size:
        raise ValueError(f"nfolds must be in [2, number of pairs={s.size}], got {nfolds}")
    folds = np.array_split(np.arange(s.size), nfolds)  # same fold sizes as KFold(shuffle=False)
    thresholds = np.empty(nfolds)
    accs = np.empty(nfolds)
    for f, test in enumerate(folds):  # nfolds iterations, each fully vectorised
        train = np.ones(s.size, dtype=bool)
        train[test] = False
        t = _best_threshold(s[train], same[train])
        thresholds[f] = t
        accs[f] = np.mean((s[test] >= t) == same[test])
    return VerificationResult(float(accs.mean()), float(accs.std()), thresholds, accs)


def far_thresholds(
    scores: ArrayLike, issame: ArrayLike, far_targets: Iterable[float] = (1e-4, 1e-3, 1e-2)
) -> dict[float, float]:
    """Per target FAR, the lowest threshold t with FAR(t) = #(impostor > t) / #impostors <= target.

    t is the (m+1)-th largest impostor score with m = floor(far · #impostors); pairs are accepted
    iff ``score > t``. Ties: impostors tied at t are all rejected, so the achieved FAR never exceeds
    the target (it can be lower when scores tie). A target below 1/#impostors yields t = the largest
    impostor score (FAR 0); a target >= 1 yields t = -inf.
    """
    s, same = _check_pairs(scores, issame)
    imp = np.sort(s[~same])[::-1]
    if imp.size == 0:
        raise ValueError("far_thresholds needs at least one impostor pair (issame == False)")
    out = {}
    for far in far_targets:
        far = float(far)
        if not 0.0 < far <= 1.0:
            raise ValueError(f"far targets must lie in (0, 1], got {far}")
        m = int(np.floor(far * imp.size * (1.0 + 1e-12)))
        out[far] = float(imp[m]) if m < imp.size else -np.inf
    return out


def tar_at_far(
    scores: ArrayLike, issame: ArrayLike, far_targets: Iterable[float] = (1e-4, 1e-3, 1e-2)
) -> dict[float, float]:
    """TAR (fraction of genuine pairs with score > t) at the thresholds of :func:`far_thresholds`.

    Unlike insightface's IJB script (which reads the ROC point whose FPR is *nearest* the target),
    the threshold here guarantees achieved FAR <= target, the conservative convention.
    """
    s, same = _check_pairs(scores, issame)
    gen = s[same]
    if gen.size == 0:
        raise ValueError("tar_at_far needs at least one genuine pair (issame == True)")
    thr = far_thresholds(s, same, far_targets)
    return {far: float(np.mean(gen > t)) for far, t in thr.items()}
