"""mhe-timm-train / validate / export end to end on the committed glyph subset (tiny random-weight models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import timm_ext.train as train_mod
from mhe_plugins.datasets.glyphs import subset_glyph_dataset
from mhe_plugins.training import load_checkpoint
from timm_ext.export import export_onnx
from timm_ext.train import build_parser, train
from timm_ext.validate import validate

REPO = Path(__file__).resolve().parents[2]
SUBSET = REPO / "data" / "glyphs"
TINY = ["--model", "resnet10t", "--model-kwargs", "channels=(16,32,64,64)", "--input-size", "1", "32", "32"]


def _args(data_dir, out, *extra, dataset="glyphs"):
    argv = ["--data-dir", str(data_dir), "--dataset", dataset, *TINY, "--output", str(out), "--no-progress"]
    return build_parser().parse_args(argv + ["--threads", "1", *map(str, extra)])


@pytest.fixture(scope="module")
def glyphs100(tmp_path_factory):
    """The first 100 classes of the committed subset (train ~1.8k images, test from the held-out fonts)."""
    out = tmp_path_factory.mktemp("g100")
    subset_glyph_dataset(SUBSET, out, 100)
    return out


def test_mhp_converges_on_held_out_fonts(glyphs100, tmp_path):
    # the plain product head (no neck): on this 64-d toy backbone and 6 short epochs the default 1024-wide
    # neck converges far slower (test top-1 8 vs > 30), see docs/timm.md
    args = _args(glyphs100, tmp_path / "run", "--head", "mhp", "--head-sizes", 10, 10, "--epochs", 6,
                 "--batch-size", 32, "--lr", 0.1, "--extra-eval-split", "test", "--seed", 0,
                 "--head-neck", 0)  # fmt: skip
    summary = train(args)
    hist = summary["history"]
    assert len(hist) == 6 and hist[-1]["train_loss"] < 0.6 * hist[0]["train_loss"]
    assert hist[-1]["test_top1"] > 30.0  # chance is 1%; unseen fonts
    assert hist[-1]["test_top5"] > hist[-1]["test_top1"]
    assert summary["head_params"] == 64 * 20 + 20
    out = tmp_path / "run"
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("epoch,train_loss")
    assert len((out / "log.jsonl").read_text().splitlines()) == 6
    # validate CLI on the last checkpoint reproduces the trainer's test numbers
    res = validate(str(glyphs100), str(out / "last.pt"), split="test")
    assert res["top1"] == pytest.approx(hist[-1]["test_top1"]) and res["n"] > 250


def test_resume_reproduces_uninterrupted_run(glyphs100, tmp_path, monkeypatch):
    common = ["--head", "mhc", "--head-sizes", 10, 10, "--epochs", 2, "--batch-size", 16,
              "--max-steps-per-epoch", 4, "--seed", 1]  # fmt: skip
    full = train(_args(glyphs100, tmp_path / "full", *common))
    calls = {"n": 0}
    real_eval = train_mod.evaluate

    def crash_in_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_eval(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(_args(glyphs100, tmp_path / "cut", *common))
    monkeypatch.setattr(train_mod, "evaluate", real_eval)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 0
    resumed = train(_args(glyphs100, tmp_path / "cut", *common, "--resume", tmp_path / "cut" / "last.pt"))
    assert [r["epoch"] for r in resumed["history"]] == [0, 1]
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=f"{k} differs after resume")
    assert resumed["history"][-1]["train_loss"] == pytest.approx(full["history"][-1]["train_loss"])


def test_bad_inputs_give_clear_errors(glyphs100, tmp_path):
    with pytest.raises(ValueError, match=r"--head-sizes \[9, 10\] cover 90 ids .* 100 classes"):
        train(_args(glyphs100, tmp_path / "a", "--head", "mhp", "--head-sizes", 9, 10, "--epochs", 1))
    with pytest.raises(ValueError, match=r"has class id \d+, outside \[0, 50\)"):
        train(_args(glyphs100, tmp_path / "b", "--head", "mhp", "--num-classes", 50, "--epochs", 1))
    with pytest.raises(ValueError, match="--head mhs"):
        train(_args(glyphs100, tmp_path / "c", "--head", "mhs", "--mixup", 0.8, "--epochs", 1))
    # ImageFolder with a corrupt file: the error names the file (timm would skip it with a warning)
    root = tmp_path / "folder"
    for split in ("train", "valid"):
        for c in range(3):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((32, 32), 40 * i + c, np.uint8)).save(
                    root / split / f"class{c}" / f"{i}.png"
                )
    (root / "train" / "class1" / "2.png").write_bytes(b"\x89PNG\r\n garbage")
    with pytest.raises(ValueError, match=r"corrupt or unreadable image .*class1/2\.png"):
        train(_args(root, tmp_path / "d", "--head", "mhp", "--epochs", 1, "--batch-size", 4, dataset=""))


@pytest.mark.parametrize("head", ["mhp", "mhc", "mhs"])
def test_onnx_export_matches_pytorch(glyphs100, tmp_path, head):
    out = tmp_path / head
    steps = ["--epochs", 1, "--max-steps-per-epoch", 2, "--amp"]  # bf16 autocast on CPU
    neck = ["--head-neck", 48] if head == "mhc" else []  # the neck is rebuilt from the checkpoint config
    train(_args(glyphs100, out, "--head", head, "--head-sizes", 10, 10, *steps, *neck))
    rep = export_onnx(out / "last.pt", out / "model.onnx", top_k=5)
    assert rep["ids_equal"] and rep["max_abs_score_diff"] < 1e-4
    assert rep["preprocess"] == str(out / "model.preprocess.json") and rep["classes"] == str(
        out / "model.classes.json"
    )
    _check_export_sidecars(out / "last.pt", out / "model.onnx", glyphs100, head)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    scores, ids = sess.run(None, {"images": np.random.randn(7, 1, 32, 32).astype(np.float32)})
    assert ids.shape == (7, 5) and ids.dtype == np.int64 and (ids < 100).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # sorted best first


def test_torchrun_ddp_two_processes(glyphs100, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "timm_ext.train", "--data-dir", str(glyphs100), "--dataset", "glyphs", *TINY, "--head", "mhp",
           "--head-sizes", "10", "10", "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "3",
           "--output", str(out), "--no-progress", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["history"]) == 1
    # validation is sharded over the 2 ranks and summed back (timm's sampler pads by < 2 items)
    n_valid = len(np.load(glyphs100 / "valid.npz")["labels"])
    assert load_checkpoint(out / "last.pt")["epoch"] == 0
    assert n_valid <= summary["history"][0]["valid_n"] <= n_valid + 1


def _check_export_sidecars(ckpt: Path, onnx: Path, data: Path, head: str) -> None:
    """OUT.preprocess.json / OUT.classes.json agree with the checkpoint and rebuild the evaluation transform."""
    from timm.data import create_transform

    from mhe_plugins.datasets.glyphs import GlyphDataset
    from timm_ext.data import build_loader

    pre = json.loads(onnx.with_name("model.preprocess.json").read_text())
    classes = json.loads(onnx.with_name("model.classes.json").read_text())
    cfg = load_checkpoint(ckpt)["config"]
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "num_classes", "head_sizes"):
        assert pre[key] == cfg[key], key
    assert pre["top_k"] == 5 and pre["outputs"]["scores"] == (
        "logits" if head == "mhs" else "log-probabilities"
    )
    ds = GlyphDataset(data, "test", mode="L")
    assert classes["num_classes"] == 100 and classes["names"] == ds.classes
    # the JSON alone rebuilds the exact evaluation transform mhe-timm-validate applies
    ours = create_transform(
        input_size=tuple(pre["input_size"]), interpolation=pre["interpolation"], mean=tuple(pre["mean"]),
        std=tuple(pre["std"]), crop_pct=pre["crop_pct"], crop_mode=pre["crop_mode"], is_training=False,
    )  # fmt: skip
    ref = build_loader(ds, tuple(cfg["input_size"]), 8, False, tuple(cfg["mean"]), tuple(cfg["std"]),
                       interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"]).dataset.transform  # fmt: skip
    for i in (0, 5, 17):
        torch.testing.assert_close(ours(ds[i][0]), ref(ds[i][0]), atol=0, rtol=0)


def test_mhs_sampling_correction_flag(monkeypatch):
    parse = lambda *a: build_parser().parse_args(["--data-dir", "d", "--output", "o", *a])  # noqa: E731
    assert "sampling_correction" not in train_mod.head_kwargs_from_args(parse("--head", "mhs"))
    with pytest.raises(ValueError, match="applies to --head mhs, not --head mhp"):
        train_mod.head_kwargs_from_args(parse("--head", "mhp", "--mhs-sampling-correction"))

    class Old:
        def __init__(self, in_features, codec, mode="batch_union"): ...

    class New:
        def __init__(self, in_features, codec, mode="batch_union", sampling_correction: bool = False): ...

    monkeypatch.setattr(train_mod, "MHSHead", Old)
    with pytest.raises(ValueError, match="has no sampling_correction option"):
        train_mod.head_kwargs_from_args(parse("--head", "mhs", "--mhs-sampling-correction"))
    monkeypatch.setattr(train_mod, "MHSHead", New)
    kw = train_mod.head_kwargs_from_args(parse("--head", "mhs", "--mhs-sampling-correction"))
    assert kw == {"mode": "per_sample", "sampling_correction": True}
    kw = train_mod.head_kwargs_from_args(parse("--head", "mhs", "--no-mhs-sampling-correction"))
    assert kw == {"mode": "per_sample", "sampling_correction": False}
    monkeypatch.undo()
    # no flag: the core default, which the glyph benchmark made the corrected loss
    model = train_mod.create_model("resnet10t", head="mhs", num_classes=100, head_sizes=[10, 10],
                                   head_kwargs=train_mod.head_kwargs_from_args(parse("--head", "mhs")))  # fmt: skip
    assert model.head.sampling_correction is True


def test_documented_cli_commands_at_tiny_size(glyphs100, tmp_path, capsys):
    """The mhe-timm-train / validate / export lines of docs/timm.md, through their console-script mains."""
    from timm_ext.export import main as export_main
    from timm_ext.train import main as train_main
    from timm_ext.validate import main as validate_main

    out = tmp_path / "out"
    common = ["--data-dir", str(glyphs100), "--dataset", "glyphs", *TINY, "--head", "mhp", "--head-sizes", "10",
              "10", "--batch-size", "16", "--lr", "0.1", "--opt", "sgd", "--sched", "cosine",
              "--warmup-epochs", "1", "--smoothing", "0.1", "--mixup", "0.2", "--output", str(out),
              "--head-neck", "32", "--max-steps-per-epoch", "2", "--no-progress", "--threads", "1"]  # fmt: skip
    assert train_main([*common, "--epochs", "1"]) == 0
    assert train_main([*common, "--epochs", "2", "--resume", str(out / "last.pt")]) == 0
    capsys.readouterr()
    assert validate_main(["--data-dir", str(glyphs100), "--checkpoint", str(out / "best.pt"), "--split", "test",
                          "--out", str(tmp_path / "res.json")]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "res.json").read_text()) and printed["n"] > 250
    assert export_main(["--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "model.onnx"),
                        "--top-k", "5", "--no-check"]) == 0  # fmt: skip
    assert (tmp_path / "model.preprocess.json").exists() and (tmp_path / "model.classes.json").exists()


def test_head_neck_defaults_and_resume(tmp_path):
    from mhe_plugins.training import atomic_save
    from timm_ext.train import NECK_DEFAULTS, resolve_head_neck

    def neck(*extra):
        return resolve_head_neck(_args(tmp_path, tmp_path / "o", *extra))

    # measured defaults: a neck for the product and cascade heads, none for linear / MHS
    assert neck("--head", "mhp") == NECK_DEFAULTS["mhp"] == 1024 and neck("--head", "mhc") == 1024
    assert neck("--head", "linear") is None and neck("--head", "mhs") is None
    assert (
        neck("--head", "mhp", "--head-neck", 0) is None and neck("--head", "linear", "--head-neck", 64) == 64
    )
    with pytest.raises(ValueError, match="--head-neck must be >= 0"):
        neck("--head", "mhp", "--head-neck", -1)
    # resuming a run made without a neck (e.g. before the default changed) keeps it without one
    ckpt = tmp_path / "last.pt"
    atomic_save({"config": {"neck_dim": None}}, ckpt)
    assert neck("--head", "mhp", "--resume", ckpt) is None
    atomic_save({"config": {"neck_dim": 48}}, ckpt)
    assert neck("--head", "mhp", "--resume", ckpt) == 48
