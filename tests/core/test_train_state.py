"""The run-folder commit protocol (``TrainState``), the run lock, temp-file hygiene and disk-full messages.

Kill points are simulated in-process by an exception raised at the N-th file operation (nothing after it
runs, as with SIGKILL); the subprocess harness in ``tests/crash`` does the same with real kills.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mhe_plugins import training as T
from mhe_plugins.training import atomic as atomic_mod


class Killed(BaseException):
    """Stands in for SIGKILL at a precise point: nothing after it runs."""


def _kill_on_nth(monkeypatch, module, name: str, nth: int) -> dict:
    real, calls = getattr(module, name), {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _commit_epochs(store: T.TrainState, epochs: range, best_at: set[int]) -> None:
    for e in epochs:
        w = torch.full((3,), float(e))
        best = {"epoch": e, "model": w} if e in best_at else None
        store.commit({"epoch": e, "model": w}, best)


def _epoch(path: Path) -> int:
    return int(T.load_checkpoint(path)["epoch"])


def test_normal_order_needs_no_repair(tmp_path):
    store = T.TrainState(tmp_path)
    _commit_epochs(store, range(4), best_at={0, 2})
    assert _epoch(tmp_path / "last.pt") == 3 and _epoch(tmp_path / "best.pt") == 2
    assert store.recover() == [] and not store.status().best_is_stale
    state, note = store.load_best()
    assert int(state["epoch"]) == 2 and note is None


@pytest.mark.parametrize("nth", [1, 2, 3, 4])
def test_kill_at_every_write_of_a_new_best(tmp_path, monkeypatch, nth):
    """Kill before the N-th atomic write or rename of the commit of epoch 3 (a new best): the committed best
    is always readable, the read-only path writes nothing, recovery only rolls forward."""
    store = T.TrainState(tmp_path)
    _commit_epochs(store, range(3), best_at={1})
    op = ("atomic_save", 1) if nth == 1 else ("atomic_save", 2) if nth == 2 else ("replace", nth - 2)
    target = T.state if op[0] == "atomic_save" else atomic_mod.os
    _kill_on_nth(monkeypatch, target, op[0], op[1])
    with pytest.raises(Killed):
        _commit_epochs(store, range(3, 4), best_at={3})
    monkeypatch.undo()
    before = _snapshot(tmp_path)
    fresh = T.TrainState(tmp_path)
    state, _ = fresh.load_best()
    assert _snapshot(tmp_path) == before, "load_best must not write"
    committed = _epoch(tmp_path / "last.pt")
    assert int(state["epoch"]) == (3 if committed == 3 else 1)
    fresh.recover()
    assert _epoch(tmp_path / "best.pt") == int(state["epoch"]), "best.pt must match the commit"
    assert fresh.recover() == []
    resumed = fresh.load_resume()
    assert int(resumed["epoch"]) == committed and "_best_state" not in resumed


def test_damaged_last_keeps_best_and_refuses_resume(tmp_path):
    store = T.TrainState(tmp_path)
    _commit_epochs(store, range(4), best_at={0, 2})
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:100])  # a half-finished copy of the run folder
    before = _snapshot(tmp_path)
    assert T.TrainState(tmp_path).recover() == []
    with pytest.raises(T.RunDamagedError, match=r"last\.pt is damaged .*best\.pt from epoch 2 is intact"):
        T.TrainState(tmp_path).load_resume()
    state, note = T.TrainState(tmp_path).load_best()
    assert int(state["epoch"]) == 2 and "last.pt is damaged" in note
    assert _snapshot(tmp_path) == before, "nothing may be deleted or rewritten"


def test_missing_last_is_nothing_to_resume_and_best_survives(tmp_path):
    store = T.TrainState(tmp_path)
    _commit_epochs(store, range(2), best_at={1})
    (tmp_path / "last.pt").unlink()
    assert T.TrainState(tmp_path).recover() == []
    with pytest.raises(T.NothingToResumeError, match="nothing to resume"):
        T.TrainState(tmp_path).load_resume()
    assert _epoch(tmp_path / "best.pt") == 1


def test_resume_continues_the_commit_counter(tmp_path):
    store = T.TrainState(tmp_path)
    _commit_epochs(store, range(3), best_at={2})
    again = T.TrainState(tmp_path)
    again.load_resume()
    _commit_epochs(again, range(3, 5), best_at=set())
    st = again.status()
    assert st.last.commit == 5 and st.last.best_commit == 3 and st.best.commit == 3
    assert not st.best_is_stale


def test_previous_protocol_folder_is_repaired_by_renaming(tmp_path):
    """A kill under the old protocol left best.pt (epoch 3) newer than last.pt (epoch 2) and best.pt.prev."""
    T.atomic_save({"epoch": 2, "model": torch.zeros(2)}, tmp_path / "last.pt")
    T.atomic_save({"epoch": 1, "model": torch.ones(2)}, tmp_path / "best.pt.prev")
    T.atomic_save({"epoch": 3, "model": torch.ones(2)}, tmp_path / "best.pt")
    notes = T.TrainState(tmp_path).recover()
    assert notes and _epoch(tmp_path / "best.pt") == 1
    assert _epoch(tmp_path / "best.pt.uncommitted") == 3, "the uncommitted weights are kept, not deleted"


# ---------------------------------------------------------------- lock


def test_second_trainer_on_a_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    holder = textwrap.dedent(
        f"""
        import sys, time
        from mhe_plugins.training import lock_run_dir
        lock_run_dir({str(out)!r})
        print("locked", flush=True)
        sys.stdin.readline()
        """
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(T.RunLockedError, match=rf"in use by another trainer \(pid {proc.pid} "):
            T.prepare_output_dir(out, resume=False, overwrite=False, run_files=["last.pt"])
    finally:
        proc.communicate("\n", timeout=60)
    T.prepare_output_dir(out, resume=False, overwrite=False, run_files=["last.pt"])  # free again
    T.release_run_locks()


# ---------------------------------------------------------------- temp files, full disk


def test_only_our_own_temp_files_are_cleaned(tmp_path):
    T.atomic_save({"epoch": 1}, tmp_path / "last.pt")
    ours = tmp_path / f".last.pt.abc123{atomic_mod.TMP_SUFFIX}"
    ours.write_bytes(b"junk")  # left by a killed writer
    (tmp_path / "sub").mkdir()
    users = [tmp_path / ".notes.tmp", tmp_path / "sub" / ".draft.txt.tmp", tmp_path / ".last.pt.x.tmp"]
    for p in users:
        p.write_text("the user's")
    T.prepare_output_dir(tmp_path, resume=True, overwrite=False, run_files=["last.pt"])
    T.release_run_locks()
    assert not ours.exists()
    assert all(p.read_text() == "the user's" for p in users)


def test_kill_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    T.atomic_save({"epoch": 1}, tmp_path / "last.pt")

    def half_write(obj, fh):
        fh.write(b"PK\x03\x04 partial")
        raise Killed

    monkeypatch.setattr(atomic_mod.torch, "save", half_write)
    with pytest.raises(Killed):
        T.atomic_save({"epoch": 2}, tmp_path / "last.pt")
    monkeypatch.undo()
    assert _epoch(tmp_path / "last.pt") == 1


def test_full_disk_says_disk_full(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_mod.os, "fsync", no_space)
    with pytest.raises(OSError, match=r"cannot write .*last\.pt: disk full"):
        T.atomic_save({"epoch": 2}, tmp_path / "last.pt")
    assert not list(tmp_path.iterdir()), "no temp file may stay behind"


def test_full_disk_through_torch_save_says_disk_full(tmp_path, monkeypatch):
    """torch's zip writer drops the errno ("file write failed"): the free space decides."""

    def failing_save(obj, fh):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(atomic_mod.torch, "save", failing_save)
    monkeypatch.setattr(atomic_mod.os, "statvfs", lambda p: Full())
    with pytest.raises(OSError, match=r"cannot write .*last\.pt: disk full"):
        T.atomic_save({"epoch": 2}, tmp_path / "last.pt")


def test_full_disk_in_a_log_append_says_disk_full(tmp_path, monkeypatch):
    log = T.JsonlLogger(tmp_path / "log.jsonl")
    real_open = open

    def full_open(path, mode="r", *a, **k):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(OSError, match=r"cannot write .*log\.jsonl: disk full"):
        log.log({"epoch": 0})
