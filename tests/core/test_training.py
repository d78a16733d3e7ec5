"""The shared trainer utilities: checkpoints that survive kills, run-folder policy, logs, guards, timeouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mhe_plugins import training as T

REPO = Path(__file__).resolve().parents[2]


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
