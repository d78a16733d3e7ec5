"""mhe-xmc train's TensorBoard scalars: one point per validation at its optimizer step, the numbers of
log.jsonl, both SWA candidates once SWA validates; the CLI's logging options reach TrainConfig."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xmc.cli import build_parser, config_from_args
from xmc.train import TrainConfig, train, validation_tags

METRICS = [f"{m}@{k}" for m in ("P", "nDCG", "PSP") for k in (1, 3, 5)]


def scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_validation_rows_become_scalars(wordnet_small, tmp_path):
    out = tmp_path / "run"
    cfg = dict(head="mhc", epochs=2, batch_size=128, tfidf_dim=32, num_groups=20, swa_every=5, ranker=False)
    train(TrainConfig(data_dir=str(wordnet_small), output=str(out), threads=1, progress=False, **cfg))
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    got = scalars(out / "tensorboard")
    steps = [r["step"] for r in rows]
    assert len(rows) == 2 and steps[0] < steps[1]
    every = {"train/loss", "train/lr", "train/docs_per_s", "valid/swa_selected"} | {
        f"valid/{m}" for m in METRICS
    }
    swa = {f"valid_{w}/{m}" for w in ("raw", "swa") for m in METRICS}  # epoch 1 = the last quarter: SWA too
    assert set(got) == every | swa
    for tag in every:
        assert [s for s, _ in got[tag]] == steps, tag
    for tag in swa:
        assert [s for s, _ in got[tag]] == steps[1:], tag
    for r in rows:
        for tag, value in validation_tags(r).items():
            assert dict(got[tag])[r["step"]] == pytest.approx(value, rel=1e-6), tag
    docs = dict(got["train/docs_per_s"])
    assert all(v > 0 for v in docs.values())


def test_cli_logging_options():
    base = ["train", "--data-dir", "d", "--output", "o"]
    cfg = config_from_args(build_parser().parse_args(base))
    assert (cfg.tensorboard, cfg.log_dir, cfg.wandb, cfg.wandb_project) == (True, None, False, None)
    argv = [*base, "--no-tensorboard", "--log-dir", "tb", "--wandb", "--wandb-project", "p"]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert (cfg.tensorboard, cfg.log_dir, cfg.wandb, cfg.wandb_project) == (False, "tb", True, "p")
