"""One MHS: the core head on 1 process, sharded over 2 gloo ranks, the face wrapper and the pml wrapper give
the same loss and gradients (<= 1e-5), anchored to a brute-force softmax written independently."""

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

HERE = Path(__file__).parent
spec = importlib.util.spec_from_file_location("mhs_sharded_worker", HERE / "mhs_sharded_worker.py")
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)


def brute_force(x, w, y, class_ids, margin):
    """CE over ``class_ids`` (global ids) with the combined margin on the target, by hand."""
    rows = w.reshape(-1, x.shape[1])[class_ids]
    if margin is None:
        logits = x @ rows.T
    else:
        m1, m2, m3 = margin
        cos = F.normalize(x) @ F.normalize(rows).T
        tgt = torch.tensor([class_ids.index(int(t)) for t in y])
        theta = torch.acos(cos[torch.arange(len(y)), tgt].clamp(-1 + 1e-7, 1 - 1e-7))
        logits = cos.clone()
        logits[torch.arange(len(y)), tgt] = torch.cos(m1 * theta + m2) - m3
        logits = logits * worker.SCALE
    tgt = torch.tensor([class_ids.index(int(t)) for t in y])
    return F.cross_entropy(logits, tgt)


@pytest.fixture(scope="module")
def one_process():
    return worker.run(1, 0)


def test_one_process_matches_brute_force_and_face_wrapper(one_process):
    x, y, w = worker.inputs()
    hit = sorted({int(t) // 6 for t in y})
    union = [g * 6 + j for g in hit for j in range(6) if g * 6 + j < worker.NUM_CLASSES]
    every = list(range(worker.NUM_CLASSES))
    expect = {
        "union_arcface": (union, worker.CONFIGS["union_arcface"]["margin"]),
        "union_all_rate": (every, worker.CONFIGS["union_all_rate"]["margin"]),
        "union_dot": (union, None),
        "per_sample_all": (every, worker.CONFIGS["per_sample_all"]["margin"]),
    }
    for name, (ids, margin) in expect.items():
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ref = brute_force(xr, wr, y, ids, margin)
        ref.backward()
        got = one_process[f"{name}/core"]
        assert got["loss"] == pytest.approx(ref.item(), abs=1e-5), name
        torch.testing.assert_close(got["x_grad"], xr.grad, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(got["w_grad"], wr.grad, rtol=0, atol=1e-5, msg=name)
        face = one_process.get(f"{name}/face")
        if face is not None:
            assert face["loss"] == pytest.approx(got["loss"], abs=1e-5), name
            torch.testing.assert_close(face["x_grad"], got["x_grad"], rtol=0, atol=1e-5)
            torch.testing.assert_close(face["w_grad"], got["w_grad"], rtol=0, atol=1e-5)


def test_pml_wrapper_matches_core(one_process):
    from insightface_ext.pml import MHSArcFaceLoss

    x, y, w = worker.inputs()
    loss_fn = MHSArcFaceLoss(
        worker.NUM_CLASSES,
        worker.DIM,
        head_sizes=worker.HEAD_SIZES,
        margin=math.degrees(worker.M2),
        scale=worker.SCALE,
    )
    with torch.no_grad():
        loss_fn.head.weight.copy_(w)
    xr = x.clone().requires_grad_(True)
    loss = loss_fn(xr, y)
    loss.backward()
    core = one_process["union_arcface/core"]
    assert loss.item() == pytest.approx(core["loss"], abs=1e-5)
    torch.testing.assert_close(xr.grad, core["x_grad"], rtol=0, atol=1e-5)
    torch.testing.assert_close(loss_fn.head.weight.grad, core["w_grad"], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The worker's files from 2 gloo ranks under torchrun."""
    tmp_path = tmp_path_factory.mktemp("mhs_sharded")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(HERE / "mhs_sharded_worker.py"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path


def test_two_gloo_ranks_equal_one_process(one_process, two_ranks):
    n = worker.BATCH // 2
    for r in range(2):
        got = torch.load(two_ranks / f"rank{r}.pt")
        assert set(got) == set(one_process)
        for key, ref in one_process.items():
            g0, g1 = got[key]["groups"]
            assert (g0, g1) == ((0, 4) if r == 0 else (4, 7)), key
            assert got[key]["loss"] == pytest.approx(ref["loss"], abs=1e-5), key
            torch.testing.assert_close(
                got[key]["x_grad"], ref["x_grad"][r * n : (r + 1) * n], rtol=0, atol=1e-5
            )
            torch.testing.assert_close(got[key]["w_grad"], ref["w_grad"][g0:g1], rtol=0, atol=1e-5)


def test_two_ranks_topk_lists_merge_to_the_exact_top_k(two_ranks):
    """Each rank ranks only its own classes (blocks of groups, shared rows built a block at a time); the
    merged k-lists equal a brute-force top-k over all classes, and one process gives the same."""
    x, _, w = worker.inputs()
    ranks = [torch.load(two_ranks / f"topk-rank{r}.pt") for r in range(2)]
    gw = ranks[0]["group_weight"]
    one = worker.run_topk(1, 0)
    for name in ("plain", "shared", "cosine"):
        rows = (w + gw[:, None, :] if name != "plain" else w).reshape(-1, worker.DIM)[: worker.NUM_CLASSES]
        scores = x @ rows.T if name != "cosine" else F.normalize(x) @ F.normalize(rows).T * worker.SCALE
        ref_v, ref_i = scores.topk(5, dim=1)
        (v0, i0), (v1, i1) = ranks[0][name], ranks[1][name]
        assert int(i0.max()) < 24 <= int(i1.min()), name  # each rank returns only its own classes
        v, pos = torch.cat([v0, v1], 1).topk(5, dim=1)
        torch.testing.assert_close(v, ref_v, rtol=0, atol=1e-5, msg=name)
        assert torch.equal(torch.cat([i0, i1], 1).gather(1, pos), ref_i), name
        torch.testing.assert_close(one[name][0], ref_v, rtol=0, atol=1e-5, msg=name)
        assert torch.equal(one[name][1], ref_i), name
