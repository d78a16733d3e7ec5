"""Crash-safe fairseq checkpoints: atomic copies, and recovery from a truncated checkpoint_last.pt."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

pytest.importorskip("fairseq")

from fairseq import checkpoint_utils  # noqa: E402

from fairseq_ext import checkpoints, register  # noqa: E402
from mhe_plugins.training import atomic as atomic_mod  # noqa: E402

register()


def _ckpt(path, updates: int, mtime: float) -> None:
    torch.save(
        {"model": {"w": torch.full((64,), float(updates))}, "args": argparse.Namespace(u=updates)}, path
    )
    os.utime(path, (mtime, mtime))


def _truncate(path) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_fallback_is_newest_loadable_checkpoint(tmp_path):
    _ckpt(tmp_path / "checkpoint_1_100.pt", 100, 1_000)
    _ckpt(tmp_path / "checkpoint_best.pt", 100, 1_100)
    _ckpt(tmp_path / "checkpoint_2_200.pt", 200, 1_200)
    _ckpt(tmp_path / "checkpoint_last.pt", 300, 1_300)
    last = str(tmp_path / "checkpoint_last.pt")
    assert checkpoints.check_loadable(last) is None
    _truncate(last)
    assert checkpoints.check_loadable(last) is not None
    assert checkpoints.fallback_checkpoint(str(tmp_path), last) == str(tmp_path / "checkpoint_2_200.pt")
    _truncate(tmp_path / "checkpoint_2_200.pt")
    assert checkpoints.fallback_checkpoint(str(tmp_path), last) == str(tmp_path / "checkpoint_best.pt")
    (tmp_path / "checkpoint_best.pt").write_bytes(b"not a checkpoint")
    torch.save({"no_model": 1}, tmp_path / "checkpoint_1_100.pt")
    with pytest.raises(RuntimeError, match="no other checkpoint") as err:
        checkpoints.fallback_checkpoint(str(tmp_path), last)
    assert "checkpoint_1_100.pt: not a fairseq checkpoint" in str(err.value)


def test_checkpoint_copy_is_atomic(tmp_path, monkeypatch):
    assert getattr(checkpoint_utils, "_mhe_safe", False)
    src, dst = tmp_path / "checkpoint_5_10.pt", tmp_path / "checkpoint_last.pt"
    _ckpt(src, 10, 2_000)
    _ckpt(dst, 5, 1_000)
    old = dst.read_bytes()

    def killed(fd):  # every byte was written to the temp file, the process "dies" before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_mod.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == [src.name, dst.name]
    monkeypatch.undo()
    assert checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes()
    assert checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=False) is False
    assert checkpoint_utils.PathManager.exists(str(dst))  # other methods are fairseq's own


def test_checkpoint_loading_stays_weights_only_whatever_the_environment(tmp_path, monkeypatch):
    """Issue 25: with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, fairseq's own torch.load (no weights_only argument)
    unpickled arbitrary code. Through this project's plugin it stays restricted."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "checkpoint_evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "x": Evil()}, bad)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global|not allowed"):
        checkpoint_utils.load_checkpoint_to_cpu(str(bad))
    assert not marker.exists()
    good = tmp_path / "checkpoint_good.pt"
    _ckpt(good, 7, 1_000)
    # what fairseq's loader calls: plain checkpoints still load under the same environment
    assert float(checkpoint_utils.torch.load(str(good), map_location="cpu")["model"]["w"][0]) == 7.0
