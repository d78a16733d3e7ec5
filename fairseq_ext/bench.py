"""``python -m fairseq_ext.bench --data-dir DIR``: four NMT output layers on en-de, same model and budget.

Trains the same transformer through fairseq's own CLIs with (1) the standard output layer +
``label_smoothed_cross_entropy``, (2) fairseq's adaptive softmax (``adaptive_loss``), (3) MHP and (4) MHC
(``transformer_mhe --mhe-method mhp|mhc`` + ``mhe_cross_entropy``), at every ``--vocabs`` size (joint
sentencepiece BPE), decodes the full test set with beam 5 (``--required-batch-size-multiple 1``: no
sentence dropped), scores detokenised output with sacreBLEU and chrF against the raw references, and times
the output layers alone at |V| = 8k / 32k / 256k. Writes ``nmt_ende.{json,md,png}``.

Long runs are resumable: each method trains in its own save dir and fairseq continues from
``checkpoint_last.pt``; a method whose ``DONE`` file holds >= ``--max-update`` is not retrained, a decode
newer than its checkpoint is not redone; a larger ``--max-update`` continues training and re-decodes.
A finished method's figures are also kept in ``OUT/runs/NAME/v{V}_{method}.json`` (committed with the
results), keyed by every setting that shapes the run, so a rerun on a fresh machine, whose work dir is gone,
skips it. The report is written after every finished method and says PARTIAL until all are in.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fairseq_ext import USER_DIR
from fairseq_ext.model import MHC_GROUPS, codec_from_args
from mhe_plugins import LabelCodec, MHCHead, MHPHead
from mhe_plugins.training import atomic_write_json, atomic_write_text

LS = ["--label-smoothing", "0.1", "--report-accuracy"]
MHE = ["--arch", "transformer_mhe", "--criterion", "mhe_cross_entropy", "--mhe-heads", "2", *LS]
METHODS = {
    "ce": ["--arch", "transformer", "--criterion", "label_smoothed_cross_entropy", *LS],
    # adaptive_loss takes no label smoothing; it refuses torch's DDP, hence legacy_ddp (also on one CPU)
    "adaptive": ["--arch", "transformer", "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp"],
    "mhp": [*MHE, "--mhe-method", "mhp"],
    "mhc": [*MHE, "--mhe-method", "mhc"],
}
NAMES = {
    "ce": "standard (label_smoothed_cross_entropy)",
    "adaptive": "fairseq adaptive softmax (adaptive_loss)",
    "mhp": "MHP (mhe_cross_entropy, --mhe-method mhp)",
    "mhc": "MHC (mhe_cross_entropy, --mhe-method mhc)",
}
CONVERGED_BITS = 0.05  # CE's valid nll may move less than this over the last fifth of training


def adaptive_cutoffs(vocab_size: int) -> str:
    """Head cluster = the most frequent quarter of the dictionary, two tail clusters (fairseq's usual 3)."""
    return f"{vocab_size // 4},{vocab_size * 3 // 4}"


def model_args(dim: int, layers: int, heads: int) -> list[str]:
    a = []
    for side in ("encoder", "decoder"):
        a += [f"--{side}-embed-dim", str(dim), f"--{side}-ffn-embed-dim", str(4 * dim)]
        a += [f"--{side}-layers", str(layers), f"--{side}-attention-heads", str(heads)]
    return a


THREADS = {"n": 1}
LOG_INTERVAL = 50


def run(cmd: list[str], log: Path) -> str:
    """Run a fairseq CLI with a fixed thread count, appending its output to ``log``; raise on failure.

    One intra-op thread by default: on a shared CPU, OpenMP spin-waiting with more threads than free cores
    made training ~10x slower (measured 370 vs 3,700 words/s).
    """
    print("+", " ".join(cmd), flush=True)
    n = str(THREADS["n"])
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    start = log.stat().st_size if log.exists() else 0
    with open(log, "a", encoding="utf-8") as f:  # streamed, so `tail -f` shows fairseq's progress
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
    with open(log, encoding="utf-8") as f:
        f.seek(start)
        out = f.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[2]} failed ({proc.returncode}); see {log}:\n{out[-3000:]}")
    return out


def preprocess(data_dir: Path, vocab: int, work: Path, langs: tuple[str, str]) -> Path:
    """Binarise DATA/bpe{V} once into WORK/bin{V} and return it.

    Safe for parallel ``--methods`` processes sharing a work dir: a file lock lets one process binarise while
    the others wait, and fairseq writes into a temporary dir that is renamed into place only when complete,
    so nobody ever reads (or keeps) a half-written dataset.
    """
    from filelock import FileLock

    bpe, dest = data_dir / f"bpe{vocab}", work / f"bin{vocab}"
    if not (bpe / f"train.{langs[0]}").exists():
        raise FileNotFoundError(
            f"{bpe}/train.{langs[0]} missing: build it with python -m fairseq_ext.datasets ddtp"
        )
    work.mkdir(parents=True, exist_ok=True)
    with FileLock(str(work / f"bin{vocab}.lock")):
        if dest.is_dir():
            return dest
        tmp = work / f"bin{vocab}.partial"
        if tmp.exists():  # left by an interrupted run: never resumed, rebuilt from scratch
            shutil.rmtree(tmp)
        cmd = [
            sys.executable,
            "-m",
            "fairseq_cli.preprocess",
            "--source-lang",
            langs[0],
            "--target-lang",
            langs[1],
        ]
        for split in ("train", "valid", "test"):
            cmd += [f"--{split}pref", str(bpe / split)]
        cmd += ["--destdir", str(tmp), "--joined-dictionary", "--workers", "2"]
        run(cmd, work / "preprocess.log")
        os.replace(tmp, dest)
    return dest


