import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mhe_plugins import ArcFaceMargin, CombinedMargin, LabelCodec, MHCHead, MHPHead, MHSHead, product_topk
from mhe_plugins.decode import full_product_scores, log_valid_mass


# ---------------------------------------------------------------- exact product top-k
@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4), data=st.data())
def test_product_topk_equals_brute_force(sizes, data):
    cap = math.prod(sizes)
    n = data.draw(st.integers(1, cap), label="num_labels")
    k = data.draw(st.integers(1, n), label="k")
    ties = data.draw(st.booleans(), label="ties")
    codec = LabelCodec(sizes, n)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    scores = [torch.randn(3, c, generator=g, dtype=torch.float64) for c in sizes]
    if ties:  # coarse values -> many exactly tied sums
        scores = [s.mul(2).round() for s in scores]
    values, ids = product_topk(scores, codec, k)
    brute = full_product_scores(scores, n)  # (3, n): invalid ids >= n are cut
    bv, _ = brute.topk(k, dim=1)
    assert torch.equal(values, bv)  # same k best scores, incl. ties
    assert int(ids.max()) < n and int(ids.min()) >= 0  # no invalid id
    assert torch.equal(brute.gather(1, ids), values)  # each id carries its own score
    assert all(len(set(row)) == k for row in ids.tolist())  # no duplicates


def test_product_topk_masks_invalid_ids_even_when_they_score_best():
    codec = LabelCodec([3, 4], 9)  # ids 9, 10, 11 invalid
    scores = [torch.tensor([[0.0, 0.0, 10.0]]), torch.tensor([[0.0, 5.0, 4.0, 3.0]])]
    values, ids = product_topk(scores, codec, 3)
    assert ids.tolist() == [[8, 1, 5]] or ids[0, 0].item() == 8
    assert ids.max().item() < 9 and values[0, 0].item() == 10.0


def test_log_valid_mass_is_exact():
    torch.manual_seed(0)
    codec = LabelCodec([5, 4, 3], 47)
    lps = [F.log_softmax(torch.randn(6, c, dtype=torch.float64), -1) for c in codec.head_sizes]
    full = full_product_scores(lps, codec.capacity)
    expected = torch.logsumexp(full[:, :47], -1)
    assert torch.allclose(log_valid_mass(lps, codec), expected)


# ---------------------------------------------------------------- MHP
@pytest.mark.parametrize("sizes,n", [([8, 8], 64), ([5, 4, 3], 47), ([10], 7)])
def test_mhp_log_prob_normalised_and_topk_matches(sizes, n):
    torch.manual_seed(1)
    head = MHPHead(12, LabelCodec(sizes, n)).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)  # any leading dims
    lp = head.log_prob(x)
    assert lp.shape == (2, 5, n)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64))
    v, i = head.topk(x, min(4, n))
    bv, bi = lp.topk(min(4, n))
    assert torch.allclose(v, bv) and torch.equal(i, bi)
    assert torch.equal(head.predict(x), lp.argmax(-1))


def test_mhp_ce_sum_is_sum_of_head_ces_and_matches_log_prob_when_full():
    torch.manual_seed(2)
    codec = LabelCodec([6, 7])
    head = MHPHead(10, codec)
    x, t = torch.randn(9, 10), torch.randint(0, 42, (9,))
    loss = head.compute_loss(x, t)
    nll = -head.log_prob(x).gather(1, t[:, None]).mean()
    assert torch.allclose(loss, nll, atol=1e-5)  # prod C == N: sum_h CE_h == -log p(id)
    d = codec.encode(t)
    z = head.logits(x)
    manual = F.cross_entropy(z[0], d[:, 0], label_smoothing=0.1) + F.cross_entropy(
        z[1], d[:, 1], label_smoothing=0.1
    )
    assert torch.allclose(head.loss_from_logits(z, t, label_smoothing=0.1), manual)


