"""MHS-ArcFace: exactness vs brute-force ArcFace, lazy optimizer semantics, 2-process == 1-process."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from insightface_ext.heads import MHSArcFace, shard_range
from insightface_ext.optim import LazySGD

HERE = Path(__file__).parent


def brute_force(x, w_full, y, cols, m=(1.0, 0.5, 0.0), s=64.0):
    """Plain ArcFace CE over the given class columns (global ids), written independently of the head."""
    cos = F.normalize(x) @ F.normalize(w_full[cols]).T
    tgt = torch.tensor([cols.index(int(t)) for t in y])
    theta = torch.acos(cos[torch.arange(len(y)), tgt].clamp(-1 + 1e-7, 1 - 1e-7))
    logits = cos.clone()
    logits[torch.arange(len(y)), tgt] = torch.cos(m[0] * theta + m[1]) - m[2]
    return F.cross_entropy(logits * s, tgt)


@pytest.mark.parametrize("margin", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.2, 0.1, 0.05)])
def test_all_groups_sampled_equals_full_arcface(margin):
    torch.manual_seed(0)
    head = MHSArcFace(16, 95, head_sizes=(10, 10), margin=margin, scale=30.0)
    x = torch.randn(40, 16, requires_grad=True)
    y = torch.cat([torch.arange(0, 95, 10), torch.randint(0, 95, (30,))])  # every group hit
    loss = head(x, y).loss
    w = head.weight.detach().view(100, 16).clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = brute_force(x2, w, y, list(range(95)), margin, 30.0)  # padded ids 95..99 are not classes
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        head.weight.grad.to_dense().view(100, 16)[:95], w.grad[:95], rtol=1e-4, atol=1e-5
    )


def test_batch_union_scores_only_hit_groups():
    torch.manual_seed(1)
    head = MHSArcFace(8, 100, head_sizes=(10, 10))
    y = torch.tensor([13, 17, 31, 35, 39, 12])  # groups 1 and 3
    x = torch.randn(6, 8)
    loss = head(x, y).loss
    cols = list(range(10, 20)) + list(range(30, 40))
    assert head.last_num_sampled == 20
    assert loss.item() == pytest.approx(
        brute_force(x, head.weight.detach().view(100, 8), y, cols).item(), rel=1e-5
    )


def test_sample_rate_is_partial_fc_and_forces_positives():
    torch.manual_seed(2)
    head = MHSArcFace(8, 1000, head_sizes=(1000, 1), sample_rate=0.1)
    y = torch.randint(0, 1000, (64,))
    loss = head(torch.randn(64, 8), y).loss
    assert head.last_num_sampled == 100 and math.isfinite(loss.item())
    y = torch.arange(0, 1000, 4)  # 250 positives > 10 % -> all positives, nothing else
    head(torch.randn(250, 8), y)
    assert head.last_num_sampled == 250


def test_cosine_one_does_not_nan():
    head = MHSArcFace(4, 6, head_sizes=(2, 3))
    x = head.weight.detach().view(6, 4)[[0, 4]].clone().requires_grad_(True)  # cos(target) = 1 exactly
    loss = head(x, torch.tensor([0, 4])).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_bad_input_errors():
    head = MHSArcFace(4, 6, head_sizes=(2, 3))
    with pytest.raises(ValueError, match="label id 6 is out of range"):
        head(torch.randn(2, 4), torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="expected features with last dim 4"):
        head(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="< num_labels"):
        MHSArcFace(4, 7, head_sizes=(2, 3))
    assert shard_range(7, 0, 2) == (0, 4) and shard_range(7, 1, 2) == (4, 7)


def test_lazy_sgd_leaves_unsampled_rows_and_momentum_untouched():
    torch.manual_seed(3)
    head = MHSArcFace(8, 100, head_sizes=(10, 10))
    dense = head.weight.detach().clone().requires_grad_(True)
    opt = LazySGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    ref_opt = torch.optim.SGD([dense], lr=0.1, momentum=0.9, weight_decay=1e-2)
    w0 = head.weight.detach().clone()
    for step in range(3):
        x = torch.randn(5, 8)
        y = torch.tensor([21, 25, 27, 51, 55]) if step != 1 else torch.tensor([21, 22, 23, 24, 25])
        opt.zero_grad()
        head(x, y).loss.backward()
        assert head.weight.grad.is_sparse
        opt.step()
        ref_opt.zero_grad()
        dense.grad = head.weight.grad.to_dense()
        ref_opt.step()
    untouched = [g for g in range(10) if g not in (2, 5)]
    assert torch.equal(head.weight.detach()[untouched], w0[untouched])
    assert torch.count_nonzero(opt.state[head.weight]["momentum_buffer"][untouched]) == 0
    # group 2 was sampled every step -> identical to plain SGD; plain SGD decays/moves group 5 at step 1 too
    torch.testing.assert_close(head.weight.detach()[2], dense.detach()[2])
    assert not torch.allclose(head.weight.detach()[5], dense.detach()[5])
    assert not torch.allclose(dense.detach()[0], w0[0])  # what LazySGD avoids: decay on untouched rows


def test_lazy_sgd_dense_grad_equals_torch_sgd():
    torch.manual_seed(4)
    a = torch.randn(6, 3, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    o1 = LazySGD([a], lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    o2 = torch.optim.SGD([b], lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    for _ in range(3):
        g = torch.randn(6, 3)
        a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(a, b)


def test_two_processes_equal_one_process(tmp_path):
    spec = importlib.util.spec_from_file_location("face_ddp_worker", HERE / "face_ddp_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    ref = worker.run(1, 0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(HERE / "face_ddp_worker.py"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for out in outs:
        assert out["losses"] == pytest.approx(ref["losses"], abs=1e-5)
        assert out["sampled"] == ref["sampled"]
        torch.testing.assert_close(out["backbone"], ref["backbone"], rtol=0, atol=1e-5)
    assert [o["head"]["group_start"] for o in outs] == [0, 4]
    shards = torch.cat([o["head"]["weight"] for o in outs])
    torch.testing.assert_close(shards, ref["head"]["weight"], rtol=0, atol=1e-5)
    # the head really moved (the test would pass trivially otherwise)
    init = worker.initial_state()["head"]
    assert not torch.allclose(ref["head"]["weight"].reshape(init.shape), init)


class _MarginLossLikeArcfaceTorch(torch.nn.Module):
    """The call shape and attributes of arcface_torch's ``CombinedMarginLoss(s, m1, m2, m3)`` (a stand-in
    written here: the attributes are what MHSArcFace reads)."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold


def test_margin_loss_module_and_partial_fc_argument_order_swap():
    torch.manual_seed(4)
    x, y = torch.randn(12, 8), torch.randint(0, 60, (12,))
    ref = MHSArcFace(8, 60, head_sizes=(6, 10), margin=(1.0, 0.5, 0.0), scale=32.0, sample_rate=1.0)
    module = _MarginLossLikeArcfaceTorch(32.0, 1.0, 0.5, 0.0)
    swapped = MHSArcFace.from_partial_fc(module, 8, 60, 1.0, False, head_sizes=(6, 10))
    swapped.load_state_dict(ref.state_dict())
    torch.testing.assert_close(swapped(x, y).loss, ref(x, y).loss)
    assert swapped.margin_triple == (1.0, 0.5, 0.0) and swapped.scale == 32.0
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        MHSArcFace(8, 60, margin=_MarginLossLikeArcfaceTorch(32.0, 1.0, 0.5, 0.0, 0.1))
    with pytest.raises(TypeError, match="no m1/m2/m3/s attributes"):
        MHSArcFace(8, 60, margin=torch.nn.Identity())
