"""mhe-timm-train's timm options: --model-ema, --clip-grad/--clip-mode, --grad-accum-steps, --initial-checkpoint.

Each keeps timm's meaning (checked on a toy model against the rule written out by hand) and resumes
bit-exactly (an interrupted + resumed run ends with the same bytes of weights, EMA and optimizer state).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import timm_ext.train as train_mod
import timm_ext.train_loop as loop_mod
from mhe_plugins.datasets.glyphs import subset_glyph_dataset
from mhe_plugins.training import Amp, TrainState, atomic_save, load_checkpoint
from timm_ext.ema import select_weights
from timm_ext.train import build_parser, train
from timm_ext.train_loop import StepOptions, clip_parameters, train_one_epoch
from timm_ext.validate import validate

REPO = Path(__file__).resolve().parents[2]
SUBSET = REPO / "data" / "glyphs"
TINY = ["--model", "resnet10t", "--model-kwargs", "channels=(8,16,32,32)", "--input-size", "1", "32", "32"]
HEAD = ["--head", "mhp", "--head-sizes", 5, 8]
STEPS = ["--batch-size", 16, "--max-steps-per-epoch", 4, "--lr", 0.2, "--seed", 7]
RUN = [*HEAD, "--head-neck", 0, *STEPS]
#: learning rate 0 throughout (AdamW: SGD's default nesterov needs momentum): parameters stay as loaded
FROZEN = ["--opt", "adamw", "--lr", 0, "--min-lr", 0, "--weight-decay", 0]


def _args(data_dir, out, *extra):
    argv = ["--data-dir", str(data_dir), "--dataset", "glyphs", *TINY, "--output", str(out), "--no-progress"]
    return build_parser().parse_args(argv + ["--threads", "1", *map(str, extra)])


@pytest.fixture(scope="module")
def glyphs40(tmp_path_factory):
    out = tmp_path_factory.mktemp("g40")
    subset_glyph_dataset(SUBSET, out, 40)
    return out


@pytest.fixture(scope="module")
def source_run(glyphs40, tmp_path_factory):
    """A finished 1-epoch run whose checkpoints serve as --initial-checkpoint."""
    out = tmp_path_factory.mktemp("src") / "run"
    train(_args(glyphs40, out, *RUN, "--epochs", 1))
    return out


class Killed(BaseException):
    """What SIGKILL does to the Python code: nothing after this point runs."""


def _assert_same_state(a: dict, b: dict, keys=("model", "model_ema", "optimizer")) -> None:
    for key in keys:
        flat_a, flat_b = _flatten(a.get(key)), _flatten(b.get(key))
        assert flat_a.keys() == flat_b.keys(), key
        for name, va in flat_a.items():
            vb = flat_b[name]
            same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
            assert same, f"{key}.{name} differs after resume"


def _flatten(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flatten(val, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


OPTIONS = {
    "ema": ["--model-ema", "--model-ema-decay", 0.9],
    "clip_norm": ["--clip-grad", 0.5],
    "clip_value": ["--clip-grad", 0.01, "--clip-mode", "value"],
    "clip_agc": ["--clip-grad", 0.05, "--clip-mode", "agc"],
    "accum": ["--grad-accum-steps", 3],  # 4 micro-batches: groups of 3 and 1
    "initial": ["--initial-checkpoint", "SOURCE"],
    "all": [
        "--model-ema",
        "--model-ema-decay",
        0.5,
        "--clip-grad",
        1.0,
        "--grad-accum-steps",
        2,
        "--initial-checkpoint",
        "SOURCE",
        "--amp",
    ],  # fmt: skip
}


@pytest.mark.parametrize("option", OPTIONS)
def test_resume_is_bit_exact(glyphs40, source_run, tmp_path, monkeypatch, option):
    extra = [source_run / "last.pt" if v == "SOURCE" else v for v in OPTIONS[option]]
    common = [*RUN, "--epochs", 2, *extra]
    full = train(_args(glyphs40, tmp_path / "full", *common))
    real_commit = TrainState.commit
    calls = {"n": 0}

    def killed_at_second_commit(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed("killed before epoch 1 was committed")
        return real_commit(self, *a, **k)

    monkeypatch.setattr(TrainState, "commit", killed_at_second_commit)
    with pytest.raises(Killed):
        train(_args(glyphs40, tmp_path / "cut", *common))
    monkeypatch.setattr(TrainState, "commit", real_commit)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 0
    resumed = train(_args(glyphs40, tmp_path / "cut", *common, "--resume", tmp_path / "cut"))
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    _assert_same_state(a, b)
    assert (a["model_ema"] is not None) == ("--model-ema" in extra)
    drop = lambda h: [{k: v for k, v in r.items() if k != "epoch_s"} for r in h]  # noqa: E731
    assert drop(resumed["history"]) == drop(full["history"]) and len(full["history"]) == 2


# ------------------------------------------------------------------ timm's meaning, on a toy model
class Toy(nn.Module):
    """Linear body + linear "classifier"; forward(x, target) -> MSE, as MHEClassifier(x, target=...)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 1)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x, target=None):
        return ((self.head(self.body(x)).squeeze(1) - target) ** 2).mean()