def test_mhp_loss_variants_match_reference_formulas_and_soft_targets():
    torch.manual_seed(3)
    codec = LabelCodec([4, 5])
    head = MHPHead(8, codec)
    x, t = torch.randn(6, 8), torch.randint(0, 20, (6,))
    z = head.logits(x)
    onehot = torch.cat([F.one_hot(d, c).float() for d, c in zip(codec.encode(t).T, codec.head_sizes)], -1)
    cat = torch.cat(z, -1)
    joint = -(onehot * F.log_softmax(cat, -1)).sum(-1).mean()
    assert torch.allclose(head.loss_from_logits(z, t, variant="joint_softmax"), joint)
    assert torch.allclose(
        head.loss_from_logits(z, t, variant="bce"), F.multilabel_soft_margin_loss(cat, onehot)
    )
    soft = [F.one_hot(d, c).float() for d, c in zip(codec.encode(t).T, codec.head_sizes)]
    for variant in ("ce_sum", "joint_softmax", "bce"):
        assert torch.allclose(
            head.loss_from_logits(z, soft, variant=variant),
            head.loss_from_logits(z, t, variant=variant),
            atol=1e-6,
        )
    # mixup: a mix of two one-hot digit targets = the mix of the two losses (the product loss is linear in q)
    t2 = torch.randint(0, 20, (6,))
    soft2 = [F.one_hot(d, c).float() for d, c in zip(codec.encode(t2).T, codec.head_sizes)]
    mixed = [0.3 * a + 0.7 * b for a, b in zip(soft, soft2)]
    expected = 0.3 * head.loss_from_logits(z, t, reduction="none") + 0.7 * head.loss_from_logits(
        z, t2, reduction="none"
    )
    assert torch.allclose(head.loss_from_logits(z, mixed, reduction="none"), expected, atol=1e-6)


def test_mhp_ignore_index_drops_padding():
    torch.manual_seed(4)
    head = MHPHead(8, LabelCodec([4, 5], 19))
    x = torch.randn(2, 3, 8)
    t = torch.tensor([[1, 2, 1], [18, 1, 1]])
    t_pad = t.clone()
    t_pad[0, 2] = t_pad[1, 2] = -100
    per = head.compute_loss(x, t, reduction="none")
    got = head.compute_loss(x, t_pad, ignore_index=-100)
    keep = t_pad != -100
    assert torch.allclose(got, per[keep].mean())
    none = head.compute_loss(x, t_pad, ignore_index=-100, reduction="none")
    assert none.shape == (2, 3) and none[0, 2] == 0 and none[1, 2] == 0


@pytest.mark.parametrize("variant", ["ce_sum", "joint_softmax", "bce"])
def test_mhp_loss_gradcheck(variant):
    torch.manual_seed(5)
    head = MHPHead(4, LabelCodec([3, 4], 11)).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (5,))
    assert torch.autograd.gradcheck(
        lambda inp: head.compute_loss(inp, t, variant=variant, label_smoothing=0.1), (x,)
    )


def test_mhp_bad_inputs():
    head = MHPHead(4, LabelCodec([3, 4], 11))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"label id 11 is out of range"):
        head.compute_loss(x, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match=r"variant must be one of"):
        head.compute_loss(x, torch.tensor([0, 1]), variant="mse")
    with pytest.raises(ValueError, match=r"k must be in \[1, num_labels=11\], got 12"):
        head.topk(x, 12)
    with pytest.raises(ValueError, match=r"last dim 4, got shape \(2, 5\)"):
        head.topk(torch.randn(2, 5), 1)


# ---------------------------------------------------------------- MHC
def test_mhc_full_beam_is_exact_and_log_prob_normalised():
    torch.manual_seed(6)
    codec = LabelCodec([5, 4, 3], 53)
    head = MHCHead(10, codec, hidden_dim=6, beam=60).double()
    x = torch.randn(7, 10, dtype=torch.float64)
    lp = head.log_prob(x)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(7, dtype=torch.float64))
    v, i = head.topk(x, 5)
    bv, bi = lp.topk(5)
    assert torch.allclose(v, bv) and torch.equal(i, bi)
    assert int(i.max()) < 53


def test_mhc_loss_is_teacher_forced_nll():
    torch.manual_seed(7)
    codec = LabelCodec([6, 5], 28)
    head = MHCHead(8, codec, hidden_dim=4)
    x, t = torch.randn(10, 8), torch.randint(0, 28, (10,))
    # sum of sibling CEs along the ground-truth path == -log p(t) of the hierarchical softmax
    assert torch.allclose(head.compute_loss(x, t), -head.log_prob(x).gather(1, t[:, None]).mean(), atol=1e-5)
    x.requires_grad_(True)
    head.compute_loss(x, t).backward()
    assert all(p.grad is not None for p in head.group.parameters())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), beam=st.integers(1, 6))
def test_mhc_two_level_beam_never_worse_than_greedy(seed, beam):
    torch.manual_seed(seed)
    head = MHCHead(6, LabelCodec([8, 6], 45), hidden_dim=5, beam=beam)
    x = torch.randn(16, 6)
    lp = head.log_prob(x)
    greedy_v, greedy_i = head.topk(x, 1, beam=1)
    beam_v, beam_i = head.topk(x, 1, beam=beam)
    assert bool((beam_v >= greedy_v - 1e-6).all())  # the greedy path is always inside the beam
    best = lp.argmax(-1, keepdim=True)
    assert (beam_i == best).float().mean() >= (greedy_i == best).float().mean()  # recall of the true argmax


