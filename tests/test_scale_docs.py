"""docs/scale.md: every shell command is run here at tiny size (``# tested: test_scale_docs.py``), covered
by a named test file, or marked as needing what the user supplies; the documented one-machine benchmark
trains every method end to end, and a rerun of it starts nothing."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mhe_plugins.bench import scale as scale_mod
from mhe_plugins.bench.__main__ import main
from mhe_plugins.bench.scale_train import METHODS

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "scale.md").read_text(encoding="utf-8")
TINY = ["--num-classes", "1000", "--train-per-class", "2", "--epochs", "1", "--eval-examples", "200",
        "--batch", "128", "--hidden", "32", "--embed-dim", "16", "--threads", "1", "--mhc-hidden", "16",
        "--log-every", "5"]  # fmt: skip


def _commands() -> list[tuple[str, str]]:
    """(command, trailing comment) of every non-comment line of the bash blocks."""
    out = []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", DOC, flags=re.S):
        if lang != "bash":
            continue
        for line in body.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                cmd, _, note = line.partition("   # ")
                out.append((cmd.strip(), note.strip()))
    return out


def _tested_here(prefix: str) -> list[list[str]]:
    return [
        shlex.split(c) for c, note in _commands() if "test_scale_docs.py" in note and c.startswith(prefix)
    ]


def test_every_command_is_tested_or_marked():
    cmds = _commands()
    assert len(cmds) >= 5
    for cmd, note in cmds:
        assert note.startswith(("needs", "tested:")), f"docs/scale.md: unmarked command {cmd!r}"
        for name in re.findall(r"test_\w+\.py", note):
            assert (Path(__file__).parent / name).is_file(), f"docs/scale.md names a missing test {name}"


@pytest.mark.slow
def test_documented_benchmark_at_tiny_size_then_rerun_starts_nothing_then_dry_run(
    tmp_path, monkeypatch, capsys
):
    runs = _tested_here("python -m mhe_plugins.bench scale")
    whole = next(a for a in runs if "--dry-run" not in a and "--sharded" in a)
    dry = next(a for a in runs if "--dry-run" in a)
    dirs = ["--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    assert "--sharded" in whole
    tiny = [*TINY, "--sharded"]  # no sharded runs here: test_scale_sharded.py runs them (torchrun, 2 ranks)
    main([*whole[3:], *tiny, *dirs])
    res = json.loads((tmp_path / "out" / "scale.json").read_text())
    assert res["partial"] is False and res["missing"] == []
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"oracle", *METHODS}
    oracle = rows["oracle"]
    # the default task: siblings stay confusable (the Bayes rule's top-1 ~78 % at N = 2e4), the branch is
    # nearly always right (top-5 ~99 %): docs/scale.md, "Calibration"
    assert 60 < oracle["top1"] < 90 and oracle["top5"] > 90
    for m in METHODS:
        r = rows[m]
        assert r["status"] == "ok", r
        assert 0 <= r["top1"] <= r["top5"] <= 100 and r["top1"] <= oracle["top1"]
        assert r["train_examples_per_s"] > 0 and r["topk_queries_per_s"] > 0 and r["peak_rss_bytes"] > 0
        # --equal-time mhs: the others train for MHS's wall time (a cap: a faster one finishes its epoch)
        capped = r["budget_exhausted"] and 0 < r["epochs_done"] < 1.0 and m != "mhs"
        assert (r["epochs_done"] == 1.0 or capped) and r["oracle_top1"] == oracle["top1"]
        assert r["head_param_bytes"] > 0 and r["epoch_s"] > 0
    assert rows["mhs"]["head_sizes"] == [125, 8] and rows["pfc"]["head_sizes"] == [1000, 1]
    assert rows["mhc"]["topk_exact"] is False and rows["mhp"]["topk_exact"] is True
    # LazyAdam's two bf16 moments take what the fp32 weights take (+ an 8-byte step counter per tensor:
    # the class rows and, with --mhs-shared, the 125 shared group rows)
    assert rows["mhs"]["head_param_bytes"] == (1000 + 125) * 16 * 4
    assert rows["mhs"]["head_state_bytes"] == rows["mhs"]["head_param_bytes"] + 2 * 8
    md = (tmp_path / "out" / "scale.md").read_text()
    assert "## N = 1,000" in md and "PARTIAL" not in md and "## Checks (issue 29)" in md
    assert (tmp_path / "out" / "scale.png").stat().st_size > 0

    def no_worker(*a, **k):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(scale_mod.subprocess, "run", no_worker)
    main([*whole[3:], *tiny, *dirs])
    (tmp_path / "out" / "scale.md").unlink()
    main([*whole[3:], *tiny, *dirs, "--report-only"])  # the report again from the store, nothing trained
    again = json.loads((tmp_path / "out" / "scale.json").read_text())
    assert again["rows"] == res["rows"] and (tmp_path / "out" / "scale.md").is_file()
    monkeypatch.undo()
    capsys.readouterr()
    before = {f: f.stat().st_mtime_ns for f in (tmp_path / "out").rglob("*") if f.is_file()}
    main([*dry[3:], *tiny, *dirs])  # lists the runs of the same command: all done, and writes nothing
    after = {f: f.stat().st_mtime_ns for f in (tmp_path / "out").rglob("*") if f.is_file()}
    assert after == before
    said = [line for line in capsys.readouterr().out.splitlines() if " est " in line]
    assert len(said) == 1 + len(METHODS) and all(line.rstrip().endswith("done") for line in said)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machine_torchrun_commands_on_one_machine(tmp_path):
    nodes = _tested_here("torchrun --nnodes")
    assert [a[a.index("--node_rank") + 1] for a in nodes] == ["0", "1"]
    port = str(_free_port())
    dirs = ["--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    procs = []
    for argv in nodes:
        argv = [{"HOST": "127.0.0.1", "29500": port}.get(a, a) for a in argv]
        cmd = [sys.executable, "-m", "torch.distributed.run", *argv[1:], *TINY, *dirs]
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    report = nodes[0][nodes[0].index("--report") + 1]
    res = json.loads((tmp_path / "out" / f"{report}.json").read_text())
    rows = {(r["label"], r["world"]): r for r in res["rows"]}
    assert set(rows) == {("oracle", 1), ("mhs", 2)} and res["partial"] is False
    two = rows[("mhs", 2)]
    assert two["status"] == "ok" and len(two["per_rank"]) == 2 and two["topk_queries_per_s"] > 0
    halves = [r["head_param_bytes"] for r in two["per_rank"]]
    assert halves[0] + halves[1] == 1000 * 16 * 4  # every class row on exactly one rank


def test_documented_calibration_command_reuses_the_committed_runs_and_gives_the_committed_table(
    tmp_path, monkeypatch
):
    """The calibration command of docs/scale.md, on a copy of the committed run store: it trains nothing
    and writes the committed report's table again (the figures docs/scale.md quotes)."""
    cmd = next(a for a in _tested_here("python -m mhe_plugins.bench scale") if "scale_calibration" in a)
    store = tmp_path / "out" / "runs" / "scale"
    store.mkdir(parents=True)
    for f in (ROOT / "benchmarks" / "results" / "runs" / "scale").glob("*-N20000-*.json"):
        (store / f.name).write_bytes(f.read_bytes())

    def no_worker(*a, **k):
        raise AssertionError("the calibration command started a run: its stored run is missing or stale")

    monkeypatch.setattr(scale_mod.subprocess, "run", no_worker)
    main([*cmd[3:], "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    table = lambda text: text[text.index("## N = 20,000") : text.index("## Checks")]  # noqa: E731
    ours = (tmp_path / "out" / "scale_calibration.md").read_text()
    assert table(ours) == table((ROOT / "benchmarks" / "results" / "scale_calibration.md").read_text())
    assert "PARTIAL" not in ours
