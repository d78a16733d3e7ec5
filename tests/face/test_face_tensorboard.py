"""mhe-face-train's TensorBoard scalars (arcface_torch's OUTPUT/tensorboard): the numbers of train_log.jsonl
at their global step, none twice after a kill before a checkpoint commit and the resume; CLI/config switches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from insightface_ext.recordio import write_face_rec
from insightface_ext.train import cli as train_main
from insightface_ext.train import face_tags
from insightface_ext.verification import write_bin
from mhe_plugins.training import ShardedCheckpoint

CONFIG = """
from insightface_ext.config import base_config
config = base_config()
config.network = "r18"
config.width = 4
config.embedding_size = 16
config.input_size = 16
config.head_sizes = (4, 5)
config.margin_list = (1.0, 0.2, 0.0)
config.scale = 16.0
config.batch_size = 8
config.rec = {rec!r}
config.num_classes = 20
config.num_workers = 0
config.save_every = 4
config.log_every = 1
config.val_targets = ("val.bin",)
config.verbose = 4
"""


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("face_tb")
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 256, (20, 16, 16, 3))
    samples = [
        (np.clip(protos[i] + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8), i)
        for i in range(20)
        for _ in range(6)
    ]
    write_face_rec(d / "rec", samples, img_fmt=".png")
    pairs = [(k * 6, k * 6 + 1, k * 6, (k + 1) % 20 * 6) for k in range(20)]  # a genuine, an impostor pair
    write_bin(d / "rec" / "val.bin", [samples[i][0] for p in pairs for i in p], [True, False] * 20)
    path = d / "tiny_face.py"
    path.write_text(CONFIG.format(rec=str(d / "rec")))
    return str(path)


def scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for tag, value in face_tags(r).items():
            out.setdefault(tag, []).append((r["step"], value))
    return out


def test_scalars_are_the_log_and_survive_a_kill_and_resume(cfg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_main([cfg, "--output", str(out), "--set", "max_steps=4"])

    def killed(self, step, names, meta=None):  # steps 5..8 are logged, their checkpoint is never committed
        raise KeyboardInterrupt(f"killed before committing step {step}")

    monkeypatch.setattr(ShardedCheckpoint, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        train_main([cfg, "--output", str(out), "--set", "max_steps=8"])
    monkeypatch.undo()
    assert [s for s, _ in scalars(out / "tensorboard")["train/loss"]] == list(range(1, 9))
    train_main([cfg, "--output", str(out), "--set", "max_steps=8"])  # resumes from step 4

    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    got, want = scalars(out / "tensorboard"), expected(rows)
    train = {"train/loss", "train/lr", "train/img_per_s", "train/sampled_classes"}
    assert train | {"val/val/acc10fold", "val/val/acc10fold_std"} <= set(got) == set(want)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 9))  # steps 5..8 once: the resumed run's
    assert [s for s, _ in got["val/val/acc10fold"]] == [4, 8]
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_cli_and_config_switches(cfg, tmp_path):
    off = tmp_path / "off"
    train_main([cfg, "--output", str(off), "--set", "max_steps=1", "--no-tensorboard"])
    assert (off / "train_log.jsonl").is_file() and not (off / "tensorboard").exists()
    assert json.loads((off / "config.json").read_text())["tensorboard"] is False
    train_main([cfg, "--output", str(tmp_path / "a"), "--set", "max_steps=1", f"log_dir={tmp_path / 'tb'}"])
    assert set(scalars(tmp_path / "tb")) >= {"train/loss", "val/val/acc10fold"}
    assert not (tmp_path / "a" / "tensorboard").exists()
