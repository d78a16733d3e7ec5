"""mhe-timm-train after kills and on reused folders; timm split names; readers that name the bad file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mhe_plugins.training.state as state_mod
import timm_ext.train as train_mod
from mhe_plugins.datasets.glyphs import GlyphDataset, load_glyph_split, subset_glyph_dataset
from mhe_plugins.training import RunExistsError, load_checkpoint
from timm_ext.data import build_dataset
from timm_ext.train import build_parser, train
from timm_ext.validate import validate

REPO = Path(__file__).resolve().parents[2]
SUBSET = REPO / "data" / "glyphs"
TINY = ["--model", "resnet10t", "--model-kwargs", "channels=(8,16,32,32)", "--input-size", "1", "32", "32"]
FAST = ["--batch-size", 32, "--max-steps-per-epoch", 12, "--lr", 0.2, "--seed", 3]


def _args(data_dir, out, *extra, dataset="glyphs"):
    argv = ["--data-dir", str(data_dir), "--dataset", dataset, *TINY, "--output", str(out), "--no-progress"]
    return build_parser().parse_args(argv + ["--threads", "1", *map(str, extra)])


@pytest.fixture(scope="module")
def glyphs40(tmp_path_factory):
    out = tmp_path_factory.mktemp("g40")
    subset_glyph_dataset(SUBSET, out, 40)
    return out


class Killed(BaseException):
    """What SIGKILL does to the Python code: nothing after this point runs."""


def _assert_consistent(out: Path, data: Path) -> dict:
    """best.pt (through mhe-timm-validate), last.pt, summary.json/csv and log.jsonl tell the same story."""
    res = validate(str(data), str(out / "best.pt"), split="valid")
    summary = json.loads((out / "summary.json").read_text())
    hist = summary["history"]
    epochs = [r["epoch"] for r in hist]
    assert epochs == list(range(len(hist)))
    assert load_checkpoint(out / "last.pt")["epoch"] == epochs[-1]
    assert summary["best_val_top1"] == max(r["valid_top1"] for r in hist)
    best_epoch = max(hist, key=lambda r: r["valid_top1"])["epoch"]  # first of equal maxima
    assert load_checkpoint(out / "best.pt")["epoch"] == best_epoch
    assert res["top1"] == pytest.approx(summary["best_val_top1"], abs=1e-9)
    assert len((out / "summary.csv").read_text().splitlines()) == len(hist) + 1
    return summary


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize("kill_at", ["best.pt", "last.pt"])
def test_kill_during_checkpoint_write_then_resume(glyphs40, tmp_path, monkeypatch, kill_at):
    out = tmp_path / "run"
    real_save = state_mod.atomic_save
    seen = {}

    def killing_save(obj, path):
        # kill at the first new best after epoch 0: writing last.pt (the commit) or best.pt right after it
        name, epoch = Path(path).name, obj["epoch"]
        if name == "last.pt" and epoch >= 1 and "_best_state" in obj and "best_epoch" not in seen:
            seen["best_epoch"] = epoch
        if name == kill_at and seen.get("best_epoch") == epoch:
            raise Killed(f"killed writing {name} at epoch {epoch}")
        return real_save(obj, path)

    monkeypatch.setattr(state_mod, "atomic_save", killing_save)
    with pytest.raises(Killed):
        train(_args(glyphs40, out, "--epochs", 4, *FAST))
    monkeypatch.setattr(state_mod, "atomic_save", real_save)
    killed_epoch = seen["best_epoch"]
    # right after the kill (no resume): validate is read-only and scores the committed best
    before = _files(out)
    res = validate(str(glyphs40), str(out / "best.pt"), split="valid")
    assert _files(out) == before, "mhe-timm-validate must not write in the run folder"
    committed = load_checkpoint(out / "last.pt")["history"]
    assert len(committed) == (killed_epoch + 1 if kill_at == "best.pt" else killed_epoch)
    assert res["top1"] == pytest.approx(max(r["valid_top1"] for r in committed), abs=1e-9)
    # the log got the killed epoch's row (logged before the commit); resume keeps exactly one per epoch
    assert [r["epoch"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())][
        -1
    ] == killed_epoch
    train(_args(glyphs40, out, "--epochs", 4, *FAST, "--resume", out / "last.pt"))
    summary = _assert_consistent(out, glyphs40)
    assert summary["finished"] and len(summary["history"]) == 4
    logged = [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3]


def test_real_sigkill_mid_run_then_resume(glyphs40, tmp_path):
    out = tmp_path / "run"
    argv = ["--data-dir", str(glyphs40), "--dataset", "glyphs", *TINY, "--output", str(out), "--no-progress",
            "--threads", "1", "--epochs", "3", *map(str, FAST)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "timm_ext.train", *argv], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 240
    while not (out / "log.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere inside epoch 1 (or its checkpoint writes)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    args = build_parser().parse_args([*argv, "--resume", str(out / "last.pt")])
    train(args)
    summary = _assert_consistent(out, glyphs40)
    assert [r["epoch"] for r in summary["history"]] == [0, 1, 2]
    assert [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_output_folder_with_a_run_is_not_overwritten(glyphs40, tmp_path):
    out = tmp_path / "run"
    common = ["--epochs", 1, "--batch-size", 16, "--max-steps-per-epoch", 2]
    train(_args(glyphs40, out, *common))
    before = (out / "last.pt").read_bytes()
    with pytest.raises(RunExistsError, match=r"--resume .* --overwrite"):
        train(_args(glyphs40, out, *common, "--seed", 5))
    assert (out / "last.pt").read_bytes() == before
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    (out / "notes.txt").write_text("mine")
    train(_args(glyphs40, out, *common, "--seed", 5, "--overwrite"))
    assert (out / "last.pt").read_bytes() != before
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_non_finite_loss_names_epoch_and_step(glyphs40, tmp_path, monkeypatch):
    real = train_mod.MHEClassifier.compute_loss
    calls = {"n": 0}

    def nan_at_third_step(self, x, target, **kw):
        calls["n"] += 1
        loss = real(self, x, target, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_mod.MHEClassifier, "compute_loss", nan_at_third_step)
    with pytest.raises(FloatingPointError, match="non-finite loss nan at epoch 0 step 2"):
        train(_args(glyphs40, tmp_path / "run", "--epochs", 1, "--batch-size", 8, "--max-steps-per-epoch", 4))
    assert not (tmp_path / "run" / "last.pt").exists()


def _image_folder(root: Path, splits: dict[str, int], classes: int = 3) -> None:
    for split, per_class in splits.items():
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((32, 32), 20 * i + 60 * c, np.uint8)).save(
                    root / split / f"class{c}" / f"{i}.png"
                )


def test_timm_validation_split_name_and_missing_split(tmp_path):
    root = tmp_path / "data"
    _image_folder(root, {"train": 4, "validation": 2, "test": 3})
    # timm's default split name: `--val-split valid` (our default) finds `validation`, not the pooled root
    ds = build_dataset("", root, "valid", in_chans=1)
    assert len(ds) == 3 * 2 and Path(ds.reader.root) == root / "validation"
    assert len(build_dataset("torch/folder", root, "valid", in_chans=1)) == 3 * 2
    assert len(build_dataset("", root, ".", in_chans=1)) == 3 * (4 + 2 + 3)  # '.': the root, on request
    args = ["--epochs", 1, "--batch-size", 4, "--max-steps-per-epoch", 1]
    summary = train(_args(root, tmp_path / "ok", *args, dataset=""))
    assert summary["history"][0]["valid_n"] == 6
    # a missing split is an error naming the paths tried (timm would use DATA_DIR itself)
    (root / "validation").rename(root / "holdout")
    with pytest.raises(FileNotFoundError, match=r"split 'valid' not found .*validation"):
        train(_args(root, tmp_path / "bad", *args, dataset=""))
    for name in ("", "torch/folder"):
        with pytest.raises(FileNotFoundError, match=str(root / "valid")):
            build_dataset(name, root, "valid", in_chans=1)
    with pytest.raises(FileNotFoundError, match=str(root / "dev")):
        validate(str(root), str(tmp_path / "ok" / "last.pt"), split="dev")
    assert validate(str(root), str(tmp_path / "ok" / "last.pt"), split="holdout")["n"] == 6


def test_glyph_reader_errors_name_the_file(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\nc\n", encoding="utf-8")
    images, fonts = np.zeros((3, 8, 8), np.uint8), np.array(["f"] * 3)
    np.savez(tmp_path / "train.npz", images=images, labels=np.array([0.0, 1.7, 2.0]), fonts=fonts)
    with pytest.raises(
        ValueError, match=r"train\.npz: labels must be a 1-d integer array, got float64.*item 1 is 1\.7"
    ):
        load_glyph_split(tmp_path, "train")
    # a zip whose member is damaged: BadZipFile inside numpy -> error naming the file
    np.savez(tmp_path / "valid.npz", images=images, labels=np.array([0, 1, 2]), fonts=fonts)
    raw = bytearray((tmp_path / "valid.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "valid.npz") as z:
        info = z.getinfo("labels.npy")
    raw[info.header_offset] ^= 0xFF  # the member's local header: "Bad magic number for file header"
    (tmp_path / "valid.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"valid\.npz: corrupt or truncated npz file \(BadZipFile"):
        GlyphDataset(tmp_path, "valid")
    # a truncated archive (disk full while copying)
    np.savez(tmp_path / "test.npz", images=images, labels=np.array([0, 1, 2]), fonts=fonts)
    (tmp_path / "test.npz").write_bytes((tmp_path / "test.npz").read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"test\.npz"):
        load_glyph_split(tmp_path, "test")


def test_decompression_bomb_names_the_image(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _image_folder(root, {"train": 1}, classes=2)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "train" / "class1" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 64*64 > 2 * 1500: PIL's DecompressionBombError
    ds = build_dataset("", root, "train", in_chans=1)
    i = [Path(p).name for p in ds.filenames()].index("big.png")
    with pytest.raises(ValueError, match=r"class1/big\.png .*too large to decode safely"):
        ds[i]
    assert ds[0][0].size == (32, 32)  # normal images still load


def test_damaged_last_pt_never_costs_best_pt(glyphs40, tmp_path):
    """Issue 25: a truncated last.pt (a half-finished copy of the run folder) made mhe-timm-validate and the
    next mhe-timm-train start delete best.pt. Now: validate scores best.pt and writes nothing; --resume
    refuses, naming what is intact; a fresh start without --overwrite refuses too; best.pt is never lost."""
    out = tmp_path / "run"
    common = ["--epochs", 2, *FAST]
    train(_args(glyphs40, out, *common))
    last = out / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = _files(out)
    res = validate(str(glyphs40), str(out / "best.pt"), split="valid")
    summary = json.loads((out / "summary.json").read_text())
    assert res["top1"] == pytest.approx(summary["best_val_top1"], abs=1e-9)
    with pytest.raises(
        RuntimeError, match=r"cannot resume .*last\.pt is damaged .*best\.pt from epoch \d is intact"
    ):
        train(_args(glyphs40, out, *common, "--resume", last))
    with pytest.raises(RunExistsError):
        train(_args(glyphs40, out, *common))
    assert _files(out) == before, "nothing in the run folder may change"


def test_resume_with_nothing_to_resume_is_an_error(glyphs40, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(
            _args(glyphs40, tmp_path / "run", "--epochs", 1, *FAST, "--resume", tmp_path / "run" / "last.pt")
        )
    assert not (tmp_path / "run").exists(), "a refused resume creates nothing"
