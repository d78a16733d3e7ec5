"""Tests of mhe_plugins.metrics: napkinxc cross-checks, hand-computed cases, verification protocols."""

from __future__ import annotations

import math

import napkinxc.metrics as nxm
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import norm

from mhe_plugins import metrics as M

# ----------------------------------------------------------------------------- XMC helpers


def _random_xmc(seed: int, n: int = 300, num_labels: int = 60, kmax: int = 7):
    """Random truth (incl. empty rows), ranked predictions (some short, -1 padded), train truth."""
    rng = np.random.default_rng(seed)
    # skewed label popularity so propensities differ a lot
    pop = rng.zipf(1.6, size=num_labels).astype(float)
    pop /= pop.sum()
    truth = [
        sorted(rng.choice(num_labels, size=rng.integers(0, 9), replace=False, p=pop).tolist())
        for _ in range(n)
    ]
    pred_lists = []
    padded = np.full((n, kmax), -1, dtype=np.int64)
    for i in range(n):
        length = kmax if rng.random() < 0.8 else int(rng.integers(0, kmax))
        # half the ranking drawn near the truth so hits are common
        cand = list(
            dict.fromkeys(
                rng.permutation(truth[i]).tolist()[: rng.integers(0, 4)]
                + rng.permutation(num_labels).tolist()
            )
        )
        row = rng.permutation(cand[: length + 2])[:length].tolist()
        pred_lists.append(row)
        padded[i, :length] = row
    train = [
        rng.choice(num_labels, size=rng.integers(1, 6), replace=False, p=pop).tolist() for _ in range(500)
    ]
    return truth, pred_lists, padded, train


def _csr(lists, num_labels):
    rows = np.repeat(np.arange(len(lists)), [len(r) for r in lists])
    cols = np.concatenate([np.asarray(r, dtype=np.int64) for r in lists])
    return sp.csr_matrix((np.ones(cols.size), (rows, cols)), shape=(len(lists), num_labels))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_xmc_metrics_match_napkinxc_on_random_data(seed, k):
    truth, pred_lists, padded, train = _random_xmc(seed)
    num_labels = 60
    inv_ps = nxm.Jain_et_al_inverse_propensity(_csr(train, num_labels))
    props = M.jain_propensity(_csr(train, num_labels))
    np.testing.assert_allclose(1.0 / props, inv_ps, rtol=1e-12)

    ref = {
        "P": nxm.precision_at_k(truth, pred_lists, k=k)[-1],
        "nDCG": nxm.ndcg_at_k(truth, pred_lists, k=k)[-1],
        "PSP": nxm.psprecision_at_k(truth, pred_lists, inv_ps, k=k)[-1],
        "PSnDCG": nxm.psndcg_at_k(truth, pred_lists, inv_ps, k=k)[-1],
    }
    # the same numbers whatever the input containers are
    for pred, tr in [
        (padded, truth),
        (torch.from_numpy(padded), _csr(truth, num_labels)),
        (pred_lists, truth),
    ]:
        assert M.precision_at_k(pred, tr, k) == pytest.approx(ref["P"], abs=1e-12)
        assert M.ndcg_at_k(pred, tr, k) == pytest.approx(ref["nDCG"], abs=1e-12)
        assert M.psp_at_k(pred, tr, k, props) == pytest.approx(ref["PSP"], abs=1e-12)
        assert M.psndcg_at_k(pred, tr, k, torch.from_numpy(props)) == pytest.approx(ref["PSnDCG"], abs=1e-12)
    out = M.xmc_metrics(padded, truth, ks=(k,), propensities=props)
    assert out == pytest.approx({f"{m}@{k}": 100 * v for m, v in ref.items()}, abs=1e-9)


