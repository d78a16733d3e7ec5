"""The crash-injection machinery itself, on a tiny script (seconds, no trainer): what counts as a file
event, that a kill is a real SIGKILL before the event, that Ctrl-C mode raises, and that the checks see
differences. If these fail, the trainer crash tests mean nothing."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import torch

from crash.checks import compare_checkpoints, duplicate_rows, rows_differ, trace_notes
from crash.harness import Event, diff_snapshots, run_child, sample_points, snapshot
from crash.trainers import Trainer

SCRIPT = """
import os, shutil, sys, tempfile
from pathlib import Path
run = Path(sys.argv[1]); outside = Path(sys.argv[2])
try:
    run.mkdir(exist_ok=True)
    run.mkdir(exist_ok=True)                                  # exists: not an event
    (outside / "cache.txt").write_text("not counted")        # outside the run folder
    (run / "a.txt").write_text("a")                          # 2 open
    fd, tmp = tempfile.mkstemp(dir=run, prefix=".b.", suffix=".tmp")  # 3 open
    with os.fdopen(fd, "wb") as fh:
        fh.write(b"b"); fh.flush(); os.fsync(fh.fileno())    # 4 fsync
    os.replace(tmp, run / "b.txt")                           # 5 rename
    (run / "d" / "e").mkdir(parents=True)                    # 6, 7 mkdir
    (run / "d" / "e" / "f").write_text("f")                  # 8 open
    shutil.rmtree(run / "d")                                 # 9 rmtree, 10 remove, 11, 12 rmdir
    (run / "b.txt").read_text()                              # reading: not an event
    os.unlink(run / "a.txt")                                 # 13 remove
finally:
    (outside / "finally.txt").write_text("cleanup ran")
