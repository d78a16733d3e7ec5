"""MHC with ``sparse_grad``: the same loss and gradients as the dense head, as row-sparse tensors over only
the sibling blocks a step scores, so LazyAdam updates those rows and leaves every other row as it was."""

from __future__ import annotations

import pytest
import torch

from mhe_plugins import build_head
from mhe_plugins.optim import LazyAdam


def _pair(n: int = 1000, **kw):
    torch.manual_seed(0)
    dense = build_head("mhc", 12, n, num_heads=3, hidden_dim=8, **kw)
    sparse = build_head("mhc", 12, n, num_heads=3, hidden_dim=8, sparse_grad=True, **kw)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


@pytest.mark.parametrize("shortlist", [0, 37])
def test_sparse_grad_equals_the_dense_gradient_on_the_touched_rows_only(shortlist):
    dense, sparse = _pair(shortlist=shortlist, group_mlp_dim=16)
    assert "sparse_grad=True" in repr(sparse)
    x = torch.randn(64, 12)
    y = torch.randint(0, 1000, (64,))
    y[:5] = 999  # the last (partial) block
    y[5:9] = y[9]  # repeated targets: their sibling blocks are read once
    losses = [h(x, y).loss for h in (dense, sparse)]
    torch.testing.assert_close(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for (name, pd), ps in zip(dense.named_parameters(), sparse.parameters()):
        if pd.grad is None:
            assert ps.grad is None, name
            continue
        if name.startswith(("node_embed", "node_bias")):
            assert ps.grad.is_sparse, name
            touched = ps.grad.coalesce().indices()[0]
            if name.endswith("1.weight"):  # the leaves: only the scored sibling blocks
                assert touched.numel() < pd.shape[0] // 2
            untouched = torch.ones(pd.shape[0], dtype=torch.bool)
            untouched[touched] = False
            assert pd.grad[untouched].abs().sum() == 0  # the dense head's other rows get nothing either
        torch.testing.assert_close(ps.grad.to_dense(), pd.grad, msg=name)


def test_lazy_adam_leaves_unscored_rows_alone_and_the_head_learns():
    _, head = _pair(n=600)
    opt = LazyAdam(head.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(20, 12, generator=g) * 3
    classes = torch.randperm(600, generator=g)[:20]  # 20 classes in use
    before = head.node_embed[-1].weight.detach().clone()
    first = last = None
    for _ in range(150):
        k = torch.randint(0, 20, (64,), generator=g)
        x = centers[k] + torch.randn(64, 12, generator=g) * 0.3
        loss = head(x, classes[k]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss) if first is None else first
        last = float(loss)
    assert last < 0.2 * first
    size = head.codec.head_sizes[-1]
    used = {int(p) for p in head.codec.encode(classes)[:, :2] @ torch.tensor([head.codec.head_sizes[1], 1])}
    moved = (head.node_embed[-1].weight.detach() != before).any(1).nonzero().squeeze(1).tolist()
    assert {m // size for m in moved} <= used  # only leaves under the scored parents changed
    with torch.no_grad():
        assert (head.topk(centers, 1)[1].squeeze(1) == classes).float().mean() > 0.9


def test_a_sparse_head_cannot_tie_its_leaves():
    _, head = _pair(n=200)
    with pytest.raises(ValueError, match="sparse_grad"):
        head.tie_leaf_embedding(torch.nn.Parameter(torch.zeros(200, 8)))
