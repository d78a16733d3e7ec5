"""mhe-timm-train's TensorBoard scalars: one point per epoch and tag, what log.jsonl holds, none twice after
a kill and --resume; `tensorboard --inspect` lists them; --no-tensorboard / --log-dir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import mhe_plugins.training.state as state_mod
from mhe_plugins.datasets.glyphs import subset_glyph_dataset
from timm_ext.metric_log import epoch_tags
from timm_ext.train import build_parser, train

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model", "resnet10t", "--model-kwargs", "channels=(8,16,32,32)", "--input-size", "1", "32", "32"]
RUN = ["--head", "mhp", "--head-sizes", 5, 4, "--batch-size", 16, "--max-steps-per-epoch", 3, "--seed", 3]
TAGS = {"train/loss", "train/lr", "train/epoch_s", "train/img_per_s", "valid/top1", "valid/top5"}


def _args(data_dir, out, *extra):
    argv = ["--data-dir", str(data_dir), "--dataset", "glyphs", *TINY, "--output", str(out), "--no-progress"]
    return build_parser().parse_args(argv + ["--threads", "1", *map(str, extra)])


def scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def glyphs20(tmp_path_factory):
    out = tmp_path_factory.mktemp("g20")
    subset_glyph_dataset(REPO / "data" / "glyphs", out, 20)
    return out


class Killed(BaseException):
    """What SIGKILL does to the Python code: nothing after this point runs."""


def test_scalars_match_log_and_resume_leaves_no_duplicates(glyphs20, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = state_mod.atomic_save

    def killed_at_epoch_1_commit(
        obj, path
    ):  # epoch 1's row is logged (JSON and TensorBoard), never committed
        if Path(path).name == "last.pt" and obj["epoch"] == 1:
            raise Killed
        return real_save(obj, path)

    monkeypatch.setattr(state_mod, "atomic_save", killed_at_epoch_1_commit)
    with pytest.raises(Killed):
        train(_args(glyphs20, out, *RUN, "--epochs", 3))
    monkeypatch.setattr(state_mod, "atomic_save", real_save)
    assert [s for s, _ in scalars(out / "tensorboard")["train/loss"]] == [
        0,
        1,
    ]  # the uncommitted epoch is there
    train(_args(glyphs20, out, *RUN, "--epochs", 3, "--resume", out / "last.pt"))

    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    got = scalars(out / "tensorboard")
    assert set(got) == TAGS
    for tag, points in got.items():
        assert [s for s, _ in points] == [0, 1, 2], tag  # one point per epoch, epoch 1 once (the re-run's)
    for r in rows:  # and they are the log's numbers
        for tag, value in epoch_tags(r, ("valid",)).items():
            assert dict(got[tag])[r["epoch"]] == pytest.approx(value, rel=1e-6), (tag, r["epoch"])

    # the installed TensorBoard CLI reads the same folder
    tb = Path(sys.executable).with_name("tensorboard")
    res = subprocess.run(
        [str(tb), "--inspect", "--logdir", str(out / "tensorboard")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    listed = res.stdout + res.stderr
    assert all(f"   {tag}\n" in listed for tag in TAGS), listed


def test_no_tensorboard_and_log_dir(glyphs20, tmp_path):
    one = ["--epochs", 1, "--max-steps-per-epoch", 1]
    train(_args(glyphs20, tmp_path / "off", *RUN, *one, "--no-tensorboard"))
    assert (tmp_path / "off" / "log.jsonl").is_file() and not (tmp_path / "off" / "tensorboard").exists()
    train(
        _args(
            glyphs20, tmp_path / "on", *RUN, *one, "--log-dir", tmp_path / "tb", "--extra-eval-split", "test"
        )
    )
    assert not (tmp_path / "on" / "tensorboard").exists()
    got = scalars(tmp_path / "tb")
    assert set(got) == TAGS | {"test/top1", "test/top5"} and all(len(p) == 1 for p in got.values())
