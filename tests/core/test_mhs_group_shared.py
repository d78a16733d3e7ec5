"""MHS with ``group_shared``: a class's row is its own row plus its group's shared row, everywhere the head
scores classes (sampled training logits, full logits, exact top-k, shards), and a step moves only the
sampled groups' rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mhe_plugins.heads import build_head
from mhe_plugins.margins import CombinedMargin
from mhe_plugins.optim import LazyAdam


def _head(**kw):
    torch.manual_seed(0)
    head = build_head("mhs", 6, 95, head_sizes=(12, 8), group_shared=True, sparse_grad=True, **kw)
    with torch.no_grad():
        head.group_weight.normal_()  # zero at start: make the shared rows matter
    return head


def test_rows_are_own_plus_shared_everywhere():
    head = _head()
    x = torch.randn(7, 6)
    rows = head.weight + head.group_weight[:, None, :]
    ref = x @ rows.reshape(-1, 6)[:95].t()
    torch.testing.assert_close(head.full_logits(x), ref)
    v, i = head.topk(x, 4)
    assert torch.equal(i, ref.topk(4, dim=1).indices)
    target = torch.tensor([0, 9, 17, 94, 40, 41, 3])
    out = head.sampled_logits(x, target)
    cols = (out.groups[:, None] * 8 + torch.arange(8)).reshape(-1)
    valid = cols < 95
    torch.testing.assert_close(out.logits[:, valid], ref[:, cols[valid]])
    assert bool(torch.isinf(out.logits[:, ~valid]).all())
    # the training loss is the cross-entropy of the sampled softmax over those rows
    loss = head(x, target).loss
    torch.testing.assert_close(loss, F.cross_entropy(out.logits, out.target))


def test_a_step_moves_only_the_sampled_groups_rows():
    head = _head()
    before_w, before_g = head.weight.detach().clone(), head.group_weight.detach().clone()
    opt = LazyAdam(list(head.parameters()), lr=0.1)
    target = torch.tensor([3, 20, 21])  # groups 0 and 2
    head(torch.randn(3, 6), target).loss.backward()
    assert head.group_weight.grad.is_sparse
    opt.step()
    moved_g = (head.group_weight.detach() != before_g).any(1)
    moved_w = (head.weight.detach() != before_w).flatten(1).any(1)
    assert moved_g.nonzero().flatten().tolist() == [0, 2] == moved_w.nonzero().flatten().tolist()


def test_shards_carry_the_shared_rows_and_refuse_shards_without_them():
    head = _head()
    x = torch.randn(5, 6)
    state = head.shard_state()
    other = build_head("mhs", 6, 95, head_sizes=(12, 8), group_shared=True)
    other.load_shards([state])
    torch.testing.assert_close(other.full_logits(x), head.full_logits(x))
    plain = build_head("mhs", 6, 95, head_sizes=(12, 8)).shard_state()
    with pytest.raises(ValueError, match="group_shared rows but the checkpoint shards have none"):
        other.load_shards([plain])
    assert "group_shared=True" in repr(head)


@pytest.mark.parametrize("margin", [None, (1.0, 0.3, 0.0)])
def test_topk_scores_blocks_of_groups_never_all_rows_and_stays_exact(monkeypatch, margin):
    from mhe_plugins.heads import mhs as mhs_mod

    head = _head(**({"margin": CombinedMargin(*margin, s=8.0)} if margin else {}))
    head.TOPK_CHUNK = 16  # 2 groups of 8 per block: 6 blocks, the last one cut at the 95 real classes
    x = torch.randn(9, 6)
    rows = (head.weight + head.group_weight[:, None, :]).reshape(-1, 6)[:95]
    if margin:
        ref = F.normalize(x, dim=-1) @ F.normalize(rows, dim=-1).t() * head.margin.s
    else:
        ref = x @ rows.t()
    seen, real = [], mhs_mod.chunked_topk
    monkeypatch.setattr(
        mhs_mod, "chunked_topk", lambda x, w, k, **kw: seen.append(w.shape[0]) or real(x, w, k, **kw)
    )
    for k in (1, 5, 20, 95):  # 20 and 95: more than one block holds
        v, i = head.topk(x, k)
        rv, ri = ref.topk(k, dim=1)
        torch.testing.assert_close(v, rv)
        assert torch.equal(i, ri)
    assert max(seen) == 16 and min(seen) == 15  # never more than one block of rows at once
