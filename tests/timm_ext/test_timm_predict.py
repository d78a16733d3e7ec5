"""mhe-timm-predict: per image, the same top-k as mhe-timm-validate on the same checkpoint; CSV / JSON; read-only."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mhe_plugins import entry
from mhe_plugins.datasets.glyphs import load_glyph_split, subset_glyph_dataset
from mhe_plugins.training import atomic_save, load_checkpoint
from timm_ext.predict import main as predict_main
from timm_ext.predict import predict
from timm_ext.train import build_parser, train
from timm_ext.validate import validate

REPO = Path(__file__).resolve().parents[2]
SUBSET = REPO / "data" / "glyphs"
TINY = ["--model", "resnet10t", "--model-kwargs", "channels=(8,16,32,32)", "--input-size", "1", "32", "32"]


@pytest.fixture(scope="module")
def glyphs40(tmp_path_factory):
    out = tmp_path_factory.mktemp("g40")
    subset_glyph_dataset(SUBSET, out, 40)
    return out


@pytest.fixture(scope="module")
def test_pngs(glyphs40, tmp_path_factory) -> Path:
    """Every image of the test split as ``imgs/<item>.png``, the last 10 two folders down (recursion);
    sorted paths keep the split's order."""
    root = tmp_path_factory.mktemp("imgs") / "imgs"
    images, _, _ = load_glyph_split(glyphs40, "test")
    for i, img in enumerate(images):
        folder = root / "sub" / "deeper" if i >= len(images) - 10 else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _run(glyphs40: Path, out: Path, head: str) -> Path:
    argv = ["--data-dir", str(glyphs40), "--dataset", "glyphs", *TINY, "--output", str(out), "--no-progress",
            "--threads", "1", "--head", head, "--head-sizes", "5", "8", "--head-neck", "0", "--epochs", "1",
            "--batch-size", "16", "--max-steps-per-epoch", "30", "--lr", "0.1"]  # fmt: skip
    train(build_parser().parse_args(argv))
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.parametrize("head", ["mhp", "mhc", "mhs"])
def test_predict_equals_validate_per_image(glyphs40, test_pngs, tmp_path, capsys, head):
    run = _run(glyphs40, tmp_path / "run", head)
    before = _files(run)
    ckpt = run / "best.pt"
    res = validate(str(glyphs40), str(ckpt), split="test", batch_size=64, predictions=tmp_path / "val.csv")
    val = _rows((tmp_path / "val.csv").read_text())
    assert len(val) == res["n"] == len(load_glyph_split(glyphs40, "test")[1])
    capsys.readouterr()
    assert predict_main([str(test_pngs), "--checkpoint", str(ckpt), "--batch-size", "64"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows[0]) == ["filename", *[f"{c}_{i}" for c in ("index", "label", "prob") for i in range(5)]]
    assert len(rows) == len(val)  # notes.txt is no image
    names = load_checkpoint(ckpt)["class_names"]
    for r in rows:  # same image, same ids: the whole top-5, per image
        item = int(Path(r["filename"]).stem)
        assert [int(r[f"index_{i}"]) for i in range(5)] == [int(val[item][f"index_{i}"]) for i in range(5)], r
        assert [r[f"label_{i}"] for i in range(5)] == [names[int(r[f"index_{i}"])] for i in range(5)]
        probs = [float(r[f"prob_{i}"]) for i in range(5)]
        assert all(0 < p <= 1 for p in probs) and probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1 + 1e-5  # normalised over all N classes (MHS: its logits normalised too)
    assert [int(Path(r["filename"]).stem) for r in rows] == list(range(len(rows)))  # sorted, recursive
    assert len({r["index_0"] for r in rows}) >= 5  # a model that predicts more than one class
    top1 = [int(r["index_0"]) == int(v["target"]) for r, v in zip(rows, val)]
    assert 100.0 * sum(top1) / len(top1) == pytest.approx(res["top1"])
    assert _files(run) == before, "mhe-timm-predict must not write in the run folder"


def test_predict_formats_files_and_entry_point(glyphs40, test_pngs, tmp_path, capsys):
    run = _run(glyphs40, tmp_path / "run", "mhp")
    ckpt = str(run / "last.pt")
    a, b = test_pngs / "00003.png", test_pngs / "00001.png"
    recs = predict([a, b, test_pngs / "sub"], ckpt, top_k=3)
    assert [r["filename"] for r in recs[:2]] == [str(a), str(b)]  # in the order given, then the folder's
    assert len(recs) == 12
    assert all(len(r["ids"]) == len(r["names"]) == len(r["probs"]) == 3 for r in recs)
    # --format json --output FILE carries the same numbers as the CSV on stdout
    argv = [str(a), str(b), "--checkpoint", ckpt, "--top-k", "3"]
    assert predict_main([*argv, "--format", "json", "--output", str(tmp_path / "p.json")]) == 0
    doc = json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))
    assert doc["checkpoint"] == ckpt and len(doc["predictions"]) == 2
    for got, rec in zip(doc["predictions"], recs):  # another batch: the same ids, scores up to rounding
        assert {k: got[k] for k in ("filename", "ids", "names")} == {
            k: rec[k] for k in ("filename", "ids", "names")
        }
        assert got["probs"] == pytest.approx(rec["probs"], rel=1e-5)
    capsys.readouterr()
    assert entry.run("mhe-timm-predict", "timm", "timm_ext.predict:main", argv) == 0  # the console script
    rows = _rows(capsys.readouterr().out)
    for row, rec in zip(rows, recs[:2]):
        assert [int(row[f"index_{i}"]) for i in range(3)] == rec["ids"]
        assert [float(row[f"prob_{i}"]) for i in range(3)] == pytest.approx(rec["probs"], rel=1e-5)
    assert len(predict([a], ckpt, top_k=500)[0]["ids"]) == 40  # k is capped at the class count


def test_predict_bad_input_names_it(glyphs40, test_pngs, tmp_path):
    run = _run(glyphs40, tmp_path / "run", "mhp")
    ckpt = run / "last.pt"
    with pytest.raises(FileNotFoundError, match=r"image file or folder not found: .*missing\.png"):
        predict([tmp_path / "missing.png"], ckpt)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no images \(.jpeg, .jpg, .png\) found under .*empty"):
        predict([tmp_path / "empty"], ckpt)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n garbage")
    with pytest.raises(ValueError, match=r"corrupt or unreadable image .*bad\.png"):
        predict([test_pngs / "00000.png", tmp_path / "bad.png"], ckpt)
    atomic_save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"foreign\.pt is not a mhe-timm-train checkpoint"):
        predict([test_pngs / "00000.png"], tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="--top-k must be >= 1"):
        predict([test_pngs / "00000.png"], ckpt, top_k=0)
    before = _files(run)
    for target in (ckpt, run / "summary.json"):
        with pytest.raises(ValueError, match="would overwrite a file of the run"):
            predict_main([str(test_pngs / "00000.png"), "--checkpoint", str(ckpt), "--output", str(target)])
    assert _files(run) == before
