"""MHCMultiLabelHead: exact decoding vs brute force, teacher forcing, masking, permutation, learning."""

import pytest
import torch

from mhe_plugins.heads import build_head
from mhe_plugins.heads.mhc_multilabel import pad_labels


def _head(n=103, g=10, k=None, seed=None, d=16):
    torch.manual_seed(0)
    return build_head(
        "mhc_multilabel", d, n, num_groups=g, hidden_dim=8, candidates_topk=k, permutation_seed=seed
    )


def test_group_split_and_ragged_last_group_is_masked():
    head = _head(n=103, g=10)
    assert (head.num_groups, head.group_size) == (10, 11)  # {G; per} rule: 10*11 = 110 >= 103
    out = head.candidates(torch.randn(4, 16))
    # 7 dummy slots exist only in the last group and are masked, never real duplicated ids
    last = out.candidates >= 103
    assert torch.equal(last, ~out.candidate_mask)
    for row in out.candidates:
        assert row.unique().numel() == row.numel()


@pytest.mark.parametrize("seed", [None, 3])
def test_topk_with_all_groups_equals_brute_force(seed):
    head = _head(n=103, g=10, k=10, seed=seed).eval()
    x = torch.randn(32, 16)
    with torch.no_grad():
        vals, ids = head.topk(x, 7)
        full = head.full_scores(x)
    ref_vals, ref_ids = full.topk(7, dim=1)
    torch.testing.assert_close(vals, ref_vals)
    assert torch.equal(ids, ref_ids)
    assert all(r.unique().numel() == 7 for r in ids)


def test_topk_with_few_groups_scores_are_product_and_within_top_groups():
    head = _head(n=103, g=10, k=2).eval()
    x = torch.randn(16, 16)
    with torch.no_grad():
        vals, ids = head.topk(x, 30)  # 2 groups x 11 slots - dummies < 30 -> padded with -1
        full = head.full_scores(x)
        top_groups = head.group(x).topk(2, dim=1).indices
    for b in range(16):
        real = ids[b][ids[b] >= 0]
        assert real.numel() == real.unique().numel()
        assert set((real // 11).tolist()) <= set(top_groups[b].tolist())
        torch.testing.assert_close(vals[b][: real.numel()], full[b, real])
        assert (vals[b][real.numel() :] == -1).all()


def test_teacher_forcing_keeps_every_truth_group_even_beyond_k():
    head = _head(n=103, g=10, k=1)
    target = pad_labels([[0, 25, 50, 102], [7], []])
    out = head.candidates(torch.randn(3, 16), target)
    groups = (out.candidates // 11).tolist()
    assert {0, 2, 4, 9} <= set(groups[0])  # 4 truth groups although candidates_topk=1
    assert 0 in groups[1]
    loss = head.loss_from_candidates(out, target)
    assert torch.isfinite(loss)


def test_candidate_targets_match_brute_force_bce():
    head = _head(n=103, g=10, k=3, seed=5)
    target = pad_labels([[1, 2, 60], [100, 102], [5]])
    x = torch.randn(3, 16)
    out = head.candidates(x, target)
    loss = head.loss_from_candidates(out, target)
    # brute force: per sample, loop over candidates
    internal = head.to_internal
    cl, ct = [], []
    for b, labs in enumerate([[1, 2, 60], [100, 102], [5]]):
        pos = {int(internal[i]) for i in labs}
        for j, c in enumerate(out.candidates[b].tolist()):
            if c < 103:
                cl.append(out.candidate_logits[b, j])
                ct.append(1.0 if c in pos else 0.0)
        assert sum(ct[-out.candidate_mask[b].sum() :]) == len(labs)  # every positive is a candidate
    cand = torch.nn.functional.binary_cross_entropy_with_logits(torch.stack(cl), torch.tensor(ct))
    gt = torch.zeros(3, 10)
    for b, labs in enumerate([[1, 2, 60], [100, 102], [5]]):
        for i in labs:
            gt[b, int(internal[i]) // 11] = 1
    grp = torch.nn.functional.binary_cross_entropy_with_logits(out.group_logits, gt)
    torch.testing.assert_close(loss, cand + grp)


def test_out_of_range_label_is_a_clear_error():
    head = _head(n=103, g=10)
    with pytest.raises(ValueError, match="label id 103"):
        head.compute_loss(torch.randn(1, 16), pad_labels([[103]]))


def test_learns_a_separable_multilabel_problem():
    torch.manual_seed(1)
    n, d = 200, 32
    protos = torch.randn(n, d)
    labels = [torch.randperm(n)[:3].tolist() for _ in range(400)]
    x = torch.stack([protos[ls].sum(0) for ls in labels]) + 0.1 * torch.randn(400, d)
    head = build_head(
        "mhc_multilabel", d, n, num_groups=14, hidden_dim=32, candidates_topk=6, permutation_seed=0
    )
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    tgt = pad_labels(labels)
    for _ in range(300):
        opt.zero_grad()
        head.compute_loss(x, tgt).backward()
        opt.step()
    with torch.no_grad():
        ids = head.eval().topk(x, 3)[1]
    p3 = sum(len(set(ids[i].tolist()) & set(labels[i])) for i in range(400)) / (3 * 400)
    assert p3 > 0.75  # chance is 0.015