class Recorder:
    def __init__(self):
        self.steps: list[int] = []

    def step_update(self, n: int) -> None:
        self.steps.append(n)

    def update(self, model, step: int) -> None:
        self.steps.append(step)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=g), torch.randn(4, generator=g)) for _ in range(n)]


def test_grad_accum_follows_timm():
    """5 micro-batches, N=2: updates after micro-batches 2, 4 and 5; losses / 2, / 2 and / 1 (the short last
    group); schedule and EMA see update counts epoch * 3 + 1..3."""
    model, ref = Toy(), Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched, ema = Recorder(), Recorder()
    data = _batches(5)
    losses = train_one_epoch(1, model, model, data, 5, opt, sched, Amp("cpu", False), torch.device("cpu"), {},
                             StepOptions(accum_steps=2), ema=ema)  # fmt: skip
    assert sched.steps == [4, 5, 6] and ema.steps == [4, 5, 6]
    with torch.no_grad():  # the rule by hand
        for group in ([0, 1], [2, 3], [4]):
            grads = [torch.zeros_like(p) for p in ref.parameters()]
            for i in group:
                ref.zero_grad()
                with torch.enable_grad():
                    (ref(*data[i]) / len(group)).backward()
                grads = [g + p.grad for g, p in zip(grads, ref.parameters())]
            for p, g in zip(ref.parameters(), grads):
                p -= 0.1 * g
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert losses[1].item() == 20  # samples; the logged loss is the undivided mean


@pytest.mark.parametrize("mode", ["norm", "value", "agc"])
def test_clip_grad_dispatches_like_timm(monkeypatch, mode):
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    real = loop_mod.dispatch_clip_grad

    def recording(params, value, mode):
        seen.append((len(params), value, mode))
        real(params, value=value, mode=mode)
        if mode == "norm":
            assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) <= value * (
                1 + 1e-5
            )
        if mode == "value":
            assert all(p.grad.abs().max() <= value for p in params)

    monkeypatch.setattr(loop_mod, "dispatch_clip_grad", recording)
    train_one_epoch(0, model, model, _batches(3), 3, opt, Recorder(), Amp("cpu", False), torch.device("cpu"), {},
                    StepOptions(accum_steps=1, clip_grad=0.01, clip_mode=mode))  # fmt: skip
    n_all, n_body = len(list(model.parameters())), len(list(model.body.parameters()))
    assert seen == [(n_body if mode == "agc" else n_all, 0.01, mode)] * 3  # AGC leaves the head out (timm)


def test_clip_parameters_of_an_mhe_model_leave_out_the_head_for_agc():
    model = train_mod.create_model("resnet10t", head="mhp", num_classes=40, head_sizes=[5, 8], in_chans=1,
                                   channels=(8, 16, 32, 32), neck_dim=16)  # fmt: skip
    everything = list(model.parameters())
    head = {id(p) for p in model.get_classifier().parameters()}
    assert clip_parameters(model, "norm") == everything
    agc = clip_parameters(model, "agc")
    assert len(agc) == len(everything) - len(head) and not head & {id(p) for p in agc}


def test_ema_updates_like_timm_model_ema_v3():
    """First update copies the weights (timm's decay 0 at update 1), then ema = d * ema + (1 - d) * model."""
    from timm.utils import ModelEmaV3

    model = Toy()
    ema = ModelEmaV3(model, decay=0.5)
    expected = None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []

    class Snap(Recorder):
        def step_update(self, n: int) -> None:
            snapshots.append([p.detach().clone() for p in model.parameters()])

    train_one_epoch(0, model, model, _batches(3), 3, opt, Snap(), Amp("cpu", False), torch.device("cpu"), {},
                    StepOptions(), ema=ema)  # fmt: skip
    for snap in snapshots:
        expected = snap if expected is None else [0.5 * e + 0.5 * s for e, s in zip(expected, snap)]
    for e, p in zip(expected, ema.module.parameters()):
        torch.testing.assert_close(p, e)


