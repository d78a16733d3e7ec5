"""ImageFolder class ids come from the training split (train) or the checkpoint (validate), never from
the folders a validation split happens to have: a missing class folder re-indexed every later class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import timm_ext.train as train_mod
import timm_ext.validate as validate_mod
from timm_ext import data as data_mod
from timm_ext.data import build_dataset, dataset_targets
from timm_ext.train import build_parser, train

TINY = ["--model", "resnet10t", "--model-kwargs", "channels=(8,8,16,16)", "--input-size", "1", "32", "32"]
CLASSES = ["ant", "bee", "cat", "dog"]


def _folder(root: Path, split: str, classes: list[str], per_class: int = 2) -> None:
    for c, name in enumerate(classes):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((32, 32), 30 * c + i, np.uint8)).save(root / split / name / f"{i}.png")


def _by_class(ds) -> dict[str, set[int]]:
    """Folder name -> the targets its files got."""
    out: dict[str, set[int]] = {}
    for (path, _), t in zip(ds.reader.samples, dataset_targets(ds)):
        out.setdefault(Path(path).parent.name, set()).add(int(t))
    return out


def test_val_split_missing_a_class_keeps_training_ids(tmp_path):
    _folder(tmp_path, "train", CLASSES)
    _folder(tmp_path, "valid", CLASSES[1:])  # no "ant" folder
    train_ds = build_dataset("", tmp_path, "train", 1)
    val_ds = build_dataset("", tmp_path, "valid", 1, class_map=data_mod.class_map_of(train_ds))
    assert _by_class(val_ds) == {"bee": {1}, "cat": {2}, "dog": {3}}
    # a list of names in id order works the same (what checkpoints store)
    val_ds = build_dataset("", tmp_path, "valid", 1, class_map=CLASSES)
    assert _by_class(val_ds) == {"bee": {1}, "cat": {2}, "dog": {3}}


def test_val_split_with_unknown_class_folder_is_an_error(tmp_path):
    _folder(tmp_path, "train", CLASSES)
    _folder(tmp_path, "valid", [*CLASSES[1:], "eel", "fox"])
    with pytest.raises(ValueError, match=r"valid.*'eel', 'fox'.*not classes of the training"):
        build_dataset("", tmp_path, "valid", 1, class_map=CLASSES)


def test_glyph_class_map_mismatch_is_an_error(tmp_path):
    from mhe_plugins.datasets.glyphs import subset_glyph_dataset

    subset_glyph_dataset(Path(__file__).resolve().parents[2] / "data" / "glyphs", tmp_path, 5)
    names = (tmp_path / "classes.txt").read_text(encoding="utf-8").split("\n")[:5]
    build_dataset("glyphs", tmp_path, "valid", 1, class_map=names)  # same classes: fine
    with pytest.raises(ValueError, match=r"class .* has id 0 .* 1 in the class map"):
        build_dataset("glyphs", tmp_path, "valid", 1, class_map=[names[1], names[0], *names[2:]])


def test_train_and_validate_use_the_training_class_ids(tmp_path, monkeypatch):
    """End to end: the trainer's val loader and mhe-timm-validate see the training ids."""
    _folder(tmp_path / "data", "train", CLASSES)
    _folder(tmp_path / "data", "valid", CLASSES[1:])
    _folder(tmp_path / "data", "test", CLASSES[2:])
    seen = []
    real_loader = train_mod.build_loader

    def spy(ds, **kw):
        seen.append(ds)
        return real_loader(ds, **kw)

    monkeypatch.setattr(train_mod, "build_loader", spy)
    argv = ["--data-dir", str(tmp_path / "data"), "--dataset", "", *TINY, "--output", str(tmp_path / "run"),
            "--no-progress", "--threads", "1", "--head", "mhp", "--head-sizes", "2", "2", "--epochs", "1",
            "--batch-size", "4", "--max-steps-per-epoch", "1"]  # fmt: skip
    train(build_parser().parse_args(argv))
    assert _by_class(seen[1]) == {"bee": {1}, "cat": {2}, "dog": {3}}  # [train, val]

    captured = []
    real_eval = validate_mod.evaluate

    def eval_spy(model, loader, device):
        captured.append(loader.dataset)
        return real_eval(model, loader, device)

    monkeypatch.setattr(validate_mod, "evaluate", eval_spy)
    validate_mod.validate(str(tmp_path / "data"), str(tmp_path / "run" / "last.pt"), split="test")
    assert _by_class(captured[0]) == {"cat": {2}, "dog": {3}}
    assert json.loads((tmp_path / "run" / "classes.json").read_text())["names"] == CLASSES
