"""The scale benchmark's synthetic data: seeded, streamed (chunks equal the whole), the prior and the
permutations exact, and the streaming oracle equal to a brute-force Bayes rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mhe_plugins.bench.scale_data import (
    EVAL,
    TRAIN,
    FeistelPermutation,
    ScaleData,
    zipf_log_prob,
    zipf_rank,
)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000, 4097])
def test_feistel_is_a_bijection_with_its_inverse(n):
    p = FeistelPermutation(n, 1234)
    f = p.fwd(np.arange(n))
    assert sorted(f.tolist()) == list(range(n))
    assert (p.inv(f) == np.arange(n)).all()
    if n > 50:  # pseudo-random, not the identity or a shift
        assert (f != np.arange(n)).mean() > 0.9


def test_same_seed_same_batch_and_chunks_equal_whole():
    d = ScaleData(5000, seed=3)
    x, y, c = d.examples(TRAIN, np.arange(300))
    x2, y2, c2 = ScaleData(5000, seed=3).examples(TRAIN, np.arange(300))
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(c, c2)
    parts = [d.examples(TRAIN, np.arange(a, min(a + 64, 300))) for a in range(0, 300, 64)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    xo = ScaleData(5000, seed=4).examples(TRAIN, np.arange(300))[0]
    assert not torch.equal(xo, x)
    # held-out examples are other draws, with clean labels
    xe, ye, ce = d.examples(EVAL, np.arange(300))
    assert not torch.equal(xe, x) and torch.equal(ye, ce)


def test_epoch_batches_cover_the_training_set_once_and_ranks_split_the_global_batch():
    d = ScaleData(300, train_per_class=2.0, label_noise=0.0)
    order = d.train_order(0)
    assert sorted(order.fwd(np.arange(d.num_train)).tolist()) == list(range(d.num_train))
    whole = list(d.train_batches(0, 40))
    ranks = [list(d.train_batches(0, 40, rank=r, world=2)) for r in range(2)]
    assert len(whole) == d.num_train // 40
    for step, (x, _) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x)
    assert not torch.equal(whole[0][0], next(iter(d.train_batches(1, 40)))[0])  # a new order per epoch


def test_prior_is_exact_and_label_noise_is_its_fraction():
    for s in (0.0, 0.75, 1.0, 1.3):
        p = np.exp(zipf_log_prob(np.arange(1000), 1000, s))
        assert p.sum() == pytest.approx(1.0, abs=1e-9)
        assert (np.diff(p) <= 1e-15).all()  # non-increasing in the rank
    u = (np.arange(200000) + 0.5) / 200000  # a uniform grid: the inverse CDF gives the exact masses
    counts = np.bincount(zipf_rank(u, 50, 0.75), minlength=50) / len(u)
    np.testing.assert_allclose(counts, np.exp(zipf_log_prob(np.arange(50), 50, 0.75)), atol=2e-5)
    d = ScaleData(1000, label_noise=0.1)
    _, y, c = d.examples(TRAIN, np.arange(20000))
    assert float((y != c).float().mean()) == pytest.approx(0.1, abs=0.015)  # a flip may redraw the class


def test_prototypes_share_the_hierarchy_not_the_id_blocks():
    d = ScaleData(4096, leaf_group=8, mid_group=4, w_top=0.5, w_mid=0.3, w_leaf=0.2)
    ids = np.arange(4096)
    mu = torch.from_numpy(d.prototypes(ids)).double()
    low, high = d.leaf_dims, d.dim - d.leaf_dims  # the leaf term lives on the first leaf_dims features
    assert float((mu * mu).sum(1).mean()) == pytest.approx(
        d.w_leaf * low + (d.w_top + d.w_mid) * high, rel=0.03
    )
    leaf = d.leaf_of(ids)

    def mean_dist(other_leaf):
        return float(((mu - mu[d.class_of_leaf(other_leaf)]) ** 2).sum(1).mean())

    sib = mean_dist(leaf ^ 1)  # the other leaf under the same mid node: only the leaf term differs
    cousin = mean_dist(leaf ^ 8)  # same top node, another mid node
    assert sib == pytest.approx(2 * d.w_leaf * low, rel=0.05)
    assert cousin == pytest.approx(2 * (d.w_leaf * low + d.w_mid * high), rel=0.05)
    id_neighbours = float(((mu[1:] - mu[:-1]) ** 2).sum(1).mean())  # id neighbours are not tree neighbours
    assert id_neighbours == pytest.approx(2 * float((mu * mu).sum(1).mean()), rel=0.1)
    aligned = ScaleData(4096, tree_aligned=True)
    assert (aligned.leaf_of(np.arange(10)) == np.arange(10)).all()


def test_streaming_oracle_equals_brute_force_bayes_rule():
    d = ScaleData(700, leaf_group=4, mid_group=5, noise=0.9)
    x, _, c = d.examples(EVAL, np.arange(400))
    mu = torch.from_numpy(d.prototypes(np.arange(700))).double()
    logp = torch.from_numpy(d.log_prior(np.arange(700)))
    # log N(x; mu_c, diag(s^2)) + log P(c), dropping terms equal for every class
    var = torch.from_numpy(d.noise_scales()).double() ** 2  # `noise` on the leaf dims, `noise_rest` elsewhere
    post = logp[None] - (((x.double()[:, None, :] - mu[None]) ** 2) / (2 * var)).sum(-1)
    ref_v, ref_i = post.topk(5, dim=1)
    v, i = d.oracle_topk(x, 5, chunk=64)
    assert (i[:, 0] == ref_i[:, 0]).float().mean() >= 0.995  # fp32 ties may swap a near-equal pair
    assert (i == ref_i).float().mean() >= 0.99
    acc = float((i[:, 0] == c).float().mean())
    assert 0.5 < acc < 1.0
    assert math.isfinite(float(v.sum()))