def test_xmc_hand_computed_tiny_case():
    truth = [[0, 2], [1]]
    pred = np.array([[0, 1, 2], [3, 1, -1]])
    assert M.precision_at_k(pred, truth, 1) == pytest.approx(0.5)
    assert M.precision_at_k(pred, truth, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    # k larger than the ranking: missing ranks are misses
    assert M.precision_at_k(pred, truth, 5) == pytest.approx((2 / 5 + 1 / 5) / 2)
    s0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    s1 = (1 / math.log2(3)) / 1.0
    assert M.ndcg_at_k(pred, truth, 3) == pytest.approx((s0 + s1) / 2)
    props = np.array([0.5, 0.25, 1.0, 1.0])  # inverse: 2, 4, 1, 1
    # PSP@1: gains 2 (sample 0) + 0; best 2 + 4
    assert M.psp_at_k(pred, truth, 1, props) == pytest.approx(2 / 6)
    # PSP@3: gains (2 + 1) + 4 over best (2 + 1) + 4 -> perfect
    assert M.psp_at_k(pred, truth, 3, props) == pytest.approx(1.0)
    # a label listed twice in the truth is one relevant label; torch rows are accepted
    assert M.ndcg_at_k(np.array([[0, 1]]), [torch.tensor([0, 0])], 2) == pytest.approx(1.0)
    assert M.precision_at_k(np.array([[0, 1]]), [[0, 0]], 2) == pytest.approx(0.5)
    out = M.xmc_metrics(pred, truth, ks=(3, 1))
    assert list(out) == ["P@1", "P@3", "nDCG@1", "nDCG@3"]
    assert out["P@1"] == pytest.approx(50.0)


def test_all_true_labels_are_used_not_truncated():
    # 12 true labels: P@5 of a perfect ranking is 1, nDCG ideal uses min(k, |y|) = 5
    truth = [list(range(12))]
    pred = np.array([[11, 10, 9, 8, 7]])
    assert M.precision_at_k(pred, truth, 5) == 1.0
    assert M.ndcg_at_k(pred, truth, 5) == pytest.approx(1.0)
    props = np.linspace(0.1, 1.0, 12)  # label 0 rarest: best PSP ranking is 0..4
    best = (1 / props[:5]).sum()
    assert M.psp_at_k(pred, truth, 5, props) == pytest.approx((1 / props[7:12]).sum() / best)


def test_jain_propensity_formula_and_input_forms():
    counts = np.array([0, 1, 10, 100, 1000])
    n = 1000
    A, B = 0.6, 2.6
    c = (math.log(n) - 1) * (B + 1) ** A
    expected = [1 / (1 + c * (nl + B) ** -A) for nl in counts]
    np.testing.assert_allclose(M.jain_propensity(counts, n, A=A, B=B), expected, rtol=1e-12)
    p = M.jain_propensity(counts, n)
    assert np.all(np.diff(p) > 0) and p.max() < 1.0  # frequent labels have higher propensity
    train = [[0, 1], [1], [1, 3], [2]]
    from_lists = M.jain_propensity(train, num_labels=6)
    np.testing.assert_allclose(from_lists, M.jain_propensity(np.array([1, 3, 1, 1, 0, 0]), 4))
    np.testing.assert_allclose(from_lists, M.jain_propensity(_csr(train, 6)))


def test_topk_accuracy_logits_and_ranked_ids():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    targets = torch.tensor([1, 2, 0, 1])
    # ranks of the target: 1, 3, 3, 2
    assert M.topk_accuracy(logits, targets, ks=(1, 2, 5)) == pytest.approx(
        {"top1": 25.0, "top2": 50.0, "top5": 100.0}
    )
    assert M.topk_accuracy(logits.numpy(), targets.numpy(), ks=(1, 2)) == pytest.approx(
        {"top1": 25.0, "top2": 50.0}
    )
    ranked = np.array([[1, 0, -1], [0, -1, -1], [2, 1, 0], [0, 1, 2]])
    assert M.topk_accuracy(ranked, targets, ks=(1, 2, 3)) == pytest.approx(
        {"top1": 25.0, "top2": 50.0, "top3": 75.0}
    )
    # ignore_index drops rows
    t = torch.tensor([1, -100, -100, 1])
    assert M.topk_accuracy(logits, t, ks=(1,), ignore_index=-100) == {"top1": 50.0}


def test_topk_accuracy_matches_brute_force_rank():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 40, generator=g)
    targets = torch.randint(0, 40, (500,), generator=g)
    rank = (logits > logits.gather(1, targets[:, None])).sum(1)  # 0-based rank of the target (no ties)
    out = M.topk_accuracy(logits, targets, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert out[f"top{k}"] == pytest.approx(100.0 * (rank < k).float().mean().item())


# ----------------------------------------------------------------------------- verification


def _pairs(rng, n_gen, n_imp, mu_gen, mu_imp=0.0, sigma=1.0):
    scores = np.concatenate([rng.normal(mu_gen, sigma, n_gen), rng.normal(mu_imp, sigma, n_imp)])
    same = np.concatenate([np.ones(n_gen, bool), np.zeros(n_imp, bool)])
    perm = rng.permutation(scores.size)
    return scores[perm], same[perm]


def test_verification_separable_is_perfect():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(0.6, 1.0, 3000), rng.uniform(-1.0, 0.2, 3000)])
    same = np.r_[np.ones(3000, bool), np.zeros(3000, bool)]
    perm = rng.permutation(6000)
    res = M.verification_accuracy_10fold(scores[perm], issame=same[perm])
    assert res.accuracy_mean == 1.0 and res.accuracy_std == 0.0
    assert M.verification_accuracy_10fold(scores[perm], same[perm]).accuracy_mean == 1.0  # positional
    assert res.thresholds.shape == (10,) and np.all((res.thresholds > 0.2) & (res.thresholds < 0.6))


