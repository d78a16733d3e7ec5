"""The four trainers as the harness sees them: tiny jobs on bundled data, how each resumes, which files are
checkpoints, which are logs, and what "consistent" means for each. Only CLIs and output files are used,
never the trainers' Python internals, so these descriptions survive rewrites of the commit protocol."""

from __future__ import annotations

import fnmatch
import json
import lzma
import math
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

from .checks import json_without, load, read_jsonl, tensors
from .harness import REPO, child_env, file_set, python

BIN = Path(sys.executable).parent
TIMING = frozenset({"epoch_s", "elapsed_s", "img_per_s", "train_s", "wall", "ups", "wps", "gb_free"})


@dataclass
class Tool:
    """A read-only command to run on a killed run's folder (``argv`` gets a copy of it; None = skip)."""

    name: str
    argv: Callable[[Path], list[str] | None]
    allowed_outputs: tuple[str, ...] = ()  # files the tool is documented to write
    stdin: str = ""  # fed to the tool


class Trainer:
    """Base description; subclasses fill in the commands and the trainer-specific consistency."""

    name = ""
    log_name = ""
    summary_name: str | None = None
    weight_keys: dict[str, tuple[str, ...]] = {}
    default_weight_keys: tuple[str, ...] = ("",)  # for a checkpoint not named in weight_keys
    state_ignore: tuple[str, ...] = ()  # tensor paths that hold timings (meters), not training state
    extra_invariants: tuple[str, ...] = ()  # checked by this trainer's consistency() besides best_consistent
    timing_keys = TIMING

    def __init__(self) -> None:
        self.data = Path()

    def prepare(self, data: Path) -> None:
        """Build the tiny data set once (idempotent)."""
        self.data = data

    def command(self, out: Path) -> list[str]:
        raise NotImplementedError

    def resume_command(self, out: Path) -> list[str]:
        """What a user types to continue a run after a crash."""
        return self.command(out)

    def readonly_tools(self, out: Path) -> list[Tool]:
        return []

    def checkpoints(self, out: Path) -> dict[str, Path]:
        """Logical checkpoint name -> file, compared tensor by tensor with the reference run."""
        return {n: out / n for n in self.weight_keys if (out / n).is_file()}

    #: per-process files with unpredictable names (TensorBoard event files: time, host, pid), which a
    #: resumed run legitimately adds; left out of the file-set invariants
    volatile = ("events.out.tfevents.*",)

    def run_files(self, out: Path) -> set[str]:
        files = file_set(out) if out.is_dir() else set()
        return {f for f in files if not any(fnmatch.fnmatch(Path(f).name, v) for v in self.volatile)}

    def log_rows(self, out: Path) -> list[dict]:
        rows = read_jsonl(out / self.log_name) if self.log_name else []
        if self.summary_name and (out / self.summary_name).is_file():
            rows.append({"_summary": json_without(out / self.summary_name, self.timing_keys)})
        return rows

    def log_key(self, row: dict) -> Hashable:
        return json.dumps(row, sort_keys=True)

    def consistency(self, out: Path) -> list[tuple[str, str]]:
        """(b): the best checkpoint is the one the summary and logs name; each problem as (invariant, text)."""
        return []


def _bad(checks: list[tuple[bool, str]], invariant: str = "best_consistent") -> list[tuple[str, str]]:
    return [(invariant, text) for ok, text in checks if not ok]


# ------------------------------------------------------------------ timm


