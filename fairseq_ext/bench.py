"""``python -m fairseq_ext.bench --data-dir DIR``: standard output layer vs MHE on en-de, same budget.

Trains the same small transformer twice through fairseq's own CLIs (``label_smoothed_cross_entropy`` +
``transformer`` vs ``mhe_cross_entropy`` + ``transformer_mhe``), decodes the test set with beam 5, scores
detokenised output with sacreBLEU against the raw references, and times the output layer alone at
|V| = 8k / 32k / 256k. Writes ``nmt_ende.{json,md,png}``. Re-running resumes: fairseq continues from
``checkpoint_last.pt`` and finished steps are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fairseq_ext import USER_DIR
from mhe_plugins import LabelCodec, MHPHead
from mhe_plugins.training import atomic_write_json, atomic_write_text

METHODS = {
    "ce": ["--arch", "transformer", "--criterion", "label_smoothed_cross_entropy"],
    "mhe": ["--arch", "transformer_mhe", "--criterion", "mhe_cross_entropy", "--mhe-heads", "2"],
}


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
    bpe, dest = data_dir / f"bpe{vocab}", work / f"bin{vocab}"
    if (dest / f"dict.{langs[1]}.txt").exists() and (
        dest / f"test.{langs[0]}-{langs[1]}.{langs[1]}.bin"
    ).exists():
        return dest
    if not (bpe / f"train.{langs[0]}").exists():
        raise FileNotFoundError(
            f"{bpe}/train.{langs[0]} missing: build it with python -m fairseq_ext.datasets ddtp"
        )
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
    cmd += ["--destdir", str(dest), "--joined-dictionary", "--workers", "2"]
    work.mkdir(parents=True, exist_ok=True)
    run(cmd, work / "preprocess.log")
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


def train(method: str, bin_dir: Path, work: Path, a: argparse.Namespace) -> dict:
    save = work / method
    save.mkdir(parents=True, exist_ok=True)
    log = save / "train.log"
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
    cmd += METHODS[method] + model_args(a.dim, a.layers, a.heads)
    cmd += [
        "--dropout",
        "0.1",
        "--label-smoothing",
        "0.1",
        "--optimizer",
        "adam",
        "--adam-betas",
        "(0.9, 0.98)",
    ]
    cmd += ["--lr", str(a.lr), "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(a.warmup)]
    cmd += ["--clip-norm", "1.0", "--max-tokens", str(a.max_tokens), "--max-update", str(a.max_update)]
    cmd += ["--seed", "1", "--cpu", "--num-workers", "0", "--save-dir", str(save), "--no-epoch-checkpoints"]
    cmd += ["--validate-interval-updates", str(a.valid_every), "--save-interval-updates", str(a.valid_every)]
    cmd += [
        "--keep-interval-updates",
        "1",
        "--log-format",
        "json",
        "--log-interval",
        "50",
        "--report-accuracy",
    ]
    done = save / "DONE"  # holds the --max-update reached; a larger budget continues from checkpoint_last.pt
    if _done_updates(done) < a.max_update:
        run(cmd, log)
        atomic_write_text(f"{a.max_update}\n", done)
    stats = parse_log(log.read_text(encoding="utf-8"))
    inner = stats["train_inner"] or stats["train"]
    # words/s over the run: target words of each logged window (wpb * updates) / summed training wall time;
    # a resumed run's first window starts one --log-interval before its first logged update
    prev = max(0, int(inner[0]["num_updates"]) - LOG_INTERVAL) if stats["train_inner"] else 0
    words, wall = 0.0, 0.0
    for r in inner:
        window = r["wpb"] * (r["num_updates"] - prev)
        words, wall, prev = words + window, wall + (window / r["wps"] if r["wps"] else 0.0), r["num_updates"]
    return {
        "train_wps": round(words / wall, 1) if wall else None,
        "train_wall_s": round(wall, 1),
        "num_updates": int(max((r["num_updates"] for r in inner), default=0)),
        "valid_curve": sorted(
            {
                int(r["num_updates"]): {
                    "updates": int(r["num_updates"]),
                    "nll_loss": r["nll_loss"],
                    "ppl": r["ppl"],
                }
                for r in stats["valid"]
            }.values(),
            key=lambda r: r["updates"],
        ),
        "valid_nll_loss": stats["valid"][-1]["nll_loss"] if stats["valid"] else None,
        "valid_accuracy": stats["valid"][-1].get("accuracy") if stats["valid"] else None,
        "checkpoint": str(save / "checkpoint_last.pt"),
    }


def generate(method: str, bin_dir: Path, work: Path, refs: list[str], a: argparse.Namespace) -> dict:
    import sacrebleu

    ckpt = work / method / "checkpoint_last.pt"
    cmd = [sys.executable, "-m", "fairseq_cli.generate", str(bin_dir), "--user-dir", USER_DIR]
    cmd += ["--task", "translation", "--path", str(ckpt), "--gen-subset", "test", "--beam", str(a.beam)]
    cmd += ["--batch-size", str(a.gen_batch), "--required-batch-size-multiple", "1", "--cpu"]
    cmd += ["--remove-bpe", "sentencepiece", "--num-workers", "0", "--max-len-a", "1.2", "--max-len-b", "10"]
    out_path = work / method / "generate.txt"
    if not out_path.exists() or out_path.stat().st_mtime < ckpt.stat().st_mtime:  # stale after more training
        out = run(cmd, work / method / "generate.log")
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
    return {
        "bleu": round(bleu.score, 2),
        "bleu_detail": str(bleu),
        "bleu_signature": str(metric.get_signature()),
        "gen_sent_per_s": float(speed.group(3)),
        "gen_seconds": float(speed.group(2)),
    }


def output_params(ckpt: str) -> dict:
    import argparse as _argparse

    torch.serialization.add_safe_globals([_argparse.Namespace])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    out = sum(v.numel() for k, v in state.items() if k.startswith("decoder.output_projection."))
    total = sum(v.numel() for k, v in state.items() if not k.endswith("version") and v.is_floating_point())
    return {"output_params": out, "total_params": total}


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _scaling_one(v: int, dim: int, tokens: int, rows: int, reps: int) -> dict:
    x = torch.randn(tokens, dim, requires_grad=True)
    y = torch.randint(0, v, (tokens,))
    xr = torch.randn(rows, dim)
    dense = torch.nn.Linear(dim, v, bias=False)
    codec = LabelCodec.balanced(v, 2)
    mhe = MHPHead(dim, codec, bias=False)

    def dense_step():
        F.cross_entropy(dense(x), y, label_smoothing=0.1).backward()

    def mhe_step():
        mhe.loss(mhe(x), y, label_smoothing=0.1).backward()

    @torch.no_grad()
    def dense_lp():
        return F.log_softmax(dense(xr).float(), -1)

    @torch.no_grad()
    def mhe_lp():
        return mhe.log_prob(xr)

    r = {
        "head_sizes": list(codec.head_sizes),
        "ce_params": dense.weight.numel(),
        "mhe_params": sum(p.numel() for p in mhe.parameters()),
        "ce_train_step_ms": 1e3 * _time(dense_step, reps),
        "mhe_train_step_ms": 1e3 * _time(mhe_step, reps),
        "ce_beam_logprobs_ms": 1e3 * _time(dense_lp, reps),
        "mhe_beam_logprobs_ms": 1e3 * _time(mhe_lp, reps),
    }
    r["param_ratio"] = r["ce_params"] / r["mhe_params"]
    r["train_step_speedup"] = r["ce_train_step_ms"] / r["mhe_train_step_ms"]
    r["beam_logprobs_speedup"] = r["ce_beam_logprobs_ms"] / r["mhe_beam_logprobs_ms"]
    return {k: (round(val, 3) if isinstance(val, float) else val) for k, val in r.items()}


def scaling(vocabs: list[int], dim: int, tokens: int, rows: int, reps: int) -> dict:
    """Output layer alone: params, train step (fwd+bwd of projection + loss), one beam step's log-probs."""
    torch.manual_seed(0)
    res = {
        str(v): _scaling_one(v, dim, tokens, rows, reps) for v in tqdm(vocabs, desc="output-layer scaling")
    }
    return {"dim": dim, "tokens": tokens, "beam_rows": rows, "reps": reps, "by_vocab": res}