def test_verification_gaussian_reaches_bayes_accuracy():
    # equal priors, unit variances, means 0 and 2: Bayes accuracy = Phi(1) = 0.8413, threshold 1.0
    rng = np.random.default_rng(1)
    scores, same = _pairs(rng, 6000, 6000, mu_gen=2.0)
    res = M.verification_accuracy_10fold(scores, issame=same)
    assert res.accuracy_mean == pytest.approx(norm.cdf(1.0), abs=0.015)
    assert np.all(np.abs(res.thresholds - 1.0) < 0.25)
    assert res.fold_accuracies.shape == (10,)
    assert res.accuracy_std == pytest.approx(res.fold_accuracies.std())


def test_best_threshold_is_exact_vs_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(20):
        s = np.round(rng.normal(size=60), 1)  # many ties
        y = rng.random(60) < 0.5
        t = M._best_threshold(s, y)
        cands = np.concatenate([[-np.inf, np.inf], s])
        brute = max(np.mean((s >= c) == y) for c in cands)
        assert np.mean((s >= t) == y) == pytest.approx(brute)


def test_verification_from_embeddings_equals_cosine_scores():
    rng = np.random.default_rng(3)
    e1 = rng.normal(size=(400, 16))
    same = rng.random(400) < 0.5
    e2 = np.where(same[:, None], e1 + 0.8 * rng.normal(size=(400, 16)), rng.normal(size=(400, 16)))
    cos = (e1 * e2).sum(1) / np.linalg.norm(e1, axis=1) / np.linalg.norm(e2, axis=1)
    a = M.verification_accuracy_10fold(torch.from_numpy(e1).float(), torch.from_numpy(e2).float(), same)
    b = M.verification_accuracy_10fold(cos, issame=same)
    assert a.accuracy_mean == pytest.approx(b.accuracy_mean)
    assert a.accuracy_mean > 0.9


def test_tar_at_far_ties_and_edges():
    scores = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.5, 1.0, 2.0])
    same = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    # far 0.25 -> one impostor may pass -> t = 0 (tied impostors are rejected), accept score > 0
    # far 0.5 -> still t = 0: the tie means FAR stays 0.25 <= 0.5; far 1e-4 -> t = max impostor = 1
    out = M.tar_at_far(scores, same, far_targets=(1e-4, 0.25, 0.5, 1.0))
    assert out == {1e-4: 0.25, 0.25: 0.75, 0.5: 0.75, 1.0: 1.0}
    thr = M.far_thresholds(scores, same, far_targets=(1e-4, 0.25, 1.0))
    assert thr == {1e-4: 1.0, 0.25: 0.0, 1.0: -np.inf}