class Timm(Trainer):
    name, log_name, summary_name = "timm", "log.jsonl", "summary.json"
    weight_keys = {"last.pt": ("model",), "best.pt": ("model",)}

    def prepare(self, data: Path) -> None:
        super().prepare(data)
        if not (data / "valid.npz").is_file():
            code = "import sys; from mhe_plugins.datasets.glyphs import subset_glyph_dataset as s; s(*sys.argv[1:3], 40)"
            _check_call(python("-c", code, str(REPO / "data" / "glyphs"), str(data)))

    def command(self, out: Path) -> list[str]:
        return python(
            "-m", "timm_ext.train", "--data-dir", str(self.data), "--dataset", "glyphs", "--model", "resnet10t",
            "--model-kwargs", "channels=(8,16,32,32)", "--input-size", "1", "32", "32", "--output", str(out),
            "--no-progress", "--threads", "1", "--epochs", "3", "--batch-size", "32",
            "--max-steps-per-epoch", "3", "--lr", "0.2", "--seed", "3",
        )  # fmt: skip

    def resume_command(self, out: Path) -> list[str]:
        # the documented way on: --resume OUT/last.pt; before the first commit there is nothing to resume
        if (out / "last.pt").is_file():
            return [*self.command(out), "--resume", str(out / "last.pt")]
        return [*self.command(out), "--overwrite"]

    def readonly_tools(self, out: Path) -> list[Tool]:
        def argv(copy: Path) -> list[str] | None:
            if not (copy / "best.pt").is_file():
                return None
            return python("-m", "timm_ext.validate", "--data-dir", str(self.data), "--checkpoint",
                          str(copy / "best.pt"), "--split", "valid", "--batch-size", "64")  # fmt: skip

        return [Tool("mhe-timm-validate", argv)]

    def log_key(self, row: dict) -> Hashable:
        return row.get("epoch")

    def consistency(self, out: Path) -> list[tuple[str, str]]:
        s = json.loads((out / "summary.json").read_text())
        hist = s["history"]
        epochs = [r["epoch"] for r in hist]
        best_row = max(hist, key=lambda r: r["valid_top1"])  # first of equal maxima
        last, best = load(out / "last.pt"), load(out / "best.pt")
        csv_rows = len((out / "summary.csv").read_text().splitlines()) - 1
        return _bad([
            (epochs == list(range(len(hist))), f"summary.json epochs {epochs}"),
            (bool(s.get("finished")), "summary.json says not finished"),
            (last["epoch"] == epochs[-1], f"last.pt epoch {last['epoch']} != summary's last {epochs[-1]}"),
            (s["best_val_top1"] == best_row["valid_top1"], f"best_val_top1 {s['best_val_top1']} != max of history"),
            (best["epoch"] == best_row["epoch"], f"best.pt epoch {best['epoch']} but summary's best is {best_row['epoch']}"),
            (best.get("val_top1") == s["best_val_top1"], f"best.pt val_top1 {best.get('val_top1')} != {s['best_val_top1']}"),
            (csv_rows == len(hist), f"summary.csv has {csv_rows} rows for {len(hist)} epochs"),
        ])  # fmt: skip


# ------------------------------------------------------------------ xmc


