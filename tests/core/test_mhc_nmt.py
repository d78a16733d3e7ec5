"""MHC as an exact-likelihood output layer (NMT): per-target log-probs, batched full log-probs, tied
leaves, token-level label smoothing; MHP per-head smoothing that leaves the true id 1 - eps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mhe_plugins import LabelCodec, MHCHead, MHPHead
from mhe_plugins.heads.mhp import per_head_smoothing


def _brute(head: MHCHead, x: torch.Tensor) -> torch.Tensor:
    """log p(v) = sum over levels of log_softmax over the siblings of v's prefix, one label at a time."""
    codec, n = head.codec, head.num_labels
    out = torch.empty(x.shape[0], n, dtype=torch.float64)
    for v in range(n):
        digits = codec.encode(torch.tensor([v]))[0]
        total = torch.zeros(x.shape[0], dtype=torch.float64)
        prefix = 0
        for h, size in enumerate(codec.head_sizes):
            sibs = [prefix * size + c for c in range(size)]
            valid = [s for s in sibs if s <= codec.prefix_limit(h)]
            if h == 0:
                z = head._root_logits(x).double()[:, valid]
            else:
                q = head.query(h, x).double()
                emb = head.node_embed[h - 1](torch.tensor(valid)).double()
                z = q @ emb.t() + head.node_bias[h - 1](torch.tensor(valid)).double()[:, 0]
            total += F.log_softmax(z, -1)[:, valid.index(prefix * size + int(digits[h]))]
            prefix = prefix * size + int(digits[h])
        out[:, v] = total
    return out


