"""Exact top-k over the product of heads without materialising the N = prod(C_h) scores.

The score of an id is the sum of its digits' per-head scores. Heads are folded left to right keeping k
candidate prefixes. Keeping the k best prefixes is exact for prefixes whose every completion is a valid id
(exchange argument: k better prefixes with the same suffix would give k better ids). Only one prefix per
level can have invalid completions (ids >= N): the prefix of N-1, the "boundary". It is carried along as a
separate extra candidate, so ids >= N are masked and the result still equals brute force.
Only a head's k best digits can extend a prefix into the top k, so each level costs one top-k over the
head's C_h scores plus a top-k over k*k sums: O(B * (C_h + k^2)) per level, never O(B * N).
Which ids can be returned never depends on the score values: digits that would leave the valid range are
dropped by position, not by a -inf fill (a -inf or NaN score would tie with the fill), so NaN, +-inf or
overflowing scores still give ids < N (their values are then NaN/inf: see ``checks.check_finite``).

:func:`chunked_topk` is the other exact top-k, over the rows of one big classifier (a dense layer, MHS's
class rows): classes in chunks, queries in blocks, so no B x N score tensor exists at 10^6-10^7 classes;
it also gives the exact log-sum-exp of the same scores in the same pass (dense log-probabilities).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import as_int
from .codec import LabelCodec

__all__ = [
    "product_topk",
    "log_valid_mass",
    "full_product_scores",
    "valid_first_topk",
    "merge_topk",
    "chunked_topk",
    "in_graph_capture",
]


def product_topk(
    head_scores: Sequence[torch.Tensor], codec: LabelCodec, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids of ``sum_h head_scores[h][digit_h]`` over ids < N. Scores are (B, C_h); returns (B, k) x2."""
    if len(head_scores) != codec.num_heads:
        raise ValueError(f"expected {codec.num_heads} head score tensors, got {len(head_scores)}")
    if not 1 <= as_int(k, "k") <= codec.num_labels:
        raise ValueError(f"k must be in [1, num_labels={codec.num_labels}], got {k}")
    k = int(k)
    first = head_scores[0]
    b, device, dtype = first.shape[0], first.device, first.dtype
    # non-boundary candidates (all completions valid)
    nb_scores = first.new_zeros((b, 0))
    nb_ids = torch.zeros((b, 0), dtype=torch.long, device=device)
    # boundary candidate: the prefix of N-1 (same id for every row)
    bd_score = first.new_zeros((b,))
    bd_id = 0
    for scores, size, last in zip(head_scores, codec.head_sizes, codec.last_digits):
        if scores.shape != (b, size):
            raise ValueError(f"head scores must have shape ({b}, {size}), got {tuple(scores.shape)}")
        # Only a head's k best digits can extend a prefix into the top k (k better digits would give k
        # better ids), so one top-(k + excluded) per head replaces a top-k over (k x C) combinations.
        excluded = size - last  # digits >= last are not allowed after the boundary prefix
        wide = min(size, k + excluded) if excluded <= k else min(size, k)
        top_v, top_d = scores.topk(wide, dim=1)
        parts_v, parts_i = [], []
        if nb_scores.shape[1]:  # every kept prefix x the head's best digits
            kk = min(k, size)
            ext = (nb_scores.unsqueeze(-1) + top_v[:, None, :kk]).flatten(1)  # flatten: 0 rows are fine
            ext_ids = (nb_ids.unsqueeze(-1) * size + top_d[:, None, :kk]).flatten(1)
            v, pos = ext.topk(min(k, ext.shape[1]), dim=1)
            parts_v.append(v)
            parts_i.append(ext_ids.gather(1, pos))
        if last > 0:  # children of the boundary with a smaller digit have only valid completions
            if excluded <= k:
                # the best allowed digits, in score order: rank by (disallowed, position), which does not
                # depend on the score values (NaN/inf cannot reorder it); a top-k, not a stable sort, so
                # the graph exports to ONNX
                rank = (top_d >= last).to(torch.float32) * wide + torch.arange(wide, device=device)
                pos = rank.topk(min(k, last), dim=1, largest=False).indices
                v, d = top_v.gather(1, pos), top_d.gather(1, pos)
            else:
                v, d = scores[:, :last].topk(min(k, last), dim=1)
            parts_v.append(v + bd_score.unsqueeze(-1))
            parts_i.append(d + bd_id * size)
        if parts_v:
            cand_v, cand_i = torch.cat(parts_v, 1), torch.cat(parts_i, 1)
            nb_scores, pos = cand_v.topk(min(k, cand_v.shape[1]), dim=1)
            nb_ids = cand_i.gather(1, pos)
        bd_score = bd_score + scores[:, last]
        bd_id = bd_id * size + last
    all_scores = torch.cat([nb_scores, bd_score.unsqueeze(-1)], 1)
    all_ids = torch.cat([nb_ids, torch.full((b, 1), bd_id, dtype=torch.long, device=device)], 1)
    values, pos = all_scores.topk(k, dim=1)
    return values.to(dtype), all_ids.gather(1, pos)


