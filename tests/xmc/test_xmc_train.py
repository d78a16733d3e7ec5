"""End-to-end trainer on a real WordNet-XMC slice: convergence, eval/predict, SWA weights, resume."""

import io
import json

import numpy as np
import pytest
import torch

from mhe_plugins import metrics as M
from mhe_plugins.training import load_checkpoint
from xmc.cli import main
from xmc.data import load_dataset
from xmc.evaluate import evaluate_model_dir, predict_lines
from xmc.train import TrainConfig, train


def _cfg(data, out, **kw):
    base = dict(epochs=3, batch_size=64, tfidf_dim=128, threads=1, progress=False, seed=1)
    base.update(kw)
    return TrainConfig(data_dir=str(data), output=str(out), **base)


@pytest.fixture(scope="module")
def mhc_run(wordnet_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("mhc")
    summary = train(
        _cfg(wordnet_small, out, head="mhc", epochs=12, num_groups=20, candidates_topk=4, swa_every=10)
    )
    return out, summary


def test_mhc_converges_well_above_popularity_baseline(mhc_run, wordnet_small):
    out, summary = mhc_run
    ds = load_dataset(wordnet_small)
    res = evaluate_model_dir(out, wordnet_small, "test", out=out / "metrics.json")
    assert json.loads((out / "metrics.json").read_text()) == res
    assert set(res) == {f"{m}@{k}" for m in ("P", "nDCG", "PSP") for k in (1, 3, 5)}
    # baseline: always predict the 5 most frequent training labels
    top = np.argsort(-np.asarray(ds.splits["train"].labels.sum(0)).ravel())[:5]
    pop = M.xmc_metrics(np.tile(top, (len(ds.splits["test"]), 1)), ds.splits["test"].labels)
    assert res["P@1"] > pop["P@1"] + 15, (res, pop)
    assert res["P@5"] > pop["P@5"] + 5, (res, pop)
    # selection used validation only; log has one record per epoch (+ the learned ranker's, no epoch)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["split"] for r in log] == ["valid"] * 13 and 0 <= summary["best_epoch"] < 12
    assert [r.get("stage") for r in log if "epoch" not in r] == ["ranker"]


def test_swa_average_is_saved_and_raw_weights_stay_in_checkpoint(mhc_run):
    out, _ = mhc_run
    ck = load_checkpoint(out / "checkpoint.pt")
    best = load_checkpoint(out / "model.pt")
    swa = {k.removeprefix("module."): v for k, v in ck["swa"].items() if k.startswith("module.")}
    raw = ck["model"]
    assert int(ck["swa"]["n_averaged"]) > 1
    key = "head.embed.weight"
    assert not torch.equal(swa[key], raw[key])  # the average was never swapped into the raw weights
    # late SWA (last quarter = epochs 9..11): from then on both weights are validated, the better is kept
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    log = [r for r in log if "epoch" in r]
    for r in log:
        assert ("other" in r) == (r["epoch"] >= 9), r
        if "other" in r:
            (other,) = r["other"].values()
            assert r["P@5"] >= other["P@5"]
    assert log[best["epoch"]]["weights"] == best["weights"]
    if best["epoch"] == 11:  # the saved model is exactly the weights that won at the last epoch
        assert torch.equal(best["state_dict"][key], (swa if best["weights"] == "swa" else raw)[key])


def test_predict_maps_back_to_label_tokens(mhc_run, wordnet_small):
    out, _ = mhc_run
    vocab = set((out / "labels.txt").read_text().split())
    rows = predict_lines(out, ["beagle; a small hound", "oak; a tree of the genus Quercus"], top_k=5)
    assert [len(r) for r in rows] == [5, 5]
    for r in rows:
        assert all(lab in vocab for lab, _ in r)
        scores = [s for _, s in r]
        assert scores == sorted(scores, reverse=True) and 0 <= scores[-1] <= scores[0] <= 1
        assert len({lab for lab, _ in r}) == 5


def test_resume_continues_exactly(wordnet_small, tmp_path):
    kw = dict(head="flat", epochs=2, swa=False, batch_size=128)
    full = train(_cfg(wordnet_small, tmp_path / "full", **kw))
    part = tmp_path / "part"
    train(_cfg(wordnet_small, part, **{**kw, "epochs": 2, "max_steps": 19}))  # 19 steps = epoch 1 of 2
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(wordnet_small, part, **kw))
    resumed = train(_cfg(wordnet_small, part, resume=True, **kw))
    assert resumed["history"][-1]["P@5"] == pytest.approx(full["history"][-1]["P@5"], abs=1e-6)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(part / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_cli_defaults_work_on_bow_format(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    data = tmp_path / "bow"
    data.mkdir()
    for split, n in (("train", 300), ("test", 60)):
        lines = []
        for _ in range(n):
            labs = sorted(set(rng.integers(0, 40, 2).tolist()))
            feats = sorted(
                {int(f) for lab in labs for f in (lab * 2, lab * 2 + 1)} | {int(rng.integers(80, 100))}
            )
            lines.append(",".join(map(str, labs)) + " " + " ".join(f"{f}:1.0" for f in feats))
        (data / f"{split}.txt").write_text(f"{n} 100 40\n" + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    main(
        [
            "train",
            "--data-dir",
            str(data),
            "--output",
            str(out),
            "--epochs",
            "8",
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    main(["eval", "--model", str(out), "--data-dir", str(data), "--out", str(out / "m.json")])
    res = json.loads((out / "m.json").read_text())
    assert res["P@1"] > 70  # features identify the labels
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "bow" and meta["model"]["head"] == "mhc"
    # predict reads BoW feature lines from stdin: features 6,7 identify label 3
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("6:1.0 7:1.0\n"))
    main(["predict", "--model", str(out), "--top-k", "2"])
    line = capsys.readouterr().out.strip()
    assert line.split()[0].split(":")[0] == "3" and len(line.split()) == 2


def test_gradient_accumulation_equals_the_larger_batch(wordnet_small, tmp_path):
    kw = dict(head="flat", epochs=1, swa=False, dropout=0.0, max_steps=6)
    train(_cfg(wordnet_small, tmp_path / "big", batch_size=64, **kw))
    train(_cfg(wordnet_small, tmp_path / "acc", batch_size=32, grad_accum=2, **kw))
    a = load_checkpoint(tmp_path / "big" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "acc" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=2e-5, rtol=1e-4)