def test_select_weights():
    assert select_weights(50.0, None) == (50.0, "model")
    assert select_weights(50.0, {"top1": 50.0}) == (50.0, "model")  # a tie keeps the model
    assert select_weights(50.0, {"top1": 60.0}) == (60.0, "ema")


# ------------------------------------------------------------------ end to end
def test_grad_accum_schedule_counts_optimizer_updates(glyphs40, tmp_path, monkeypatch):
    seen = {}
    real = train_mod.create_scheduler_v2

    def recording(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "create_scheduler_v2", recording)
    out = tmp_path / "run"
    train(_args(glyphs40, out, *RUN, "--epochs", 1, "--max-steps-per-epoch", 5, "--grad-accum-steps", 2,
                "--opt", "adamw", "--lr", 0.01))  # fmt: skip
    assert seen["updates_per_epoch"] == 3  # ceil(5 / 2)
    state = load_checkpoint(out / "last.pt")["optimizer"]["state"]
    assert {float(s["step"]) for s in state.values()} == {3.0}  # AdamW stepped 3 times for 5 micro-batches


def test_model_ema_eval_log_and_best(glyphs40, tmp_path, monkeypatch):
    # decay 0: the EMA is the model, bit for bit, so its metrics equal the model's
    out = tmp_path / "same"
    summary = train(_args(glyphs40, out, *RUN, "--epochs", 1, "--model-ema", "--model-ema-decay", 0,
                          "--extra-eval-split", "test"))  # fmt: skip
    row = summary["history"][0]
    assert row["valid_ema_top1"] == row["valid_top1"] and row["test_ema_top1"] == row["test_top1"]
    last = load_checkpoint(out / "last.pt")
    _assert_same_state({"model": last["model"]}, {"model": last["model_ema"]}, keys=("model",))
    assert summary["best_weights"] == "model" and load_checkpoint(out / "best.pt")["weights"] == "model"
    # a real decay: the EMA differs, is logged on its own; best.pt follows the better of the two
    out = tmp_path / "ema"
    summary = train(_args(glyphs40, out, *RUN, "--epochs", 2, "--model-ema", "--model-ema-decay", 0.9))
    last = load_checkpoint(out / "last.pt")
    assert any(not torch.equal(last["model"][k], last["model_ema"][k]) for k in last["model"])
    logged = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert all({"valid_top1", "valid_ema_top1", "valid_ema_top5"} <= r.keys() for r in logged)
    assert "valid_ema_top1" in (out / "summary.csv").read_text().splitlines()[0]
    best_row = max(summary["history"], key=lambda r: max(r["valid_top1"], r["valid_ema_top1"]))
    assert summary["best_val_top1"] == max(best_row["valid_top1"], best_row["valid_ema_top1"])
    assert validate(str(glyphs40), str(out / "best.pt"), split="valid")["top1"] == pytest.approx(
        summary["best_val_top1"], abs=1e-9
    )
    # when the EMA scores higher, best.pt holds the EMA weights and says so
    monkeypatch.setattr(train_mod, "select_weights", lambda top1, ema: (ema["top1"], "ema"))
    out = tmp_path / "ema_best"
    summary = train(_args(glyphs40, out, *RUN, "--epochs", 1, "--model-ema", "--model-ema-decay", 0.9))
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert best["weights"] == "ema" == summary["best_weights"]
    _assert_same_state({"model": best["model"]}, {"model": last["model_ema"]}, keys=("model",))
    res = validate(str(glyphs40), str(out / "best.pt"), split="valid")
    assert res["top1"] == pytest.approx(summary["history"][0]["valid_ema_top1"], abs=1e-9)


