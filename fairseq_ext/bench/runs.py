"""The fairseq CLIs the benchmark drives: binarise, train (resumable), decode and score, count parameters.

Why subprocesses: every method trains through fairseq's own ``fairseq_cli.train`` exactly as a user would,
with a fixed thread count, and a killed run continues from its ``checkpoint_last.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from fairseq_ext import USER_DIR
from mhe_plugins.bench.env import thread_env
from mhe_plugins.training import atomic_write_text

from .methods import method_args, model_args, run_dir, shortlist_for

THREADS = {"n": 1}


LOG_INTERVAL = 50


def run(cmd: list[str], log: Path) -> str:
    """Run a fairseq CLI with a fixed thread count, appending its output to ``log``; raise on failure.

    One intra-op thread by default: on a shared CPU, OpenMP spin-waiting with more threads than free cores
    made training ~10x slower (measured 370 vs 3,700 words/s).
    """
    print("+", " ".join(cmd), flush=True)
    env = thread_env(THREADS["n"])
    start = log.stat().st_size if log.exists() else 0
    with open(log, "a", encoding="utf-8") as f:  # streamed, so `tail -f` shows fairseq's progress
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
    with open(log, encoding="utf-8") as f:
        f.seek(start)
        out = f.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[2]} failed ({proc.returncode}); see {log}:\n{out[-3000:]}")
    return out


def preprocess(
    data_dir: Path, vocab: int, work: Path, langs: tuple[str, str], srcdict: Path | None = None
) -> Path:
    """Binarise DATA/bpe{V} once into WORK/bin{V} (with a given joined dictionary ``srcdict``:
    WORK/bin{V}.{its stem}) and return it.

    Safe for parallel ``--methods`` processes sharing a work dir: a file lock lets one process binarise while
    the others wait, and fairseq writes into a temporary dir that is renamed into place only when complete,
    so nobody ever reads (or keeps) a half-written dataset.
    """
    from filelock import FileLock

    name = f"bin{vocab}" + (f".{srcdict.stem}" if srcdict else "")
    bpe, dest = data_dir / f"bpe{vocab}", work / name
    if not (bpe / f"train.{langs[0]}").exists():
        raise FileNotFoundError(
            f"{bpe}/train.{langs[0]} missing: build it with python -m fairseq_ext.datasets ddtp"
        )
    work.mkdir(parents=True, exist_ok=True)
    with FileLock(str(work / f"{name}.lock")):
        if dest.is_dir():
            return dest
        tmp = work / f"{name}.partial"
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
        cmd += ["--srcdict", str(srcdict)] if srcdict else []
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
    cmd += [
        "--seed",
        str(getattr(a, "seed", 1)),
        "--cpu",
        "--num-workers",
        "0",
        "--save-dir",
        str(save),
        "--no-epoch-checkpoints",
    ]
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


def _learned_order(a: argparse.Namespace, method: str) -> bool:
    return method == "mhc" and getattr(a, "mhc_grouping", "frequency") != "frequency"


def _write_order(bin_dir: Path, work: Path, a: argparse.Namespace, vocab_size: int, tree: bool) -> Path:
    """WORK/order.k{K}.g{G}.{grouping}[.tree].txt, written once by ``python -m fairseq_ext.grouping``
    (``tree``: with the specials pinned first and the renumbered dictionary WORK/dict.<same stem>.txt)."""
    src, tgt = a.langs.split("-")
    k = shortlist_for(a, vocab_size)
    stem = f"k{k}.g{a.mhc_groups}.{a.mhc_grouping}" + (".tree" if tree else "")
    order, tree_dict = work / f"order.{stem}.txt", work / f"dict.{stem}.txt"
    if not order.is_file() or (tree and not tree_dict.is_file()):  # deterministic: rewritten whole
        cmd = [sys.executable, "-m", "fairseq_ext.grouping", str(bin_dir), "-s", src, "-t", tgt]
        cmd += ["--shortlist", str(k), "--groups", str(a.mhc_groups), "--method", a.mhc_grouping]
        cmd += ["--out", str(order)] + (["--dict-out", str(tree_dict)] if tree else [])
        run(cmd, work / "grouping.log")
    return order


def label_order_args(
    method: str, bin_dir: Path, work: Path, a: argparse.Namespace, vocab_size: int
) -> list[str]:
    """MHC with ``--mhc-grouping context``: write the order file once per (short list, groups) and pass it."""
    if not _learned_order(a, method):
        return []
    return ["--mhe-label-order", str(_write_order(bin_dir, work, a, vocab_size, tree=False))]


def tree_ordered_data(
    method: str, bin_dir: Path, work: Path, a: argparse.Namespace, vocab_size: int
) -> tuple[Path, list[str]]:
    """(data dir, order flags) for the layout docs/fairseq.md recommends: MHC with a learned order gets the
    data binarised again with the dictionary renumbered to its order (``grouping --dict-out``), so the order
    is the identity and decoding gathers nothing; every other method keeps ``bin_dir``."""
    if not _learned_order(a, method):
        return bin_dir, label_order_args(method, bin_dir, work, a, vocab_size)
    order = _write_order(bin_dir, work, a, vocab_size, tree=True)
    tree_dict = order.with_name(order.name.replace("order.", "dict.", 1))
    data = preprocess(a.data_dir, a.bpe_vocab, work, tuple(a.langs.split("-")), srcdict=tree_dict)  # type: ignore[arg-type]
    return data, ["--mhe-label-order", str(order)]


def train(method: str, bin_dir: Path, work: Path, a: argparse.Namespace, vocab_size: int) -> dict:
    save = run_dir(work, method, a)
    save.mkdir(parents=True, exist_ok=True)
    log = save / "train.log"
    cmd = train_cmd(method, bin_dir, save, a, vocab_size, a.max_update, a.lr_scheduler)
    cmd += label_order_args(method, bin_dir, work, a, vocab_size)
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


def generate_cmd(bin_dir: Path, ckpt: Path, a: argparse.Namespace, fixed_len: int = 0) -> list[str]:
    """``fairseq-generate`` of the full test set with beam ``--beam`` (no sentence dropped).

    ``fixed_len`` > 0 forces every hypothesis to exactly that many tokens (EOS banned before, forced at it):
    every model then runs the same number of decoder steps, so sentences/s compares the cost of a step.
    """
    cmd = [sys.executable, "-m", "fairseq_cli.generate", str(bin_dir), "--user-dir", USER_DIR]
    cmd += ["--task", "translation", "--path", str(ckpt), "--gen-subset", "test", "--beam", str(a.beam)]
    cmd += ["--batch-size", str(a.gen_batch), "--required-batch-size-multiple", "1", "--cpu"]
    cmd += ["--remove-bpe", "sentencepiece", "--num-workers", "0"]
    if fixed_len > 0:
        return cmd + ["--min-len", str(fixed_len), "--max-len-a", "0", "--max-len-b", str(fixed_len)]
    return cmd + ["--max-len-a", "1.2", "--max-len-b", "10"]


def generation_speed(out: str, where: Path) -> tuple[float, float]:
    """(sentences/s, seconds) from fairseq-generate's closing line."""
    speed = re.search(r"Translated ([\d,]+) sentences .* in ([\d.]+)s \(([\d.]+) sentences/s", out)
    if speed is None:
        raise RuntimeError(f"{where}: no 'Translated N sentences ... sentences/s' line from fairseq-generate")
    return float(speed.group(3)), float(speed.group(2))


