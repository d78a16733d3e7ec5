"""MHS sampling: the sampled-softmax correction equals -log(inclusion probability) measured by Monte Carlo,
and an empty batch gives a finite zero loss connected to the graph."""

from __future__ import annotations

import math

import pytest
import torch

from insightface_ext.heads import MHSArcFace
from mhe_plugins import ArcFaceMargin, LabelCodec, MHSHead


def _pair(**kw):
    """Two heads with the same weights, with and without the correction."""
    codec = LabelCodec([8, 3])
    plain = MHSHead(4, codec, margin=ArcFaceMargin(0.2, 16.0), sampling_correction=False, **kw)
    corr = MHSHead(4, codec, margin=ArcFaceMargin(0.2, 16.0), sampling_correction=True, **kw)
    corr.load_state_dict(plain.state_dict())
    return plain, corr


def test_per_sample_correction_is_minus_log_inclusion_probability():
    torch.manual_seed(0)
    plain, corr = _pair(mode="per_sample", sampled_groups=3)
    t = torch.randint(0, 24, (16,))
    # Monte Carlo inclusion probability of one fixed other group among a sample's negatives
    hits = trials = 0
    for _ in range(1500):
        g = plain.sampled_logits(torch.randn(16, 4), t).groups
        other = (t // 3 + 1) % 8  # a group that is never the sample's own
        hits += int((g[:, 1:] == other[:, None]).any(1).sum())
        trials += 16
    q_mc = hits / trials
    x = torch.randn(16, 4)
    torch.manual_seed(5)
    a = plain.sampled_logits(x, t)
    torch.manual_seed(5)
    b = corr.sampled_logits(x, t)
    assert torch.equal(a.groups, b.groups)
    diff = b.logits - a.logits
    assert torch.equal(diff[:, :3], torch.zeros(16, 3))  # own group (target and siblings): uncorrected
    offset = diff[:, 3:]
    assert torch.allclose(offset, offset[0, 0].expand_as(offset))
    assert math.exp(-offset[0, 0].item()) == pytest.approx(q_mc, abs=0.01)  # exact value: 2 / 7
    # the loss really changes, and the target logit is untouched
    assert corr.loss_from_sampled(b).item() > plain.loss_from_sampled(a).item()


def test_batch_union_correction_only_on_random_extra_groups():
    torch.manual_seed(1)
    plain, corr = _pair(mode="batch_union", sample_rate=0.5)  # 8 groups -> 4 scored
    t = torch.tensor([0, 1, 7, 8])  # groups 0 and 2 are positives
    counts = torch.zeros(8)
    n = 4000
    for _ in range(n):
        counts[plain.sample_groups(t // 3)[0]] += 1  # what forward draws
    assert counts[0] == counts[2] == n
    q_mc = counts[[1, 3, 4, 5, 6, 7]].mean().item() / n
    x = torch.randn(4, 4)
    torch.manual_seed(9)
    a = plain.sampled_logits(x, t)
    torch.manual_seed(9)
    b = corr.sampled_logits(x, t)
    assert torch.equal(a.groups, b.groups) and a.groups.numel() == 4
    diff = (b.logits - a.logits).view(4, 4, 3)
    positive = torch.isin(a.groups, torch.tensor([0, 2]))
    assert torch.equal(diff[:, positive], torch.zeros_like(diff[:, positive]))
    extra = diff[:, ~positive]
    assert torch.allclose(extra, extra.flatten()[0].expand_as(extra))
    assert math.exp(-extra.flatten()[0].item()) == pytest.approx(q_mc, abs=0.015)  # exact value: 2 / 6


@pytest.mark.parametrize("mode", ["batch_union", "per_sample"])
def test_empty_batch_gives_zero_loss_on_the_graph_and_empty_topk(mode):
    head = MHSHead(4, LabelCodec([5, 3], 14), mode=mode, margin=ArcFaceMargin(0.5, 32.0), sparse_grad=True)
    x = torch.randn(0, 4, requires_grad=True)
    loss = head.compute_loss(x, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert x.grad.shape == (0, 4)
    assert head.compute_loss(x, torch.zeros(0, dtype=torch.long), reduction="none").shape == (0,)
    v, i = head.topk(torch.randn(0, 4), 3)
    assert v.shape == (0, 3) and i.shape == (0, 3) and i.dtype == torch.long
    face = MHSArcFace(4, 14, head_sizes=(5, 3))
    assert face(x, torch.zeros(0, dtype=torch.long)).loss.item() == 0.0


def test_lazy_sgd_sparse_grads_sorted_or_not_equal_dense_sgd_on_touched_rows():
    from mhe_plugins.optim import LazySGD

    torch.manual_seed(3)
    for idx in ([1, 4, 6], [6, 1, 4, 1]):  # sorted unique (MHSHead's) and unsorted with a duplicate
        a = torch.randn(8, 2, 3)
        b = a.clone()
        vals = torch.randn(len(idx), 2, 3)
        sparse = torch.sparse_coo_tensor(torch.tensor([idx]), vals, a.shape, check_invariants=True)
        pa, pb = torch.nn.Parameter(a), torch.nn.Parameter(b)
        oa = LazySGD([pa], lr=0.1, momentum=0.9, weight_decay=0.01)
        ob = torch.optim.SGD([pb], lr=0.1, momentum=0.9, weight_decay=0.01)
        for _ in range(2):
            pa.grad, pb.grad = sparse.clone(), sparse.to_dense()
            oa.step()
            ob.step()
        rows = sorted(set(idx))
        torch.testing.assert_close(pa.data[rows], pb.data[rows])
        untouched = [r for r in range(8) if r not in rows]
        assert torch.equal(pa.data[untouched], a[untouched])
