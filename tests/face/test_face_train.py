"""Trainer end to end on a generated .rec: learning, exact resume, torchrun + re-sharding, eval, ONNX export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from insightface_ext import evaluate as face_eval
from insightface_ext import export as face_export
from insightface_ext.config import load_config
from insightface_ext.recordio import write_face_rec
from insightface_ext.train import cli as train_main
from insightface_ext.train import poly_warmup
from insightface_ext.verification import embed_images, evaluate_bin, load_bin, verification_metrics, write_bin
from mhe_plugins.metrics import pair_scores
from mhe_plugins.training import ShardedCheckpoint, load_checkpoint

NUM_IDS, PER_ID = 20, 6

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
config.lr = 0.1
config.num_epoch = 3
config.warmup_epoch = 0
config.rec = {rec!r}
config.num_classes = {n}
config.num_workers = 0
config.save_every = 4
config.log_every = 1
config.val_targets = ("val.bin",)
config.val_image_size = 16
config.verbose = 10
config.output = "unused"
"""


def _identity_images(seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (NUM_IDS, 16, 16, 3))
    return [
        (np.clip(protos[i] + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8), i)
        for i in range(NUM_IDS)
        for _ in range(PER_ID)
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("face")
    samples = _identity_images()
    write_face_rec(d / "rec", samples, img_fmt=".png")
    imgs, same = [], []
    for k in range(NUM_IDS):  # genuine: two images of id k; impostor: id k vs id k+1
        imgs += [
            samples[k * PER_ID][0],
            samples[k * PER_ID + 1][0],
            samples[k * PER_ID][0],
            samples[((k + 1) % NUM_IDS) * PER_ID][0],
        ]
        same += [True, False]
    write_bin(d / "rec" / "val.bin", imgs, same)
    cfg = d / "tiny_face.py"
    cfg.write_text(CONFIG.format(rec=str(d / "rec"), n=NUM_IDS))
    return d, cfg


def _latest(out: Path, name: str) -> dict:
    """A file of the newest complete checkpoint in a face run folder."""
    return ShardedCheckpoint(out / "checkpoints").latest().load(name)


def test_poly_warmup_schedule():
    assert poly_warmup(0, 100, 10) == 0 and poly_warmup(5, 100, 10) == 0.5
    assert poly_warmup(10, 100, 10) == 1.0 and poly_warmup(55, 100, 10) == pytest.approx(0.25)
    assert poly_warmup(100, 100, 10) == 0.0


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from insightface_ext.config import base_config\nconfig = base_config()\nconfig.sample_rat = 0.1\n"
    )
    with pytest.raises(ValueError, match=r"bad.py: unknown config keys \['sample_rat'\]"):
        load_config(str(bad))
    with pytest.raises(FileNotFoundError, match="bundled configs"):
        load_config("no_such_config")
    assert load_config("ms1mv3_r50_mhs").head_sizes == (13, 7187)