def generate(method: str, bin_dir: Path, work: Path, refs: list[str], a: argparse.Namespace) -> dict:
    import sacrebleu

    rdir = run_dir(work, method, a)
    ckpt = rdir / "checkpoint_last.pt"
    cmd = generate_cmd(bin_dir, ckpt, a)
    out_path = rdir / "generate.txt"
    if not out_path.exists() or out_path.stat().st_mtime < ckpt.stat().st_mtime:  # stale after more training
        out = run(cmd, rdir / "generate.log")
        atomic_write_text(out, out_path)
    out = out_path.read_text(encoding="utf-8")
    hyps = {int(m.group(1)): m.group(2) for m in re.finditer(r"^D-(\d+)\t[^\t]*\t(.*)$", out, re.M)}
    if len(hyps) != len(refs):
        raise RuntimeError(f"{out_path}: {len(hyps)} hypotheses for {len(refs)} references")
    sent_s, seconds = generation_speed(out, out_path)
    sys_out = [hyps[i] for i in range(len(refs))]
    metric = sacrebleu.metrics.BLEU()
    bleu = metric.corpus_score(sys_out, [refs])
    chrf = sacrebleu.metrics.CHRF().corpus_score(sys_out, [refs])
    return {
        "bleu": round(bleu.score, 2),
        "chrf": round(chrf.score, 2),
        "bleu_detail": str(bleu),
        "bleu_signature": str(metric.get_signature()),
        "gen_sent_per_s": sent_s,
        "gen_seconds": seconds,
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
