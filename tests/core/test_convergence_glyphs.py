"""Convergence on real data: the bundled 500-class CJK glyph subset (train fonts -> unseen test fonts).

A 1-hidden-layer MLP on raw pixels with each head; dense softmax is the reference. Measured when written
(6 epochs, 1 thread): dense 90.5 %, MHS 91.0 %, MHC 70.6 %, MHP 51.0 % top-1 on the held-out fonts; chance
is 0.2 %. The thresholds leave room for platform noise but fail on any broken loss or decoder.
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from mhe_plugins import LabelCodec, MHCHead, MHPHead, MHSHead
from mhe_plugins.datasets.glyphs import load_glyph_split

DATA = Path(__file__).resolve().parents[2] / "data" / "glyphs"


@pytest.fixture(scope="module")
def glyphs():
    def tensors(split):
        im, lab, _ = load_glyph_split(DATA, split)
        return torch.from_numpy(im).float().div(255).flatten(1), torch.from_numpy(lab).long()

    return tensors("train"), tensors("test")


def _train_and_score(head_factory, glyphs, epochs=6):
    (xtr, ytr), (xte, yte) = glyphs
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(xtr.shape[1], 256), nn.ReLU())
    head = head_factory()
    opt = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 128):
            idx = perm[i : i + 128]
            loss = head.compute_loss(trunk(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        feats = trunk(xte)
        top1 = (head.predict(feats) == yte).float().mean().item()
        top5 = (head.topk(feats, 5)[1] == yte[:, None]).any(1).float().mean().item()
    return top1, top5


class DenseHead(nn.Linear):
    def compute_loss(self, x, y):
        return nn.functional.cross_entropy(self(x), y)

    def predict(self, x):
        return self(x).argmax(-1)

    def topk(self, x, k):
        return self(x).topk(k, -1)


def test_all_heads_learn_real_glyphs_and_mhs_matches_dense(glyphs):
    codec = LabelCodec.balanced(500, 2)  # [23, 22]: 506 slots, 6 invalid ids masked
    assert codec.capacity > 500
    res = {
        "dense": _train_and_score(lambda: DenseHead(256, 500), glyphs),
        "mhs": _train_and_score(lambda: MHSHead(256, codec), glyphs),
        "mhc": _train_and_score(lambda: MHCHead(256, codec, hidden_dim=64, beam=4), glyphs),
        "mhp": _train_and_score(lambda: MHPHead(256, codec), glyphs),
    }
    print(res)
    assert res["dense"][0] > 0.80
    assert res["mhs"][0] >= res["dense"][0] - 0.03
    assert res["mhc"][0] > 0.55
    assert res["mhp"][0] > 0.35
    for top1, top5 in res.values():
        assert top5 >= top1
