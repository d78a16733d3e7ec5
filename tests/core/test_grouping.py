"""Cascade label orders: frequency short list first, tail groups that are exactly the codec's blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mhe_plugins import LabelCodec
from mhe_plugins.grouping import (
    balanced_kmeans,
    balanced_tree_order,
    cascade_order,
    frequency_order,
    tree_levels,
)


def test_frequency_order_breaks_ties_by_id():
    assert frequency_order([3, 9, 3, 0, 9]).tolist() == [1, 4, 0, 2, 3]


def test_balanced_kmeans_finds_separated_clusters_in_exact_blocks():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 10
    truth = rng.permutation(np.repeat(np.arange(4), [10, 10, 10, 7]))  # 37 = 3 blocks of 10 + 7
    x = centers[truth] + rng.normal(size=(37, 8)) * 0.1
    got = balanced_kmeans(x, 4, seed=1)
    assert np.bincount(got).tolist() == [10, 10, 10, 7]
    # the same partition as the truth (cluster ids may differ)
    pairs = {(int(a), int(b)) for a, b in zip(got, truth)}
    assert len(pairs) == 4


def test_cascade_order_puts_frequent_first_and_clusters_in_codec_blocks():
    rng = np.random.default_rng(1)
    n, k, g = 50, 8, 5  # tail of 42: blocks of 9, 9, 9, 9, 6
    counts = rng.permutation(np.arange(1, n + 1) * 7)
    tail = frequency_order(counts)[k:]
    truth = np.zeros(n, dtype=int)
    truth[tail] = rng.permutation(np.repeat(np.arange(g), [9, 9, 9, 9, 6]))
    vectors = np.eye(g)[truth] * 5 + rng.normal(size=(n, g)) * 0.01
    order = cascade_order(counts, k, g, vectors)
    assert sorted(order.tolist()) == list(range(n))
    assert order[:k].tolist() == frequency_order(counts)[:k].tolist()
    codec = LabelCodec.from_spec(n - k, num_groups=g)
    assert codec.head_sizes == (5, 9)
    blocks = [order[k + i : k + i + 9] for i in range(0, n - k, 9)]
    for b in blocks:  # every codec block is one cluster, frequency-sorted inside
        assert len({int(truth[i]) for i in b}) == 1
        assert np.all(np.diff(counts[b]) < 0)
    assert cascade_order(counts, k, g).tolist() == frequency_order(counts).tolist()
    with pytest.raises(ValueError, match="shortlist=50 must be smaller"):
        cascade_order(counts, 50, g)
    with pytest.raises(ValueError, match="one row per label"):
        cascade_order(counts, k, g, vectors[:-1])


def test_cascade_order_pins_reserved_labels_at_the_front_of_the_short_list():
    rng = np.random.default_rng(2)
    n, k, g = 40, 8, 4
    counts = rng.permutation(np.arange(1, n + 1) * 3).astype(float)
    counts[[0, 1]] = 0  # reserved ids that never occur (fairseq's <s>, <pad>) would land in the tail
    vectors = rng.normal(size=(n, 3))
    for vec in (None, vectors):
        order = cascade_order(counts, k, g, vec, first=[0, 1, 2, 3])
        assert sorted(order.tolist()) == list(range(n))
        assert order[:4].tolist() == [0, 1, 2, 3]
        rest = [i for i in frequency_order(counts).tolist() if i > 3][: k - 4]
        assert order[4:k].tolist() == rest  # then the most frequent of the others
    with pytest.raises(ValueError, match="need shortlist >= 4"):
        cascade_order(counts, 3, g, first=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="distinct ids"):
        cascade_order(counts, k, g, first=[0, 0])
    with pytest.raises(ValueError, match="distinct ids"):
        cascade_order(counts, k, g, first=[n])


def _tree_data(rng, depth: int, leaf: int, noise: float):
    """Labels at the leaves of a binary tree of ``depth`` levels (``leaf`` labels per leaf node): each
    node adds a vector that halves in scale with depth, so subtrees are clusters at every level."""
    n_leaves = 2**depth
    vec = np.zeros((n_leaves, 16))
    for level in range(depth):
        nodes = rng.normal(size=(2 ** (level + 1), 16)) * 4.0 / 2**level
        vec += nodes[np.arange(n_leaves) // 2 ** (depth - level - 1)]
    truth = rng.permutation(np.repeat(np.arange(n_leaves), leaf))
    return vec[truth] + rng.normal(size=(len(truth), 16)) * noise, truth


def test_balanced_tree_order_makes_leaf_blocks_and_subtree_blocks():
    rng = np.random.default_rng(0)
    x, truth = _tree_data(rng, depth=6, leaf=8, noise=0.05)  # 64 leaves x 8 labels
    order = balanced_tree_order(x, 8, seed=3)
    assert sorted(order.tolist()) == list(range(len(truth)))
    leaves = truth[order].reshape(64, 8)
    assert (leaves == leaves[:, :1]).all()  # every block of 8 consecutive codes is one leaf
    quads = (truth[order] // 4).reshape(16, 32)  # and every aligned block of 32 one subtree of 4 leaves
    assert (quads == quads[:, :1]).all()


@pytest.mark.parametrize("n,leaf", [(1003, 8), (7, 8), (9, 8), (100, 1)])
def test_balanced_tree_order_is_a_permutation_at_any_size(n, leaf):
    x = np.random.default_rng(1).normal(size=(n, 4))
    levels = []
    order = balanced_tree_order(x, leaf, on_level=lambda: levels.append(1))
    assert sorted(order.tolist()) == list(range(n))
    assert len(levels) == tree_levels(n, leaf)  # the progress total is the number of levels made
    assert order.tolist() == balanced_tree_order(x, leaf).tolist()  # seeded: the same order every time
    with pytest.raises(ValueError, match="needs \\(N, D\\) vectors"):
        balanced_tree_order(x[:, 0], leaf)


def test_balanced_tree_order_stopping_at_a_fixed_point_gives_the_order_of_all_iterations(monkeypatch):
    import mhe_plugins.grouping as grouping

    x = np.random.default_rng(2).normal(size=(3000, 8))
    real_equal = torch.equal
    for balance in (0.5, 0.3):
        stops = []
        with monkeypatch.context() as m:
            m.setattr(grouping.torch, "equal", lambda a, b, s=stops: s.append(real_equal(a, b)) or s[-1])
            early = grouping.balanced_tree_order(x, 8, iters=10, seed=1, balance=balance)
        assert any(stops)  # some level did stop early
        with monkeypatch.context() as m:
            m.setattr(grouping.torch, "equal", lambda a, b: False)  # never a fixed point: all 10 iterations
            every = grouping.balanced_tree_order(x, 8, iters=10, seed=1, balance=balance)
        assert early.tolist() == every.tolist()


def _two_sorts(seg, score):
    """The reference: a stable sort by -score, then a stable sort by segment."""
    by_score = torch.argsort(-score, stable=True)
    return by_score[torch.argsort(seg[by_score], stable=True)]


def test_segment_order_is_the_two_stable_sorts_ties_signed_zeros_and_infinities_included():
    from mhe_plugins.grouping import segment_order

    g = torch.Generator().manual_seed(3)
    seg = torch.randint(0, 50, (5000,), generator=g).sort().values
    score = torch.randn(5000, generator=g)
    score[::7] = torch.round(score[::7])  # many ties
    score[::11] = 0.0
    score[::13] = -0.0
    score[5], score[6] = float("inf"), float("-inf")
    score[7] = torch.finfo(torch.float32).max
    score[8] = -torch.finfo(torch.float32).tiny
    assert torch.equal(segment_order(seg, score), _two_sorts(seg, score))
    shuffled = seg[torch.randperm(5000, generator=g)]  # segments need not be contiguous
    assert torch.equal(segment_order(shuffled, score), _two_sorts(shuffled, score))


@pytest.mark.parametrize("balance", [0.5, 0.3])
def test_label_tree_order_unchanged_by_the_one_sort(monkeypatch, balance):
    from mhe_plugins import grouping

    x = np.random.default_rng(0).normal(size=(3000, 6)).astype(np.float32)
    new = grouping.balanced_tree_order(x, 8, seed=1, balance=balance)
    monkeypatch.setattr(grouping, "segment_order", _two_sorts)
    assert np.array_equal(new, grouping.balanced_tree_order(x, 8, seed=1, balance=balance))