class Xmc(Trainer):
    name, log_name, summary_name = "xmc", "log.jsonl", "train_summary.json"
    weight_keys = {"checkpoint.pt": ("model",), "model.pt": ("state_dict",)}

    def prepare(self, data: Path) -> None:
        super().prepare(data)
        if (data / "test_labels.txt").is_file():
            return
        data.mkdir(parents=True, exist_ok=True)
        src = REPO / "data" / "wordnet_xmc"
        read = lambda f: lzma.open(src / f, "rt", encoding="utf-8").read().splitlines()  # noqa: E731
        counts = Counter(lab for line in read("train_labels.txt.xz") for lab in line.split())
        keep = {lab for lab, _ in counts.most_common(60)}  # 60 frequent labels
        for split, n in (("train", 600), ("valid", 100), ("test", 100)):
            texts, labels = [], []
            for text, line in zip(read(f"{split}_texts.txt.xz"), read(f"{split}_labels.txt.xz")):
                kept = [lab for lab in line.split() if lab in keep]
                if kept and len(texts) < n:
                    texts.append(text)
                    labels.append(" ".join(kept))
            (data / f"{split}_texts.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8")
            (data / f"{split}_labels.txt").write_text("".join(t + "\n" for t in labels), encoding="utf-8")

    def command(self, out: Path) -> list[str]:
        return python(
            "-m", "xmc.cli", "train", "--data-dir", str(self.data), "--output", str(out), "--head", "mhc",
            "--encoder", "tfidf", "--epochs", "3", "--batch-size", "100", "--tfidf-dim", "32", "--num-groups", "8", "--threads", "1",
            "--seed", "1", "--swa-every", "2", "--neighbours", "5", "--select-metric", "nDCG@5", "--no-progress",
        )  # fmt: skip

    def resume_command(self, out: Path) -> list[str]:
        # --resume continues OUT/checkpoint.pt; before the first commit there is nothing to resume
        if (out / "checkpoint.pt").is_file():
            return [*self.command(out), "--resume"]
        return [*self.command(out), "--overwrite"]

    def readonly_tools(self, out: Path) -> list[Tool]:
        def argv(copy: Path) -> list[str] | None:
            if not (copy / "model.pt").is_file():
                return None
            return python("-m", "xmc.cli", "eval", "--model", str(copy), "--data-dir", str(self.data),
                          "--split", "valid")  # fmt: skip

        def predict(copy: Path) -> list[str] | None:
            if not (copy / "model.pt").is_file():
                return None
            return python("-m", "xmc.cli", "predict", "--model", str(copy), "--top-k", "3")

        # docs/reliability.md: eval and predict never create, rewrite or delete a file in a run folder
        return [
            Tool("mhe-xmc-eval", argv),
            Tool("mhe-xmc-predict", predict, stdin="oak; a tree\nbeagle; a hound\n"),
        ]

    def log_key(self, row: dict) -> Hashable:
        return (row.get("epoch"), row.get("step"), row.get("split"), "_summary" in row)

    def consistency(self, out: Path) -> list[tuple[str, str]]:
        s = json.loads((out / "train_summary.json").read_text())
        model, ck = load(out / "model.pt"), load(out / "checkpoint.pt")
        rows = [r for r in read_jsonl(out / "log.jsonl") if "epoch" in r]
        metric = next(k for k in s if k.startswith("best_valid_"))[len("best_valid_") :]
        best_row = max(rows, key=lambda r: r[metric]) if rows else {}
        return _bad([
            (model["epoch"] == s["best_epoch"], f"model.pt epoch {model['epoch']} != summary best_epoch {s['best_epoch']}"),
            (ck["best_epoch"] == s["best_epoch"], f"checkpoint.pt best_epoch {ck['best_epoch']} != summary's {s['best_epoch']}"),
            (model["valid"][metric] == s[f"best_valid_{metric}"], f"model.pt {metric} {model['valid'][metric]} != summary's"),
            (best_row.get("epoch") == model["epoch"], f"log's best epoch {best_row.get('epoch')} != model.pt's {model['epoch']}"),
            (best_row.get("weights") == model.get("weights"), f"log says {best_row.get('weights')} weights won, model.pt holds {model.get('weights')}"),
            (ck["epoch"] == max((r["epoch"] for r in rows), default=-1), "checkpoint.pt epoch is not the log's last"),
        ])  # fmt: skip


# ------------------------------------------------------------------ face

FACE_CONFIG = """
from insightface_ext.config import base_config
config = base_config()
config.network, config.width, config.embedding_size, config.input_size = "r18", 4, 16, 16
config.head_sizes, config.margin_list, config.scale = (4, 5), (1.0, 0.2, 0.0), 16.0
config.batch_size, config.lr, config.num_epoch, config.warmup_epoch = 8, 0.1, 3, 0
config.rec, config.num_classes, config.num_workers = {rec!r}, 20, 0
config.max_steps, config.save_every, config.log_every, config.verbose = 7, 3, 1, 4
config.val_targets, config.val_image_size = ("val.bin",), 16
config.output = "unused"
"""


