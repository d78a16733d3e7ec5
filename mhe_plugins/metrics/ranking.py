"""Multi-label ranking metrics for XMC: P@k, nDCG@k, PSP@k, PSnDCG@k and Jain et al. propensities.

Why here: they must match napkinxc / pyxclib (tests/core/test_metrics.py cross-checks them), so every
XMC report (trainer, tuner, benchmark) calls these instead of re-deriving them. The building blocks
return fractions in [0, 1]; :func:`xmc_metrics` returns percent.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from ._common import _check_k, _to_numpy

__all__ = ["precision_at_k", "ndcg_at_k", "psp_at_k", "psndcg_at_k", "jain_propensity", "xmc_metrics"]

Truth = sp.spmatrix | sp.sparray | Sequence[Sequence[int]]


def _ranked_ids(pred_ids: Any, k: int) -> np.ndarray:
    """(n, k) int64 ranking, right-padded / truncated to k columns, negatives mean 'no prediction'."""
    if isinstance(pred_ids, (list, tuple)) and any(
        isinstance(r, (list, tuple, np.ndarray)) for r in pred_ids
    ):
        rows = [np.asarray(r, dtype=np.int64).ravel()[:k] for r in pred_ids]
        out = np.full((len(rows), k), -1, dtype=np.int64)
        for i, r in enumerate(rows):  # only for ragged Python input; arrays take the vectorised path
            out[i, : r.size] = r
        return out
    arr = _to_numpy(pred_ids, "pred_ids")
    if arr.ndim != 2:
        raise ValueError(f"pred_ids must be 2-D (n, k) ranked ids, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"pred_ids must hold integer label ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)[:, :k]
    if arr.shape[1] < k:
        arr = np.pad(arr, ((0, 0), (0, k - arr.shape[1])), constant_values=-1)
    arr = np.where(arr < 0, -1, arr)
    _check_no_duplicates(arr)
    return arr


def _check_no_duplicates(arr: np.ndarray) -> None:
    if arr.shape[1] < 2:
        return
    s = np.sort(arr, axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if dup.any():
        row = int(np.nonzero(dup.any(axis=1))[0][0])
        col = int(np.nonzero(dup[row])[0][0])
        raise ValueError(f"pred_ids row {row} repeats label id {int(s[row, col + 1])}; a ranking must not")


def _truth_csr(truth: Truth, num_labels: int | None = None) -> sp.csr_matrix:
    """Binary CSR (n, L) of relevant labels from a sparse matrix or a list of label-id lists."""
    if sp.issparse(truth):
        y = sp.csr_matrix(truth, copy=True)
        y.sum_duplicates()
        y.eliminate_zeros()
        y.data = np.ones_like(y.data, dtype=np.float64)
        return y
    if isinstance(truth, (np.ndarray, torch.Tensor)):
        raise ValueError(
            "truth must be a scipy.sparse matrix (n, L) or a list of label-id lists, "
            f"got a dense {type(truth).__name__} of shape {tuple(truth.shape)}"
        )
    if not isinstance(truth, Iterable):
        raise ValueError(
            f"truth must be a scipy.sparse matrix or a list of label-id lists, got {type(truth)}"
        )
    rows = [t.detach().cpu().ravel().tolist() if isinstance(t, torch.Tensor) else t for t in truth]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    try:
        cols = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    except (TypeError, ValueError) as err:
        raise ValueError(f"truth must be a list of integer label-id lists ({err})") from err
    if cols.size and cols.min() < 0:
        row = int(np.searchsorted(np.cumsum(lengths), np.argmin(cols), side="right"))
        raise ValueError(f"truth row {row} holds negative label id {int(cols.min())}")
    inferred = int(cols.max()) + 1 if cols.size else 0
    n_labels = max(inferred, num_labels or 0)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    y = sp.csr_matrix((np.ones(cols.size), cols, indptr), shape=(len(rows), n_labels))
    y.sum_duplicates()  # a label listed twice is still one relevant label
    y.data[:] = 1.0
    return y


def _hits(pred: np.ndarray, y: sp.csr_matrix, strict_label_space: bool) -> np.ndarray:
    """(n, k) bool: is pred[i, j] a relevant label of sample i (padding never is)."""
    n, k = pred.shape
    if n != y.shape[0]:
        raise ValueError(f"pred_ids has {n} rows but truth has {y.shape[0]} rows")
    num_labels = y.shape[1]
    if strict_label_space and pred.size and pred.max() >= num_labels:
        bad = int(pred.max())
        raise ValueError(
            f"pred_ids holds label id {bad} but truth has only {num_labels} labels (ids 0..{num_labels - 1})"
        )
    valid = (pred >= 0) & (pred < num_labels)
    rows = np.broadcast_to(np.arange(n)[:, None], pred.shape)[valid]
    hits = np.zeros(pred.shape, dtype=bool)
    if rows.size:
        hits[valid] = np.asarray(y[rows, pred[valid]]).ravel() > 0
    return hits


def _prepare(
    pred_ids: Any, truth: Truth, k: int, num_labels: int | None = None
) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray]:
    k = _check_k(k)
    pred = _ranked_ids(pred_ids, k)
    strict = sp.issparse(truth)
    if not strict:  # a list-of-lists label space ends at the largest id seen on either side
        top = int(pred.max()) + 1 if pred.size else 0
        num_labels = max(num_labels or 0, top)
    y = _truth_csr(truth, num_labels)
    return pred, y, _hits(pred, y, strict)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def _row_topk_sorted(y: sp.csr_matrix, values: np.ndarray, k: int) -> np.ndarray:
    """(n, k) per-row largest ``values[label]`` over each row's true labels, descending, zero-padded."""
    n = y.shape[0]
    out = np.zeros((n, k), dtype=np.float64)
    if y.nnz == 0:
        return out
    row_of = np.repeat(np.arange(n), np.diff(y.indptr))
    v = values[y.indices]
    order = np.lexsort((-v, row_of))  # by row, then descending value
    rank = np.arange(y.nnz) - y.indptr[row_of[order]]
    keep = rank < k
    out[row_of[order][keep], rank[keep]] = v[order][keep]
    return out