def log_valid_mass(head_log_probs: Sequence[torch.Tensor], codec: LabelCodec) -> torch.Tensor:
    """log P(id < N) under the product of per-head distributions, exactly, in O(sum C_h).

    P(id <= M) = sum_h [prod_{j<h} p_j(m_j)] * P_h(d_h < m_h) + prod_j p_j(m_j) with m = digits of M = N-1.
    """
    if codec.capacity == codec.num_labels:
        return head_log_probs[0].new_zeros(head_log_probs[0].shape[:-1])
    prefix = head_log_probs[0].new_zeros(head_log_probs[0].shape[:-1])
    terms = []
    for lp, last in zip(head_log_probs, codec.last_digits):
        if last > 0:
            terms.append(prefix + torch.logsumexp(lp[..., :last], dim=-1))
        prefix = prefix + lp[..., last]
    terms.append(prefix)
    return torch.logsumexp(torch.stack(terms, -1), dim=-1)


def full_product_scores(head_scores: Sequence[torch.Tensor], num_labels: int) -> torch.Tensor:
    """All ``prod C_h`` summed scores (..., N) by an outer sum (row-major = mixed radix), cut to N."""
    out = head_scores[0]
    for s in head_scores[1:]:
        out = (out.unsqueeze(-1) + s.unsqueeze(-2)).flatten(-2)
    return out[..., :num_labels]