class Face(Trainer):
    name, log_name = "face", "train_log.jsonl"
    extra_invariants = ("face_model_is_final",)
    weight_keys = {"model.pt": ("",), "state.pt": ("backbone",), "head_shard_0.pt": ("weight",)}

    def prepare(self, data: Path) -> None:
        super().prepare(data)
        if (data / "tiny_face.py").is_file():
            return
        code = (
            "import sys, numpy as np; from pathlib import Path\n"
            "from insightface_ext.recordio import write_face_rec\n"
            "from insightface_ext.verification import write_bin\n"
            "d = Path(sys.argv[1]); rng = np.random.default_rng(0)\n"
            "protos = rng.integers(0, 256, (20, 16, 16, 3))\n"
            "s = [(np.clip(protos[i] + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8), i)"
            " for i in range(20) for _ in range(6)]\n"
            "write_face_rec(d / 'rec', s, img_fmt='.png')\n"
            "imgs = [s[k * 6 + j][0] for k in range(20) for j in (0, 1)]\n"
            "write_bin(d / 'rec' / 'val.bin', imgs, [k % 2 == 0 for k in range(20)])\n"
        )
        _check_call(python("-c", code, str(data)))
        (data / "tiny_face.py").write_text(FACE_CONFIG.format(rec=str(data / "rec")))

    def command(self, out: Path) -> list[str]:
        return python("-m", "insightface_ext.train", str(self.data / "tiny_face.py"), "--output", str(out))

    def readonly_tools(self, out: Path) -> list[Tool]:
        def argv(copy: Path) -> list[str] | None:
            if not (copy / "model.pt").is_file():
                return None
            return python("-m", "insightface_ext.evaluate", "--config", str(self.data / "tiny_face.py"),
                          "--weights", str(copy / "model.pt"), "--bin", str(self.data / "rec" / "val.bin"),
                          "--device", "cpu")  # fmt: skip

        return [Tool("mhe-face-eval", argv)]

    def latest(self, out: Path) -> Path | None:
        """The newest checkpoint folder whose manifest lists files of the right sizes."""
        for folder in sorted((out / "checkpoints").glob("step-*"), reverse=True):
            try:
                files = json.loads((folder / "MANIFEST.json").read_text())["files"]
                if all((folder / n).stat().st_size == size for n, size in files.items()):
                    return folder
            except (OSError, ValueError, KeyError):
                continue
        return None

    def checkpoints(self, out: Path) -> dict[str, Path]:
        found = {"model.pt": out / "model.pt"} if (out / "model.pt").is_file() else {}
        if (latest := self.latest(out)) is not None:
            found.update({p.name: p for p in latest.glob("*.pt")})
        return found

    def log_key(self, row: dict) -> Hashable:
        return (row.get("step"), row.get("val"))

    def consistency(self, out: Path) -> list[tuple[str, str]]:
        latest = self.latest(out)
        if latest is None:
            return [("best_consistent", "no complete checkpoint folder")]
        state = load(latest / "state.pt")
        model = tensors(load(out / "model.pt"))
        backbone = tensors(state["backbone"])
        same = model.keys() == backbone.keys() and all(model[k].equal(backbone[k]) for k in model)
        rows = [r for r in read_jsonl(out / self.log_name) if "loss" in r]
        last_step = max((r["step"] for r in rows), default=-1)
        problems = _bad(
            [(same, f"model.pt is not the backbone of {latest.name}/state.pt")], "face_model_is_final"
        )
        return problems + _bad(
            [
                (
                    state["step"] == last_step,
                    f"{latest.name} step {state['step']} != last logged step {last_step}",
                )
            ]
        )


# ------------------------------------------------------------------ fairseq


