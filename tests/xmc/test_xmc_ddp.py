"""torchrun with 2 gloo processes: same evaluation metrics as 1 process, and equivalent training."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mhe_plugins.training import load_checkpoint
from xmc.evaluate import evaluate_model_dir
from xmc.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]


def _torchrun(*args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "xmc.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_two_process_training_and_eval_match_one_process(wordnet_small, tmp_path):
    common = dict(
        head="flat", epochs=1, dropout=0.0, swa=False, tfidf_dim=64, threads=1, progress=False, seed=3
    )
    one = tmp_path / "one"
    train(TrainConfig(data_dir=str(wordnet_small), output=str(one), batch_size=64, **common))
    ref = evaluate_model_dir(one, wordnet_small, "test")

    # evaluation of the same model, sharded over 2 ranks: identical metrics
    two_eval = tmp_path / "two_eval"
    shutil.copytree(one, two_eval)
    metrics = tmp_path / "metrics.json"
    stdout = _torchrun(
        "eval", "--model", str(two_eval), "--data-dir", str(wordnet_small), "--batch-size", "37",
        "--out", str(metrics), "--dist-timeout", "120",
    )  # fmt: skip
    assert stdout.count('"world_size": 2') == 1  # a real 2-rank group; only rank 0 reports
    assert json.loads(metrics.read_text()) == ref

    # training on 2 ranks x 32 docs = the same global batches of 64: same weights and metrics
    two = tmp_path / "two"
    _torchrun(
        "train",
        "--data-dir",
        str(wordnet_small),
        "--output",
        str(two),
        "--head",
        "flat",
        "--encoder",
        "tfidf",
        "--epochs",
        "1",
        "--dropout",
        "0",
        "--no-swa",
        "--tfidf-dim",
        "64",
        "--threads",
        "1",
        "--no-progress",
        "--seed",
        "3",
        "--batch-size",
        "32",
    )
    a, b = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(two / "checkpoint.pt")
    assert a["step"] == b["step"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=2e-5, rtol=1e-4)
    got = evaluate_model_dir(two, wordnet_small, "test")
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=0.5), k