def _inverse_propensities(propensities: Any, num_labels: int) -> np.ndarray:
    p = _to_numpy(propensities, "propensities").astype(np.float64).ravel()
    if p.size < num_labels:
        raise ValueError(f"propensities has {p.size} entries but the label space has {num_labels} labels")
    bad = ~np.isfinite(p) | (p <= 0)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise ValueError(f"propensities must be finite and > 0, got {p[i]} at label {i}")
    return 1.0 / p


class _Ranked(NamedTuple):
    """Predictions matched against the truth once, so every metric at every k reuses the work."""

    pred: np.ndarray  # (n, kmax) ranked ids, -1 = no prediction
    hits: np.ndarray  # (n, kmax) bool
    y: sp.csr_matrix  # (n, L) binary truth


def _ranked(pred_ids: Any, truth: Truth, kmax: int, propensities: Any | None = None) -> _Ranked:
    n_prop = None if propensities is None else _to_numpy(propensities, "propensities").size
    pred, y, hits = _prepare(pred_ids, truth, kmax, num_labels=n_prop)
    return _Ranked(pred=pred, hits=hits, y=y)


def _precision(r: _Ranked, k: int) -> float:
    if not r.hits.shape[0]:
        return float("nan")
    return float(r.hits[:, :k].sum(axis=1).mean() / k)


def _ideal_dcg(y: sp.csr_matrix, k: int) -> np.ndarray:
    n_true = np.minimum(np.diff(y.indptr), k)
    return np.concatenate([[0.0], np.cumsum(_discounts(k))])[n_true]


def _ndcg(r: _Ranked, k: int) -> float:
    if not r.hits.shape[0]:
        return float("nan")
    dcg = r.hits[:, :k] @ _discounts(k)
    idcg = _ideal_dcg(r.y, k)
    return float(np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0).mean())


def _ps(r: _Ranked, k: int, inv: np.ndarray, top_inv: np.ndarray, discount: bool) -> float:
    """Propensity-scored gain of the ranking over that of the best k-ranking, as dataset sums.

    For PSnDCG napkinxc divides each sample by its ideal binary DCG before summing; that factor
    is shared by a sample's numerator and denominator, so it only re-weights samples.
    ``top_inv`` holds each row's largest inverse propensities over its true labels (>= k columns).
    """
    w = _discounts(k) if discount else np.ones(k)
    gain = np.where(r.hits[:, :k], inv[np.clip(r.pred[:, :k], 0, None)], 0.0) @ w
    best = top_inv[:, :k] @ w
    if discount:
        idcg = _ideal_dcg(r.y, k)
        has = idcg > 0
        gain, best = gain[has] / idcg[has], best[has] / idcg[has]
    total = best.sum()
    return float(gain.sum() / total) if total > 0 else 0.0


def precision_at_k(pred_ids: Any, truth: Truth, k: int) -> float:
    """P@k = mean over samples of |top-k ∩ truth| / k (fraction; samples without labels count as 0)."""
    return _precision(_ranked(pred_ids, truth, k), k)


def ndcg_at_k(pred_ids: Any, truth: Truth, k: int) -> float:
    """nDCG@k with binary gains; ideal DCG uses min(k, |truth|) hits; samples without labels count as 0."""
    return _ndcg(_ranked(pred_ids, truth, k), k)