class Fairseq(Trainer):
    name = "fairseq"
    weight_keys = {"checkpoint_last.pt": ("model",), "checkpoint_best.pt": ("model",)}
    default_weight_keys = ("model",)  # checkpoint_<epoch>_<updates>.pt
    extra_invariants = ("final_position",)
    state_ignore = ("extra_state.metrics",)  # fairseq's meters: words/s, wall time...

    def prepare(self, data: Path) -> None:
        super().prepare(data)
        if not (data / "bin600" / "dict.de.txt").is_file():
            _check_call(python("-m", "fairseq_ext.datasets", "sample", "--out", str(data), "--vocab", "600",
                               "--train-lines", "200"))  # fmt: skip

    def command(self, out: Path) -> list[str]:
        user_dir = str(REPO / "fairseq_ext")
        return [str(BIN / "fairseq-train"), str(self.data / "bin600"), "--user-dir", user_dir, *(
            "--task translation --arch transformer_mhe --mhe-method mhc --criterion mhe_cross_entropy "
            "--mhe-heads 2 --label-smoothing 0.1 --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 "
            "--decoder-embed-dim 32 --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 "
            "--encoder-attention-heads 2 --decoder-attention-heads 2 --share-all-embeddings --dropout 0.0 "
            "--optimizer adam --lr 3e-3 --lr-scheduler inverse_sqrt --warmup-updates 4 --max-tokens 1000 --cpu "
            "--num-workers 0 --seed 1 --max-update 9 --save-interval-updates 3 --keep-interval-updates 2 "
            "--no-epoch-checkpoints --validate-interval-updates 3 --log-format json --log-interval 1000"
        ).split(), "--save-dir", str(out)]  # fmt: skip

    def readonly_tools(self, out: Path) -> list[Tool]:
        def argv(copy: Path) -> list[str] | None:
            if not (copy / "checkpoint_best.pt").is_file():
                return None
            return [str(BIN / "fairseq-generate"), str(self.data / "bin600"), "--user-dir", str(REPO / "fairseq_ext"),
                    "--path", str(copy / "checkpoint_best.pt"), "--gen-subset", "valid", "--beam", "1",
                    "--batch-size", "64", "--max-len-b", "5", "--cpu", "--num-workers", "0"]  # fmt: skip

        return [Tool("fairseq-generate", argv)]

    def checkpoints(self, out: Path) -> dict[str, Path]:
        return {p.name: p for p in sorted(out.glob("checkpoint*.pt"))}

    def consistency(self, out: Path) -> list[tuple[str, str]]:
        last, best = load(out / "checkpoint_last.pt"), load(out / "checkpoint_best.pt")
        updates = last["optimizer_history"][-1]["num_updates"]
        best_loss = last["extra_state"].get("best")
        return _bad([(updates == 9, f"checkpoint_last.pt at {updates} updates, expected 9")], "final_position") + _bad([
            (best_loss is None or math.isclose(best["extra_state"]["val_loss"], best_loss, rel_tol=0, abs_tol=0),
             f"checkpoint_best.pt has val_loss {best['extra_state'].get('val_loss')} but the run's best is {best_loss}"),
        ])  # fmt: skip


TRAINERS: dict[str, type[Trainer]] = {"timm": Timm, "xmc": Xmc, "face": Face, "fairseq": Fairseq}


def available(name: str) -> str | None:
    """None if the trainer can run in this venv, else why not (fairseq is compiled separately)."""
    if name == "fairseq" and not (BIN / "fairseq-train").exists():
        return "fairseq-train is not installed (make venv builds it)"
    if name == "fairseq":
        probe = subprocess.run(python("-c", "import fairseq"), capture_output=True, env=child_env(None))
        if probe.returncode != 0:
            return "fairseq does not import"
    return None


def _check_call(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=child_env(None), cwd=REPO, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"data preparation failed: {' '.join(argv[:4])}...\n{proc.stderr[-3000:]}")


def make(name: str) -> Trainer:
    return TRAINERS[name]()


__all__ = ["Trainer", "Tool", "TRAINERS", "make", "available"]
