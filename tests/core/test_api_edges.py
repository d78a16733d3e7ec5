"""API edges from the audit (issue 14, items 3 and 8): non-finite scores, empty batches, dtypes, bad values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mhe_plugins import LabelCodec, MHCHead, MHPHead, MHSHead, build_head, check_finite, product_topk
from mhe_plugins.decode import full_product_scores

SPECIAL = [float("nan"), float("inf"), float("-inf"), 1e38, -1e38, 3e38]


# ---------------------------------------------------------------- item 3: ids < N for any scores
@settings(max_examples=120, deadline=None)
@given(sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4), data=st.data())
def test_product_topk_ids_are_valid_for_non_finite_scores(sizes, data):
    n = data.draw(st.integers(1, math.prod(sizes)), label="num_labels")
    k = data.draw(st.integers(1, n), label="k")
    codec = LabelCodec(sizes, n)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    p_special = data.draw(st.sampled_from([0.3, 0.7, 1.0]), label="share of special scores")
    scores = []
    for c in sizes:
        s = torch.randn(4, c, generator=g)
        special = torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), (4, c), generator=g)]
        scores.append(torch.where(torch.rand(4, c, generator=g) < p_special, special, s))
    values, ids = product_topk(scores, codec, k)
    assert ids.shape == values.shape == (4, k)
    assert int(ids.min()) >= 0 and int(ids.max()) < n  # never an invalid combination
    assert all(len(set(row)) == k for row in ids.tolist())  # no duplicates either
    # every returned value is the returned id's own score (NaN where that score is NaN)
    brute = full_product_scores(scores, n)
    torch.testing.assert_close(brute.gather(1, ids), values, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("fill", SPECIAL, ids=str)
def test_mhp_topk_with_non_finite_features_returns_valid_ids(fill):
    """One bad feature per row makes logits +-inf/NaN (a -inf logit used to tie with the invalid-id mask)."""
    torch.manual_seed(0)
    for _ in range(40):  # random codecs whose capacity exceeds N
        sizes = torch.randint(2, 8, (int(torch.randint(2, 4, (1,))),)).tolist()
        cap = math.prod(sizes)
        n = int(torch.randint(cap // 2, cap, (1,)))
        head = MHPHead(6, LabelCodec(sizes, n))
        x = torch.randn(8, 6)
        x[torch.arange(8), torch.randint(0, 6, (8,))] = fill
        x[0] = fill  # a whole row: 6 * 3e38 * w overflows fp32
        k = int(torch.randint(1, min(n, 20) + 1, (1,)))
        values, ids = head.topk(x, k)
        assert int(ids.min()) >= 0 and int(ids.max()) < n, (sizes, n, k)
        assert all(len(set(r)) == k for r in ids.tolist())
        assert bool((head.predict(x) < n).all())


# ---------------------------------------------------------------- item 8: empty batch
@pytest.mark.parametrize("kind", ["mhp", "mhc"])
def test_empty_batch_loss_is_zero_and_backpropagates(kind):
    codec = LabelCodec([3, 4], 10)
    head = MHPHead(5, codec) if kind == "mhp" else MHCHead(5, codec, hidden_dim=4)
    x = torch.zeros(0, 5, requires_grad=True)
    for kw in ({}, {"label_smoothing": 0.1}, {"reduction": "sum"}):
        loss = head.compute_loss(x, torch.zeros(0, dtype=torch.long), **kw)
        assert loss.shape == () and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert x.grad.shape == (0, 5)
    grads = [p.grad for p in head.parameters() if p.grad is not None]
    assert grads and all(bool((g == 0).all()) for g in grads)  # connected to the graph, zero gradient
    # F.cross_entropy's mean over nothing would be NaN; ours is the mean over the items that exist
    assert math.isnan(F.cross_entropy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).item())


@pytest.mark.parametrize("kind", ["mhp", "mhc", "mhs"])
def test_empty_batch_topk_has_shape_0_k(kind):
    codec = LabelCodec([3, 4], 10)
    head = {
        "mhp": lambda: MHPHead(5, codec),
        "mhc": lambda: MHCHead(5, codec, hidden_dim=4),
        "mhs": lambda: MHSHead(5, codec),
    }[kind]()
    for shape in [(0, 5), (2, 0, 5)]:
        values, ids = head.topk(torch.zeros(shape), 3)
        assert values.shape == ids.shape == (*shape[:-1], 3) and ids.dtype == torch.long
    assert head.predict(torch.zeros(0, 5)).shape == (0,)


def test_empty_batch_with_soft_targets():
    head = MHPHead(5, LabelCodec([3, 4], 10))
    soft = [torch.zeros(0, 3), torch.zeros(0, 4)]
    assert head.compute_loss(torch.zeros(0, 5), soft).item() == 0.0


# ---------------------------------------------------------------- item 8: opt-in finiteness check
def test_check_finite_names_what_is_not_finite():
    x = torch.randn(3, 4)
    assert check_finite("features", x) is x  # passes finite values through unchanged
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    with pytest.raises(
        FloatingPointError, match=r"features has 2 non-finite value\(s\) of 12, first nan at index \(1, 2\)"
    ):
        check_finite("features", x)
    head = MHPHead(4, LabelCodec([3, 4], 10))
    loss = head.compute_loss(x, torch.tensor([0, 1, 2]))
    assert math.isnan(loss.item())  # the heads do not check on every call (it syncs the device) ...
    with pytest.raises(FloatingPointError, match=r"loss has 1 non-finite"):
        check_finite("loss", loss)  # ... the trainer calls the check where it matters
    with pytest.raises(FloatingPointError, match=r"logits\[1\] has 1 non-finite value\(s\) of 4, first -inf"):
        check_finite("logits", [torch.zeros(3), torch.tensor([0.0, 1.0, float("-inf"), 2.0])])
    with pytest.raises(FloatingPointError, match=r"batch\['x'\]"):
        check_finite("batch", {"y": torch.tensor([1, 2]), "x": torch.tensor([float("inf")])})
    check_finite("ids", torch.tensor([1, 2]))  # integer tensors cannot be non-finite


# ---------------------------------------------------------------- item 8: fp16/bf16 features without autocast
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features_are_cast_to_the_head_dtype(dtype):
    torch.manual_seed(1)
    codec = LabelCodec([4, 5], 18)
    x = torch.randn(6, 8).to(dtype)
    y = torch.randint(0, 18, (6,))
    ref = x.float()
    heads = [MHPHead(8, codec), MHCHead(8, codec, hidden_dim=4, beam=20), MHSHead(8, codec)]
    for head in heads:
        v, i = head.topk(x, 3)
        rv, ri = head.topk(ref, 3)
        assert v.dtype == torch.float32 and torch.equal(i, ri) and torch.equal(v, rv)
        torch.testing.assert_close(head.compute_loss(x, y), head.compute_loss(ref, y), rtol=0, atol=0)
    ml = build_head("mhc_multilabel", 8, 18, num_groups=4, hidden_dim=4)
    assert torch.equal(ml.topk(x, 3)[1], ml.topk(ref, 3)[1])
    with pytest.raises(ValueError, match=r"features must be a floating-point tensor, got Tensor torch.int64"):
        heads[0].topk(torch.ones(2, 8, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"expected features with last dim 8, got shape \(2, 7\)"):
        heads[0](torch.randn(2, 7), y[:2])  # forward too, not only topk


# ---------------------------------------------------------------- item 8: non-integer ids and sizes
def test_non_integer_ids_digits_and_sizes_raise_naming_the_value():
    codec = LabelCodec([3, 4], 10)
    with pytest.raises(ValueError, match=r"digits must be integers, got 1.7"):
        codec.decode(np.array([1.7, 2.0]))
    with pytest.raises(ValueError, match=r"digits must be integers, got nan"):
        codec.decode(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match=r"digits must be integers, got 1.7"):
        codec.decode(1.7)  # the audit's case: it used to return 4
    with pytest.raises(ValueError, match=r"last dim 2, got shape \(\)"):
        codec.decode(3)
    with pytest.raises(ValueError, match=r"label ids must be integers, got 2.5"):
        codec.encode(torch.tensor([1.0, 2.5]))
    with pytest.raises(ValueError, match=r"num_labels must be a positive int, got 3.7"):
        LabelCodec([3, 4], 3.7)
    with pytest.raises(ValueError, match=r"num_labels must be a positive int, got 3.7"):
        LabelCodec.balanced(3.7, 2)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int, got 1.5"):
        LabelCodec.balanced(30, 1.5)
    with pytest.raises(ValueError, match=r"head sizes must be positive ints, got True"):
        LabelCodec([True, 4])
    with pytest.raises(ValueError, match=r"in_features must be an integer, got 4.5"):
        MHPHead(4.5, codec)
    with pytest.raises(ValueError, match=r"k must be an integer, got 2.5"):
        MHPHead(4, codec).topk(torch.randn(2, 4), 2.5)
    with pytest.raises(ValueError, match=r"beam must be >= 1, got 0"):
        MHCHead(4, codec, beam=0)
    # integral floats are accepted and mean the integer
    assert LabelCodec([3.0, np.int64(4)], 10.0) == codec
    assert LabelCodec([torch.tensor(3), 4], torch.tensor(10.0)) == codec
    with pytest.raises(ValueError, match=r"num_labels must be a positive int, got tensor\(9.5000\)"):
        LabelCodec([3, 4], torch.tensor(9.5))
    assert codec.decode(np.array([2.0, 1.0])) == 9
    assert torch.equal(codec.encode(torch.tensor([9.0])), torch.tensor([[2, 1]]))


def test_capacity_beyond_int64_names_the_limit():
    with pytest.raises(
        ValueError,
        match=r"product of head sizes \[4294967296, 4294967296\] is 18446744073709551616 > 2\*\*63 - 1",
    ):
        LabelCodec([2**32, 2**32])
    with pytest.raises(ValueError, match=r"> 2\*\*63 - 1: label ids and digit arithmetic are int64"):
        LabelCodec([2**40, 2**40], 5)
    assert LabelCodec([2**31, 2**31]).num_labels == 2**62  # still fine below the limit


def test_multilabel_topk_k_must_be_a_positive_int():
    head = build_head("mhc_multilabel", 8, 30, num_groups=5, hidden_dim=4)
    x = torch.randn(2, 8)
    for k, match in [(0, r"k must be >= 1, got 0"), (-3, r"got -3"), (2.5, r"k must be an integer, got 2.5")]:
        with pytest.raises(ValueError, match=match):
            head.topk(x, k)
    assert head.topk(x, 2)[1].shape == (2, 2)
    with pytest.raises(ValueError, match=r"num_labels must be a positive int, got 30.5"):
        build_head("mhc_multilabel", 8, 30.5)


# ---------------------------------------------------------------- item 8: soft targets are validated
def _soft(codec, b, gen):
    return [torch.softmax(torch.randn(b, c, generator=gen), -1) for c in codec.head_sizes]


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (
            lambda q: [q[0][:1], q[1]],
            r"soft target of head 0 \(size 4\) must have shape \(5, 4\), got \(1, 4\)",
        ),
        (lambda q: [q[0], q[1][:, :3]], r"head 1 \(size 5\) must have shape \(5, 5\), got \(5, 3\)"),
        (lambda q: [q[0], q[1] * 2], r"head 1 \(size 5\): row 0 sums to 2, expected 1"),
        (lambda q: [q[0] - q[0] * torch.eye(5, 4), q[1]], r"head 0 \(size 4\): row 0 sums to"),
        (
            lambda q: [q[0] + torch.eye(5, 4) * 0.5 - torch.eye(5, 4).roll(1, 1) * 0.5, q[1]],
            r"negative entry",
        ),
        (lambda q: [q[0].masked_fill(torch.eye(5, 4).bool(), float("nan")), q[1]], r"non-finite"),
        (lambda q: [q[0]], r"expected 2 soft digit targets, got 1"),
        (lambda q: [q[0].long(), q[1]], r"must be a float tensor"),
    ],
)
def test_soft_targets_are_validated_per_head(corrupt, match):
    codec = LabelCodec([4, 5], 19)
    head = MHPHead(6, codec)
    gen = torch.Generator().manual_seed(2)
    x, soft = torch.randn(5, 6, generator=gen), _soft(codec, 5, gen)
    head.compute_loss(x, soft)  # valid rows pass
    with pytest.raises(ValueError, match=match):
        head.compute_loss(x, corrupt(soft))


def test_soft_target_tolerance_accepts_half_precision_mixes():
    codec = LabelCodec([4, 5], 19)
    gen = torch.Generator().manual_seed(3)
    soft = [(0.37 * q + 0.63 * q.flip(0)).half() for q in _soft(codec, 8, gen)]
    loss = MHPHead(6, codec).compute_loss(torch.randn(8, 6), soft)
    assert torch.isfinite(loss)


def test_mhc_target_must_match_the_features():
    head = MHCHead(4, LabelCodec([3, 4], 10), hidden_dim=3)
    with pytest.raises(ValueError, match=r"target shape \(3,\) does not match the features \(2,\)"):
        head.compute_loss(torch.randn(2, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"MHCHead trains on hard label ids \(a tensor\), got list"):
        head.compute_loss(torch.randn(2, 4), [torch.ones(2, 3) / 3, torch.ones(2, 4) / 4])
