"""mmengine registration of the MHE cls heads: build from a config, train, predict like mmpretrain heads."""

from __future__ import annotations

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, Registry
from mmengine.structures import BaseDataElement


def _samples(labels):
    return [BaseDataElement(gt_label=torch.tensor([int(y)])) for y in labels]


@pytest.mark.parametrize(
    "cfg",
    [
        dict(type="MHPClsHead", in_channels=64, num_classes=60, head_sizes=[6, 10], loss_variant="ce_sum"),
        dict(type="MHCClsHead", in_channels=64, num_classes=60, head_sizes=[6, 10], hidden_dim=16, beam=6),
        dict(type="MHSClsHead", in_channels=64, num_classes=60, head_sizes=[6, 10], sampled_groups=3),
    ],
    ids=lambda c: c["type"],
)
def test_build_train_predict(cfg):
    import mhe_plugins.mm  # noqa: F401  (what custom_imports does)

    torch.manual_seed(0)
    head = MODELS.build(cfg)
    assert head.num_classes == 60
    # a separable toy problem: class prototypes + noise
    protos = torch.randn(60, 64) * 3
    y = torch.arange(60).repeat(2)
    x = protos[y] + 0.1 * torch.randn(len(y), 64)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        losses = head.loss((x,), _samples(y))
        assert set(losses) == {"loss"}
        first = first if first is not None else losses["loss"].item()
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert losses["loss"].item() < 0.2 * first
    preds = head.predict((x,), _samples(y))
    assert len(preds) == len(y)
    labels = torch.cat([p.pred_label for p in preds])
    scores = torch.stack([p.pred_score for p in preds])
    assert scores.shape == (len(y), 60)
    torch.testing.assert_close(scores.sum(-1), torch.ones(len(y)), atol=1e-4, rtol=0)
    assert (labels == y).float().mean() > 0.95
    assert torch.equal(labels, scores.argmax(-1))
    # predict without data samples, and the tuple-of-feats convention (last element is used)
    assert len(head.predict((torch.zeros(3, 64), x[:3]))) == 3


def test_custom_imports_from_a_config_file(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(
        "custom_imports = dict(imports=['mhe_plugins.mm'], allow_failed_imports=False)\n"
        "head = dict(type='MHPClsHead', in_channels=8, num_classes=100, num_heads=2)\n"
    )
    cfg = Config.fromfile(str(path))
    head = MODELS.build(cfg.head)
    assert type(head).__name__ == "MHPClsHead" and list(head.head.codec.head_sizes) == [10, 10]
    # a downstream child registry (as mmpretrain's MODELS) finds the heads through its parent
    child = Registry("model", parent=MODELS, scope="child_scope_for_test")
    assert type(child.build(dict(type="MHSClsHead", in_channels=8, num_classes=30))).__name__ == "MHSClsHead"


def test_bad_config_and_multilabel_targets_are_refused():
    import mhe_plugins.mm  # noqa: F401

    with pytest.raises(ValueError, match="product of head sizes"):
        MODELS.build(dict(type="MHPClsHead", in_channels=8, num_classes=100, head_sizes=[9, 10]))
    head = MODELS.build(dict(type="MHPClsHead", in_channels=8, num_classes=100))
    bad = [BaseDataElement(gt_label=torch.tensor([1, 2]))]
    with pytest.raises(ValueError, match="single-label"):
        head.loss((torch.randn(1, 8),), bad)
