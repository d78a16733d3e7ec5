"""``mhe-xmc train --resume`` never harms the model folder; ``eval`` is read-only (issue 25)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import mhe_plugins.training.state as state_mod
from mhe_plugins.training import load_checkpoint
from xmc.evaluate import evaluate_model_dir
from xmc.train import TrainConfig, train

KW = dict(
    head="flat", epochs=2, swa=False, batch_size=128, tfidf_dim=32, threads=1, progress=False, ranker=False
)  # the learned ranker's own commit: tests/xmc/test_xmc_issue28.py


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".mhe-run.lock"
    }


@pytest.fixture(scope="module")
def trained(wordnet_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("xmc_resume") / "run"
    train(TrainConfig(data_dir=str(wordnet_small), output=str(out), **KW))
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_truncated_checkpoint_keeps_model_and_refuses_resume(trained, wordnet_small, tmp_path):
    run = _copy(trained, tmp_path)
    ck = run / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    before = _snapshot(run)
    with pytest.raises(RuntimeError, match=r"checkpoint\.pt is damaged .*model\.pt from epoch \d is intact"):
        train(TrainConfig(data_dir=str(wordnet_small), output=str(run), resume=True, **KW))
    res = evaluate_model_dir(run, wordnet_small, "valid")
    summary = json.loads((run / "train_summary.json").read_text())
    assert res["P@5"] == pytest.approx(summary["best_valid_P@5"], abs=1e-6)
    assert _snapshot(run) == before, "a refused resume and eval change nothing"


def _relabel(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    for split in ("train", "valid", "test"):
        f = dst / f"{split}_labels.txt"
        f.write_text(
            "".join(" ".join(fn(t) for t in line.split()) + "\n" for line in f.read_text().splitlines())
        )
    return dst


def test_resume_on_other_data_writes_nothing(trained, wordnet_small, tmp_path):
    """Another dataset (one label fewer) or the same label count under other names: refused before any
    file of the run is touched (it used to rewrite labels.txt/config.json, or silently rename labels)."""
    run = _copy(trained, tmp_path)
    names = (run / "labels.txt").read_text().split()
    fewer = _relabel(wordnet_small, tmp_path / "fewer", lambda t: names[1] if t == names[0] else t)
    renamed = _relabel(wordnet_small, tmp_path / "renamed", lambda t: "x" + t)
    before = _snapshot(run)
    for data in (fewer, renamed):
        with pytest.raises(ValueError, match=r"cannot resume .*labels differ \(.*labels"):
            train(TrainConfig(data_dir=str(data), output=str(run), resume=True, **KW))
        assert _snapshot(run) == before


def test_resume_with_no_checkpoint_is_an_error(wordnet_small, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(TrainConfig(data_dir=str(wordnet_small), output=str(tmp_path / "new"), resume=True, **KW))
    assert not (tmp_path / "new").exists()


def test_kill_between_checkpoint_and_model_pt(wordnet_small, tmp_path, monkeypatch):
    """The commit (checkpoint.pt) happened, model.pt was not written: eval scores the committed best without
    writing; --resume rolls model.pt forward and finishes like an uninterrupted run."""
    run = tmp_path / "run"
    real, seen = state_mod.atomic_save, {"n": 0}

    class Killed(BaseException):
        pass

    def killing(obj, path):
        if Path(path).name == "model.pt":
            seen["n"] += 1
            if seen["n"] == 2:  # the second new best (epoch 1)
                raise Killed
        return real(obj, path)

    monkeypatch.setattr(state_mod, "atomic_save", killing)
    with pytest.raises(Killed):
        train(TrainConfig(data_dir=str(wordnet_small), output=str(run), **KW))
    monkeypatch.undo()
    ck = load_checkpoint(run / "checkpoint.pt")
    assert ck["epoch"] == 1 and load_checkpoint(run / "model.pt")["epoch"] == 0
    before = _snapshot(run)
    res = evaluate_model_dir(run, wordnet_small, "valid")
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert res["P@5"] == pytest.approx(log[1]["P@5"], abs=1e-6), "eval uses the committed best"
    assert _snapshot(run) == before
    train(TrainConfig(data_dir=str(wordnet_small), output=str(run), resume=True, **KW))
    assert load_checkpoint(run / "model.pt")["epoch"] == 1