def psp_at_k(pred_ids: Any, truth: Truth, k: int, propensities: Any) -> float:
    """Propensity-scored P@k, normalised by the best achievable value (pyxclib / napkinxc convention).

    PSP@k = Σ_i Σ_{j<k} hit_ij / p_{pred_ij}  /  Σ_i Σ_{j<k} (j-th largest 1/p over truth_i),
    i.e. a ratio of sums over the data set (not a mean of per-sample ratios). ``propensities`` are
    p_l (e.g. from :func:`jain_propensity`), one per label id.
    """
    r = _ranked(pred_ids, truth, k, propensities)
    inv = _inverse_propensities(propensities, r.y.shape[1])
    return _ps(r, k, inv, _row_topk_sorted(r.y, inv, k), discount=False)


def psndcg_at_k(pred_ids: Any, truth: Truth, k: int, propensities: Any) -> float:
    """Propensity-scored nDCG@k, normalised like :func:`psp_at_k` (ratio of dataset sums)."""
    r = _ranked(pred_ids, truth, k, propensities)
    inv = _inverse_propensities(propensities, r.y.shape[1])
    return _ps(r, k, inv, _row_topk_sorted(r.y, inv, k), discount=True)


def jain_propensity(
    label_frequencies_or_train_truth: Any,
    num_train: int | None = None,
    A: float = 0.55,
    B: float = 1.5,
    num_labels: int | None = None,
) -> np.ndarray:
    """Label propensities of Jain et al. (2016): ``p_l = 1 / (1 + C (N_l + B)^-A)``, ``C = (ln N - 1)(B + 1)^A``.

    The first argument is either a 1-D array of per-label training counts N_l (then ``num_train``
    = N is required) or the training truth (sparse (N, L) or list of label lists; N = its rows).
    ``num_labels`` pads the label space for list input (unseen labels get N_l = 0).
    Typical (A, B): Amazon 0.6/2.6, Wikipedia 0.5/0.4, otherwise 0.55/1.5.
    """
    src = label_frequencies_or_train_truth
    if sp.issparse(src) or (
        isinstance(src, (list, tuple)) and any(isinstance(r, (list, tuple, np.ndarray)) for r in src)
    ):
        y = _truth_csr(src, num_labels)
        counts = np.asarray(y.sum(axis=0), dtype=np.float64).ravel()
        n = y.shape[0] if num_train is None else num_train
    else:
        counts = _to_numpy(src, "label_frequencies").astype(np.float64).ravel()
        if num_train is None:
            raise ValueError("jain_propensity: num_train is required when label frequencies are given")
        if num_labels is not None and num_labels > counts.size:
            counts = np.pad(counts, (0, num_labels - counts.size))
        n = num_train
    if n <= np.e:
        raise ValueError(f"num_train must be > e (C = (ln N - 1)(B+1)^A must be positive), got {n}")
    if counts.size and (counts.min() < 0 or not np.all(np.isfinite(counts))):
        i = int(np.argmin(counts)) if counts.min() < 0 else int(np.nonzero(~np.isfinite(counts))[0][0])
        raise ValueError(f"label frequency of label {i} must be finite and >= 0, got {counts[i]}")
    if counts.size and counts.max() > n:
        i = int(np.argmax(counts))
        raise ValueError(f"label {i} occurs {counts[i]:g} times, more than num_train={n}")
    c = (np.log(n) - 1.0) * (B + 1.0) ** A
    return 1.0 / (1.0 + c * np.exp(-A * np.log(counts + B)))


def xmc_metrics(
    pred_ids: Any,
    truth: Truth,
    ks: Iterable[int] = (1, 3, 5),
    propensities: Any | None = None,
) -> dict[str, float]:
    """P@k and nDCG@k (plus PSP@k and PSnDCG@k when propensities are given) in percent."""
    ks = sorted({_check_k(k, "ks entry") for k in ks})
    if not ks:
        raise ValueError("ks must name at least one k")
    r = _ranked(pred_ids, truth, ks[-1], propensities)
    out: dict[str, float] = {}
    out.update({f"P@{k}": 100.0 * _precision(r, k) for k in ks})
    out.update({f"nDCG@{k}": 100.0 * _ndcg(r, k) for k in ks})
    if propensities is not None:
        inv = _inverse_propensities(propensities, r.y.shape[1])
        top = _row_topk_sorted(r.y, inv, ks[-1])
        out.update({f"PSP@{k}": 100.0 * _ps(r, k, inv, top, discount=False) for k in ks})
        out.update({f"PSnDCG@{k}": 100.0 * _ps(r, k, inv, top, discount=True) for k in ks})
    return out