# ---------------------------------------------------------------- MHS
def test_mhs_batch_union_logits_are_the_full_logits_of_the_hit_groups():
    torch.manual_seed(8)
    codec = LabelCodec([6, 5], 28)
    head = MHSHead(8, codec)
    x, t = torch.randn(9, 8), torch.tensor([0, 1, 27, 27, 13, 4, 5, 9, 12])
    out = head.sampled_logits(x, t)
    groups = torch.unique(t // 5)
    assert torch.equal(out.groups, groups)
    full = head.full_logits(x)
    ids = (groups[:, None] * 5 + torch.arange(5)).flatten()
    valid = ids < 28
    assert torch.allclose(out.logits[:, valid], full[:, ids[valid]])
    assert torch.isinf(out.logits[:, ~valid]).all()
    chosen = ids[out.target]
    assert torch.equal(chosen, t)  # the target column is the true class
    # all groups sampled -> MHS loss == full softmax CE
    head_all = MHSHead(8, codec, sampled_groups=6)
    head_all.load_state_dict(head.state_dict())
    assert torch.allclose(head_all.compute_loss(x, t), F.cross_entropy(head.full_logits(x), t), atol=1e-6)


def test_mhs_per_sample_has_own_group_first_and_distinct_negatives():
    torch.manual_seed(9)
    head = MHSHead(8, LabelCodec([10, 4]), mode="per_sample", sampled_groups=4)
    t = torch.randint(0, 40, (32,))
    out = head.sampled_logits(torch.randn(32, 8), t)
    assert out.logits.shape == (32, 16)
    assert torch.equal(out.groups[:, 0], t // 4) and torch.equal(out.target, t % 4)
    assert all(len(set(r)) == 4 for r in out.groups.tolist())


def test_mhs_arcface_margin_matches_formula_and_is_nan_free():
    torch.manual_seed(10)
    codec = LabelCodec([4, 4])
    head = MHSHead(8, codec, margin=ArcFaceMargin(m=0.5, s=64), sampled_groups=4)
    x, t = torch.randn(5, 8), torch.randint(0, 16, (5,))
    out = head.sampled_logits(x, t)
    cos = F.normalize(x) @ F.normalize(head.weight.reshape(16, 8)).T
    expect = cos * 64
    theta = torch.acos(cos[torch.arange(5), t].clamp(-1, 1))
    tgt = torch.where(
        theta + 0.5 <= math.pi,
        torch.cos(theta + 0.5),
        cos[torch.arange(5), t] - math.sin(math.pi - 0.5) * 0.5,
    )
    expect[torch.arange(5), t] = tgt * 64
    assert torch.allclose(out.logits, expect, atol=1e-4)
    # embeddings equal to (or opposite) their class centre: cos = +-1 -> acos' is infinite without the clamp
    w = head.weight.detach().reshape(16, 8)
    x2 = torch.stack([w[3], -w[7]]).requires_grad_(True)
    head.compute_loss(x2, torch.tensor([3, 7])).backward()
    assert torch.isfinite(x2.grad).all() and torch.isfinite(head.weight.grad).all()


def test_combined_margin_cosface():
    m = CombinedMargin(1.0, 0.0, 0.35, 30.0)
    cos = torch.tensor([[0.2, 0.9]])
    assert torch.allclose(m(cos, torch.tensor([1])), torch.tensor([[6.0, (0.9 - 0.35) * 30]]))
    assert torch.allclose(m(cos, torch.tensor([-1])), cos * 30)  # no target column: no margin


def test_mhs_topk_is_chunked_full_classifier():
    torch.manual_seed(11)
    head = MHSHead(8, LabelCodec([7, 9], 60), chunk_size=5)
    x = torch.randn(4, 8)
    v, i = head.topk(x, 6)
    bv, bi = head.full_logits(x).topk(6)
    assert torch.allclose(v, bv, atol=1e-5) and torch.equal(i, bi)
    assert torch.equal(head.log_prob(x).topk(6).indices, i)


def test_mhs_sparse_grad_touches_only_sampled_groups():
    torch.manual_seed(12)
    head = MHSHead(8, LabelCodec([10, 4]), sparse_grad=True)
    t = torch.tensor([1, 2, 30])  # groups 0 and 7
    head.compute_loss(torch.randn(3, 8), t).backward()
    g = head.weight.grad
    assert g.is_sparse
    assert sorted(g.coalesce().indices()[0].unique().tolist()) == [0, 7]
    torch.optim.SGD(head.parameters(), lr=0.1).step()  # plain SGD accepts sparse grads