def test_tar_at_far_gaussian_known_answer():
    # stratified N(0, 1) impostors and N(3, 1) genuines (evenly spaced quantiles, shuffled): the
    # empirical tails equal the Gaussian ones, so TAR@FAR = Phi(3 - Phi^-1(1 - FAR)) up to 1/n
    rng = np.random.default_rng(4)
    n = 100_000
    q = norm.ppf((np.arange(n) + 0.5) / n)
    scores = np.concatenate([3.0 + q, q])
    same = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    perm = rng.permutation(2 * n)
    scores, same = scores[perm], same[perm]
    out = M.tar_at_far(scores, same)
    assert list(out) == [1e-4, 1e-3, 1e-2]
    for far, tar in out.items():
        # the threshold is the (m+1)-th largest impostor, m = far * n, i.e. quantile 1 - (m + 0.5) / n
        t = norm.ppf(1 - (math.floor(far * n) + 0.5) / n)
        assert tar == pytest.approx(norm.cdf(3.0 - t), abs=2e-5)
        assert tar == pytest.approx(norm.cdf(3.0 - norm.ppf(1 - far)), abs=5e-3)
    thr = M.far_thresholds(scores, same, far_targets=list(np.geomspace(1e-5, 0.5, 25)))
    imp = scores[~same]
    for far, t in thr.items():  # achieved FAR never above target, and within one impostor of it
        achieved = np.mean(imp > t)
        assert achieved <= far + 1e-15
        assert achieved >= far - 1.0 / imp.size - 1e-15


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: M.precision_at_k(np.zeros((2, 3), int), [[0], [1]], 0), "got 0"),
        (lambda: M.ndcg_at_k(np.zeros((3, 3), int), [[0], [1]], 1), "3 rows but truth has 2"),
        (lambda: M.precision_at_k(np.array([[0, 1, 0]]), [[0]], 3), "repeats label id 0"),
        (lambda: M.precision_at_k(np.array([[7]]), sp.csr_matrix((1, 5)), 1), "label id 7"),
        (lambda: M.precision_at_k(np.zeros(3, int), [[0]], 1), r"shape \(3,\)"),
        (lambda: M.psp_at_k(np.array([[0]]), [[0, 1]], 1, np.array([0.5, -1.0])), "-1.0 at label 1"),
        (lambda: M.psp_at_k(np.array([[0]]), sp.csr_matrix(np.ones((1, 4))), 1, np.ones(3)), "3 entries"),
        (lambda: M.precision_at_k(np.array([[0]]), [[-2]], 1), "negative label id -2"),
        (lambda: M.topk_accuracy(torch.randn(4, 3), torch.tensor([0, 1]), ks=(1,)), "2 entries"),
        (lambda: M.topk_accuracy(torch.randn(2, 3), torch.tensor([0, 1]), ks=(1, 0)), "got 0"),
        (lambda: M.jain_propensity(np.array([1, 2])), "num_train is required"),
        (lambda: M.jain_propensity(np.array([1, 20]), 10), "occurs 20 times"),
        (lambda: M.tar_at_far(np.zeros(3), np.zeros(4, bool)), "3 entries but issame has 4"),
        (lambda: M.tar_at_far(np.array([0.1, np.nan]), np.array([0, 1], bool)), "pair 1 is not finite"),
        (lambda: M.tar_at_far(np.zeros(2), np.array([0, 1], bool), far_targets=(0.0,)), "got 0.0"),
        (lambda: M.verification_accuracy_10fold(np.zeros(5), issame=np.ones(5, bool)), "got 10"),
        (
            lambda: M.verification_accuracy_10fold(np.ones((4, 3)), np.ones((4, 2)), np.ones(4, bool)),
            r"\(4, 3\) and \(4, 2\)",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
