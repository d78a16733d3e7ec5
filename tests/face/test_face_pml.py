"""insightface_ext.pml.MHSArcFaceLoss inside pytorch-metric-learning."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses, reducers, regularizers

from insightface_ext.pml import MHSArcFaceLoss


def test_equals_pml_arcface_when_all_groups_sampled():
    torch.manual_seed(0)
    mine = MHSArcFaceLoss(95, 16, head_sizes=(10, 10), margin=28.6, scale=30)
    ref = losses.ArcFaceLoss(95, 16, margin=28.6, scale=30)
    with torch.no_grad():
        ref.W.copy_(mine.W)
    x = torch.randn(40, 16)
    y = torch.cat([torch.arange(0, 95, 10), torch.randint(0, 95, (30,))])
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = mine(x1, y), ref(x2, y)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    a.backward()
    b.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mine.head.weight.grad.view(100, 16)[:95].t(), ref.W.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mine.get_logits(x), ref.get_logits(x), rtol=1e-5, atol=1e-4)


def test_pml_training_loop_step_with_regularizer_and_reducer():
    torch.manual_seed(1)
    num_classes, d = 60, 8
    centres = torch.randn(num_classes, 12) * 3
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, d))
    loss_func = MHSArcFaceLoss(
        num_classes,
        d,
        head_sizes=(6, 10),
        margin=20.0,
        scale=16,
        weight_regularizer=regularizers.RegularFaceRegularizer(),
        reducer=reducers.MeanReducer(),
    )
    assert loss_func.sub_loss_names() == ["loss", "weight_reg_loss"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_opt = torch.optim.SGD(loss_func.parameters(), lr=0.05, momentum=0.9)  # pml: loss params separately
    first = last = None
    for _ in range(60):
        y = torch.randint(0, num_classes, (64,))
        x = centres[y] + 0.3 * torch.randn(64, 12)
        loss = loss_func(model(x), y)
        opt.zero_grad()
        loss_opt.zero_grad()
        loss.backward()
        opt.step()
        loss_opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < 0.5 * first
    with torch.no_grad():
        y = torch.arange(num_classes)
        acc = (loss_func.get_logits(model(centres[y])).argmax(1) == y).float().mean().item()
    assert acc > 0.9


@pytest.mark.parametrize("miner_name", ["MultiSimilarityMiner", "BatchHardMiner", "TripletMarginMiner"])
def test_miner_indices_weight_the_loss_like_pml_arcface(miner_name):
    from pytorch_metric_learning import miners

    torch.manual_seed(2)
    mine = MHSArcFaceLoss(95, 16, head_sizes=(10, 10), margin=28.6, scale=30)
    ref = losses.ArcFaceLoss(95, 16, margin=28.6, scale=30)
    with torch.no_grad():
        ref.W.copy_(mine.W)
    y = torch.cat([torch.arange(0, 95, 10), torch.arange(0, 95, 10), torch.randint(0, 95, (20,))])
    x = torch.randn(len(y), 16)
    miner = getattr(miners, miner_name)()
    tuples = miner(x, y)
    assert sum(len(t) for t in tuples) > 0
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = mine(x1, y, tuples), ref(x2, y, tuples)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert a.item() != pytest.approx(mine(x, y).item(), rel=1e-3)  # the miner changes the loss
    a.backward()
    b.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