def test_train_learns_and_resumes_exactly(setup, tmp_path):
    d, cfg = setup
    full = train_main([str(cfg), "--output", str(tmp_path / "a"), "--set", "max_steps=12"])
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert full["steps"] == 12 and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert full["val"]["val"]["num_pairs"] == 2 * NUM_IDS
    # stop after 4 steps, resume to 12: identical backbone and head to the uninterrupted run
    train_main([str(cfg), "--output", str(tmp_path / "b"), "--set", "max_steps=4"])
    ck = _latest(tmp_path / "b", "state.pt")
    assert ck["step"] == 4
    train_main([str(cfg), "--output", str(tmp_path / "b"), "--set", "max_steps=12"])
    a, b = (load_checkpoint(tmp_path / x / "model.pt") for x in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    ha, hb = (_latest(tmp_path / x, "head_shard_0.pt") for x in "ab")
    torch.testing.assert_close(ha["weight"], hb["weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ha["momentum"], hb["momentum"], rtol=0, atol=1e-6)


def test_torchrun_two_ranks_then_resume_in_one(setup, tmp_path):
    d, cfg = setup
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "insightface_ext.train",
            str(cfg),
            "--output",
            str(out),
            "--set",
            "max_steps=3",
            "batch_size=4",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s0, s1 = (_latest(out, f"head_shard_{r}.pt") for r in range(2))
    assert (s0["group_start"], s0["group_end"], s1["group_start"], s1["group_end"]) == (0, 2, 2, 4)
    assert s0["step"] == s1["step"] == 3
    # the 2-rank shards are re-sharded into a 1-process head on resume
    res = train_main([str(cfg), "--output", str(out), "--set", "max_steps=5", "batch_size=4"])
    assert res["steps"] == 5
    one = _latest(out, "head_shard_0.pt")
    assert one["world_size"] == 1 and (one["group_start"], one["group_end"]) == (0, 4)
    # groups not sampled in steps 4-5 keep exactly the values the two ranks wrote
    w2 = torch.cat([s0["weight"], s1["weight"]]).flatten(1)
    kept = (one["weight"].flatten(1) == w2).all(1)
    changed = ~kept
    assert changed.any()
    torch.testing.assert_close(one["weight"].flatten(1)[kept], w2[kept])


def test_eval_cli_bin_and_pairs_and_export(setup, tmp_path):
    d, cfg = setup
    train_main([str(cfg), "--output", str(tmp_path / "m"), "--set", "max_steps=6"])
    weights = tmp_path / "m" / "model.pt"
    # pair list on image files
    from PIL import Image

    samples = _identity_images()
    lines = []
    for k in range(NUM_IDS):
        for j in (0, 1):
            Image.fromarray(samples[k * PER_ID + j][0]).save(tmp_path / f"{k}_{j}.png")
        lines += [f"{k}_0.png {k}_1.png 1", f"{k}_0.png {(k + 1) % NUM_IDS}_1.png 0"]
    (tmp_path / "pairs.txt").write_text("# img1 img2 same\n" + "\n".join(lines) + "\n")
    res = face_eval.cli(
        [
            "--config",
            str(cfg),
            "--weights",
            str(weights),
            "--bin",
            str(d / "rec" / "val.bin"),
            "--pairs",
            str(tmp_path / "pairs.txt"),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(res))
    # the CLI agrees with embedding + core metrics done by hand
    model = face_eval.load_backbone(load_config(str(cfg)), weights)
    imgs, same = load_bin(d / "rec" / "val.bin")
    e = embed_images(model, imgs)
    assert res["val"] == verification_metrics(pair_scores(e[0::2], e[1::2]), same)
    assert res["val"] == evaluate_bin(model, d / "rec" / "val.bin")
    assert res["pairs"]["num_pairs"] == 2 * NUM_IDS
    with pytest.raises(ValueError, match=r"pairs.txt:2: expected"):
        (tmp_path / "pairs.txt").write_text("a.png b.png 1\na.png b.png yes\n")
        face_eval.cli(
            ["--config", str(cfg), "--weights", str(weights), "--pairs", str(tmp_path / "pairs.txt")]
        )
    out = face_export.cli(
        ["--config", str(cfg), "--weights", str(weights), "--output", str(tmp_path / "m.onnx")]
    )
    assert Path(out["path"]).is_file() and out["max_abs_diff"] < 1e-4


def test_kill_between_checkpoint_files_resumes_from_last_complete(setup, tmp_path, monkeypatch):
    d, cfg = setup
    out = tmp_path / "k"
    train_main([str(cfg), "--output", str(out), "--set", "max_steps=4"])

    def killed(self, step, names, meta=None):  # every file of step 8 is written, the manifest never is
        raise KeyboardInterrupt(f"killed before committing step {step}")

    monkeypatch.setattr(ShardedCheckpoint, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        train_main([str(cfg), "--output", str(out), "--set", "max_steps=8"])
    monkeypatch.undo()
    assert (out / "checkpoints" / "step-0000000008" / "head_shard_0.pt").is_file()
    assert ShardedCheckpoint(out / "checkpoints").latest().step == 4
    model_at_4 = load_checkpoint(out / "model.pt")  # model.pt is replaced only after a commit
    torch.testing.assert_close(model_at_4, _latest(out, "state.pt")["backbone"], rtol=0, atol=0)
    res = train_main([str(cfg), "--output", str(out), "--set", "max_steps=8"])
    assert res["steps"] == 8 and _latest(out, "state.pt")["step"] == 8
    steps = [
        r["step"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert steps == list(range(1, 9))  # no row twice after the resume
    ref = train_main([str(cfg), "--output", str(tmp_path / "ref"), "--set", "max_steps=8"])
    a, b = load_checkpoint(out / "model.pt"), load_checkpoint(Path(ref["output"]) / "model.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_old_layout_resumes_or_says_why_not(setup, tmp_path):
    d, cfg = setup
    out = tmp_path / "old"
    train_main([str(cfg), "--output", str(out), "--set", "max_steps=4"])
    ref = ShardedCheckpoint(out / "checkpoints").latest()
    # the layout of earlier versions: checkpoint.pt + head_shard_<rank>.pt at the root
    torch.save(ref.load("state.pt"), out / "checkpoint.pt")
    shard = ref.load("head_shard_0.pt")
    shard["weight"] = shard["weight"].flatten(1)  # stored as (groups, C_rest * d) then
    shard["momentum"] = shard["momentum"].flatten(1)
    torch.save(shard, out / "head_shard_0.pt")
    import shutil

    shutil.rmtree(out / "checkpoints")
    other = tmp_path / "old_bad"
    shutil.copytree(out, other)
    res = train_main([str(cfg), "--output", str(out), "--set", "max_steps=6"])
    assert res["steps"] == 6
    full = train_main([str(cfg), "--output", str(tmp_path / "full"), "--set", "max_steps=6"])
    a, b = load_checkpoint(out / "model.pt"), load_checkpoint(Path(full["output"]) / "model.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    shard["step"] = 8  # a kill between the two files of the old layout
    torch.save(shard, other / "head_shard_0.pt")
    with pytest.raises(
        RuntimeError, match=r"checkpoint.pt is from step 4 but head_shard_0.pt is from step 8"
    ):
        train_main([str(cfg), "--output", str(other), "--set", "max_steps=6"])


def test_run_folder_policy_config_types_and_dist_timeout(setup, tmp_path):
    d, cfg = setup
    out = tmp_path / "p"
    train_main([str(cfg), "--output", str(out), "--set", "max_steps=2"])
    with pytest.raises(FileExistsError, match=r"already holds a training run .*--overwrite"):
        train_main([str(cfg), "--output", str(out), "--no-resume", "--set", "max_steps=2"])
    (out / ".model.pt.123.mhe-partial").write_bytes(b"half")  # left by a killed writer
    (out / ".notes.tmp").write_text("the user's")  # not ours: never touched
    res = train_main([str(cfg), "--output", str(out), "--no-resume", "--overwrite", "--set", "max_steps=1"])
    assert res["steps"] == 1 and not (out / ".model.pt.123.mhe-partial").exists()
    assert (out / ".notes.tmp").read_text() == "the user's"
    assert ShardedCheckpoint(out / "checkpoints").latest().step == 1  # the old steps 1-2 are gone
    with pytest.raises(ValueError, match=r"--set lr=abc: config key 'lr' must be float, got 'abc'"):
        train_main([str(cfg), "--output", str(out), "--set", "lr=abc"])
    with pytest.raises(
        ValueError, match=r"--set batch_size=2.5: config key 'batch_size' must be int, got 2.5"
    ):
        train_main([str(cfg), "--output", str(out), "--set", "batch_size=2.5"])
    with pytest.raises(ValueError, match="distributed timeout must be > 0 seconds, got 0.0"):
        train_main([str(cfg), "--output", str(out), "--dist-timeout", "0"])
    # a val target that does not exist stops the run before any training, naming the paths tried
    fresh = tmp_path / "q"
    with pytest.raises(FileNotFoundError, match=r"val target 'lfw': neither lfw nor .*rec/lfw.bin is a file"):
        train_main([str(cfg), "--output", str(fresh), "--set", "val_targets=('lfw',)"])
    assert not (fresh / "checkpoints").exists()


def test_frozen_rank_fails_with_dist_timeout_message(setup, tmp_path):
    d, cfg = setup
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(Path(__file__).parent / "face_timeout_worker.py"), str(cfg), "--output", str(tmp_path / "t")]
    cmd += ["--dist-timeout", "3", "--set", "batch_size=4", "save_every=100"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=180
    )
    assert proc.returncode != 0
    msg = "rank 0/2: a collective did not complete within 3 s at epoch 0 step 2"
    assert msg in proc.stderr, proc.stderr[-3000:]


def test_model_pt_is_current_after_a_kill_before_its_write(setup, tmp_path, monkeypatch):
    """Issue 25: a kill (or Ctrl-C) between the final checkpoint commit and the model.pt write left model.pt
    stale, and the resume exited at once without writing it. Now the resume makes it current."""
    import insightface_ext.train as train_mod

    d, cfg = setup
    out = tmp_path / "k"
    real = train_mod.atomic_save

    class Killed(BaseException):
        pass

    def killing(obj, path):
        if Path(path).name == "model.pt" and ShardedCheckpoint(out / "checkpoints").latest().step == 6:
            raise Killed
        return real(obj, path)

    monkeypatch.setattr(train_mod, "atomic_save", killing)
    with pytest.raises(Killed):
        train_main([str(cfg), "--output", str(out), "--set", "max_steps=6", "val_targets=()"])
    monkeypatch.undo()
    final = ShardedCheckpoint(out / "checkpoints").latest()
    backbone = final.load("state.pt")["backbone"]
    model = load_checkpoint(out / "model.pt")
    assert not all(torch.equal(model[k], backbone[k]) for k in backbone), "model.pt is stale after the kill"
    res = train_main([str(cfg), "--output", str(out), "--set", "max_steps=6", "val_targets=()"])
    assert res["steps"] == 6
    model = load_checkpoint(out / "model.pt")
    assert all(torch.equal(model[k], backbone[k]) for k in backbone)
