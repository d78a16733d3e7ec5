"""MetricLogger: the JSON-lines rows and the same scalars in TensorBoard, read back with TensorBoard's own
reader, without duplicate points after a resume; W&B only when asked for (a stand-in module, no network)."""

from __future__ import annotations

import json
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mhe_plugins.training import MetricLogger, add_metric_log_args, open_metric_logger


def scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purges applied)."""
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _logger(tmp_path, **kw) -> MetricLogger:
    return MetricLogger(tmp_path / "log.jsonl", step_key="step", tb_dir=tmp_path / "tb", **kw)


def test_rows_and_scalars_then_resume_shows_each_step_once(tmp_path):
    log = _logger(tmp_path)
    for s in range(1, 7):  # steps 4..6 were logged but never committed (the run was killed)
        log.log({"step": s, "loss": 10.0 - s, "tag": "x", "ok": True}, extra={"train/ips": 100.0})
    log.close()
    resumed = _logger(tmp_path)
    assert resumed.truncate(lambda r: r["step"] <= 3) == 3 and resumed.purge_step == 4
    for s in range(4, 9):
        resumed.log({"step": s, "loss": 100.0 + s})
    resumed.close()
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))  # the JSON rows exactly as given
    assert rows[0] == {"step": 1, "loss": 9.0, "tag": "x", "ok": True}
    got = scalars(tmp_path / "tb")
    assert set(got) == {"loss", "train/ips"}  # numbers only; the step is the x axis, not a tag
    assert got["loss"] == [(s, 10.0 - s) for s in (1, 2, 3)] + [(s, 100.0 + s) for s in range(4, 9)]
    assert got["train/ips"] == [(1, 100.0), (2, 100.0), (3, 100.0)]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2


def test_everything_dropped_then_relogged_and_a_fresh_run_hides_older_points(tmp_path):
    log = _logger(tmp_path)
    for s in range(3):
        log.log({"step": s, "loss": 1.0})
    log.close()
    again = _logger(tmp_path)  # e.g. timm resuming another folder's checkpoint: the log is rewritten
    again.truncate(lambda r: False)
    assert again.purge_step == 0
    for s in range(2):
        again.log({"step": s, "loss": 2.0})
    again.close()
    assert scalars(tmp_path / "tb")["loss"] == [(0, 2.0), (1, 2.0)]
    fresh = MetricLogger(tmp_path / "other.jsonl", step_key="step", tb_dir=tmp_path / "tb")
    fresh.log({"step": 5, "loss": 3.0})  # a new run in the same folder starts at purge step 0
    fresh.close()
    assert scalars(tmp_path / "tb")["loss"] == [(5, 3.0)]


def test_other_ranks_and_no_tensorboard_write_no_event_file(tmp_path, monkeypatch):
    off = MetricLogger(
        tmp_path / "a" / "log.jsonl", step_key="step", tb_dir=tmp_path / "a" / "tb", enabled=False
    )
    off.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "a").exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not even importable
    only_json = MetricLogger(tmp_path / "b" / "log.jsonl", step_key="step", tb_dir=None)
    only_json.log({"step": 1, "loss": 1.0})
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["log.jsonl"]
    with pytest.raises(ImportError, match=r"pip install tensorboard .*--no-tensorboard"):
        _logger(tmp_path / "c")


def test_row_without_its_step_is_refused(tmp_path):
    log = _logger(tmp_path)
    with pytest.raises(KeyError, match="no 'step'"):
        log.log({"loss": 1.0})


def test_cli_options_and_default_folder(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    add_metric_log_args(p)
    assert vars(p.parse_args([])) == {
        "log_dir": None,
        "tensorboard": True,
        "wandb": False,
        "wandb_project": None,
    }
    args = p.parse_args(["--no-tensorboard"])
    assert (
        open_metric_logger(tmp_path / "l.jsonl", tmp_path, args, step_key="step", enabled=True).tb_dir is None
    )
    log = open_metric_logger(tmp_path / "l.jsonl", tmp_path, p.parse_args([]), step_key="step", enabled=True)
    assert log.tb_dir == tmp_path / "tensorboard"
    args = p.parse_args(["--log-dir", str(tmp_path / "tb2")])
    assert open_metric_logger(tmp_path / "l.jsonl", tmp_path, args, step_key="step", enabled=True).tb_dir == (
        tmp_path / "tb2"
    )


class _FakeWandb(types.ModuleType):
    """Records what a W&B run would have been sent; never touches the network."""

    def __init__(self):
        super().__init__("wandb")
        self.runs: list[dict] = []

    def init(self, **kw):
        run = types.SimpleNamespace(kw=kw, logged=[], finished=False)
        run.log = lambda data, step: run.logged.append((step, data))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_wandb_only_when_asked_and_each_start_is_its_own_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    _logger(tmp_path / "plain").log({"step": 1, "loss": 1.0})  # not asked for: wandb is never imported
    with pytest.raises(ImportError, match="--wandb needs the wandb package"):
        _logger(tmp_path / "x", wandb=True)
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = _logger(tmp_path, wandb=True, wandb_project="p", run_name="run1", config={"lr": 0.1})
    log.log({"step": 1, "loss": 2.0}, extra={"ips": 5.0})
    log.log({"step": 2, "loss": 1.0})
    log.truncate(lambda r: r["step"] <= 1)  # a resume: the old W&B run ends, the next row starts a new one
    log.log({"step": 2, "loss": 0.5})
    log.close()
    first, second = fake.runs
    assert first.kw == {
        "project": "p",
        "name": "run1",
        "group": "run1",
        "config": {"lr": 0.1, "start_step": 1},
    }
    assert first.logged == [(1, {"loss": 2.0, "ips": 5.0}), (2, {"loss": 1.0})] and first.finished
    assert (
        second.kw["config"]["start_step"] == 2 and second.logged == [(2, {"loss": 0.5})] and second.finished
    )