def cached_scaling(path: Path, a: argparse.Namespace) -> dict:
    """Scaling numbers are reused when the settings match, so a re-run only re-parses the logs."""
    key = {
        "vocabs": a.scaling_vocabs,
        "dim": a.scaling_dim,
        "tokens": a.scaling_tokens,
        "reps": a.scaling_reps,
    }
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            return old["result"]
    res = scaling(
        [int(v) for v in a.scaling_vocabs.split(",")], a.scaling_dim, a.scaling_tokens, 320, a.scaling_reps
    )
    atomic_write_json({"key": key, "result": res}, path)
    return res


def write_report(result: dict, out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(result, out_dir / f"{stem}.json")
    m, c = result["methods"], result["config"]
    lines = [
        "# NMT en-de (Debian DDTP + LibreOffice): standard output layer vs MHE",
        "",
        f"Data: {result['dataset']}. Model: transformer, {c['layers']}+{c['layers']} layers, d={c['dim']}, "
        f"{c['heads']} attention heads, joint BPE {c['vocab']} (|V|={result['vocab_size']}), "
        f"{c['max_update']} updates x {c['max_tokens']} tokens, adam lr {c['lr']}, label smoothing 0.1, "
        f"CPU ({c['threads']} threads, shared machine). Test: beam {c['beam']}, sacreBLEU on detokenised output.",
        "",
        "| method | sacreBLEU | output-layer params | total params | valid nll (bits) | train words/s | gen sent/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"ce": "label_smoothed_cross_entropy + transformer", "mhe": "mhe_cross_entropy + transformer_mhe"}
    for k in ("ce", "mhe"):
        r = m[k]
        lines.append(
            f"| {names[k]} | {r['bleu']:.2f} | {r['output_params']:,} | {r['total_params']:,} | "
            f"{r['valid_nll_loss']:.3f} | {r['train_wps']:,.0f} | {r['gen_sent_per_s']:.1f} |"
        )
    d = result["delta"]
    lines += [
        "",
        f"MHE - CE BLEU: {d['bleu']:+.2f} (target >= -1.0: {'met' if d['bleu'] >= -1.0 else 'NOT met'}); "
        f"output layer {d['output_param_ratio']:.1f}x fewer params; train speed x{d['train_wps_ratio']:.2f}; "
        f"generation speed x{d['gen_speed_ratio']:.2f}.",
        "",
        "## Output layer alone",
        "",
        f"d={result['scaling']['dim']}; train step = projection + label-smoothed loss fwd+bwd on "
        f"{result['scaling']['tokens']} tokens; beam step = full-|V| log-probs for "
        f"{result['scaling']['beam_rows']} rows (64 sentences x beam 5); median of {result['scaling']['reps']}.",
        "",
        "| |V| | MHE heads | CE params | MHE params | ratio | CE step ms | MHE step ms | speed-up "
        "| CE beam-step ms | MHE beam-step ms | speed-up |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, r in result["scaling"]["by_vocab"].items():
        lines.append(
            f"| {int(v):,} | {r['head_sizes']} | {r['ce_params']:,} | {r['mhe_params']:,} | {r['param_ratio']:.0f}x "
            f"| {r['ce_train_step_ms']:.1f} | {r['mhe_train_step_ms']:.1f} | {r['train_step_speedup']:.1f}x "
            f"| {r['ce_beam_logprobs_ms']:.1f} | {r['mhe_beam_logprobs_ms']:.1f} | {r['beam_logprobs_speedup']:.1f}x |"
        )
    lines += ["", f"![curves]({stem}.png)", ""]
    atomic_write_text("\n".join(lines), out_dir / f"{stem}.md")
    plot(result, out_dir / f"{stem}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, style in (("ce", "o-"), ("mhe", "s-")):
        curve = result["methods"][k]["valid_curve"]
        ax1.plot([p["updates"] for p in curve], [p["nll_loss"] for p in curve], style, label=k)
    ax1.set_xlabel("updates")
    ax1.set_ylabel("valid nll (bits/token)")
    ax1.set_title("validation NLL (same budget)")
    ax1.legend()
    sc = result["scaling"]["by_vocab"]
    vs = list(sc)
    xs = range(len(vs))
    ax2.bar([i - 0.2 for i in xs], [sc[v]["ce_train_step_ms"] for v in vs], 0.4, label="CE (d x |V|)")
    ax2.bar([i + 0.2 for i in xs], [sc[v]["mhe_train_step_ms"] for v in vs], 0.4, label="MHE (2 heads)")
    ax2.set_xticks(list(xs), [f"{int(v) // 1000}k" for v in vs])
    ax2.set_yscale("log")
    ax2.set_xlabel("|V|")
    ax2.set_ylabel("output-layer train step (ms)")
    ax2.set_title("output layer alone")
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


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
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--max-update", type=int, default=1000)
    p.add_argument("--valid-every", type=int, default=200)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--scaling-vocabs", default="8000,32000,256000")
    p.add_argument("--scaling-dim", type=int, default=512)
    p.add_argument("--scaling-tokens", type=int, default=512)
    p.add_argument("--scaling-reps", type=int, default=3)
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument(
        "--methods",
        default="ce,mhe",
        help="train/decode only these; e.g. two processes with ce / mhe in parallel, then one with both to report",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per run (1 = robust on a busy CPU)"
    )
    a = p.parse_args(argv)
    THREADS["n"] = a.threads
    torch.set_num_threads(a.threads)
    langs = tuple(a.langs.split("-"))
    work = a.work_dir or a.data_dir / "bench"
    refs = (a.data_dir / "raw" / f"test.{langs[1]}").read_text(encoding="utf-8").splitlines()
    bin_dir = preprocess(a.data_dir, a.vocab, work, langs)  # type: ignore[arg-type]
    methods = {}
    chosen = [m for m in a.methods.split(",") if m]
    if not chosen or set(chosen) - set(METHODS):
        p.error(f"--methods must be a comma list from {list(METHODS)}, got {a.methods!r}")
    for method in chosen:
        r = train(method, bin_dir, work, a)
        r.update(generate(method, bin_dir, work, refs, a))
        r.update(output_params(r.pop("checkpoint")))
        methods[method] = r
        print(method, {k: v for k, v in r.items() if k != "valid_curve"}, flush=True)
    if set(chosen) != set(METHODS):
        return {"methods": methods}
    scal = {} if a.skip_scaling else cached_scaling(work / "scaling.json", a)
    ce, mhe = methods["ce"], methods["mhe"]
    stats_path = a.data_dir / "stats.json"
    result = {
        "methods": methods,
        "delta": {
            "bleu": round(mhe["bleu"] - ce["bleu"], 2),
            "output_param_ratio": ce["output_params"] / mhe["output_params"],
            "train_wps_ratio": mhe["train_wps"] / ce["train_wps"],
            "gen_speed_ratio": mhe["gen_sent_per_s"] / ce["gen_sent_per_s"],
        },
        "scaling": scal,
        "vocab_size": sum(1 for _ in open(bin_dir / f"dict.{langs[1]}.txt", encoding="utf-8")) + 4,
        "config": {**{k: v for k, v in vars(a).items() if not isinstance(v, Path)}, "threads": a.threads},
        "dataset": json.loads(stats_path.read_text())["splits"] if stats_path.exists() else str(a.data_dir),
        "test_sentences": len(refs),
    }
    if not math.isfinite(result["delta"]["bleu"]):
        raise RuntimeError("non-finite BLEU")
    write_report(result, a.out_dir, a.name)
    return result


if __name__ == "__main__":
    main()