def test_model_ema_resume_of_a_run_without_ema_is_refused(glyphs40, source_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(source_run, out)
    with pytest.raises(ValueError, match=r"--model-ema: .*last\.pt holds no EMA state"):
        train(_args(glyphs40, out, *RUN, "--epochs", 2, "--model-ema", "--resume", out))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _assert_same_parameters(state: dict, src: dict, config: dict) -> None:
    """Every trainable parameter equal (BatchNorm running statistics move even at lr 0)."""
    names = [n for n, _ in train_mod.build_model_from_config(config).named_parameters()]
    assert names
    for name in names:
        assert torch.equal(state[name], src[name]), name


def test_initial_checkpoint_loads_weights_only(glyphs40, source_run, tmp_path):
    before = _files(source_run)
    src = load_checkpoint(source_run / "best.pt")["model"]
    # lr 0: the trained parameters are the checkpoint's, exactly; a new run (epoch 0, a fresh optimizer);
    # without --head-neck the checkpoint's neck (none) is kept, not the mhp default of 1024
    out = tmp_path / "ft"
    summary = train(_args(glyphs40, out, *HEAD, *STEPS, *FROZEN, "--epochs", 1,
                          "--initial-checkpoint", source_run / "best.pt"))  # fmt: skip
    assert [r["epoch"] for r in summary["history"]] == [0] and summary["config"]["neck_dim"] is None
    last = load_checkpoint(out / "last.pt")
    assert {float(s["step"]) for s in last["optimizer"]["state"].values()} == {4.0}  # this run's 4 steps only
    _assert_same_parameters(last["model"], src, last["config"])
    assert _files(source_run) == before, "--initial-checkpoint must not write in the run it reads"


def test_initial_checkpoint_errors_name_the_file(glyphs40, source_run, tmp_path):
    ckpt = source_run / "last.pt"
    with pytest.raises(ValueError, match=r"initial-checkpoint .*last\.pt was trained with a different head: "
                                         r"head_sizes \[5, 8\] in the checkpoint vs \[8, 5\] here"):  # fmt: skip
        train(_args(glyphs40, tmp_path / "a", "--head", "mhp", "--head-sizes", 8, 5, "--head-neck", 0, *STEPS,
                    "--epochs", 1, "--initial-checkpoint", ckpt))  # fmt: skip
    with pytest.raises(ValueError, match=r"different head: head 'mhp' in the checkpoint vs 'mhc' here"):
        train(_args(glyphs40, tmp_path / "b", "--head", "mhc", "--head-sizes", 5, 8, "--head-neck", 0, *STEPS,
                    "--epochs", 1, "--initial-checkpoint", ckpt))  # fmt: skip
    other = [a if a != "channels=(8,16,32,32)" else "channels=(8,16,32,16)" for a in TINY]
    argv = ["--data-dir", str(glyphs40), "--dataset", "glyphs", *other, "--output", str(tmp_path / "c"),
            "--no-progress", *map(str, RUN), "--epochs", "1", "--initial-checkpoint", str(ckpt)]  # fmt: skip
    with pytest.raises(ValueError, match=r"last\.pt: its weights do not fit this model"):
        train(build_parser().parse_args(argv))
    atomic_save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"foreign\.pt is not a mhe-timm-train checkpoint"):
        train(_args(glyphs40, tmp_path / "d", *RUN, "--initial-checkpoint", tmp_path / "foreign.pt"))
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        train(_args(glyphs40, tmp_path / "e", *RUN, "--initial-checkpoint", tmp_path / "nope.pt"))
    for name in "abcde":
        assert not (tmp_path / name / "last.pt").exists()