@pytest.mark.parametrize("group_mlp_dim", [0, 5])
@pytest.mark.parametrize("sizes,n", [([5, 7], 33), ([3, 4, 3], 31), ([6, 6], 36)])
def test_batched_and_target_log_probs_equal_brute_force(sizes, n, group_mlp_dim):
    torch.manual_seed(0)
    head = MHCHead(12, LabelCodec(sizes, n), hidden_dim=6, group_mlp_dim=group_mlp_dim)
    for b in head.node_bias:
        nn.init.normal_(b.weight)
    for mlp in head.group_mlps:  # trained (non-zero) group MLPs, so they change every group level's scores
        nn.init.normal_(mlp[2].weight)
    assert len(head.group_mlps) == (len(sizes) - 1 if group_mlp_dim else 0)
    x = torch.randn(9, 12)
    ref = _brute(head, x)
    with torch.no_grad():
        full = head.log_prob(x).double()
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(9, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(full, head.log_prob(x).double(), atol=1e-5, rtol=1e-5)
    y = torch.randint(0, n, (9,))
    tlp = head.target_log_prob(x, y).double()
    torch.testing.assert_close(tlp, ref.gather(1, y[:, None])[:, 0], atol=1e-5, rtol=1e-5)
    # leading dims are kept
    assert head.log_prob(x.view(3, 3, 12)).shape == (3, 3, n)
    assert head.target_log_prob(x.view(3, 3, 12), y.view(3, 3)).shape == (3, 3)


def _implied_target(head: MHCHead, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Full-vocabulary target q(v) the smoothed loss trains towards, built label by label: uniform eps/(N-1)
    mass per label, aggregated per node on the true path; off the true path the model's own conditional."""
    codec, n = head.codec, head.num_labels
    u = eps / (n - 1)
    with torch.no_grad():
        p = head.log_prob(x).double().exp()
    q = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for i in range(x.shape[0]):
        yd = codec.encode(y[i : i + 1])[0].tolist()
        uniform = torch.full((n,), u, dtype=torch.float64)
        uniform[y[i]] = 1 - eps
        for v in range(n):
            vd = codec.encode(torch.tensor([v]))[0].tolist()
            k = next((h for h in range(len(vd)) if vd[h] != yd[h]), len(vd))  # first level off the true path
            if k == len(vd):
                q[i, v] = 1 - eps
                continue
            # mass of v's level-k node (uniform target, true path not below it), then model's split inside
            stride = codec.strides[k]
            node = sum(d * codec.strides[h] for h, d in enumerate(vd[: k + 1])) // stride
            ids = torch.arange(node * stride, min((node + 1) * stride, n))
            inside = p[i, ids]
            q[i, v] = uniform[ids].sum() * p[i, v] / inside.sum()
    return q


@pytest.mark.parametrize("sizes,n", [([5, 7], 33), ([3, 4, 3], 31)])
def test_smoothed_loss_implies_token_level_target(sizes, n):
    torch.manual_seed(1)
    eps = 0.1
    head = MHCHead(10, LabelCodec(sizes, n), hidden_dim=5).double()
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, n - 1, 17, 30, 11])
    q = _implied_target(head, x.detach(), y, eps)
    torch.testing.assert_close(q.sum(-1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(q.gather(1, y[:, None])[:, 0], torch.full((6,), 1 - eps, dtype=torch.float64))
    # every sibling of the true label gets exactly fairseq's eps / (N - 1), every top-level group its share
    u, stride, top = eps / (n - 1), head.codec.strides[-2], head.codec.strides[0]
    for i in range(6):
        g = int(y[i]) // stride
        others = [v for v in range(g * stride, min((g + 1) * stride, n)) if v != int(y[i])]
        torch.testing.assert_close(q[i, others], torch.full((len(others),), u, dtype=torch.float64))
        for g0 in range(-(-n // top)):
            ids = range(g0 * top, min((g0 + 1) * top, n))
            want = len(ids) * u + (1 - eps - u) * (int(y[i]) in ids)
            assert float(q[i, list(ids)].sum()) == pytest.approx(want, rel=1e-9)
    # the loss's gradient is exactly that of the full cross-entropy against q
    loss, nll = head.smoothed_nll(x, y, eps)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    full = -(q * head.log_prob(x)).sum()
    (gref,) = torch.autograd.grad(full, x)
    torch.testing.assert_close(gx, gref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(nll, -head.target_log_prob(x, y))
    # eps = 0: loss is the exact nll
    l0, n0 = head.smoothed_nll(x, y, 0.0)
    torch.testing.assert_close(l0, n0)


def test_smoothed_loss_closed_form_at_uniform_logits():
    sizes, n, eps = [5, 7], 33, 0.2  # groups 0..3 have 7 labels, group 4 has 5
    head = MHCHead(4, LabelCodec(sizes, n), hidden_dim=3)
    for p in head.parameters():
        nn.init.zeros_(p)
    y = torch.tensor([3, 30])  # group 0 (7 labels), group 4 (5 labels)
    loss, nll = head.smoothed_nll(torch.randn(2, 4), y, eps)
    u = eps / (n - 1)
    for i, (members, g_size) in enumerate([(7, 7), (5, 5)]):
        q_group = 1 - eps + (members - 1) * u  # mass of the true group
        expected = math.log(5) + q_group * math.log(g_size)
        assert float(loss[i].detach()) == pytest.approx(expected, rel=1e-6)
        assert float(nll[i].detach()) == pytest.approx(math.log(5) + math.log(g_size), rel=1e-6)


def test_tied_leaf_embedding_shares_rows_and_masks_padding_nodes():
    torch.manual_seed(2)
    codec = LabelCodec([5, 7], 33)  # capacity 35 > 33 leaves
    head = MHCHead(8, codec, hidden_dim=6)
    table = nn.Parameter(torch.randn(33, 6))
    head.tie_leaf_embedding(table)
    assert head.node_embed[-1].weight is table
    x, y = torch.randn(4, 8), torch.tensor([0, 7, 32, 20])
    full = head.log_prob(x)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(full.double(), _brute(head, x), atol=1e-5, rtol=1e-5)
    head.target_log_prob(x, y).sum().backward()
    assert table.grad is not None and table.grad[[0, 7, 32, 20]].abs().sum() > 0
    with pytest.raises(ValueError, match="width 5 != MHC hidden_dim 6"):
        head.tie_leaf_embedding(nn.Parameter(torch.randn(33, 5)))
    with pytest.raises(ValueError, match="32 rows < num_labels=33"):
        head.tie_leaf_embedding(nn.Parameter(torch.randn(32, 6)))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        head.smoothed_nll(x, y, 1.0)


def test_mhp_token_smoothing_keeps_one_minus_eps_on_true_id():
    torch.manual_seed(3)
    eps, codec = 0.1, LabelCodec([6, 5, 4], 120)
    head = MHPHead(7, codec)
    eps_h = per_head_smoothing(eps, 3)
    assert (1 - eps_h) ** 3 == pytest.approx(1 - eps)
    x, y = torch.randn(5, 7, dtype=torch.float64), torch.tensor([0, 1, 59, 119, 77])
    head = head.double()
    # implied product target: per head (1 - eps_h) on the digit, eps_h / (C_h - 1) elsewhere
    digits = codec.encode(y)
    qs = []
    for h, c in enumerate(codec.head_sizes):
        qh = torch.full((5, c), eps_h / (c - 1), dtype=torch.float64)
        qh.scatter_(1, digits[:, h : h + 1], 1 - eps_h)
        qs.append(qh)
    q = torch.einsum("ba,bc,bd->bacd", *qs).reshape(5, 120)
    torch.testing.assert_close(q.gather(1, y[:, None])[:, 0], torch.full((5,), 1 - eps, dtype=torch.float64))
    # the loss equals the cross-entropy of that product target against the product distribution
    lp_full = head.log_prob(x)
    ref = -(q * lp_full).sum(-1)
    got = head.token_smoothed_loss(head.logits(x), y, eps, reduction="none")
    torch.testing.assert_close(got, ref)
    # padding is ignored; the old per-head-full-eps loss keeps only (1 - eps)^H on the true id
    pad = y.clone()
    pad[1] = 0
    got_ign = head.token_smoothed_loss(head.logits(x), pad, eps, ignore_index=0, reduction="sum")
    assert float(got_ign) == pytest.approx(float(ref[2:].sum()), rel=1e-9)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        per_head_smoothing(1.0, 2)


@pytest.mark.parametrize("tied", [False, True])
def test_grouped_and_per_item_sibling_scoring_agree(tied, monkeypatch):
    torch.manual_seed(4)
    codec = LabelCodec([4, 5, 3], 53)  # 60 >= 53: tied table has fewer rows than leaf nodes
    head = MHCHead(6, codec, hidden_dim=5).double()
    for b in head.node_bias:
        nn.init.normal_(b.weight)
    if tied:
        head.tie_leaf_embedding(nn.Parameter(torch.randn(53, 5, dtype=torch.float64)))
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 53, (40,))

    def run():
        head.zero_grad()
        loss, nll = head.smoothed_nll(x, y, 0.1)
        loss.sum().backward()
        return loss.detach(), nll.detach(), [p.grad.clone() for p in head.parameters()]

    grouped = run()
    monkeypatch.setattr(MHCHead, "GROUPED_MAX_PARENTS", 0)
    per_item = run()
    torch.testing.assert_close(grouped[0], per_item[0])
    torch.testing.assert_close(grouped[1], per_item[1])
    for a, b in zip(grouped[2], per_item[2]):
        torch.testing.assert_close(a, b)
    # and both equal the brute-force label log-probs
    torch.testing.assert_close(-grouped[1], _brute(head, x).gather(1, y[:, None])[:, 0])


def test_group_mlp_starts_linear_trains_and_keeps_exact_topk():
    """The group MLP adds nothing at init (same scores as the linear head), gets gradient from the
    teacher-forced loss, and full-width beam search stays exact over the MLP-scored groups."""
    torch.manual_seed(0)
    codec = LabelCodec([4, 3, 5], 57)
    linear = MHCHead(10, codec, hidden_dim=6)
    with_mlp = MHCHead(10, codec, hidden_dim=6, group_mlp_dim=8)
    with_mlp.load_state_dict(linear.state_dict(), strict=False)
    x, y = torch.randn(16, 10), torch.randint(0, 57, (16,))
    torch.testing.assert_close(with_mlp.log_prob(x), linear.log_prob(x))
    loss, _ = with_mlp.smoothed_nll(x, y, 0.1)
    loss.mean().backward()
    assert all(m[2].weight.grad.abs().sum() > 0 for m in with_mlp.group_mlps)
    for mlp in with_mlp.group_mlps:
        nn.init.normal_(mlp[2].weight)
    full = with_mlp.log_prob(x)
    values, ids = with_mlp.topk(x, 7, beam=57)
    ref_values, ref_ids = full.topk(7, dim=-1)
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)
    assert torch.equal(ids, ref_ids)
    assert "group_mlp_dim=8" in repr(with_mlp)
    with pytest.raises(ValueError, match="group_mlp_dim"):
        MHCHead(10, codec, group_mlp_dim=-1)
