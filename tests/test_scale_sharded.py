"""The scale benchmark over 2 gloo ranks, docs/scale.md's two sharded commands at tiny size: launched by
torchrun itself (the ranks run the cells), then resumed by the one-machine orchestrator with ``--sharded``
(same run names: the sharded cell is reused, only the 1-rank run trains); each rank holds half the MHS head
(parameters + optimizer state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mhe_plugins.bench.__main__ import main

TINY = ["--num-classes", "2000", "--methods", "mhs", "--train-per-class", "2", "--epochs", "1",
        "--eval-examples", "300", "--batch", "128", "--hidden", "32", "--embed-dim", "16", "--threads", "1"]  # fmt: skip


@pytest.mark.slow
def test_two_rank_run_under_torchrun_then_resumed_by_the_orchestrator(tmp_path):
    dirs = ["--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [
            *cmd,
            "-m",
            "mhe_plugins.bench",
            "scale",
            *TINY,
            *dirs,
            "--checkpoint-every",
            "1e-6",
            "--report",
            "ranks",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "scale.json").exists()  # --report: its own report, the store is shared
    res = json.loads((tmp_path / "out" / "ranks.json").read_text())
    got = {(r["label"], r["world"]) for r in res["rows"]}
    assert got == {("oracle", 1), ("mhs", 2)} and res["partial"] is False
    assert not list((tmp_path / "work").glob("*/ckpt-rank*.pt"))  # each rank removed its own after the store

    main(["scale", *TINY, *dirs, "--sharded", "2000", "--nproc-per-node", "2"])  # runs only mhs on 1 rank
    res = json.loads((tmp_path / "out" / "scale.json").read_text())
    assert res["partial"] is False
    rows = {(r["label"], r["world"]): r for r in res["rows"]}
    one, two = rows[("mhs", 1)], rows[("mhs", 2)]
    assert one["status"] == two["status"] == "ok"
    assert len(two["per_rank"]) == 2
    ref = one["head_param_bytes"] + one["head_state_bytes"]
    for r in two["per_rank"]:
        assert (r["head_param_bytes"] + r["head_state_bytes"]) / ref == pytest.approx(0.5, abs=0.02)
    assert 0 <= two["top1"] <= 100 and two["topk_queries_per_s"] > 0
    assert any("over 2 ranks" in what for what, _ in res["checks"])


@pytest.mark.slow
def test_learned_codes_and_shared_group_rows_over_two_ranks(tmp_path):
    """Each rank sums PIFA vectors over its share of the examples and all-reduces them, so both learn the
    same codes; the shared group rows are sharded with their groups and the exact top-k merges the ranks'."""
    method = "mhs@codes=pifa,mhs_shared=true"
    args = [a if a != "mhs" else method for a in TINY]
    dirs = ["--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "mhe_plugins.bench", "scale", *args, *dirs, "--report", "ranks"],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    main(["scale", *args, *dirs, "--sharded", "2000", "--nproc-per-node", "2"])  # the 1-rank run
    rows = {
        (r["label"], r["world"]): r for r in json.loads((tmp_path / "out" / "scale.json").read_text())["rows"]
    }
    one, two = rows[(method, 1)], rows[(method, 2)]
    assert one["status"] == two["status"] == "ok" and one["codes_s"] > 0 and two["codes_s"] > 0
    for r in two["per_rank"]:
        ratio = (r["head_param_bytes"] + r["head_state_bytes"]) / (
            one["head_param_bytes"] + one["head_state_bytes"]
        )
        assert ratio == pytest.approx(0.5, abs=0.02)
    # a tiny run (2 examples per class, 1 epoch; 4-5 % here): both 40x above chance (1 / 2000), and close
    assert min(one["top1"], two["top1"]) > 2 and abs(one["top1"] - two["top1"]) < 5