def parse_log(text: str) -> dict[str, list[dict]]:
    """fairseq ``--log-format json`` lines grouped by logger tag (train_inner / train / valid)."""
    out: dict[str, list[dict]] = {"train_inner": [], "train": [], "valid": []}
    for line in text.splitlines():
        m = re.search(r"\| (train_inner|train|valid) \| (\{.*\})\s*$", line)
        if m:
            tag = m.group(1)  # epoch-level lines prefix every key with "train_" / "valid_": drop it
            out[tag].append({k.removeprefix(f"{tag}_"): _num(v) for k, v in json.loads(m.group(2)).items()})
    return out


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _done_updates(done: Path) -> int:
    try:
        return int(done.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return 0


def method_args(method: str, vocab_size: int, a: argparse.Namespace) -> list[str]:
    if method == "adaptive":
        return METHODS[method] + [
            "--adaptive-softmax-cutoff",
            a.adaptive_cutoffs or adaptive_cutoffs(vocab_size),
        ]
    if method == "mhc":
        shape = (
            ["--mhe-head-sizes", a.mhc_head_sizes]
            if a.mhc_head_sizes
            else ["--mhe-groups", str(a.mhc_groups)]
        )
        return METHODS[method] + [*shape, "--mhe-group-mlp-dim", str(a.mhc_group_mlp_dim)]
    return METHODS[method]


def mhc_codec(vocab_size: int, groups: int, head_sizes: str | None = None) -> LabelCodec:
    """The codec ``transformer_mhe --mhe-method mhc`` builds from the bench's MHC options (the model's own rule)."""
    shape = argparse.Namespace(mhe_method="mhc", mhe_groups=groups, mhe_head_sizes=head_sizes, mhe_heads=None)
    return codec_from_args(shape, vocab_size)


def method_settings(method: str, a: argparse.Namespace) -> dict:
    """The bench options that shape only this method's output layer (part of its run key and dir)."""
    if method == "mhc":
        return {k: getattr(a, k) for k in ("mhc_groups", "mhc_group_mlp_dim", "mhc_head_sizes")}
    return {}


def method_tag(method: str, a: argparse.Namespace) -> str:
    """``mhc`` with its shape spelled out (``mhc.g16.mlp512``), so that no run ever resumes a checkpoint of
    a differently shaped output layer; every other method is its name."""
    if method != "mhc":
        return method
    tag = method + (".h" + a.mhc_head_sizes.replace(",", "x") if a.mhc_head_sizes else "")
    tag += f".g{a.mhc_groups}" if a.mhc_groups and not a.mhc_head_sizes else ""
    return tag + (f".mlp{a.mhc_group_mlp_dim}" if a.mhc_group_mlp_dim else "")


def train_words_and_wall(train_inner: list[dict], train: list[dict]) -> tuple[float, float]:
    """Target words trained and training wall seconds, summed over fairseq's logged windows.

    Each ``train_inner`` line covers the updates since the previous one (at most ``--log-interval``); a
    run that was killed and resumed from ``checkpoint_last.pt`` restarts below the last logged update, and
    that window counts only its own updates (never a negative or a double span). Without inner lines (a
    run shorter than one interval) the epoch lines are used.
    """
    inner = train_inner or train
    prev = max(0, int(inner[0]["num_updates"]) - LOG_INTERVAL) if train_inner and inner else 0
    words = wall = 0.0
    for r in inner:
        n = int(r["num_updates"]) - prev
        if n <= 0:  # resumed from an earlier checkpoint: this window started at most one interval ago
            n = min(LOG_INTERVAL, int(r["num_updates"]))
        window = r["wpb"] * n
        words, wall, prev = (
            words + window,
            wall + (window / r["wps"] if r["wps"] else 0.0),
            int(r["num_updates"]),
        )
    return words, wall


def run_dir(work: Path, method: str, a: argparse.Namespace) -> Path:
    """Where one method trains and decodes. inverse_sqrt does not depend on ``--max-update``, so a larger
    budget continues the same run; the cosine schedule anneals to zero at ``--max-update``, so each budget
    is its own run (a killed run still resumes: same dir)."""
    if a.lr_scheduler == "inverse_sqrt":
        return work / method_tag(method, a)
    return work / f"{method_tag(method, a)}.{a.lr_scheduler}{a.max_update}"


def train_cmd(
    method: str,
    bin_dir: Path,
    save: Path,
    a: argparse.Namespace,
    vocab_size: int,
    max_update: int,
    scheduler: str,
) -> list[str]:
    """The ``fairseq-train`` command every run of the bench uses (timing runs change only the budget)."""
    cmd = [
        sys.executable,
        "-m",
        "fairseq_cli.train",
        str(bin_dir),
        "--user-dir",
        USER_DIR,
        "--task",
        "translation",
    ]
    cmd += method_args(method, vocab_size, a) + model_args(a.dim, a.layers, a.heads)
    cmd += [
        "--dropout",
        "0.1",
        "--optimizer",
        "adam",
        "--adam-betas",
        "(0.9, 0.98)",
    ]
    cmd += ["--lr", str(a.lr), "--lr-scheduler", scheduler, "--warmup-updates", str(a.warmup)]
    cmd += ["--clip-norm", "1.0", "--max-tokens", str(a.max_tokens), "--max-update", str(max_update)]
    cmd += ["--seed", "1", "--cpu", "--num-workers", "0", "--save-dir", str(save), "--no-epoch-checkpoints"]
    cmd += ["--validate-interval-updates", str(a.valid_every), "--save-interval-updates", str(a.valid_every)]
    cmd += [
        "--keep-interval-updates",
        "1",
        "--log-format",
        "json",
        "--log-interval",
        str(LOG_INTERVAL),
    ]
    return cmd


def train(method: str, bin_dir: Path, work: Path, a: argparse.Namespace, vocab_size: int) -> dict:
    save = run_dir(work, method, a)
    save.mkdir(parents=True, exist_ok=True)
    log = save / "train.log"
    cmd = train_cmd(method, bin_dir, save, a, vocab_size, a.max_update, a.lr_scheduler)
    done = save / "DONE"  # holds the --max-update reached; a larger budget continues from checkpoint_last.pt
    if _done_updates(done) < a.max_update:
        run(cmd, log)
        atomic_write_text(f"{a.max_update}\n", done)
    stats = parse_log(log.read_text(encoding="utf-8"))
    inner = stats["train_inner"] or stats["train"]
    words, wall = train_words_and_wall(stats["train_inner"], stats["train"])
    return {
        "train_wps": round(words / wall, 1) if wall else None,
        "train_wall_s": round(wall, 1),
        "threads": a.threads,  # of the run's process (its words/s depend on it; what it learns does not)
        "num_updates": int(max((r["num_updates"] for r in inner), default=0)),
        "valid_curve": sorted(
            {
                int(r["num_updates"]): {
                    "updates": int(r["num_updates"]),
                    "nll_loss": r.get("nll_loss", r["loss"]),  # adaptive_loss logs only loss when equal
                    "ppl": r["ppl"],
                }
                for r in stats["valid"]
            }.values(),
            key=lambda r: r["updates"],
        ),
        "valid_nll_bits": stats["valid"][-1].get("nll_loss", stats["valid"][-1]["loss"])
        if stats["valid"]
        else None,
        "valid_accuracy": stats["valid"][-1].get("accuracy") if stats["valid"] else None,
        "checkpoint": str(save / "checkpoint_last.pt"),
    }


def time_training(method: str, bin_dir: Path, vwork: Path, a: argparse.Namespace, vocab_size: int) -> dict:
    """Train words/s of one method timed alone: ``--time-updates`` fresh updates of the run's exact model
    and batches, nothing saved, no validation, the first logged window (start-up) left out.

    Whole runs share the machine for hours with whatever else runs, so their averages are not comparable;
    the bench times the methods one after another instead, so every ratio comes from one machine state
    (the 1-minute load average before each timing is kept, to show what that state was). inverse_sqrt,
    because cosine needs a budget above the warm-up; the schedule does not change the cost of an update.
    """
    save = vwork / "timing" / method_tag(method, a)
    if save.exists():  # an interrupted timing restarts from scratch: its log would mix two runs
        shutil.rmtree(save)
    save.mkdir(parents=True)
    cmd = train_cmd(method, bin_dir, save, a, vocab_size, a.time_updates, "inverse_sqrt")
    load_before = os.getloadavg()[0]
    run([*cmd, "--no-save", "--disable-validation"], save / "train.log")
    timed = parse_log((save / "train.log").read_text(encoding="utf-8"))["train_inner"][1:]
    if not timed:
        raise RuntimeError(f"{save / 'train.log'}: no logged window after the first; raise --time-updates")
    words, wall = train_words_and_wall(timed, [])
    return {
        "train_wps": round(words / wall, 1),
        "updates": int(timed[-1]["num_updates"]) - int(timed[0]["num_updates"]) + LOG_INTERVAL,
        "load_before": round(load_before, 2),
    }


def cached_timings(by_vocab: dict[str, dict], a: argparse.Namespace, work: Path) -> dict[str, dict]:
    """``time_training`` for every finished (vocabulary, method), one after another; each timing is kept in
    ``WORK/timing.json`` under its run key, so an interrupted rerun times only what is missing."""
    path = work / "timing.json"
    done = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    langs = tuple(a.langs.split("-"))
    out: dict[str, dict] = {}
    todo = [(v, m) for v, res in by_vocab.items() for m in METHODS if m in res["methods"]]
    for v, method in tqdm(todo, desc="timing train words/s, one method at a time"):
        data = data_fingerprint(a.data_dir, int(v), langs)  # type: ignore[arg-type]
        key = {**run_key(int(v), method, for_vocab(a, int(v)), data), "time_updates": a.time_updates}
        name = f"{v}:{method}"
        if done.get(name, {}).get("key") != key:
            vwork = work / f"v{v}"
            bin_dir = preprocess(a.data_dir, int(v), vwork, langs)  # type: ignore[arg-type]
            size = by_vocab[v]["vocab_size"]
            done[name] = {"key": key, "result": time_training(method, bin_dir, vwork, a, size)}
            atomic_write_json(done, path)
        out.setdefault(v, {})[method] = done[name]["result"]
    return out


def generate(method: str, bin_dir: Path, work: Path, refs: list[str], a: argparse.Namespace) -> dict:
    import sacrebleu

    rdir = run_dir(work, method, a)
    ckpt = rdir / "checkpoint_last.pt"
    cmd = [sys.executable, "-m", "fairseq_cli.generate", str(bin_dir), "--user-dir", USER_DIR]
    cmd += ["--task", "translation", "--path", str(ckpt), "--gen-subset", "test", "--beam", str(a.beam)]
    cmd += ["--batch-size", str(a.gen_batch), "--required-batch-size-multiple", "1", "--cpu"]
    cmd += ["--remove-bpe", "sentencepiece", "--num-workers", "0", "--max-len-a", "1.2", "--max-len-b", "10"]
    out_path = rdir / "generate.txt"
    if not out_path.exists() or out_path.stat().st_mtime < ckpt.stat().st_mtime:  # stale after more training
        out = run(cmd, rdir / "generate.log")
        atomic_write_text(out, out_path)
    out = out_path.read_text(encoding="utf-8")
    hyps = {int(m.group(1)): m.group(2) for m in re.finditer(r"^D-(\d+)\t[^\t]*\t(.*)$", out, re.M)}
    if len(hyps) != len(refs):
        raise RuntimeError(f"{out_path}: {len(hyps)} hypotheses for {len(refs)} references")
    speed = re.search(r"Translated ([\d,]+) sentences .* in ([\d.]+)s \(([\d.]+) sentences/s", out)
    if speed is None:
        raise RuntimeError(
            f"{out_path}: no 'Translated N sentences ... sentences/s' line from fairseq-generate"
        )
    sys_out = [hyps[i] for i in range(len(refs))]
    metric = sacrebleu.metrics.BLEU()
    bleu = metric.corpus_score(sys_out, [refs])
    chrf = sacrebleu.metrics.CHRF().corpus_score(sys_out, [refs])
    return {
        "bleu": round(bleu.score, 2),
        "chrf": round(chrf.score, 2),
        "bleu_detail": str(bleu),
        "bleu_signature": str(metric.get_signature()),
        "gen_sent_per_s": float(speed.group(3)),
        "gen_seconds": float(speed.group(2)),
    }


def output_params(ckpt: str) -> dict:
    import argparse as _argparse

    torch.serialization.add_safe_globals([_argparse.Namespace])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    # tied tensors share storage with the input embeddings: count every storage once, as its first key
    seen, unique = set(), {}
    for k, v in state.items():
        if v.is_floating_point() and not k.endswith("version") and v.untyped_storage().data_ptr() not in seen:
            seen.add(v.untyped_storage().data_ptr())
            unique[k] = v.numel()
    out_prefixes = ("decoder.output_projection.", "decoder.adaptive_softmax.")
    out = sum(n for k, n in unique.items() if k.startswith(out_prefixes))
    return {"output_params": out, "total_params": sum(unique.values())}


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _scaling_one(v: int, dim: int, tokens: int, rows: int, reps: int, mhc_groups: int) -> dict:
    """MHP balanced, MHC with the runs' shape: ``mhc_groups`` bins and a group MLP 4 x ``dim`` wide."""
    x = torch.randn(tokens, dim, requires_grad=True)
    y = torch.randint(0, v, (tokens,))
    xr = torch.randn(rows, dim)
    dense = torch.nn.Linear(dim, v, bias=False)
    codec = LabelCodec.balanced(v, 2)
    mhp = MHPHead(dim, codec, bias=False)
    mhc_sizes = mhc_codec(v, mhc_groups)
    mhc = MHCHead(dim, mhc_sizes, hidden_dim=dim, group_mlp_dim=4 * dim)

    def dense_step():
        F.cross_entropy(dense(x), y, label_smoothing=0.1).backward()

    def mhp_step():
        mhp.token_smoothed_loss(mhp(x), y, 0.1).backward()

    def mhc_step():
        mhc.smoothed_nll(x, y, 0.1)[0].sum().backward()

    @torch.no_grad()
    def dense_lp():
        return F.log_softmax(dense(xr).float(), -1)

    @torch.no_grad()
    def mhp_lp():
        return mhp.log_prob(xr)

    @torch.no_grad()
    def mhc_lp():
        return mhc.log_prob_batched(xr)

    r = {
        "head_sizes": list(codec.head_sizes),
        "mhc_head_sizes": list(mhc_sizes.head_sizes),
        "mhc_group_mlp_dim": 4 * dim,
        "ce_params": dense.weight.numel(),
        "mhp_params": sum(p.numel() for p in mhp.parameters()),
        "mhc_params": sum(p.numel() for p in mhc.parameters()),
    }
    for name, step, lp in (
        ("ce", dense_step, dense_lp),
        ("mhp", mhp_step, mhp_lp),
        ("mhc", mhc_step, mhc_lp),
    ):
        r[f"{name}_train_step_ms"] = 1e3 * _time(step, reps)
        r[f"{name}_beam_logprobs_ms"] = 1e3 * _time(lp, reps)
    for name in ("mhp", "mhc"):
        r[f"{name}_train_step_speedup"] = r["ce_train_step_ms"] / r[f"{name}_train_step_ms"]
        r[f"{name}_beam_logprobs_speedup"] = r["ce_beam_logprobs_ms"] / r[f"{name}_beam_logprobs_ms"]
    return {k: (round(val, 3) if isinstance(val, float) else val) for k, val in r.items()}


def scaling(vocabs: list[int], dim: int, tokens: int, rows: int, reps: int, mhc_groups: int) -> dict:
    """Output layers alone: params, train step (fwd+bwd of projection + loss), one beam step's log-probs."""
    torch.manual_seed(0)
    res = {
        str(v): _scaling_one(v, dim, tokens, rows, reps, mhc_groups)
        for v in tqdm(vocabs, desc="output-layer scaling")
    }
    return {"dim": dim, "tokens": tokens, "beam_rows": rows, "reps": reps, "by_vocab": res}


def cached_scaling(path: Path, a: argparse.Namespace) -> dict:
    """Scaling numbers are reused when the settings match, so a re-run only re-parses the logs."""
    key = {
        "vocabs": a.scaling_vocabs,
        "dim": a.scaling_dim,
        "tokens": a.scaling_tokens,
        "reps": a.scaling_reps,
        "methods": ["ce", "mhp", "mhc"],
        "mhc_groups": a.mhc_groups,
        "mhc_group_mlp_dim": 4 * a.scaling_dim,
    }
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            return old["result"]
    res = scaling(
        [int(v) for v in a.scaling_vocabs.split(",")],
        a.scaling_dim,
        a.scaling_tokens,
        320,
        a.scaling_reps,
        a.mhc_groups,
    )
    atomic_write_json({"key": key, "result": res}, path)
    return res


def convergence(curve: list[dict], final: int) -> dict:
    """Valid nll change over the last fifth of training: from the first point at >= 80 % of ``final``."""
    pts = [p for p in curve if p["updates"] <= final]
    start = next((p for p in pts if p["updates"] >= 0.8 * final), None)
    if not pts or start is None or start is pts[-1]:
        return {"from_update": None, "to_update": final, "delta_bits": None, "converged": False}
    delta = pts[-1]["nll_loss"] - start["nll_loss"]
    return {
        "from_update": start["updates"],
        "to_update": pts[-1]["updates"],
        "delta_bits": round(delta, 4),
        "converged": abs(delta) < CONVERGED_BITS,
    }


def targets(by_vocab: dict[str, dict]) -> list[dict]:
    """The issue's targets, each with the measured figures and whether it is met (``None``: a method it
    needs has not finished yet)."""
    out = []

    def row(vocab: str, target: str, need: tuple[str, ...], m: dict, measure) -> dict:
        if any(k not in m for k in need):
            return {"vocab": vocab, "target": target, "measured": "pending", "met": None}
        measured, met = measure(*(m[k] for k in need))
        return {"vocab": vocab, "target": target, "measured": measured, "met": bool(met)}

    for v, res in by_vocab.items():
        m = res["methods"]
        out += [
            row(
                v,
                "MHC BLEU >= CE BLEU - 0.5",
                ("mhc", "ce"),
                m,
                lambda mhc, ce: (
                    f"{mhc['bleu']:.2f} vs {ce['bleu']:.2f} ({mhc['bleu'] - ce['bleu']:+.2f})",
                    mhc["bleu"] >= ce["bleu"] - 0.5,
                ),
            ),
            row(
                v,
                "MHC valid nll <= CE + 0.2 bits",
                ("mhc", "ce"),
                m,
                lambda mhc, ce: (
                    f"{mhc['valid_nll_bits']:.3f} vs {ce['valid_nll_bits']:.3f} "
                    f"({mhc['valid_nll_bits'] - ce['valid_nll_bits']:+.3f})",
                    mhc["valid_nll_bits"] <= ce["valid_nll_bits"] + 0.2,
                ),
            ),
            row(
                v,
                "MHC BLEU >= adaptive softmax BLEU",
                ("mhc", "adaptive"),
                m,
                lambda mhc, ad: (f"{mhc['bleu']:.2f} vs {ad['bleu']:.2f}", mhc["bleu"] >= ad["bleu"]),
            ),
        ]
    big = max(by_vocab, key=int)

    def speed(mhc: dict, ce: dict) -> tuple[str, bool]:
        ratio = mhc["train_wps"] / ce["train_wps"]
        how = "timed alone" if "timing" in mhc and "timing" in ce else "whole-run averages"
        return (
            f"{ratio:.2f}x ({mhc['train_wps']:,.0f} vs {ce['train_wps']:,.0f} words/s, {how})",
            ratio >= 1.3,
        )

    out.append(
        row(
            big,
            "MHC train words/s >= 1.3x CE at the largest vocabulary",
            ("mhc", "ce"),
            by_vocab[big]["methods"],
            speed,
        )
    )
    return out


def mhc_shape(c: dict) -> str:
    """The MHC settings of a report's config, in words (older configs: balanced, linear)."""
    sizes, groups = c.get("mhc_head_sizes"), c.get("mhc_groups", 0)
    shape = f"head sizes {sizes}" if sizes else (f"{groups} frequency bins" if groups else "2 balanced heads")
    mlp = c.get("mhc_group_mlp_dim", 0)
    return shape + (f", group MLP {mlp} wide" if mlp else ", linear group layer")


def run_threads(result: dict) -> str:
    """Intra-op threads the stored runs trained with (runs made before this was recorded used 1)."""
    n = sorted({r.get("threads", 1) for res in result["by_vocab"].values() for r in res["methods"].values()})
    return "/".join(map(str, n)) or str(result["config"]["threads"])


def budget_words(c: dict) -> str:
    """The training budget of a report's config, per vocabulary size when they differ."""
    per = {int(v): n for v, n in (c.get("max_updates") or {}).items()}
    if len(set(per.values())) > 1:
        return "updates " + ", ".join(f"{n:,} at {v:,}" for v, n in sorted(per.items()))
    return f"{c['max_update']} updates"


def write_report(result: dict, out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out_dir / f"{stem}.json")
    c = result["config"]
    lines = [
        "# NMT en-de (Debian DDTP + LibreOffice): four output layers, same transformer and budget",
        "",
        f"Data: {result['dataset']}. Model: transformer, {c['layers']}+{c['layers']} layers, d={c['dim']}, "
        f"FFN {4 * c['dim']}, {c['heads']} attention heads, untied output layers, dropout 0.1; "
        f"{budget_words(c)} x {c['max_tokens']} tokens, adam (0.9, 0.98) lr {c['lr']}, {c.get('lr_scheduler', 'inverse_sqrt')} "
        f"with {c['warmup']} warm-up updates, clip-norm 1.0, label smoothing 0.1 (not for adaptive_loss, "
        f"which has none); CPU, {run_threads(result)} thread(s) per training run. MHP: 2 balanced heads; MHC: "
        f"{mhc_shape(c)}. "
        f"Test: all {result['test_sentences']} sentences, beam {c['beam']}, "
        "sacreBLEU / chrF on detokenised output vs the raw references.",
        "",
    ]
    if result.get("partial"):
        missing = [f"{m} at {int(v):,}" for v, res in result["by_vocab"].items() for m in res["missing"]]
        lines += [
            f"**PARTIAL RESULTS: not finished yet: {', '.join(missing)}.** Rerun the same command to continue "
            "(finished runs are kept in `runs/` beside this file and are not retrained).",
            "",
        ]
    timed = any("timing" in r for res in result["by_vocab"].values() for r in res["methods"].values())

    def wps(r: dict) -> str:
        run_avg = r.get("train_wps_run", r["train_wps"])
        return f"{r['train_wps']:,.0f} ({run_avg:,.0f})" if "timing" in r else f"{run_avg:,.0f}"

    if timed:
        t = next(
            r["timing"]
            for res in result["by_vocab"].values()
            for r in res["methods"].values()
            if "timing" in r
        )
        loads = [
            r["timing"]["load_before"]
            for res in result["by_vocab"].values()
            for r in res["methods"].values()
            if "timing" in r
        ]
        lines += [
            f"Train words/s: each method timed alone, one after another, over {t['updates']} updates after "
            f"{LOG_INTERVAL} start-up updates, {c['threads']} thread(s) (1-min load average before each: "
            f"{min(loads):.2f}-{max(loads):.2f}; about the thread count is the previous timing itself); "
            "in brackets the average over the whole run, which shared the machine with the other runs.",
            "",
        ]
    for v, res in result["by_vocab"].items():
        m = res["methods"]
        conv = res["convergence"].get("ce") or convergence([], 0)
        size = f"{res['vocab_size']:,}" if res["vocab_size"] else "?"
        lines += [
            f"## Joint BPE {int(v):,} (|V| = {size}; MHP heads {res['head_sizes']}; "
            f"MHC heads {res.get('mhc_head_sizes', res['head_sizes'])}; "
            f"adaptive cutoffs {res['adaptive_cutoffs']})",
            "",
            "| method | sacreBLEU | chrF | valid nll (bits) | output-layer params | total params "
            f"| {'train words/s alone (whole run)' if timed else 'train words/s (whole run)'} | gen sent/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k in METHODS:
            if k not in m:
                lines.append(f"| {NAMES[k]} | pending | | | | | | |")
                continue
            r = m[k]
            lines.append(
                f"| {NAMES[k]} | {r['bleu']:.2f} | {r['chrf']:.2f} | {r['valid_nll_bits']:.3f} | "
                f"{r['output_params']:,} | {r['total_params']:,} | {wps(r)} | "
                f"{r['gen_sent_per_s']:.1f} |"
            )
        moved = "n/a" if conv["delta_bits"] is None else f"{conv['delta_bits']:+.3f} bits"
        verdict = "converged" if conv["converged"] else "NOT converged - rerun with a larger --max-update"
        if "ce" not in m:
            verdict = "pending (CE not finished)"
        lines += [
            "",
            f"Budget check: CE's valid nll moved {moved} from update {conv['from_update']} to "
            f"{conv['to_update']} (last fifth; converged means |change| < {CONVERGED_BITS}): "
            f"**{verdict}**.",
            "",
        ]
    lines += ["## Targets", "", "| |V| | target | measured | met |", "|---:|---|---|---|"]
    for t in result["targets"]:
        lines.append(
            f"| {int(t['vocab']):,} | {t['target']} | {t['measured']} | "
            f"{'pending' if t['met'] is None else 'yes' if t['met'] else '**NO**'} |"
        )
    sc = result.get("scaling") or {}
    if sc:
        lines += [
            "",
            "## Output layers alone",
            "",
            f"d={sc['dim']}; train step = projection + label-smoothed loss fwd+bwd on {sc['tokens']} tokens; "
            f"beam step = full-|V| log-probs for {sc['beam_rows']} rows (64 sentences x beam 5); "
            f"median of {sc['reps']}; MHC hidden width = d, group MLP {sc['by_vocab'][next(iter(sc['by_vocab']))].get('mhc_group_mlp_dim', 0)} wide.",
            "",
            "| |V| | MHP heads | MHC heads | CE params | MHP params | MHC params | CE step ms | MHP step ms | MHC step ms "
            "| CE beam ms | MHP beam ms | MHC beam ms |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v, r in sc["by_vocab"].items():
            lines.append(
                f"| {int(v):,} | {r['head_sizes']} | {r.get('mhc_head_sizes', r['head_sizes'])} | {r['ce_params']:,} | {r['mhp_params']:,} | {r['mhc_params']:,} "
                f"| {r['ce_train_step_ms']:.1f} | {r['mhp_train_step_ms']:.1f} | {r['mhc_train_step_ms']:.1f} "
                f"| {r['ce_beam_logprobs_ms']:.1f} | {r['mhp_beam_logprobs_ms']:.1f} | {r['mhc_beam_logprobs_ms']:.1f} |"
            )
    lines += ["", f"![validation nll curves]({stem}.png)", ""]
    atomic_write_text("\n".join(lines), out_dir / f"{stem}.md")
    plot(result, out_dir / f"{stem}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = list(result["by_vocab"])
    fig, axes = plt.subplots(1, len(vocabs), figsize=(5.5 * len(vocabs), 4), squeeze=False)
    for ax, v in zip(axes[0], vocabs):
        for k, style in zip(METHODS, ("o-", "^-", "s-", "d-")):
            if k not in result["by_vocab"][v]["methods"]:
                continue
            curve = result["by_vocab"][v]["methods"][k]["valid_curve"]
            ax.plot([p["updates"] for p in curve], [p["nll_loss"] for p in curve], style, label=k, ms=3)
        ax.set_xlabel("updates")
        ax.set_ylabel("valid nll (bits/token)")
        ax.set_title(f"joint BPE {int(v):,}")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


RUN_KEYS = (
    "langs",
    "lr_scheduler",
    "dim",
    "layers",
    "heads",
    "lr",
    "warmup",
    "max_tokens",
    "max_update",
    "valid_every",
    "beam",
    "gen_batch",
    "adaptive_cutoffs",
)  # not --threads: it changes the speed of a run, not what it learns (words/s are timed alone anyway)


def budgets(spec: str, vocabs: list[int]) -> dict[int, int]:
    """``--max-update``: one budget for every size, or one per ``--vocabs`` size, in the same order (a
    larger vocabulary costs more per update, so its converged budget may be set apart)."""
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--max-update must be an int or comma-separated ints, got {spec!r}") from None
    if len(values) == 1:
        values *= len(vocabs)
    if len(values) != len(vocabs) or min(values) < 1:
        raise ValueError(f"--max-update {spec!r}: give one budget >= 1, or one per --vocabs size {vocabs}")
    return dict(zip(vocabs, values))


def for_vocab(a: argparse.Namespace, vocab: int) -> argparse.Namespace:
    """``a`` with ``max_update`` set to this vocabulary's budget (everything per run reads it from here)."""
    return argparse.Namespace(**{**vars(a), "max_update": a.max_updates[vocab]})


def run_key(vocab: int, method: str, a: argparse.Namespace, data: dict) -> dict:
    """Everything that shapes one (vocabulary, method) run; a stored result is reused only on an exact match."""
    key = {"vocab": vocab, "method": method, "data": data, **{k: getattr(a, k) for k in RUN_KEYS}}
    return {**key, **method_settings(method, a)}


def stored_path(a: argparse.Namespace, vocab: int, method: str) -> Path:
    return Path(a.out_dir) / "runs" / a.name / f"v{vocab}_{method}.json"


def load_stored(path: Path, key: dict) -> dict | None:
    """The stored run when it was made with exactly ``key``, else None (and say why, never silently)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("key") != key:
        diff = sorted(k for k in key if saved.get("key", {}).get(k) != key[k])
        print(f"{path}: made with other settings ({', '.join(diff)} differ): not reused", flush=True)
        return None
    return saved


def data_fingerprint(data_dir: Path, vocab: int, langs: tuple[str, str]) -> dict:
    """Line counts of the BPE'd splits: a stored run is only reused on the same corpus and vocabulary."""
    bpe = data_dir / f"bpe{vocab}"
    out = {}
    for split in ("train", "valid", "test"):
        f = bpe / f"{split}.{langs[1]}"
        if not f.is_file():
            raise FileNotFoundError(f"{f} missing: build it with python -m fairseq_ext.datasets ddtp")
        with open(f, "rb") as fh:
            out[split] = sum(1 for _ in fh)
    return out


def run_vocab(
    vocab: int,
    chosen: list[str],
    work: Path,
    refs: list[str],
    a: argparse.Namespace,
    on_stored: Callable[[], object] = lambda: None,
) -> dict:
    """Train + decode the chosen methods at one BPE size (each resumable; ``on_stored`` runs after each one
    is stored), then collect the numbers of every method found finished (here or in the committed store)."""
    a = for_vocab(a, vocab)
    langs = tuple(a.langs.split("-"))
    vwork = work / f"v{vocab}"
    data = data_fingerprint(a.data_dir, vocab, langs)  # type: ignore[arg-type]
    methods: dict[str, dict] = {}
    info: dict = {}
    for method in METHODS:
        path = stored_path(a, vocab, method)
        saved = load_stored(path, run_key(vocab, method, a, data))
        if saved is None and method in chosen:
            bin_dir = preprocess(a.data_dir, vocab, vwork, langs)  # type: ignore[arg-type]
            size = sum(1 for _ in open(bin_dir / f"dict.{langs[1]}.txt", encoding="utf-8")) + 4  # + specials
            r = train(method, bin_dir, vwork, a, size)
            r.update(generate(method, bin_dir, vwork, refs, a))
            r.update(output_params(r.pop("checkpoint")))
            saved = {"key": run_key(vocab, method, a, data), "vocab_size": size, "result": r}
            atomic_write_json(saved, path)
            print(vocab, method, {k: v for k, v in r.items() if k != "valid_curve"}, flush=True)
            on_stored()
        if saved is not None:
            methods[method] = saved["result"]
            info["vocab_size"] = saved["vocab_size"]
    size = info.get("vocab_size")
    return {
        "vocab_size": size,
        "head_sizes": list(LabelCodec.balanced(size, 2).head_sizes) if size else None,
        "mhc_head_sizes": list(mhc_codec(size, a.mhc_groups, a.mhc_head_sizes).head_sizes) if size else None,
        "adaptive_cutoffs": (a.adaptive_cutoffs or adaptive_cutoffs(size)) if size else None,
        "methods": methods,
        "missing": [m for m in METHODS if m not in methods],
        "convergence": {k: convergence(r["valid_curve"], r["num_updates"]) for k, r in methods.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fairseq_ext.bench", description=__doc__)
    p.add_argument(
        "--data-dir", type=Path, required=True, help="output of python -m fairseq_ext.datasets ddtp"
    )
    p.add_argument(
        "--work-dir", type=Path, default=None, help="binarised data + checkpoints (default DATA/bench)"
    )
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="nmt_ende")
    p.add_argument("--langs", default="en-de")
    p.add_argument("--vocabs", default="8000,32000", help="joint BPE sizes; DATA/bpe{V} must exist for each")
    p.add_argument(
        "--train-vocabs",
        default=None,
        help="train only at these of --vocabs (default all); the report still covers every --vocabs size",
    )
    p.add_argument("--report-only", action="store_true", help="train nothing: report the stored runs")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument(
        "--lr-scheduler",
        choices=("cosine", "inverse_sqrt"),
        default="cosine",
        help="cosine anneals to 0 at --max-update, so a fixed budget ends converged for that budget; "
        "inverse_sqrt never anneals: CE's validation nll keeps falling at any budget a CPU affords",
    )
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument(
        "--max-update",
        default="1000",
        help="training budget in updates: one for every --vocabs size, or one per size (e.g. 8000,4000)",
    )
    p.add_argument("--valid-every", type=int, default=200)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--adaptive-cutoffs", default=None, help="default: |V|/4,3|V|/4")
    p.add_argument(
        "--mhc-groups",
        type=int,
        default=MHC_GROUPS,
        help="MHC: top-level groups, --mhe-groups (0 = balanced two levels)",
    )
    p.add_argument(
        "--mhc-group-mlp-dim",
        type=int,
        default=None,
        help="MHC: --mhe-group-mlp-dim (default 4 x --dim, fairseq's default, the decoder FFN width; 0 = linear)",
    )
    p.add_argument("--mhc-head-sizes", default=None, help="MHC: --mhe-head-sizes (overrides --mhc-groups)")
    p.add_argument("--scaling-vocabs", default="8000,32000,256000")
    p.add_argument("--scaling-dim", type=int, default=512)
    p.add_argument("--scaling-tokens", type=int, default=512)
    p.add_argument("--scaling-reps", type=int, default=3)
    p.add_argument(
        "--skip-scaling",
        action="store_true",
        help="skip the timings meant for an idle machine: the output layers alone and --time-updates "
        "(for processes that share the machine; train words/s is then the whole-run average)",
    )
    p.add_argument(
        "--time-updates",
        type=int,
        default=150,
        help="once every run is in, time each method's training alone for this many updates (the first "
        f"{LOG_INTERVAL} left out as start-up); 0 = report whole-run words/s",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="train/decode only these (e.g. parallel processes), then run once with all to report",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per run (1 = robust on a busy CPU)"
    )
    a = p.parse_args(argv)
    if a.mhc_group_mlp_dim is None:
        a.mhc_group_mlp_dim = 4 * a.dim
    THREADS["n"] = a.threads
    torch.set_num_threads(a.threads)
    langs = tuple(a.langs.split("-"))
    if len(langs) != 2 or not all(langs):
        p.error(f"--langs must look like en-de, got {a.langs!r}")
    if a.time_updates and a.time_updates < 2 * LOG_INTERVAL:
        p.error(
            f"--time-updates {a.time_updates}: use 0 (off) or >= {2 * LOG_INTERVAL} (first {LOG_INTERVAL} are start-up)"
        )
    chosen = [m for m in a.methods.split(",") if m]
    if not chosen or set(chosen) - set(METHODS):
        p.error(f"--methods must be a comma list from {list(METHODS)}, got {a.methods!r}")
    try:
        vocabs = [int(v) for v in a.vocabs.split(",") if v]
    except ValueError:
        p.error(f"--vocabs must be comma-separated ints, got {a.vocabs!r}")
    try:
        train_vocabs = [int(v) for v in a.train_vocabs.split(",") if v] if a.train_vocabs else vocabs
    except ValueError:
        p.error(f"--train-vocabs must be comma-separated ints, got {a.train_vocabs!r}")
    if set(train_vocabs) - set(vocabs):
        p.error(f"--train-vocabs {a.train_vocabs} must be a subset of --vocabs {a.vocabs}")
    try:
        a.max_updates = budgets(a.max_update, vocabs)
    except ValueError as e:
        p.error(str(e))
    if a.lr_scheduler == "cosine" and a.warmup >= min(a.max_updates.values()):
        p.error(f"--lr-scheduler cosine needs --warmup ({a.warmup}) < --max-update ({a.max_update})")
    work = a.work_dir or a.data_dir / "bench"
    refs_path = a.data_dir / "raw" / f"test.{langs[1]}"
    if not refs_path.is_file():
        p.error(f"{refs_path} missing: build DATA with python -m fairseq_ext.datasets ddtp (or sample)")
    refs = refs_path.read_text(encoding="utf-8").splitlines()

    def report() -> dict:
        return collect_and_report([run_vocab(v, [], work, refs, a) for v in vocabs], vocabs, work, refs, a)

    for v in [] if a.report_only else train_vocabs:  # the report is rewritten after every stored run
        run_vocab(v, chosen, work, refs, a, on_stored=report)
    return report()


def collect_and_report(
    results: list[dict], vocabs: list[int], work: Path, refs: list[str], a: argparse.Namespace
) -> dict:
    """Assemble the report from every stored run (``results`` in ``vocabs`` order); write it when any run
    is in (PARTIAL until all are, scaling timed only then)."""
    by_vocab = {str(v): res for v, res in zip(vocabs, results)}
    partial = any(res["missing"] for res in by_vocab.values())
    timed = not (a.skip_scaling or partial or a.time_updates == 0)
    if timed:
        for v, per_method in cached_timings(by_vocab, a, work).items():
            m = by_vocab[v]["methods"]
            for k, t in per_method.items():
                m[k] = {**m[k], "train_wps_run": m[k]["train_wps"], "train_wps": t["train_wps"], "timing": t}
    stats_path = a.data_dir / "stats.json"
    first = str(vocabs[0])
    result = {
        "methods": by_vocab[first]["methods"],  # the first --vocabs size; every size under by_vocab
        "methods_vocab": vocabs[0],
        "by_vocab": by_vocab,
        "targets": targets(by_vocab),
        "scaling": {} if a.skip_scaling or partial else cached_scaling(work / "scaling.json", a),
        "config": {**{k: v for k, v in vars(a).items() if not isinstance(v, Path)}, "threads": a.threads},
        "dataset": json.loads(stats_path.read_text())["splits"] if stats_path.exists() else str(a.data_dir),
        "test_sentences": len(refs),
        "partial": partial,
    }
    if not any(res["methods"] for res in by_vocab.values()):
        return result
    for res in by_vocab.values():
        for k, r in res["methods"].items():
            if not math.isfinite(r["bleu"]) or r["valid_nll_bits"] is None:
                raise RuntimeError(f"{k}: no BLEU / validation nll recorded")
    write_report(result, a.out_dir, a.name)
    return result


if __name__ == "__main__":
    main()
