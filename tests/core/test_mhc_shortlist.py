"""MHC with a short list at the root and a learned label order: exact log-probs against a brute force
over every label, the smoothed loss's implied target, beam search, the order in the state dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mhe_plugins import LabelCodec, MHCHead, build_head


def _head(n=40, k=6, sizes=(5, 7), order=None, tied=False, mlp=0, hidden=5, d=9) -> MHCHead:
    torch.manual_seed(0)
    head = MHCHead(
        d,
        LabelCodec(list(sizes), n - k),
        hidden_dim=hidden,
        group_mlp_dim=mlp,
        shortlist=k,
        label_order=order,
    ).double()
    for b in head.node_bias:
        nn.init.normal_(b.weight)
    if k:
        nn.init.normal_(head.short_bias.weight)
    for m in head.group_mlps:
        nn.init.normal_(m[2].weight)
    if tied:
        head.tie_leaf_embedding(nn.Parameter(torch.randn(n, hidden, dtype=torch.float64)))
    return head


def _path(head: MHCHead, v: int) -> list[int]:
    """Tree path of label v: [root node] (short list) or [K + group, digit_1, ...] (tail)."""
    pos = int(head.label_order.position[v])
    if pos < head.shortlist:
        return [pos]
    digits = head.codec.encode(torch.tensor([pos - head.shortlist]))[0].tolist()
    return [head.shortlist + digits[0], *digits[1:]]


def _brute(head: MHCHead, x: torch.Tensor) -> torch.Tensor:
    """log p(v) label by label: the root softmax, then each level's softmax over the valid siblings."""
    n, codec, K = head.num_labels, head.codec, head.shortlist
    root = F.log_softmax(head._root_logits(x), -1)
    out = torch.empty(x.shape[0], n, dtype=torch.float64)
    for v in range(n):
        path = _path(head, v)
        total = root[:, path[0]].clone()
        prefix = path[0] - K
        for h in range(1, len(path)):
            size = codec.head_sizes[h]
            valid = [s for s in (prefix * size + c for c in range(size)) if s <= codec.prefix_limit(h)]
            emb = head._embed(h, torch.tensor(valid))
            z = head.query(h, x) @ emb.t() + head.node_bias[h - 1](torch.tensor(valid))[:, 0]
            total += F.log_softmax(z, -1)[:, valid.index(prefix * size + path[h])]
            prefix = prefix * size + path[h]
        out[:, v] = total
    return out


ORDERS = {"identity": None, "shuffled": torch.randperm(40, generator=torch.Generator().manual_seed(5))}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("k,sizes", [(6, (5, 7)), (1, (3, 4, 4)), (0, (5, 8))])
def test_log_probs_equal_brute_force_and_sum_to_one(order, tied, k, sizes):
    head = _head(k=k, sizes=sizes, order=ORDERS[order], tied=tied, mlp=4)
    x = torch.randn(7, 9, dtype=torch.float64)
    ref = _brute(head, x)
    full = head.log_prob(x)
    torch.testing.assert_close(full, ref)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(7, dtype=torch.float64))
    y = torch.tensor([0, 5, 6, 39, 17, 22, 1])
    torch.testing.assert_close(head.target_log_prob(x, y), ref.gather(1, y[:, None])[:, 0])
    out = head(x, y)  # teacher-forced path, head smoothing: the same exact log p(target)
    torch.testing.assert_close(out.target_log_prob, ref.gather(1, y[:, None])[:, 0])
    torch.testing.assert_close(out.loss, -ref.gather(1, y[:, None]).mean())
    loss, nll = head.smoothed_nll(x, y, 0.0)
    torch.testing.assert_close(loss, nll)
    torch.testing.assert_close(nll, -ref.gather(1, y[:, None])[:, 0])


