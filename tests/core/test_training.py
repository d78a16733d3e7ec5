"""The shared trainer utilities: checkpoints that survive kills, run-folder policy, logs, guards, timeouts."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mhe_plugins import training as T
from mhe_plugins.training import atomic as atomic_mod
from mhe_plugins.training import checkpoint as ckpt_mod

REPO = Path(__file__).resolve().parents[2]


class Killed(BaseException):
    """Stands in for SIGKILL at a precise point: nothing after it runs, no cleanup beyond what already ran."""


def _kill_on_call(monkeypatch, module, name: str, nth: int) -> None:
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapper)


def _epoch(path: Path) -> int:
    return int(T.load_checkpoint(path)["epoch"])


# ---------------------------------------------------------------- last/best


def _run_epochs(store: T.LastBestCheckpoint, epochs: range, best_at: set[int]) -> None:
    for e in epochs:
        store.save({"epoch": e, "w": torch.full((3,), float(e))}, {"epoch": e} if e in best_at else None)


def test_last_best_normal_order(tmp_path):
    store = T.LastBestCheckpoint(tmp_path)
    _run_epochs(store, range(4), best_at={0, 2})
    assert _epoch(tmp_path / "last.pt") == 3 and _epoch(tmp_path / "best.pt") == 2
    assert store.recover() == [] and not (tmp_path / "best.pt.prev").exists()


@pytest.mark.parametrize("kill_at", ["os.replace", "best write", "last write"])
def test_last_best_kill_during_new_best_rolls_back(tmp_path, monkeypatch, kill_at):
    store = T.LastBestCheckpoint(tmp_path)
    _run_epochs(store, range(3), best_at={1})  # committed: last epoch 2, best epoch 1
    if kill_at == "os.replace":
        _kill_on_call(monkeypatch, ckpt_mod.os, "replace", 1)
    else:
        _kill_on_call(monkeypatch, ckpt_mod, "atomic_save", 1 if kill_at == "best write" else 2)
    with pytest.raises(Killed):
        _run_epochs(store, range(3, 4), best_at={3})
    monkeypatch.undo()
    T.LastBestCheckpoint(tmp_path).recover()
    assert _epoch(tmp_path / "last.pt") == 2
    assert _epoch(tmp_path / "best.pt") == 1, "best.pt must match the committed run"
    assert not (tmp_path / "best.pt.prev").exists()


def test_last_best_first_epoch_killed_before_commit(tmp_path, monkeypatch):
    store = T.LastBestCheckpoint(tmp_path)
    _kill_on_call(monkeypatch, ckpt_mod, "atomic_save", 2)
    with pytest.raises(Killed):
        _run_epochs(store, range(1), best_at={0})
    monkeypatch.undo()
    notes = T.LastBestCheckpoint(tmp_path).recover()
    assert not (tmp_path / "best.pt").exists() and notes


def test_kill_mid_write_leaves_old_file_and_tmp_is_cleaned(tmp_path, monkeypatch):
    T.atomic_save({"epoch": 1}, tmp_path / "last.pt")

    def half_write(obj, fh):
        fh.write(b"PK\x03\x04 partial")
        raise Killed

    monkeypatch.setattr(atomic_mod.torch, "save", half_write)
    with pytest.raises(Killed):
        T.atomic_save({"epoch": 2}, tmp_path / "last.pt")
    monkeypatch.undo()
    assert _epoch(tmp_path / "last.pt") == 1
    # a real SIGKILL would not run the cleanup: leave a temp file as it would
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"junk")
    T.prepare_output_dir(tmp_path, resume=True, overwrite=False, run_files=["last.pt"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_write_keeps_the_permissions_a_plain_write_would(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = T.atomic_write_text("x", tmp_path / "fresh.json")
        assert fresh.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
        kept = tmp_path / "kept.json"
        kept.write_text("old")
        kept.chmod(0o640)
        T.atomic_write_text("new", kept)
        assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text() == "new"
    finally:
        os.umask(old)


def test_full_disk_names_the_path(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_mod.os, "fsync", no_space)
    with pytest.raises(OSError, match=r"cannot write .*last\.pt: No space left on device \(disk full\?\)"):
        T.atomic_save({"epoch": 2}, tmp_path / "last.pt")
    assert not list(tmp_path.iterdir()), "no temp file may stay behind"


def test_load_checkpoint_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(RuntimeError, match="cannot load checkpoint"):
        T.load_checkpoint(bad)
    assert not marker.exists()


# ---------------------------------------------------------------- sharded


def _write_step(store: T.ShardedCheckpoint, step: int, ranks=(0, 1), commit=True):
    for r in ranks:
        store.write(step, f"shard_{r}.pt", {"step": step, "rank": r})
    if commit:
        store.commit(step, [f"shard_{r}.pt" for r in (0, 1)], meta={"world_size": 2})


def test_sharded_resume_takes_newest_complete(tmp_path):
    store = T.ShardedCheckpoint(tmp_path / "ckpt", keep=2)
    assert store.latest() is None
    _write_step(store, 4)
    _write_step(store, 8, ranks=(0,), commit=False)  # killed between the two ranks' files
    ref = store.latest()
    assert ref.step == 4 and ref.load("shard_1.pt")["step"] == 4
    with pytest.raises(FileNotFoundError, match="shard_1.pt was not written"):
        store.commit(8, ["shard_0.pt", "shard_1.pt"])
    _write_step(store, 8)  # the resumed run writes step 8 again
    assert store.latest().step == 8


def test_sharded_truncated_file_is_not_complete(tmp_path):
    store = T.ShardedCheckpoint(tmp_path, keep=3)
    _write_step(store, 1)
    _write_step(store, 2)
    f = store.folder(2) / "shard_1.pt"
    f.write_bytes(f.read_bytes()[:10])
    assert store.latest().step == 1


def test_sharded_prunes_to_keep(tmp_path):
    store = T.ShardedCheckpoint(tmp_path, keep=2)
    for s in (1, 2, 3, 4):
        _write_step(store, s)
    assert [r.step for r in store.complete()] == [3, 4]


# ---------------------------------------------------------------- run folder, logs, guards


def test_prepare_output_dir_policy(tmp_path):
    out = tmp_path / "run"
    T.prepare_output_dir(out, resume=False, overwrite=False, run_files=["last.pt", "log.jsonl"])
    (out / "last.pt").write_bytes(b"x")
    (out / "log.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        T.RunExistsError, match=r"already holds a training run \(last.pt\).*--resume.*--overwrite"
    ):
        T.prepare_output_dir(out, resume=False, overwrite=False, run_files=["last.pt", "log.jsonl"])
    T.prepare_output_dir(out, resume=True, overwrite=False, run_files=["last.pt"])
    assert (out / "last.pt").exists()
    T.prepare_output_dir(out, resume=False, overwrite=True, run_files=["last.pt", "log.jsonl"])
    assert not (out / "last.pt").exists() and not (out / "log.jsonl").exists()
    assert (out / "notes.txt").read_text() == "mine", "overwrite deletes only the run's own files"


def test_logger_truncate_and_cut_last_line(tmp_path):
    log = T.JsonlLogger(tmp_path / "log.jsonl")
    for e in range(5):
        log.log({"epoch": e, "loss": torch.tensor(1.0 / (e + 1))})
    with open(log.path, "a") as fh:
        fh.write('{"epoch": 5, "lo')  # killed mid-line
    assert [r["epoch"] for r in log.read()] == list(range(5))
    assert log.truncate(lambda r: r["epoch"] <= 2) == 2
    log.log({"epoch": 3})
    assert [r["epoch"] for r in log.read()] == [0, 1, 2, 3]
    assert json.loads(log.path.read_text().splitlines()[0])["loss"] == 1.0


def test_check_finite_loss():
    assert T.check_finite_loss(torch.tensor(2.5)) == 2.5
    with pytest.raises(FloatingPointError, match="non-finite loss nan at epoch 3 step 7"):
        T.check_finite_loss(torch.tensor(float("nan")), epoch=3, step=7)
    with pytest.raises(FloatingPointError, match="inf"):
        T.check_finite_loss(float("inf"), step=1)


def test_schedules():
    f = T.warmup_linear_decay(2, 10)
    assert [round(f(s), 3) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.0]
    assert T.poly_warmup(5, 100, 10) == 0.5 and T.poly_warmup(100, 100, 10) == 0.0


def test_amp_cpu_off_by_default():
    amp = T.Amp(torch.device("cpu"), enabled=True)
    assert not amp.enabled and not amp.scaler.is_enabled()
    amp = T.Amp(torch.device("cpu"), enabled=True, cpu_bf16=True)
    lin = torch.nn.Linear(4, 2)
    with amp.autocast():
        assert lin(torch.randn(3, 4)).dtype == torch.bfloat16


# ---------------------------------------------------------------- distributed timeout


@pytest.mark.slow
def test_frozen_rank_ends_with_timeout_message(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(REPO / "tests/core/dist_timeout_worker.py"), "3"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert "rank 0/2: a collective did not complete within 3 s at step 3" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 120, f"job took {elapsed:.0f} s to end"
