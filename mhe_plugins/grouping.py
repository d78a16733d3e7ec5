"""Label orders for a cascade (MHC): which labels form the root's short list, how the tail is grouped.

A cascade pays for a label with one decision per level, so *which* labels share a group decides how hard
those decisions are. Frequency bins (consecutive ids of a frequency-sorted vocabulary) ignore what the
labels mean; class-based language models group words whose contexts are alike (Brown et al. 1992) and
lose 5-10 % less perplexity than frequency classes (Zweig & Makarychev 2013). Here the tail is grouped by
balanced k-means over any per-label vectors (e.g. the contexts a token follows, or the output embeddings
of a short dense warm-up): groups of equal size, as the codec's contiguous blocks require.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .checks import as_int
from .codec import group_split

__all__ = ["balanced_kmeans", "cascade_order", "frequency_order"]


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
) -> np.ndarray:
    """``order[position] = label`` for an MHC head with ``shortlist`` root leaves and ``groups`` tail groups.

    The short list is the ``shortlist`` most frequent labels. The tail keeps frequency order inside each
    group; with ``vectors`` (one row per label) the tail groups are balanced k-means clusters of the tail
    labels' vectors (ordered by their total count, the most frequent group first), else frequency bins.
    """
    by_freq = frequency_order(counts)
    n = len(by_freq)
    shortlist = as_int(shortlist, "shortlist", minimum=0)
    if shortlist >= n:
        raise ValueError(f"shortlist={shortlist} must be smaller than the number of labels ({n})")
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