def _implied_target(head: MHCHead, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """q(v) the smoothed loss trains towards: eps/(N-1) per label (1 - eps on the true one) aggregated per
    node on the true path; below the first node off the true path, the model's own split."""
    n = head.num_labels
    p = head.log_prob(x).detach().exp()
    paths = [_path(head, v) for v in range(n)]
    q = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for i in range(x.shape[0]):
        uniform = torch.full((n,), eps / (n - 1), dtype=torch.float64)
        uniform[y[i]] = 1 - eps
        true = paths[int(y[i])]
        for v in range(n):
            k = next((h for h in range(len(paths[v])) if h >= len(true) or paths[v][h] != true[h]), None)
            if k is None:
                q[i, v] = 1 - eps
                continue
            inside = [w for w in range(n) if paths[w][: k + 1] == paths[v][: k + 1]]
            q[i, v] = uniform[inside].sum() * p[i, v] / p[i, inside].sum()
    return q


@pytest.mark.parametrize("order", ORDERS)
def test_smoothed_loss_is_full_cross_entropy_against_the_implied_target(order):
    eps = 0.1
    head = _head(order=ORDERS[order])
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 39, 17, 30, 11])
    q = _implied_target(head, x, y, eps)
    torch.testing.assert_close(q.sum(-1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(q.gather(1, y[:, None])[:, 0], torch.full((6,), 1 - eps, dtype=torch.float64))
    short = head.label_order.order[: head.shortlist]
    for i in range(6):  # every short-list label other than the target gets exactly eps / (N - 1)
        others = [int(v) for v in short if int(v) != int(y[i])]
        torch.testing.assert_close(q[i, others], torch.full((len(others),), eps / 39, dtype=torch.float64))
    loss, _ = head.smoothed_nll(x, y, eps)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    (gref,) = torch.autograd.grad(-(q * head.log_prob(x)).sum(), x)
    torch.testing.assert_close(gx, gref)


@pytest.mark.parametrize("order", ORDERS)
def test_exact_beam_topk_merges_short_list_and_tail(order):
    head = _head(order=ORDERS[order], tied=True)
    x = torch.randn(11, 9, dtype=torch.float64)
    full = head.log_prob(x)
    for k in (1, 5, 40):
        values, ids = head.topk(x, k, beam=35)  # beam >= the tail's capacity: exact
        ref_v, _ = full.topk(k, -1)
        torch.testing.assert_close(values, ref_v)
        torch.testing.assert_close(full.gather(1, ids), ref_v)
        assert all(len(set(r.tolist())) == k for r in ids)
    bad = torch.full((3, 9), float("nan"), dtype=torch.float64)
    assert bool((head.topk(bad, 40)[1] < 40).all())


def test_grouped_and_per_item_sibling_scoring_agree(monkeypatch):
    head = _head(n=60, k=4, sizes=(4, 5, 3), order=torch.randperm(60), tied=True)
    x, y = torch.randn(50, 9, dtype=torch.float64), torch.randint(0, 60, (50,))

    def run():
        head.zero_grad()
        loss, nll = head.smoothed_nll(x, y, 0.1)
        loss.sum().backward()
        return [
            loss.detach(),
            nll.detach(),
            *(p.grad.clone() for p in head.parameters() if p.grad is not None),
        ]

    grouped = run()
    monkeypatch.setattr(MHCHead, "GROUPED_MAX_PARENTS", 0)
    for a, b in zip(grouped, run()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tied", [False, True])
def test_beam_search_reads_each_sibling_block_once_and_stays_exact(monkeypatch, tied):
    """Beam search scores the children of B x beam prefixes. Gathering a node-embedding copy per
    (row, prefix) was B x beam x C x hidden values (39 GB for 320 rows, beam 10, groups of 24,000 tokens);
    now no gather is larger than the node table, grouped or per item in bounded blocks, and both stay exact."""
    head = _head(n=60, k=4, sizes=(4, 5, 3), order=torch.randperm(60), tied=tied)
    x = torch.randn(30, 9, dtype=torch.float64)
    full = head.log_prob(x)
    ref_v, _ = full.topk(7, -1)
    table = max(e.weight.numel() for e in head.node_embed)
    gathered = []
    embed = head._embed
    monkeypatch.setattr(head, "_embed", lambda *a: gathered.append(embed(*a).numel()) or embed(*a))
    for per_item in (False, True):
        if per_item:  # many distinct parents: per-item scoring, a few rows per block
            monkeypatch.setattr(MHCHead, "GROUPED_MAX_PARENTS", 0)
            monkeypatch.setattr(MHCHead, "PER_ITEM_ELEMENTS", 2 * 3 * head.hidden_dim)
        gathered.clear()
        values, ids = head.topk(x, 7, beam=20)  # beam >= the tail's groups x children: exact
        torch.testing.assert_close(values, ref_v)
        torch.testing.assert_close(full.gather(1, ids), ref_v)
        assert gathered and max(gathered) <= (2 * 3 * head.hidden_dim if per_item else table)
        assert 30 * 20 * 3 * head.hidden_dim > table  # what the per-(row, prefix) gather would have read


def test_order_travels_in_the_state_dict_and_old_checkpoints_load():
    order = torch.randperm(40)
    trained = _head(order=order)
    fresh = _head()
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.label_order.order, order) and not fresh.label_order.identity
    x = torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(fresh.log_prob(x), trained.log_prob(x))
    # a checkpoint written before label orders existed (no key) is in id order
    old = {k: v for k, v in _head(k=0, sizes=(5, 8)).state_dict().items() if k != "label_order.order"}
    plain = _head(k=0, sizes=(5, 8))
    plain.load_state_dict(old)
    assert plain.label_order.identity
    # built without its order file: unusable until the checkpoint provides the order
    pending = _head()
    pending.label_order.expect_from_checkpoint()
    with pytest.raises(RuntimeError, match="label order is not set"):
        pending.log_prob(x)
    with pytest.raises(RuntimeError, match="Missing key"):
        pending.load_state_dict(old, strict=True)
    pending.load_state_dict(trained.state_dict())
    torch.testing.assert_close(pending.log_prob(x), trained.log_prob(x))


def test_bad_orders_and_short_lists_are_refused():
    with pytest.raises(ValueError, match="appears 2 times"):
        _head(order=[0, 0, *range(2, 40)])
    with pytest.raises(ValueError, match="id 40 out of range"):
        _head(order=[*range(39), 40])
    with pytest.raises(ValueError, match="40 integer label ids"):
        _head(order=list(range(39)))
    with pytest.raises(ValueError, match="shortlist=40 must be smaller"):
        build_head("mhc", 8, 40, num_groups=4, shortlist=40)


def test_registry_sizes_the_tail():
    head = build_head("mhc", 8, 1000, num_groups=10, shortlist=200, hidden_dim=4)
    assert head.num_labels == 1000 and head.codec.num_labels == 800 and head.codec.head_sizes == (10, 80)
    x = torch.randn(3, 8)
    assert head.log_prob(x).shape == (3, 1000)
    assert "shortlist=200" in repr(head)


def test_inference_buffers_never_overwrite_a_held_result():
    head = _head(order=torch.randperm(40), mlp=3).float()
    x1, x2 = torch.randn(5, 9), torch.randn(5, 9)
    with torch.no_grad():
        a = head.log_prob(x1)
        keep = a.clone()
        view = a[:, :3]
        results = [head.log_prob(x2) for _ in range(5)]  # more calls than pooled buffers
        torch.testing.assert_close(a, keep)  # still held: never reused
        assert all(r.data_ptr() != a.data_ptr() for r in results)
        del a, view, results
        again = head.log_prob(x1)
    torch.testing.assert_close(again, keep)
    # the inference path equals the differentiable one
    grad_path = head.log_prob(x2.requires_grad_())
    with torch.no_grad():
        torch.testing.assert_close(head.log_prob(x2), grad_path.detach())


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("k,sizes", [(6, (5, 7)), (8, (3, 4, 4)), (0, (5, 8))])
def test_pruned_log_prob_keeps_every_top_k_label_exact(order, tied, k, sizes):
    """Beam search needs each row's top k: the pruned distribution gives them (values and ids) as the full
    one does, every entry it computes is exact, and the labels in ``keep`` are always exact."""
    head = _head(k=k, sizes=sizes, order=ORDERS[order], tied=tied, mlp=4)
    with torch.no_grad():
        head.short_bias.weight.add_(3.0) if k else None  # a trained model's mass sits in the short list
    x = torch.randn(50, 9, dtype=torch.float64)
    full = head.log_prob(x)
    keep = torch.tensor([int(head.label_order.order[-1])])  # a tail label, always computed
    for top in (1, 3, 6):
        pruned = head.pruned_log_prob(x, top, keep=keep)
        finite = torch.isfinite(pruned)
        torch.testing.assert_close(pruned[finite], full[finite])
        torch.testing.assert_close(pruned[:, keep], full[:, keep])
        ref_v, _ = full.topk(top, -1)
        v, ids = pruned.topk(top, -1)
        torch.testing.assert_close(v, ref_v)
        torch.testing.assert_close(full.gather(1, ids), ref_v)
        if k >= top:  # the short list gives a bound: whole tail groups are skipped
            assert (~finite).any()
        else:  # no bound: nothing pruned, the result is the full distribution
            torch.testing.assert_close(pruned, full)


def test_pruned_log_prob_is_exact_when_the_mass_sits_in_the_tail():
    """Rows whose best labels are all in the tail: the short-list bound is low, every group stays."""
    head = _head(k=6, sizes=(5, 7))
    with torch.no_grad():
        head.short_bias.weight.sub_(20.0)
    x = torch.randn(20, 9, dtype=torch.float64)
    full = head.log_prob(x)
    torch.testing.assert_close(head.pruned_log_prob(x, 4), full)
    with pytest.raises(ValueError, match="k"):
        head.pruned_log_prob(x, 0)


def test_pruning_computes_the_full_distribution_when_most_groups_are_live(monkeypatch):
    """A few large groups each outweigh the k-th token: skipping nothing through the pruned path would cost
    more than the plain full distribution, so that is what is computed (exact, no -inf)."""
    head = _head(k=6, sizes=(5, 7))
    with torch.no_grad():
        head.short_bias.weight.sub_(20.0)
    x = torch.randn(20, 9, dtype=torch.float64)
    full = head.log_prob(x)
    calls = []
    plain = head.log_prob
    monkeypatch.setattr(head, "log_prob", lambda z: calls.append(1) or plain(z))
    pruned = head.pruned_log_prob(x, 4)
    assert calls == [1]
    torch.testing.assert_close(pruned, full)
    with torch.no_grad():
        head.short_bias.weight.add_(40.0)  # the mass back in the short list: pruned, not the full path
    calls.clear()
    assert torch.isneginf(head.pruned_log_prob(x, 4)).any() and not calls