def test_initial_checkpoint_from_the_folder_being_overwritten(glyphs40, source_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(source_run, out)
    src = load_checkpoint(out / "best.pt")["model"]
    train(
        _args(
            glyphs40,
            out,
            *RUN,
            *FROZEN,
            "--epochs",
            1,
            "--overwrite",
            "--initial-checkpoint",
            out / "best.pt",
        )
    )
    last = load_checkpoint(out / "last.pt")
    _assert_same_parameters(last["model"], src, last["config"])
    assert [r["epoch"] for r in last["history"]] == [0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--grad-accum-steps", 0], "--grad-accum-steps must be >= 1, got 0"),
        (["--clip-grad", 0], r"--clip-grad must be > 0 .*got 0\.0"),
        (["--model-ema", "--model-ema-decay", 1.5], r"--model-ema-decay must be in \[0, 1\], got 1\.5"),
    ],
)
def test_bad_option_values_are_refused_before_anything_is_written(glyphs40, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train(_args(glyphs40, tmp_path / "run", *RUN, *extra))
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        _args(glyphs40, tmp_path / "run", "--clip-mode", "l1")


def _doc_block(heading: str) -> list[list[str]]:
    """The commands of the first bash block after ``heading`` in docs/timm.md, split like a shell would."""
    import shlex

    text = (REPO / "docs" / "timm.md").read_text(encoding="utf-8")
    block = text.split(heading, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [
        shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()
    ]


def test_documented_commands(glyphs40, tmp_path, monkeypatch, capsys):
    """docs/timm.md's option and mhe-timm-predict lines, as written (placeholders filled in, tiny-size flags
    appended to mhe-timm-train), through the console scripts' entry point."""
    import csv
    import io

    import numpy as np
    from PIL import Image

    from mhe_plugins import entry
    from mhe_plugins.datasets.glyphs import load_glyph_split

    images = load_glyph_split(glyphs40, "test")[0]
    (tmp_path / "IMAGES" / "sub").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(images[i]).save(tmp_path / "IMAGES" / ("sub" if i > 3 else "") / f"{i}.png")
    Image.fromarray(np.asarray(images[6])).save(tmp_path / "more.png")
    monkeypatch.chdir(tmp_path)
    fill = {"DIR": str(glyphs40), "IMAGES": str(tmp_path / "IMAGES"), "more.png": str(tmp_path / "more.png")}
    tiny = ["--model-kwargs", "channels=(8,16,32,32)", "--input-size", "1", "32", "32", "--head-sizes", "5", "8",
            "--batch-size", "16", "--max-steps-per-epoch", "4", "--threads", "1", "--no-progress"]  # fmt: skip
    targets = {"mhe-timm-train": "timm_ext.train:main", "mhe-timm-predict": "timm_ext.predict:main",
               "mhe-timm-validate": "timm_ext.validate:main"}  # fmt: skip
    lines = _doc_block("### timm's training options") + _doc_block("### `mhe-timm-predict`")
    assert [cmd[0] for cmd in lines] == ["mhe-timm-train"] * 2 + ["mhe-timm-predict"] * 2 + [
        "mhe-timm-validate"
    ]
    outputs = []
    for prog, *argv in lines:
        argv = [fill.get(a, str(tmp_path / a) if a.split("/")[0] in ("OUT", "OUT2") else a) for a in argv]
        capsys.readouterr()
        assert entry.run(prog, "timm", targets[prog], argv + (tiny if prog == "mhe-timm-train" else [])) == 0
        outputs.append(capsys.readouterr().out)
    last = load_checkpoint(tmp_path / "OUT" / "last.pt")
    assert last["model_ema"] is not None and len(last["history"]) == 2
    assert [r["epoch"] for r in load_checkpoint(tmp_path / "OUT2" / "last.pt")["history"]] == [
        0,
        1,
    ]  # a new run
    rows = list(csv.DictReader(io.StringIO(outputs[2])))
    assert [Path(r["filename"]).name for r in rows] == ["0.png", "1.png", "2.png", "3.png", "4.png", "5.png",
                                                        "more.png"]  # fmt: skip
    preds = json.loads((tmp_path / "predictions.json").read_text(encoding="utf-8"))["predictions"]
    assert len(preds) == 6 and all(len(p["ids"]) == 3 for p in preds)
    assert [r["index_0"] for r in rows[:6]] == [str(p["ids"][0]) for p in preds]
    val = list(csv.DictReader(io.StringIO((tmp_path / "test_predictions.csv").read_text())))
    assert len(val) == len(images) and [v["index_0"] for v in val[:6]] == [r["index_0"] for r in rows[:6]]


def test_options_under_torchrun_ddp(glyphs40, tmp_path):
    """DDP: gradients sync only on the updating micro-batch (no_sync), EMA and clipping on every rank."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "timm_ext.train", "--data-dir", str(glyphs40), "--dataset", "glyphs", *TINY, *map(str, RUN),
           "--epochs", "1", "--max-steps-per-epoch", "5", "--grad-accum-steps", "2", "--model-ema",
           "--clip-grad", "1.0", "--opt", "adamw", "--lr", "0.01", "--output", str(out), "--no-progress",
           "--threads", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = load_checkpoint(out / "last.pt")
    assert {float(s["step"]) for s in last["optimizer"]["state"].values()} == {3.0}
    assert last["model_ema"] is not None and "valid_ema_top1" in last["history"][0]
