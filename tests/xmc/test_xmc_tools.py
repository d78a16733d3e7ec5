"""The measurement tools of docs/xmc.md at tiny size: bench (resumable per method), tune, steptime."""

import json

import pytest

from xmc import bench, steptime, tune


def test_bench_runs_all_methods_and_resumes_per_method(wordnet_small, tmp_path, monkeypatch):
    work, res = tmp_path / "work", tmp_path / "res" / "xmc_small"
    argv = [
        "--data-dir", str(wordnet_small), "--methods", "mhc,flat,mhc-perm,omikuji,napkinxc",
        "--work-dir", str(work), "--results", str(res), "--epochs", "1", "--tfidf-dim", "32",
        "--train-json", '{"max_steps": 3, "batch_size": 64}', "--no-progress",
    ]  # fmt: skip
    out = bench.main(argv)
    js = json.loads(res.with_suffix(".json").read_text())
    assert set(js["methods"]) == {"mhc", "flat", "mhc-perm", "omikuji", "napkinxc"}
    for m in js["methods"].values():
        assert {"P@1", "P@3", "P@5", "nDCG@5", "PSP@5", "train_s", "predict_s", "model_bytes"} <= set(m)
    assert js["methods"]["mhc-perm"]["config"]["permutation_seed"] == 0
    assert js["methods"]["mhc"]["train_config"]["max_steps"] == 3
    assert "mhc_vs_omikuji_P@5" in js["targets"]
    assert "| mhc-perm |" in res.with_suffix(".md").read_text()
    # second call: every method is read back from WORK/<method>.result.json, nothing is retrained
    monkeypatch.setattr(bench, "train", lambda cfg: pytest.fail("retrained"))
    monkeypatch.setattr(bench, "run_omikuji", lambda *a: pytest.fail("retrained"))
    again = bench.main(argv)
    assert again["methods"] == out["methods"]


def test_tune_skips_finished_names(wordnet_small, tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    argv = ["--data-dir", str(wordnet_small), "--out", str(out)]
    argv += ["--config", 'a={"epochs": 1, "max_steps": 2, "tfidf_dim": 16}']
    tune.main(argv)
    tune.main(argv + ["--config", 'b={"epochs": 1, "max_steps": 2, "tfidf_dim": 16, "lexical": true}'])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["name"] for r in rows] == ["a", "b"] and rows[1]["config"]["lexical"] is True
    assert all(0 <= r["P@1"] <= 100 and r["steps"] == 2 for r in rows)


def test_steptime_measures_both_variants(wordnet_small, tmp_path):
    res = steptime.main(
        ["--data-dir", str(wordnet_small), "--steps", "2", "--warmup", "1", "--tfidf-dim", "16",
         "--batch-size", "32", "--out", str(tmp_path / "s.json")]
    )  # fmt: skip
    assert res["dense"]["total"] > 0 and res["sparse"]["total"] > 0
    assert json.loads((tmp_path / "s.json").read_text())["speedup_total"] == res["speedup_total"]