"""

EXPECTED = [
    ("mkdir", "."), ("open", "a.txt"), ("open", ".b.*"), ("fsync", ".b.*"), ("rename", ".b.* -> b.txt"),
    ("mkdir", "d"), ("mkdir", "d/e"), ("open", "d/e/f"), ("rmtree", "d"), ("remove", "d/e/f"),
    ("rmdir", "d/e"), ("rmdir", "d"), ("remove", "a.txt"),
]  # fmt: skip


def _run(tmp_path: Path, at: int = 0, mode: str = "kill"):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    run = tmp_path / "run"
    return run_child(
        [sys.executable, str(script), str(run), str(outside)], tmp_path, crash_dir=run, at=at, mode=mode
    )


def _norm(e: Event) -> tuple[str, str]:
    parts = [(".b.*" if p.startswith(".b.") else p) for p in e.path.split(" -> ")]
    return e.kind, " -> ".join(parts)


def test_count_mode_lists_mutations_under_the_run_folder_only(tmp_path):
    res = _run(tmp_path)
    assert res.returncode == 0, res.describe()
    assert [_norm(e) for e in res.events] == EXPECTED
    assert [e.n for e in res.events] == list(range(1, len(EXPECTED) + 1))
    assert res.fired is None


def test_kill_mode_is_a_real_sigkill_right_before_the_event(tmp_path):
    res = _run(tmp_path, at=5)  # the rename of the fsynced temp file
    assert res.returncode == -signal.SIGKILL and res.killed
    assert res.fired is not None and _norm(res.fired) == ("rename", ".b.* -> b.txt")
    run = tmp_path / "run"
    assert not (run / "b.txt").exists() and (run / "a.txt").read_text() == "a"
    assert [p.name for p in run.glob(".b.*.tmp")]  # the temp file stays: the rename never happened
    assert not (tmp_path / "outside" / "finally.txt").exists()  # no cleanup handler ran


def test_interrupt_mode_raises_keyboard_interrupt_and_runs_cleanup(tmp_path):
    res = _run(tmp_path, at=8, mode="interrupt")
    assert res.returncode != 0 and "KeyboardInterrupt" in res.output_tail
    assert _norm(res.fired) == ("open", "d/e/f")
    assert not (tmp_path / "run" / "d" / "e" / "f").exists()
    assert (tmp_path / "outside" / "finally.txt").read_text() == "cleanup ran"


def test_torch_save_to_a_path_is_an_event(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import sys, torch\ntorch.save({'w': torch.ones(2)}, sys.argv[1] + '/w.pt')\n")
    run = tmp_path / "run"
    run.mkdir()
    res = run_child([sys.executable, str(script), str(run)], tmp_path, crash_dir=run, at=1)
    assert res.killed and _norm(res.fired) == ("torch.save", "w.pt") and not (run / "w.pt").exists()


def test_snapshot_sees_content_and_mtime_changes(tmp_path):
    (tmp_path / "a").write_text("1")
    (tmp_path / "b").write_text("2")
    before = snapshot(tmp_path)
    (tmp_path / "a").write_text("3")
    (tmp_path / "b").unlink()
    (tmp_path / "metrics.json").write_text("{}")
    assert diff_snapshots(before, snapshot(tmp_path), allowed=["metrics.json"]) == [
        "changed a (content, 1 -> 1 bytes)",
        "deleted b",
    ]


def test_sampled_points_are_reproducible_and_rotate():
    a = sample_points("timm", 50, 3, 20260101)
    assert a == sample_points("timm", 50, 3, 20260101) and len(set(a)) == 3 and all(1 <= p <= 50 for p in a)
    assert len({tuple(sample_points("timm", 50, 3, s)) for s in range(20260101, 20260111)}) > 5
    assert sample_points("x", 2, 5, 1) == [1, 2]


class _Fake(Trainer):
    name, log_name = "fake", "log.jsonl"
    weight_keys = {"last.pt": ("model",)}


def test_checks_report_what_differs(tmp_path):
    ref, got = tmp_path / "ref", tmp_path / "got"
    for d, w, m in ((ref, 1.0, 0.5), (got, 1.0, 0.25)):
        d.mkdir()
        torch.save({"model": {"w": torch.full((2,), w)}, "optimizer": {"m": torch.tensor(m)}}, d / "last.pt")
    assert compare_checkpoints(_Fake(), ref, got) == [
        ("state_equal", "last.pt: optimizer.m differs (max |diff| 0.25)")
    ]
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": {"m": torch.tensor(0.5)}}, got / "last.pt")
    assert compare_checkpoints(_Fake(), ref, got)[0][0] == "weights_equal"
    rows = [{"epoch": 0, "loss": 1.0, "epoch_s": 3}, {"epoch": 1, "loss": 0.5, "epoch_s": 4}]
    again = [*rows, {"epoch": 1, "loss": 0.5, "epoch_s": 9}]
    assert duplicate_rows(again, lambda r: r["epoch"]) == [1]
    assert rows_differ(rows, [dict(r, epoch_s=0) for r in rows], frozenset({"epoch_s"})) is None
    assert "row 1 differs in ['loss']" in rows_differ(rows, [rows[0], dict(rows[1], loss=0.4)], frozenset())
    trace = [Event(1, "open", "x.tmp"), Event(2, "rename", "x.tmp -> x"), Event(3, "open", "y.tmp"),
             Event(4, "fsync", "y.tmp"), Event(5, "rename", "y.tmp -> y"), Event(6, "fsync", ".")]  # fmt: skip
    assert trace_notes(trace) == ["2 rename x.tmp -> x: data never fsynced before the rename"]
    assert json.loads(json.dumps(trace_notes(trace[:2])))[1].endswith("not fsynced afterwards")


def test_interrupt_from_a_background_thread_reaches_the_main_thread(tmp_path):
    script = tmp_path / "t.py"
    script.write_text(
        "import sys, threading\n"
        "t = threading.Thread(target=lambda: open(sys.argv[1] + '/bg.txt', 'w').write('x'))\n"
        "try:\n    t.start(); t.join()\nexcept KeyboardInterrupt:\n    print('main thread interrupted'); raise\n"
    )
    run = tmp_path / "run"
    run.mkdir()
    res = run_child([sys.executable, str(script), str(run)], tmp_path, crash_dir=run, at=1, mode="interrupt")
    assert res.returncode != 0 and "main thread interrupted" in res.output_tail, res.describe()
    assert (run / "bg.txt").read_text() == "x"  # the thread's own write went on, as with a real Ctrl-C
