"""MHE heads on timm backbones: timm conventions, exact decoding, registry names, timm losses == MHE losses."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import timm_ext
from timm_ext.mixup import DigitMixup, check_mixup_support
from timm_ext.model import create_model, head_parameters

TINY = {
    "resnet10t": dict(channels=(8, 16, 32, 32), in_chans=1),
    "convnext_atto": dict(dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), in_chans=1),
    "vit_tiny_patch16_224": dict(
        img_size=32, patch_size=8, depth=1, embed_dim=32, in_chans=1, backbone_kwargs={"num_heads": 2}
    ),
}
N, SIZES = 42, [6, 7]


@pytest.mark.parametrize("backbone", sorted(TINY))
@pytest.mark.parametrize("head", ["linear", "mhp", "mhc", "mhs"])
def test_heads_on_timm_backbones(backbone, head):
    torch.manual_seed(0)
    model = create_model(
        backbone, head=head, num_classes=N, head_sizes=None if head == "linear" else SIZES, **TINY[backbone]
    )
    model.eval()
    x = torch.randn(5, 1, 32, 32)
    logp = model(x)
    assert logp.shape == (5, N)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(5), atol=1e-5, rtol=0)
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    assert feats.shape == (5, model.num_features)
    assert model.get_classifier() is model.head and model.num_classes == N
    assert model.pretrained_cfg["num_classes"] == N
    # exact top-k over the N ids == brute force on the full distribution (MHC: beam >= C_0 is exact)
    if head == "mhc":
        model.head.beam = SIZES[0]
    vals, ids = model.topk(x, 5)
    ref_v, ref_i = logp.topk(5, dim=-1)
    assert torch.equal(ids, ref_i)
    if head != "mhs":  # MHS scores are logits (same order), the others log-probabilities
        torch.testing.assert_close(vals, ref_v, atol=1e-5, rtol=0)
    assert torch.equal(model.predict(x), ref_i[:, 0])
    # training loss flows into backbone and head
    model.train()
    y = torch.randint(0, N, (4,))
    loss = model(x[:4], target=y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.head.parameters() if p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_reset_classifier_and_param_savings():
    m = create_model("resnet10t", head="mhp", num_classes=N, head_sizes=SIZES, **TINY["resnet10t"])
    d = m.num_features
    assert sum(p.numel() for p in m.head.parameters()) == d * sum(SIZES) + sum(SIZES)
    m.reset_classifier(1000, head_sizes=[10, 10, 10])
    assert m.num_classes == 1000 and m.head_sizes == [10, 10, 10]
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 1000)
    m.reset_classifier(0)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, d)
    with pytest.raises(ValueError, match="product of head sizes"):
        create_model("resnet10t", head="mhp", num_classes=50, head_sizes=[6, 7], **TINY["resnet10t"])


def test_registered_names_and_timm_cross_entropy_is_the_product_loss():
    assert {"resnet50_mhp", "resnet18_mhc", "convnext_tiny_mhs", "vit_tiny_patch16_224_mhp"} <= set(
        timm.list_models("*_mh[pcs]")
    )
    torch.manual_seed(0)
    m = timm.create_model("resnet10t_mhp", num_classes=N, head_sizes=SIZES, **TINY["resnet10t"])
    assert isinstance(m, timm_ext.MHEClassifier) and m.head_sizes == SIZES
    x, y = torch.randn(6, 1, 32, 32), torch.randint(0, N, (6,))
    feats = m.pooled(x)
    # timm's plain CE on the forward output == per-head CE sum (prod C = N)
    torch.testing.assert_close(F.cross_entropy(m(x), y), m.head.compute_loss(feats, y), atol=1e-5, rtol=0)
    # timm's label smoothing over N classes == the same smoothing on every head
    ls = LabelSmoothingCrossEntropy(0.1)(m(x), y)
    torch.testing.assert_close(ls, m.head.compute_loss(feats, y, label_smoothing=0.1), atol=1e-5, rtol=0)


def test_digit_mixup_equals_timm_mixup_on_full_distribution():
    torch.manual_seed(0)
    m = create_model("resnet10t", head="mhp", num_classes=N, head_sizes=SIZES, **TINY["resnet10t"])
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, N, (8,))
    for mode in ("batch", "elem"):
        kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, mode=mode)
        state = torch.random.get_rng_state()
        np.random.seed(3)
        xa, soft_full = Mixup(num_classes=N, **kw)(x.clone(), y)
        np.random.seed(3)
        torch.random.set_rng_state(state)
        xb, soft_digits = DigitMixup(m.head.codec, **kw)(x.clone(), y)
        assert torch.equal(xa, xb)
        ref = SoftTargetCrossEntropy()(m(xa), soft_full)
        ours = m.compute_loss(xb, soft_digits)
        # timm smooths over N; per-head smoothing is the same distribution's marginals -> identical loss
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_mixup_refused_for_cascade_and_sampling_heads():
    check_mixup_support("mhp", 0.8, 0.0)
    for head in ("mhc", "mhs"):
        with pytest.raises(ValueError, match=f"--head {head}"):
            check_mixup_support(head, 0.0, 1.0)


def test_small_stem_keeps_more_resolution():
    a = create_model("resnet10t", head="linear", num_classes=10, **TINY["resnet10t"])
    b = create_model("resnet10t", head="linear", num_classes=10, small_stem=True, **TINY["resnet10t"])
    x = torch.randn(2, 1, 32, 32)
    assert a.forward_features(x).shape[-1] == 1 and b.forward_features(x).shape[-1] == 2
    with pytest.raises(ValueError, match="ResNet-style"):
        create_model("convnext_atto", head="mhp", num_classes=N, small_stem=True, **TINY["convnext_atto"])


@pytest.mark.parametrize("head", ["linear", "mhp", "mhc", "mhs"])
def test_neck_in_front_of_every_head(head):
    torch.manual_seed(0)
    kw = dict(num_classes=N, head_sizes=None if head == "linear" else SIZES, **TINY["resnet10t"])
    plain = create_model("resnet10t", head=head, **kw)
    m = create_model("resnet10t", head=head, neck_dim=24, **kw)
    d = m.num_features
    assert m.head_in_features == 24 and m.mhe_config()["neck_dim"] == 24
    # head parameters = neck (Linear without bias + BatchNorm affine) + the head on 24-d inputs
    neck = d * 24 + 2 * 24
    assert head_parameters(m) == neck + sum(p.numel() for p in m.head.parameters())
    assert head_parameters(plain) == sum(p.numel() for p in plain.head.parameters())
    if head in ("linear", "mhp"):
        width = N if head == "linear" else sum(SIZES)
        assert head_parameters(m) - neck == 24 * width + width
    x = torch.randn(6, 1, 32, 32)
    m.train()
    m(x[:4], target=torch.randint(0, N, (4,))).backward()
    assert m.neck[0].weight.grad is not None and m.neck[0].weight.grad.abs().sum() > 0
    m.eval()
    feats = m.backbone.forward_head(m.backbone.forward_features(x), pre_logits=True)
    ref = torch.relu(m.neck[1](m.neck[0](feats)))  # Linear -> BatchNorm (running stats) -> ReLU
    torch.testing.assert_close(m.pooled(x), ref)
    if head == "mhc":
        m.head.beam = SIZES[0]
    logp = m(x)
    assert logp.shape == (6, N)
    assert torch.equal(m.topk(x, 5)[1], logp.topk(5, dim=-1)[1])
    with pytest.raises(ValueError, match="neck_dim must be a positive width"):
        create_model("resnet10t", head=head, neck_dim=-3, **kw)
