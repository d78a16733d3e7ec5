"""mmpretrain ClsHead compatibility (issue 13): gt_score from Mixup/CutMix, loss/topk/cal_acc config keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from mmengine.structures import BaseDataElement

import mhe_plugins.mm  # noqa: F401  (what custom_imports does)
from mhe_plugins.decode import full_product_scores

N, D = 50, 12


def _hard(labels):
    return [BaseDataElement(gt_label=torch.tensor([int(y)])) for y in labels]


def _mixed(y, lam=0.7):
    """mmpretrain Mixup: gt_score = lam * onehot(y) + (1 - lam) * onehot(y of the flipped batch)."""
    one = F.one_hot(y, N).float()
    score = lam * one + (1 - lam) * one.flip(0)
    return [BaseDataElement(gt_score=s) for s in score], score


def _build(kind="MHPClsHead", **kw):
    torch.manual_seed(0)
    extra = {"MHCClsHead": {"hidden_dim": 8, "beam": 8}, "MHSClsHead": {"sampled_groups": 7}}.get(kind, {})
    return MODELS.build(dict(type=kind, in_channels=D, num_classes=N, head_sizes=[7, 8], **extra, **kw))


def _data(b=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, generator=g), torch.randint(0, N, (b,), generator=g)


# ---------------------------------------------------------------- gt_score
def test_mhp_gt_score_is_the_soft_class_cross_entropy_of_the_product_model():
    head = _build()
    x, y = _data()
    samples, score = _mixed(y)
    got = head.loss((x,), samples)["loss"]
    hard = head.loss((x,), _hard(y))["loss"]
    assert abs(got.item() - hard.item()) > 1e-3  # gt_score is used, not ignored
    # equals the core head's soft-target loss on the per-digit marginals ...
    core = head.head.compute_loss(x, head.head.codec.digit_marginals(score))
    torch.testing.assert_close(got, core)
    # ... and, brute force, -sum_y score_y * sum_h log p_h(digit_h(y)) over the N ids (7 * 8 = 56 > N = 50)
    lps = [F.log_softmax(z, -1) for z in head.head.logits(x)]
    brute = -(score * full_product_scores(lps, N)).sum(-1).mean()
    torch.testing.assert_close(got, brute, rtol=1e-5, atol=1e-6)
    # mixing is linear: lam * loss(y) + (1 - lam) * loss(flipped y)
    mixed = 0.7 * hard + 0.3 * head.loss((x,), _hard(y.flip(0)))["loss"]
    torch.testing.assert_close(got, mixed, rtol=1e-5, atol=1e-6)
    got.backward()
    assert head.head.proj.weight.grad is not None


def test_mhp_gt_score_with_label_smoothing_smooths_each_head():
    head = _build(loss=dict(type="LabelSmoothLoss", label_smooth_val=0.2))
    x, y = _data()
    samples, score = _mixed(y)
    got = head.loss((x,), samples)["loss"]
    expect = head.head.compute_loss(x, head.head.codec.digit_marginals(score), label_smoothing=0.2)
    torch.testing.assert_close(got, expect)


@pytest.mark.parametrize("kind", ["MHCClsHead", "MHSClsHead"])
def test_hard_label_heads_refuse_soft_gt_score_and_read_one_hot_scores_as_labels(kind):
    head = _build(kind)
    x, y = _data()
    samples, _ = _mixed(y)
    with pytest.raises(ValueError, match=rf"{kind}: data sample 0 has a soft gt_score .* use MHPClsHead"):
        head.loss((x,), samples)
    one_hot = [BaseDataElement(gt_score=F.one_hot(t, N).float()) for t in y]
    torch.manual_seed(5)  # MHS samples negatives: same seed for both calls
    a = head.loss((x,), one_hot)["loss"]
    torch.manual_seed(5)
    b = head.loss((x,), _hard(y))["loss"]
    torch.testing.assert_close(a, b)


def test_bad_gt_score_is_refused_naming_the_sample():
    head = _build()
    x, y = _data(3)
    bad = [BaseDataElement(gt_score=torch.full((N,), 1.0 / N)) for _ in range(3)]
    bad[2].gt_score = bad[2].gt_score * 2
    with pytest.raises(ValueError, match=r"gt_score \(row = data sample\): row 2 sums to 2"):
        head.loss((x,), bad)
    with pytest.raises(ValueError, match=r"data sample 1 gt_score must have shape \(50,\), got \(49,\)"):
        head.loss((x,), [bad[0], BaseDataElement(gt_score=torch.zeros(49)), bad[1]])
    with pytest.raises(ValueError, match=r"data sample 1 has no gt_score but others have one"):
        head.loss((x[:2],), [bad[0], _hard(y)[1]])
    with pytest.raises(ValueError, match=r"data sample 0 has neither gt_label nor gt_score"):
        head.loss((x[:1],), [BaseDataElement()])


# ---------------------------------------------------------------- loss config
def test_loss_weight_and_label_smoothing_keep_mmpretrain_meaning():
    x, y = _data()
    base = _build().loss((x,), _hard(y))["loss"]
    weighted = _build(loss=dict(type="CrossEntropyLoss", loss_weight=2.5, use_soft=False)).loss(
        (x,), _hard(y)
    )
    torch.testing.assert_close(weighted["loss"], 2.5 * base)
    smooth = _build(loss=dict(type="LabelSmoothLoss", label_smooth_val=0.1, num_classes=N, loss_weight=1.0))
    core = _build(label_smoothing=0.1)
    assert smooth.label_smoothing == 0.1
    torch.testing.assert_close(smooth.loss((x,), _hard(y))["loss"], core.loss((x,), _hard(y))["loss"])
    torch.testing.assert_close(
        smooth.loss((x,), _hard(y))["loss"], smooth.head.compute_loss(x, y, label_smoothing=0.1)
    )
    classy = _build(loss=dict(type="LabelSmoothLoss", label_smooth_val=0.25, mode="classy_vision"))
    assert classy.label_smoothing == pytest.approx(0.2)  # eps / (1 + eps)
    ce_smooth = _build(loss=dict(type="CrossEntropyLoss", label_smooth_val=0.1, use_soft=True))
    assert ce_smooth.label_smoothing == 0.1
    summed = _build(loss=dict(type="mmpretrain.CrossEntropyLoss", reduction="sum"))
    torch.testing.assert_close(summed.loss((x,), _hard(y))["loss"], base * len(y))


def test_use_sigmoid_selects_mhp_bce_and_is_refused_elsewhere():
    x, y = _data()
    head = _build(loss=dict(type="CrossEntropyLoss", use_sigmoid=True))
    assert head.loss_variant == "bce"
    torch.testing.assert_close(head.loss((x,), _hard(y))["loss"], head.head.compute_loss(x, y, variant="bce"))
    with pytest.raises(ValueError, match=r"use_sigmoid=True conflicts with loss_variant='ce_sum'"):
        _build(loss=dict(type="CrossEntropyLoss", use_sigmoid=True), loss_variant="ce_sum")
    with pytest.raises(ValueError, match=r"MHCClsHead: loss use_sigmoid=True has no equivalent"):
        _build("MHCClsHead", loss=dict(type="CrossEntropyLoss", use_sigmoid=True))


@pytest.mark.parametrize(
    "loss,match",
    [
        (dict(type="FocalLoss", gamma=2.0), r"loss type 'FocalLoss' cannot apply to an MHE head"),
        (dict(type="AsymmetricLoss"), r"loss type 'AsymmetricLoss' cannot apply"),
        (
            dict(type="CrossEntropyLoss", class_weight=[1.0] * N),
            r"option class_weight is not supported \(no per-class",
        ),
        (dict(type="CrossEntropyLoss", use_soft=True, use_sigmoid=True), r"cannot both be set"),
        (dict(type="CrossEntropyLoss", gamma=2.0), r"CrossEntropyLoss option gamma=2.0 is not supported"),
        (
            dict(type="LabelSmoothLoss", label_smooth_val=0.1, mode="multi_label"),
            r"mode 'multi_label' is not supported",
        ),
        (dict(type="LabelSmoothLoss", label_smooth_val=0.1, num_classes=7), r"num_classes=7 differs"),
        (
            dict(type="LabelSmoothLoss", label_smooth_val=1.5),
            r"label_smooth_val must be in \[0, 1\), got 1.5",
        ),
        (dict(type="CrossEntropyLoss", reduction="none"), r"reduction must be 'mean' or 'sum'"),
    ],
)
def test_losses_that_cannot_apply_are_refused(loss, match):
    with pytest.raises(ValueError, match=match):
        _build(loss=loss)


def test_conflicting_smoothing_is_refused():
    with pytest.raises(ValueError, match=r"label_smoothing=0.2 conflicts"):
        _build(label_smoothing=0.2, loss=dict(type="LabelSmoothLoss", label_smooth_val=0.1))


# ---------------------------------------------------------------- topk / cal_acc
@pytest.mark.parametrize("kind", ["MHPClsHead", "MHCClsHead", "MHSClsHead"])
def test_cal_acc_reports_topk_accuracy_in_percent(kind):
    head = _build(kind, topk=(1, 5), cal_acc=True, loss=dict(type="CrossEntropyLoss", loss_weight=1.0))
    x, y = _data(40)
    y[:20] = head.head.predict(x[:20])  # half the batch is right at top-1 for sure
    out = head.loss((x,), _hard(y))
    assert set(out) == {"loss", "accuracy_top-1", "accuracy_top-5"}
    ranked = head.head.topk(x, 5)[1]
    for k in (1, 5):
        expect = 100.0 * (ranked[:, :k] == y[:, None]).any(1).float().mean()
        torch.testing.assert_close(out[f"accuracy_top-{k}"], expect)
    assert 50.0 <= out["accuracy_top-1"].item() <= out["accuracy_top-5"].item() <= 100.0
    assert set(_build(kind, topk=(1, 5), cal_acc=False).loss((x,), _hard(y))) == {"loss"}


def test_cal_acc_with_gt_score_and_bad_topk_are_refused():
    x, y = _data()
    samples, _ = _mixed(y)
    with pytest.raises(ValueError, match=r"cal_acc=True with gt_score"):
        _build(cal_acc=True).loss((x,), samples)
    with pytest.raises(ValueError, match=r"topk must be ints in \[1, num_classes=50\], got \(1, 51\)"):
        _build(topk=(1, 51))
    with pytest.raises(ValueError, match=r"topk must be >= 1, got 0"):
        _build(topk=0)
    assert _build(topk=3).topk == (3,)


def test_a_stock_mmpretrain_head_config_builds_and_trains():
    cfg = dict(
        type="MHPClsHead",
        num_classes=N,
        in_channels=D,
        loss=dict(type="LabelSmoothLoss", label_smooth_val=0.1, mode="original", loss_weight=1.0),
        topk=(1, 5),
        cal_acc=False,
        init_cfg=None,
    )
    head = MODELS.build(cfg)
    x, y = _data(20)
    out = head.loss((x,), _hard(y))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and head.head.proj.weight.grad is not None
    assert len(head.predict((x,))) == 20