def valid_first_topk(
    scores: torch.Tensor, invalid: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (values, positions) along dim 1 of ``scores`` (B, M) with every entry not ``invalid`` ranked
    above every ``invalid`` one, whatever the values: for the ranking NaN becomes the lowest finite value
    and +-inf the extreme finite ones, the mask is -inf below them (a NaN score outranked a -inf mask, a
    -inf score tied with it). Values are returned unchanged (NaN stays NaN: see ``checks.check_finite``).

    Static shapes (k <= M), no sort: it exports to ONNX. A row has invalid entries in its top k only if it
    has fewer than k valid ones.
    """
    lo, hi = torch.finfo(scores.dtype).min, torch.finfo(scores.dtype).max
    key = torch.where(torch.isnan(scores), lo, scores.clamp(lo, hi)).masked_fill(invalid, float("-inf"))
    pos = key.topk(k, dim=1).indices
    return scores.gather(1, pos), pos


def in_graph_capture() -> bool:
    """True while torch.compile, torch.export (ONNX dynamo export) or jit tracing captures a graph: code
    whose loops depend on the batch size must then take one shape-free path (a dynamic batch)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def merge_topk(
    best: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of two (values, ids) candidate lists (B, k1) and (B, k2); ``best`` None = none yet."""
    if best is not None:
        new = (torch.cat([best[0], new[0]], 1), torch.cat([best[1], new[1]], 1))
    v, pos = new[0].topk(min(k, new[0].shape[1]), dim=1)
    return v, new[1].gather(1, pos)


#: scores held at once by :func:`chunked_topk` (a query block x a class chunk, fp32: 64 MiB)
TILE_ELEMENTS = 1 << 24


def chunked_topk(
    x: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    chunk: int = 16384,
    cosine: bool = False,
    scale: float | None = None,
    offset: int = 0,
    with_logsumexp: bool = False,
    tile: int = TILE_ELEMENTS,
) -> tuple[torch.Tensor, ...]:
    """Exact top-k over the rows of ``weight`` (M, d) of the scores ``x @ weight.T (+ bias)`` for ``x``
    (B, d), never holding more than ``tile`` scores: queries in blocks, classes in chunks of ``chunk``
    rows, each chunk's top-k kept and merged once at the end (equal to ``torch.topk`` of the full B x M
    scores, ties aside). ``cosine``: scores are cosines of the normalised vectors; ``scale`` multiplies
    the scores (a margin head's s). Ids are row numbers + ``offset`` (a shard's first global id).

    ``with_logsumexp`` also returns the exact row-wise ``logsumexp`` over all M scores, computed in the
    same pass (what turns top-k logits into exact log-probabilities without a B x M log-softmax).
    Returns (values (B, k') fp32, ids (B, k') int64[, lse (B,)]) with k' = min(k, M).
    """
    b, m = x.shape[0], weight.shape[0]
    kk = min(int(k), m)
    # traced/exported graphs (dynamic batch): one query block, no Python branch or loop on the batch size
    traced = in_graph_capture()
    if m == 0 or (not traced and b == 0):
        out = (x.new_zeros(b, kk, dtype=torch.float32), torch.zeros(b, kk, dtype=torch.long, device=x.device))
        return (*out, x.new_full((b,), float("-inf"), dtype=torch.float32)) if with_logsumexp else out
    chunk = max(1, min(int(chunk), m))
    if cosine:
        x = torch.nn.functional.normalize(x, dim=-1)
    vals, ids, lses = [], [], []
    blocks = [x] if traced else x.split(max(1, min(b, tile // chunk)))
    for xb in blocks:
        # a running top-k and logsumexp, and one reused score buffer: per-chunk results kept in lists until
        # the end, between (B, chunk) score tensors allocated afresh, fragmented the heap (PFC's exact
        # top-5 at 10^7 classes grew past 20 GiB of RSS over 2,442 chunks)
        best, lse = None, None
        buf = None if traced else xb.new_empty((xb.shape[0], chunk), dtype=torch.float32)
        for c0 in range(0, m, chunk):
            w = weight[c0 : c0 + chunk]
            if cosine:
                w = torch.nn.functional.normalize(w, dim=-1)
            out = (
                buf if buf is not None and w.shape[0] == chunk and xb.dtype == w.dtype == buf.dtype else None
            )
            if bias is not None:
                z = torch.addmm(bias[c0 : c0 + chunk].to(xb.dtype), xb, w.t(), out=out)
            else:
                z = torch.mm(xb, w.t(), out=out)
            if z.dtype in (torch.float16, torch.bfloat16):
                z = z.float()
            if scale is not None:
                z.mul_(scale)
            v, i = z.topk(min(kk, z.shape[1]), dim=1)
            best = merge_topk(best, (v, i + (c0 + offset)), kk)
            if with_logsumexp:
                part = torch.logsumexp(z, 1)
                lse = part if lse is None else torch.logaddexp(lse, part)
        vals.append(best[0])
        ids.append(best[1])
        if with_logsumexp:
            lses.append(lse)
    out = (torch.cat(vals), torch.cat(ids))
    return (*out, torch.cat(lses)) if with_logsumexp else out
