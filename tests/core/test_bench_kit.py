"""The benchmark kit every bench uses: run store + resume-skip rule, keyed caches, PARTIAL marking, writers."""

from __future__ import annotations

import json

import pytest

from mhe_plugins.bench.env import environment, thread_env
from mhe_plugins.bench.report import (
    mark_partial,
    partial_banner,
    pyplot,
    report_paths,
    save_figure,
    write_reports,
)
from mhe_plugins.bench.store import KeyedFile, RunStore, cached_result, key_diff, settings_key


def test_store_reuses_a_keyed_record_only_with_the_same_key(tmp_path, capsys):
    store = RunStore(tmp_path / "runs")
    key = {"vocab": 8000, "method": "ce", "max_update": 8000}
    store.save("v8000_ce", {"key": key, "result": {"bleu": 20.0}})
    assert store.load("v8000_ce", key)["result"] == {"bleu": 20.0}
    assert store.load("v8000_ce", {**key, "max_update": 4000}) is None
    assert "max_update differ" in capsys.readouterr().out  # said, never silent
    assert store.load("absent", key) is None and store.names() == ["v8000_ce"]
    assert key_diff({"a": 1}, {"a": 2, "b": 3}) == ["a", "b"]


def test_run_or_reuse_skips_finished_runs_and_stores_new_ones(tmp_path):
    store = RunStore(tmp_path / "store", suffix=".result.json")
    calls, stored = [], []

    def run():
        calls.append(1)
        return {"p1": 50.0}

    assert store.run_or_reuse("mhc", run, on_stored=lambda: stored.append(1)) == {"p1": 50.0}
    assert (tmp_path / "store" / "mhc.result.json").is_file() and calls == [1] and stored == [1]
    assert store.run_or_reuse("mhc", run) == {"p1": 50.0} and calls == [1]  # skipped
    store.run_or_reuse("mhc", run, force=True)
    assert calls == [1, 1]
    assert store.run_or_reuse("other", run, may_run=False) is None and calls == [1, 1]


def test_run_or_reuse_prefers_the_work_dir_copy_and_checks_it_is_finished(tmp_path):
    store = RunStore(tmp_path / "store")
    local = tmp_path / "work" / "summary.json"
    local.parent.mkdir()
    local.write_text(json.dumps({"history": [1]}))  # an unfinished run: trained again (resumed)

    def run():
        local.write_text(json.dumps({"history": [1, 2]}, indent=1))
        return json.loads(local.read_text())

    done = lambda s: len(s["history"]) >= 2  # noqa: E731
    assert store.run_or_reuse("r", run, local=local, done=done) == {"history": [1, 2]}
    assert store.path("r").read_bytes() == local.read_bytes()  # a byte copy of the run's own file
    local.unlink()  # a fresh machine: the work dir is gone, the store still has it
    assert store.find("r", local=local) == {"history": [1, 2]}
    assert store.run_or_reuse("r", lambda: pytest.fail("retrained"), local=local, done=done)


def test_keyed_caches(tmp_path):
    cache = KeyedFile(tmp_path / "timing.json")
    assert cache.get_or_compute("8000:ce", {"k": 1}, lambda: {"wps": 3.0}) == {"wps": 3.0}
    again = KeyedFile(tmp_path / "timing.json")
    assert again.get_or_compute("8000:ce", {"k": 1}, lambda: pytest.fail("recomputed")) == {"wps": 3.0}
    assert again.get("8000:ce", {"k": 2}) is None
    assert cached_result(tmp_path / "s.json", {"v": 1}, lambda: [1]) == [1]
    assert cached_result(tmp_path / "s.json", {"v": 1}, lambda: pytest.fail("recomputed")) == [1]
    assert cached_result(tmp_path / "s.json", {"v": 2}, lambda: [2]) == [2]
    ns = type("A", (), {"lr": 0.1, "dim": 8})()
    assert settings_key(ns, ("lr", "dim"), vocab=8000) == {"vocab": 8000, "lr": 0.1, "dim": 8}


def test_partial_marking_and_writers(tmp_path):
    assert partial_banner(False) == []
    assert partial_banner(True, hint="")[0] == "**PARTIAL RESULTS: some planned runs have not finished.**"
    line = partial_banner(True, ["mhp at 300", "mhc at 300"])[0]
    assert line.startswith("**PARTIAL RESULTS: not finished yet: mhp at 300, mhc at 300.** Rerun the same")
    assert list(mark_partial({"a": 1, "partial": False}, True)) == ["partial", "a"]
    assert report_paths(tmp_path / "x.json")["md"] == tmp_path / "x.md"
    assert report_paths(tmp_path / "nmt.v2")["png"] == tmp_path / "nmt.v2.png"

    def plot(res, path):
        fig, ax = pyplot().subplots()
        ax.plot(res["y"])
        save_figure(fig, path)

    paths = write_reports(tmp_path / "out" / "r", {"y": [1, 2]}, "# r", plot)
    assert json.loads(paths["json"].read_text()) == {"y": [1, 2]} and paths["md"].read_text() == "# r\n"
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in paths["json"].parent.iterdir()) == [
        "r.json",
        "r.md",
        "r.png",
    ]  # no temp left


def test_environment_and_thread_limits():
    env = environment(3)
    assert env["threads"] == 3 and env["cpu_count"] >= 1 and "torch" in env["machine"]
    assert env["boot_id"] == environment()["boot_id"] and len(env["boot_id"]) > 8  # one boot: the same id
    assert isinstance(env["cpu_model"], str)
    child = thread_env(2, base={"PATH": "/bin"})
    assert child == {"PATH": "/bin", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
