"""IResNet backbones: published sizes, shapes, timm path."""

from __future__ import annotations

import pytest
import torch

from insightface_ext.backbones import get_model


def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_iresnet_parameter_counts_match_arcface_torch():
    # arcface_torch's iresnet50 / iresnet100 with a 512-d embedding at 112x112: 43.59 M / 65.16 M parameters
    with torch.device("meta"):  # count without allocating 100 M floats
        assert _params(get_model("r50")) == 43_590_848
        assert _params(get_model("r100")) == 65_156_160


@torch.no_grad()
def test_shapes_and_timm_backbone():
    m = get_model("r18", embedding_size=64, input_size=112, width=4).eval()
    assert m(torch.randn(2, 3, 112, 112)).shape == (2, 64)
    g = get_model("r34", embedding_size=32, input_size=32, in_chans=1, width=4).eval()
    assert g(torch.randn(3, 1, 32, 32)).shape == (3, 32)
    t = get_model("timm:resnet10t", embedding_size=24, in_chans=1).eval()
    assert t(torch.randn(2, 1, 32, 32)).shape == (2, 24)
    with pytest.raises(ValueError, match="divisible by 16"):
        get_model("r18", input_size=100)
    with pytest.raises(ValueError, match="unknown IResNet 'r7'"):
        get_model("r7")
