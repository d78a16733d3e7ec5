"""Label orders for a cascade (MHC): which labels form the root's short list, how the tail is grouped.

A cascade pays for a label with one decision per level, so *which* labels share a group decides how hard
those decisions are. Frequency bins (consecutive ids of a frequency-sorted vocabulary) ignore what the
labels mean; class-based language models group words whose contexts are alike (Brown et al. 1992) and
lose 5-10 % less perplexity than frequency classes (Zweig & Makarychev 2013). Here the tail is grouped by
balanced k-means over any per-label vectors (e.g. the contexts a token follows, or the output embeddings
of a short dense warm-up): groups of equal size, as the codec's contiguous blocks require.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .checks import as_int
from .codec import group_split

__all__ = [
    "balanced_kmeans",
    "balanced_tree_order",
    "cascade_order",
    "frequency_order",
    "segment_order",
    "tree_levels",
]


def frequency_order(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """Label ids by decreasing count (ties by id): the short list is the first K, the tail frequency bins."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.lexsort((np.arange(len(counts)), -counts))


def _balanced_assign(dist: torch.Tensor, capacity: np.ndarray) -> torch.Tensor:
    """Each row to a cluster, nearest first, cluster c never above ``capacity[c]`` rows (greedy over all
    (row, cluster) pairs by distance; needs sum(capacity) >= rows)."""
    rows, k = dist.shape
    flat = torch.argsort(dist.reshape(-1), stable=True).numpy()
    assign = np.full(rows, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    left = rows
    for idx in flat:
        r, c = divmod(int(idx), k)
        if assign[r] < 0 and load[c] < capacity[c]:
            assign[r], load[c] = c, load[c] + 1
            left -= 1
            if not left:
                break
    return torch.from_numpy(assign)


def balanced_kmeans(
    vectors: np.ndarray | torch.Tensor, groups: int, iters: int = 15, seed: int = 0
) -> np.ndarray:
    """Cluster ids (M,) in ``0 .. groups - 1`` with exactly the codec's block sizes: ceil(M / groups)
    members each, the highest-numbered cluster the remainder. k-means++ seeding, then Lloyd steps whose
    assignment respects the sizes (greedy on the smallest distances). The other ids are arbitrary:
    callers may reorder clusters, keeping the short one last."""
    x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    m = x.shape[0]
    groups = as_int(groups, "groups", minimum=1)
    if x.dim() != 2 or m < groups:
        raise ValueError(
            f"balanced_kmeans needs (M, D) vectors with M >= groups={groups}, got {tuple(x.shape)}"
        )
    per = -(-m // groups)
    if (groups - 1) * per >= m:
        raise ValueError(f"{m} labels cannot fill {groups} blocks of {per}: use fewer groups")
    capacity = np.full(groups, per)
    gen = torch.Generator().manual_seed(seed)
    centers = [x[int(torch.randint(m, (1,), generator=gen))]]
    for _ in range(1, groups):  # k-means++: next seed drawn in proportion to the squared distance
        d2 = torch.cdist(x, torch.stack(centers)).pow(2).min(1).values
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((m,), 1.0 / m)
        centers.append(x[int(torch.multinomial(probs, 1, generator=gen))])
    c = torch.stack(centers)
    assign = torch.full((m,), -1, dtype=torch.long)
    for _ in range(as_int(iters, "iters", minimum=1)):
        new = _balanced_assign(torch.cdist(x, c), capacity)
        if torch.equal(new, assign):
            break
        assign = new
        for g in range(groups):
            members = x[assign == g]
            if len(members):
                c[g] = members.mean(0)
    # exact block sizes: the cluster that least wants its members becomes the short last block
    short = int(np.argmin(np.bincount(assign.numpy(), minlength=groups)))
    capacity[short] = m - (groups - 1) * per
    final = _balanced_assign(torch.cdist(x, c), capacity).numpy()
    relabel = np.array([g for g in range(groups) if g != short] + [short])  # short block gets the last id
    return np.argsort(relabel)[final]


def cascade_order(
    counts: Sequence[float] | np.ndarray,
    shortlist: int,
    groups: int,
    vectors: np.ndarray | None = None,
    seed: int = 0,
    first: Sequence[int] = (),
) -> np.ndarray:
    """``order[position] = label`` for an MHC head with ``shortlist`` root leaves and ``groups`` tail groups.

    The short list is the ``shortlist`` most frequent labels. The tail keeps frequency order inside each
    group; with ``vectors`` (one row per label) the tail groups are balanced k-means clusters of the tail
    labels' vectors (ordered by their total count, the most frequent group first), else frequency bins.
    ``first`` pins labels at positions 0, 1, .. of the short list whatever their counts: a vocabulary
    renumbered to this order keeps its reserved ids (e.g. fairseq's 4 specials) where they were.
    """
    by_freq = frequency_order(counts)
    n = len(by_freq)
    shortlist = as_int(shortlist, "shortlist", minimum=0)
    if shortlist >= n:
        raise ValueError(f"shortlist={shortlist} must be smaller than the number of labels ({n})")
    first = [int(i) for i in first]
    if first:
        if len(first) > shortlist:
            raise ValueError(f"{len(first)} pinned labels need shortlist >= {len(first)}, got {shortlist}")
        if len(set(first)) != len(first) or min(first) < 0 or max(first) >= n:
            raise ValueError(f"pinned labels {first} must be distinct ids in [0, {n})")
        pinned = np.zeros(n, dtype=bool)
        pinned[first] = True
        by_freq = np.concatenate([np.asarray(first, dtype=by_freq.dtype), by_freq[~pinned[by_freq]]])
    short, tail = by_freq[:shortlist], by_freq[shortlist:]
    if vectors is None:
        return by_freq
    vectors = np.asarray(vectors)
    if vectors.shape[0] != n:
        raise ValueError(f"vectors has {vectors.shape[0]} rows, counts {n}: one row per label")
    groups, _ = group_split(len(tail), groups)  # the codec's number of blocks for this tail
    cluster = balanced_kmeans(vectors[tail], groups, seed=seed)
    mass = np.bincount(cluster, weights=np.asarray(counts, dtype=np.float64)[tail], minlength=groups)
    mass[groups - 1] = -np.inf  # the short block stays last (the codec's last group is the partial one)
    rank = np.argsort(np.argsort(-mass, kind="stable"), kind="stable")  # heaviest cluster first
    # stable sort by cluster rank keeps frequency order inside each cluster
    tail = tail[np.argsort(rank[cluster], kind="stable")]
    return np.concatenate([short, tail])


def _segment_means(x: torch.Tensor, seg: torch.Tensor, count: int) -> torch.Tensor:
    """(count, D) mean of the rows of ``x`` in each segment id of ``seg`` (empty segments: 0)."""
    sums = torch.zeros(count, x.shape[1], dtype=x.dtype).index_add_(0, seg, x)
    n = torch.bincount(seg, minlength=count).clamp(min=1)
    return sums / n[:, None]


def tree_levels(n: int, leaf_size: int) -> int:
    """How many levels of 2-way splits :func:`balanced_tree_order` makes for ``n`` labels (a progress total)."""
    return max(0, math.ceil(math.log2(max(1, -(-n // leaf_size)))))


def segment_order(seg: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Positions sorted by ``seg`` ascending, then ``score`` descending, ties by position: the order of a
    stable sort by -score followed by a stable sort by seg, in one sort of an int64 key (the label tree's
    levels at 10^7 labels spent most of their time in the two sorts)."""
    s = torch.where(score == 0, torch.zeros_like(score), score).float()  # -0.0 ties with 0.0, as in a sort
    bits = s.view(torch.int32).long()
    ascending = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # integer order = float order
    key = seg.long() * (1 << 33) + ((1 << 32) - ascending)  # the second part in [2^31, 3 * 2^31]
    return torch.argsort(key, stable=True)


def balanced_tree_order(
    vectors: np.ndarray | torch.Tensor,
    leaf_size: int,
    iters: int = 10,
    seed: int = 0,
    balance: float = 0.5,
    on_level: Callable[[], object] | None = None,
) -> np.ndarray:
    """``order[position] = label`` from recursive balanced 2-means over per-label vectors (e.g. the mean
    input features of each label's examples: PIFA, as Parabel and XR-Linear build their label trees).

    Every split halves a segment at a multiple of ``leaf_size`` (the left part gets ceil(groups / 2)
    blocks), so blocks of ``leaf_size`` consecutive positions are leaves of the tree and any aligned block
    of ``leaf_size * 2^j`` positions is a subtree: codes that follow the labels' structure for an MHE head
    whose digits split positions into such blocks. All segments of a level are split at once
    (vectorised sorts, O(N D) memory), so 10^7 labels take minutes, not the O(N * groups) of
    :func:`balanced_kmeans`. ``on_level`` is called after each level (e.g. a progress bar's update; there
    are :func:`tree_levels` of them).
    """
    x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    leaf_size = as_int(leaf_size, "leaf_size", minimum=1)
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"balanced_tree_order needs (N, D) vectors, got {tuple(x.shape)}")
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    order = torch.arange(n)
    starts = torch.tensor([0])  # segment starts (positions), each segment still to split
    sizes = torch.tensor([n])
    while True:
        split = sizes > leaf_size
        if not bool(split.any()):
            break
        starts, sizes = starts[split], sizes[split]
        groups = -(-sizes // leaf_size)
        left = torch.minimum(leaf_size * (-(-groups // 2)), sizes)
        lo_blocks = torch.clamp(torch.floor(groups * balance), min=1)
        hi_blocks = torch.clamp(groups - lo_blocks, min=1)
        k = starts.numel()
        # the positions of every splitting segment and the segment each belongs to
        seg = torch.repeat_interleave(torch.arange(k), sizes)
        pos = starts[seg] + (
            torch.arange(seg.numel()) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
        )
        members = order[pos]
        xm = x[members]
        # two seeds per segment: random distinct members
        a = (torch.rand(k, generator=gen) * sizes).long()
        b = (a + 1 + (torch.rand(k, generator=gen) * (sizes - 1)).long()) % sizes
        first = sizes.cumsum(0) - sizes  # offset of each segment inside pos
        c1, c2 = xm[first + a], xm[first + b]
        rank_in_seg, last_side = None, None
        for _ in range(max(1, int(iters))):
            diff = c1 - c2  # nearer c1 <=> larger x.(c1 - c2) - (|c1|^2 - |c2|^2) / 2
            score = (xm * diff[seg]).sum(1) - 0.5 * ((c1 * c1).sum(1) - (c2 * c2).sum(1))[seg]
            idx = segment_order(seg, score)  # by segment, best c1 first
            rank_in_seg = torch.empty_like(idx)
            rank_in_seg[idx] = torch.arange(idx.numel()) - first[seg[idx]]
            if balance < 0.5:  # the natural split (members nearer c1), in whole blocks, within the bounds
                near = torch.bincount(seg, weights=(score > 0).double(), minlength=k).round().long()
                blocks = torch.clamp(torch.round(near / leaf_size), lo_blocks, hi_blocks).long()
                left = torch.minimum(blocks * leaf_size, sizes - 1)
            side = (rank_in_seg >= left[seg]).long()  # 0: left part, 1: right part
            if last_side is not None and torch.equal(side, last_side):
                break  # a fixed point: the same parts give the same means, so more iterations change nothing
            last_side = side
            means = _segment_means(xm, seg * 2 + side, 2 * k).view(k, 2, -1)
            c1, c2 = means[:, 0], means[:, 1]
        order[pos[first[seg] + rank_in_seg]] = members
        starts = torch.cat([starts, starts + left])
        sizes = torch.cat([left, sizes - left])
        if on_level is not None:
            on_level()
    return order.numpy()
