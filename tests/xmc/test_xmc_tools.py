"""The measurement tools of docs/xmc.md at tiny size: bench (resumable per method), tune, steptime."""

import json

import pytest

from xmc import bench, steptime, tune


def test_bench_rows_run_and_resume_per_row(wordnet_small, tmp_path, monkeypatch, capsys):
    work, res = tmp_path / "work", tmp_path / "res" / "xmc_small"
    methods = "mhc,mhc-noranker,mhc-bare,flat,omikuji,omikuji-bonsai,napkinxc,knn"
    argv = [
        "--data-dir", str(wordnet_small), "--methods", methods,
        "--work-dir", str(work), "--results", str(res), "--epochs", "1", "--tfidf-dim", "32",
        "--train-json", '{"max_steps": 3, "batch_size": 64}', "--no-progress",
    ]  # fmt: skip
    out = bench.main(argv)
    js = json.loads(res.with_suffix(".json").read_text())
    assert list(js["methods"]) == methods.split(",")
    for m in js["methods"].values():
        assert {"P@1", "P@3", "P@5", "nDCG@5", "PSP@5", "train_s", "predict_s", "model_bytes"} <= set(m)
        assert {"P@1", "P@5"} <= set(m["valid"]) and m["train_s"] >= 0 and m["threads"] == 1
    ms = js["methods"]
    assert ms["mhc"]["ranker"] and not ms["mhc-noranker"]["ranker"] and not ms["mhc-bare"]["ranker"]
    assert ms["mhc-noranker"]["train_s"] < ms["mhc"]["train_s"]  # same model, the ranker fit left out
    assert (
        ms["mhc-bare"]["train_config"]["neighbours"] == 0
        and ms["mhc-bare"]["train_config"]["lexical"] is False
    )
    assert ms["mhc"]["train_config"]["max_steps"] == 3
    # the ablations and flat are on the anchors' features (TF-IDF only) whatever the default encoder is
    assert ms["mhc-bare"]["train_config"]["encoder"] == ms["flat"]["train_config"]["encoder"] == "tfidf"
    assert bench.NEURAL["mhc-novote"]["encoder"] == bench.NEURAL["mhc-nolex"]["encoder"] == "tfidf"
    assert (
        ms["omikuji-bonsai"]["params"]["cluster_k"] == 100
        and not ms["omikuji-bonsai"]["params"]["cluster_balanced"]
    )
    assert ms["omikuji-bonsai"]["params"]["max_depth"] == 3 and ms["omikuji"]["params"]["cluster_k"] == 2
    assert ms["knn"]["P@1"] > 20  # the vote alone is a real baseline
    assert js["targets"]["omikuji_anchor"] in ("omikuji", "omikuji-bonsai")
    assert "mhc_vs_" + js["targets"]["omikuji_anchor"] + "_P@1" in js["targets"]
    md = res.with_suffix(".md").read_text()
    assert "| omikuji-bonsai |" in md and "| knn |" in md and "valid P@1" in md
    # second call: every row is read back from WORK/<row>.result.json, nothing is retrained
    monkeypatch.setattr(bench, "train", lambda cfg: pytest.fail("retrained"))
    monkeypatch.setattr(bench, "run_tree", lambda *a, **k: pytest.fail("retrained"))
    again = bench.main(argv)
    assert again["methods"] == out["methods"]
    # another invocation adds a row; the report keeps the earlier ones; a changed setting is recomputed
    monkeypatch.undo()
    capsys.readouterr()
    more = bench.main([*argv[:3], "knn", *argv[4:8], "--max-features", "500", *argv[8:]])
    assert list(more["methods"]) == methods.split(",")
    assert "differ): not reused" in capsys.readouterr().out
    assert more["setup"]["num_features"] <= 500


def test_tune_skips_finished_names(wordnet_small, tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    argv = ["--data-dir", str(wordnet_small), "--out", str(out)]
    argv += ["--config", 'a={"epochs": 1, "max_steps": 2, "tfidf_dim": 16}']
    tune.main(argv)
    tune.main(argv + ["--config", 'b={"epochs": 1, "max_steps": 2, "tfidf_dim": 16, "lexical": true}'])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["name"] for r in rows] == ["a", "b"] and rows[1]["config"]["lexical"] is True
    assert all(0 <= r["P@1"] <= 100 and r["steps"] == 2 for r in rows)
    assert "hand_weights" in rows[0] and rows[0]["total_s"] >= 0  # the learned ranker's row (on by default)
    tune.main(argv + ["--config", "knn"])  # an anchor, on the valid split too
    knn = json.loads(out.read_text().splitlines()[-1])
    assert knn["name"] == "knn" and knn["P@1"] > 20 and knn["config"] == {}


def test_steptime_measures_both_variants(wordnet_small, tmp_path):
    res = steptime.main(
        ["--data-dir", str(wordnet_small), "--steps", "2", "--warmup", "1", "--tfidf-dim", "16",
         "--batch-size", "32", "--out", str(tmp_path / "s.json")]
    )  # fmt: skip
    assert res["dense"]["total"] > 0 and res["sparse"]["total"] > 0
    assert json.loads((tmp_path / "s.json").read_text())["speedup_total"] == res["speedup_total"]
