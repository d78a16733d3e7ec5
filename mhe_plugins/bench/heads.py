"""Head benchmark: dense Linear+CE vs AdaptiveLogSoftmaxWithLoss vs MHP vs MHS on the same inputs.

Peak memory: one child process per method, so each peak is its own. Times: all methods in one child,
interleaved step by step, so background load hits them alike. A method that cannot run (estimated
memory beyond what is available, out-of-memory kill, time limit) records ``"error"`` instead of figures.
Ratios are taken against dense measured in this same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..heads import codec_for
from .env import environment, mem_available_bytes
from .report import write_json
from .worker import METHODS

__all__ = ["run_heads_benchmark", "format_table", "estimate_bytes", "mem_available_bytes"]


def estimate_bytes(method: str, n: int, d: int, b: int) -> int:
    """Rough fp32 footprint (params + grads + logits and their grads) used to skip hopeless runs."""
    if method == "dense":
        return 4 * (2 * n * d + 3 * b * n)
    if method == "adaptive":
        return 4 * (2 * n * d // 4 + 4 * b * n)
    if method == "mhs":
        return 4 * (n * d + b * n + 2 * b * n // 4)
    return 4 * (2 * d * 4 * int(n**0.5) + 8 * b * int(n**0.5))


def _child(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "mhe_plugins.bench.worker", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        why = "killed (out of memory?)" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return {"error": f"{why}: {tail[0][:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:,.0f}x" if a / b >= 10 else f"{a / b:.1f}x"


def format_table(result: dict) -> str:
    m = result["methods"]
    dense = m.get("dense", {})
    lines = [
        "| method | params | train step (s) | top-5 (s) | peak step mem (MiB) | params vs dense | step vs dense | top-5 vs dense | mem vs dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in m.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |" + " |" * 7)
            continue
        lines.append(
            f"| {name} | {r['params']:,} | {r['train_step_s']:.4f} | {r['topk_s']:.4f} | "
            f"{r['peak_mem_bytes'] / 2**20:,.1f} | {ratio(dense.get('params'), r['params'])} fewer | "
            f"{ratio(dense.get('train_step_s'), r['train_step_s'])} faster | "
            f"{ratio(dense.get('topk_s'), r['topk_s'])} faster | "
            f"{ratio(dense.get('peak_mem_bytes'), max(r['peak_mem_bytes'], 1))} lower |"
        )
    ad, mhp = m.get("adaptive", {}), m.get("mhp", {})
    if "train_step_s" in ad and "train_step_s" in mhp:
        lines.append("")
        lines.append(
            f"MHP train step vs AdaptiveLogSoftmaxWithLoss: {ratio(ad['train_step_s'], mhp['train_step_s'])} faster"
        )
    return "\n".join(lines)


def run_heads_benchmark(
    num_classes: int,
    dim: int,
    batch: int,
    heads: int = 2,
    methods: tuple[str, ...] = METHODS,
    steps: int = 5,
    warmup: int = 1,
    k: int = 5,
    timeout: float = 1800.0,
    json_path: str | Path | None = None,
    threads: int = 0,
    progress=print,
) -> dict:
    from tqdm import tqdm

    codec = codec_for("mhp", num_classes, num_heads=heads)
    result = {
        "config": {
            "num_classes": num_classes, "dim": dim, "batch": batch, "heads": heads,
            "mhp_head_sizes": list(codec.head_sizes), "mhs_head_sizes": list(codec_for("mhs", num_classes).head_sizes),
            "steps": steps, "warmup": warmup, "topk": k, "optimizer": "SGD(lr=0.01)", **environment(threads),
        },
        "methods": {},
    }  # fmt: skip
    common = ["--num-classes", str(num_classes), "--dim", str(dim), "--batch", str(batch), "--heads", str(heads),
              "--warmup", str(warmup), "--steps", str(steps), "--topk", str(k), "--threads", str(threads)]  # fmt: skip
    runnable = []
    avail = mem_available_bytes()
    for method in methods:
        need = estimate_bytes(method, num_classes, dim, batch)
        if avail and need > 0.85 * avail:
            result["methods"][method] = {
                "error": f"skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
            }
        else:
            result["methods"][method] = {}
            runnable.append(method)
    bar = tqdm(runnable, desc=f"memory N={num_classes:,}", unit="method")
    for method in bar:  # one process per method: its peak RSS is its own
        bar.set_postfix_str(method)
        result["methods"][method].update(
            _child(["--measure", "memory", "--methods", method, *common], timeout)
        )
    ok = [m for m in runnable if "error" not in result["methods"][m]]
    if ok:
        progress(f"timing {ok} interleaved in one process ({steps} rounds)...")
        times = _child(["--measure", "times", "--methods", *ok, *common], timeout * len(ok))
        for m in ok:
            result["methods"][m].update(times.get(m, {"error": times.get("error", "no timing")}))
    result["methods"] = {m: result["methods"][m] for m in methods}
    if json_path:
        write_json(result, json_path)
    return result
