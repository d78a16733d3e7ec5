"""docs/timm.md "Stock timm scripts": timm's own train.py / validate.py through ``python -m timm_ext.stock``.

timm's scripts are not in the timm wheel nor in its sdist on PyPI, and this project does not copy third-party
code: the test runs the ``train.py`` / ``validate.py`` of the pytorch-image-models checkout that
``MHE_TIMM_SCRIPTS`` names and is skipped without one (checked here against commit aa4b5850c). The commands are
the ones docs/timm.md shows, at tiny size (20 glyph classes, resnet10t with 8-16-32-32 channels, 32x32, 1 epoch).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import timm_ext  # noqa: F401  (registers resnet10t_mhp)
from mhe_plugins.datasets.glyphs import load_glyph_split

REPO = Path(__file__).resolve().parents[2]
SUBSET = REPO / "data" / "glyphs"
DOC = REPO / "docs" / "timm.md"

# exactly the lines of docs/timm.md (test_docs_show_these_commands checks that they are there)
TRAIN = (
    "python -m timm_ext.stock pytorch-image-models/train.py --data-dir glyph20 --model resnet10t_mhp "
    '--model-kwargs "head_sizes=[5,4]" "channels=(8,16,32,32)" --num-classes 20 --smoothing 0.1 --mixup 0.2 '
    "--device cpu --epochs 1 --input-size 3 32 32 --batch-size 32 --workers 0 --output out --experiment tiny"
)
VALIDATE = (
    "python -m timm_ext.stock pytorch-image-models/validate.py --data-dir glyph20 --split validation "
    '--model resnet10t_mhp --model-kwargs "head_sizes=[5,4]" "channels=(8,16,32,32)" --num-classes 20 '
    "--checkpoint out/tiny/model_best.pth.tar --device cpu --input-size 3 32 32 --batch-size 32 --workers 0"
)


def _scripts(dest: Path) -> Path:
    """pytorch-image-models/{train,validate}.py in ``dest``, from the checkout MHE_TIMM_SCRIPTS names."""
    given = os.environ.get("MHE_TIMM_SCRIPTS")
    if not given:
        pytest.skip(
            "set MHE_TIMM_SCRIPTS to a pytorch-image-models checkout (timm's scripts are not on PyPI)"
        )
    repo = dest / "pytorch-image-models"
    repo.mkdir()
    for name in ("train.py", "validate.py"):
        shutil.copy(Path(given) / name, repo / name)
    return repo


def _image_folder(root: Path, classes: int = 20) -> None:
    """The first ``classes`` glyph classes as a timm ImageFolder: train/ and validation/ (timm's names)."""
    for split, folder in (("train", "train"), ("valid", "validation")):
        images, labels, _ = load_glyph_split(SUBSET, split)
        for i in np.flatnonzero(labels < classes):
            d = root / folder / f"c{labels[i]:02d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(d / f"{i}.png")


def _run(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    assert argv[0] == "python"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def test_docs_show_these_commands():
    text = " ".join(DOC.read_text(encoding="utf-8").replace("\\\n", " ").split())
    assert TRAIN in text and VALIDATE in text


def test_stock_timm_train_and_validate_scripts(tmp_path):
    _scripts(tmp_path)
    _image_folder(tmp_path / "glyph20")
    train = _run(TRAIN, tmp_path)
    run = tmp_path / "out" / "tiny"
    assert "Scheduled epochs: 1" in train.stdout + train.stderr
    rows = (run / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == 2 and rows[1].startswith("0,")
    # timm's checkpoint holds our model: it loads strictly into the registered name and decodes exactly
    ckpt = torch.load(run / "model_best.pth.tar", map_location="cpu", weights_only=False)
    model = timm.create_model("resnet10t_mhp", num_classes=20, head_sizes=[5, 4], channels=(8, 16, 32, 32))
    model.load_state_dict(ckpt["state_dict"])
    scores, ids = model.eval().topk(torch.randn(3, 3, 32, 32), k=5)
    assert ids.shape == (3, 5) and (ids < 20).all()
    val = _run(VALIDATE, tmp_path)
    res = json.loads(val.stdout.split("--result", 1)[1])
    assert res["model"] == "resnet10t_mhp" and 0.0 <= res["top1"] <= res["top5"] <= 100.0
