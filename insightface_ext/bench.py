"""``python -m insightface_ext.bench``: full ArcFace vs Partial-FC-style sampling (rate 0.1) vs MHS-ArcFace.

No face images are reachable offline, so the open-set stand-in is CJK glyphs (NOT faces): train on the
3,755 GB2312 level-1 characters (class = character, sample = font), then verify on the 3,008 **unseen**
level-2 characters rendered in the **unseen** test fonts: genuine pair = one character in two fonts,
impostor pair = two different characters.  All three methods run the same trainer (``insightface_ext.train``)
with the same backbone, data order, schedule and margin; only the head's sampling differs:

* ``arcface_full``: ``head_sizes=(1, N)`` -> every class every step (dense gradient, ``torch.optim.SGD``);
* ``pfc_0.1``: ``head_sizes=(N, 1), sample_rate=0.1`` -> positives + random classes up to 10 % (Partial FC);
* ``mhs``: ``head_sizes=(751, 5)`` -> all classes of the groups hit by the batch (MHS ``batch_union``);
  in the scaling run groups of ``ceil(N / (10 * batch))`` ids, i.e. at most ~10 % of the classes per step.

Then a synthetic-identity scaling run (100k and 1M ids, random embeddings) times one head step (forward,
backward, optimizer) and measures peak memory per method, each in a fresh process.  Each scaling process may
allocate at most 80 % of the memory available when it starts (``RLIMIT_DATA``): a method that needs more
fails with the allocator's error, which is recorded, instead of waking the OOM killer on a shared machine.
Writes ``benchmarks/results/face_glyphs.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mhe_plugins.bench.env import machine, mem_available_bytes, thread_env
from mhe_plugins.bench.report import pyplot, save_figure, write_json, write_reports
from mhe_plugins.bench.store import read_json

__all__ = ["main", "open_set_pairs", "METHODS"]

RESULTS = Path("benchmarks/results")
METHODS = {
    "arcface_full": {"head_sizes": "full", "sample_rate": None},
    "pfc_0.1": {"head_sizes": "single", "sample_rate": 0.1},
    "mhs": {"head_sizes": None, "sample_rate": None},  # filled from --mhs-heads
}


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _head_args(method: str, n: int, mhs_heads: tuple[int, int]) -> dict:
    """Head split of a method; variants: ``pfc_<rate>`` and ``mhs_<G>x<per>``."""
    if method == "arcface_full":
        return {"head_sizes": (1, n), "sample_rate": None}
    if method.startswith("pfc_"):
        return {"head_sizes": (n, 1), "sample_rate": float(method[4:])}
    if method == "mhs":
        return {"head_sizes": tuple(mhs_heads), "sample_rate": None}
    if method.startswith("mhs_"):
        g, per = (int(v) for v in method[4:].split("x"))
        return {"head_sizes": (g, per), "sample_rate": None}
    raise ValueError(f"unknown method {method!r}: arcface_full, pfc_<rate>, mhs or mhs_<G>x<per>")


def _method(name: str) -> str:
    _head_args(name, 10**6, (1, 1))  # validates
    return name


# --------------------------------------------------------------------------- open-set glyph verification
def open_set_pairs(labels: np.ndarray, num_impostors: int, num_balanced: int, seed: int = 0):
    """(genuine index pairs: all same-class pairs, impostor pairs: random different-class pairs, balanced 10-fold set)."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    genuine = []
    for grp in np.split(order, bounds):
        for a in range(len(grp)):
            for b in range(a + 1, len(grp)):
                genuine.append((grp[a], grp[b]))
    genuine = np.asarray(genuine, dtype=np.int64)
    i = rng.integers(0, len(labels), num_impostors * 2)
    j = rng.integers(0, len(labels), num_impostors * 2)
    keep = labels[i] != labels[j]
    impostor = np.stack([i[keep], j[keep]], 1)[:num_impostors]
    k = min(num_balanced // 2, len(genuine), len(impostor))
    g = genuine[rng.choice(len(genuine), k, replace=False)]
    im = impostor[rng.choice(len(impostor), k, replace=False)]
    balanced = np.concatenate([g, im])
    same = np.concatenate([np.ones(k, bool), np.zeros(k, bool)])
    perm = rng.permutation(2 * k)
    return genuine, impostor, balanced[perm], same[perm]


def glyph_worker(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from mhe_plugins.datasets.glyphs import load_glyph_split
    from mhe_plugins.metrics import pair_scores, tar_at_far, verification_accuracy_10fold

    from .config import load_config
    from .evaluate import load_backbone
    from .train import train
    from .verification import embed_images

    cfg = load_config("glyphs_r18_mhs")
    cfg.rec = f"glyphs:{a.train_dir}:train"
    cfg.num_classes = 3755
    head = _head_args(a.method, cfg.num_classes, a.mhs_heads)
    cfg.head_sizes, cfg.sample_rate = head["head_sizes"], head["sample_rate"]
    cfg.width, cfg.num_epoch, cfg.warmup_epoch, cfg.batch_size = a.width, a.epochs, a.warmup_epochs, a.batch
    cfg.max_steps, cfg.save_every, cfg.log_every = a.max_steps, 10**9, 20
    cfg.output = str(Path(a.work_dir) / a.method)
    cfg.resume, cfg.overwrite = False, True  # a benchmark run replaces the previous one in its work dir
    cfg.seed = a.seed
    t0 = time.perf_counter()
    res = train(cfg)
    train_s = time.perf_counter() - t0
    model = load_backbone(cfg, Path(cfg.output) / "model.pt")
    images, labels, _ = load_glyph_split(a.eval_dir, "test")
    emb = embed_images(model, images, batch_size=512, flip=False, channels=cfg.in_chans)
    genuine, impostor, balanced, same = open_set_pairs(labels, a.impostors, a.balanced_pairs, seed=0)
    pairs = np.concatenate([genuine, impostor])
    issame = np.concatenate([np.ones(len(genuine), bool), np.zeros(len(impostor), bool)])
    scores = pair_scores(emb[pairs[:, 0]], emb[pairs[:, 1]])
    tars = tar_at_far(scores, issame, (1e-4, 1e-3, 1e-2))
    acc = verification_accuracy_10fold(pair_scores(emb[balanced[:, 0]], emb[balanced[:, 1]]), issame=same)
    log = [json.loads(x) for x in (Path(cfg.output) / "train_log.jsonl").read_text().splitlines()]
    return {
        "head_sizes": list(cfg.head_sizes),
        "sample_rate": cfg.sample_rate,
        "sampled_classes_mean": float(np.mean([r["sampled_classes"] for r in log if "sampled_classes" in r])),
        "tar_at_far_1e-4": 100 * tars[1e-4],
        "tar_at_far_1e-3": 100 * tars[1e-3],
        "tar_at_far_1e-2": 100 * tars[1e-2],
        "acc10fold": 100 * acc.accuracy_mean,
        "acc10fold_std": 100 * acc.accuracy_std,
        "img_per_s": res["img_per_s"],
        "train_seconds": train_s,
        "steps": res["steps"],
        "final_loss": res["final_loss"],
        "peak_mem_bytes": _rss_peak(),
        "eval": {
            "images": int(len(labels)),
            "classes": int(len(np.unique(labels))),
            "genuine_pairs": int(len(genuine)),
            "impostor_pairs": int(len(impostor)),
            "balanced_pairs": int(len(same)),
        },
        "loss_curve": [(r["step"], r["loss"]) for r in log if "loss" in r],
    }


# --------------------------------------------------------------------------- synthetic scaling
def _estimate_bytes(method: str, n: int, d: int, b: int, mhs_heads) -> int:
    """Rough fp32 footprint of one head step (weights, optimizer state, gradients, logits, temporaries)."""
    w = 4 * n * d
    h = _head_args(method, n, mhs_heads)
    g, per = h["head_sizes"]
    if g == 1:  # full: weight, momentum, dense grad, normalised copy; logits + softmax temporaries
        return 4 * w + 6 * 4 * b * n
    k = int(h["sample_rate"] * n) + b if h["sample_rate"] else min(b, g) * per
    return 2 * w + 4 * 4 * k * d + 6 * 4 * b * k


def scale_worker(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from .heads import MHSArcFace
    from .optim import LazySGD

    n, d, b = a.num_ids, a.dim, a.batch
    if a.mem_budget:  # fail with an allocator error rather than invite the OOM killer onto a shared machine
        vm_data = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmData:"))
        resource.setrlimit(resource.RLIMIT_DATA, (vm_data + a.mem_budget, vm_data + a.mem_budget))
    heads = _head_args(a.method, n, _mhs_scale_heads(n, b))
    torch.manual_seed(0)
    base = _rss_peak()
    full = a.method == "arcface_full"
    head = MHSArcFace(d, n, head_sizes=heads["head_sizes"], sample_rate=heads["sample_rate"], sparse=not full)
    opt = (torch.optim.SGD if full else LazySGD)(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    times, sampled = [], []
    for _ in range(a.steps):
        x = torch.randn(b, d, requires_grad=True)
        y = torch.randint(0, n, (b,))
        t = time.perf_counter()
        loss = head(x, y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        sampled.append(head.last_num_sampled)
    return {
        "head_sizes": list(heads["head_sizes"]),
        "step_ms": 1000 * statistics.median(times[1:] if len(times) > 1 else times),
        "first_step_ms": 1000 * times[0],
        "peak_mem_bytes": _rss_peak(),
        "head_peak_mem_bytes": _rss_peak() - base,
        "sampled_classes": float(np.mean(sampled)),
        "loss": float(loss.item()),
    }


# --------------------------------------------------------------------------- driver
def _spawn(kind: str, args: list[str], out: Path, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "insightface_ext.bench", kind, "--json", str(out), *args]
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=thread_env(threads))


def _collect(p: subprocess.Popen, out: Path) -> dict:
    rc = p.wait()
    if rc == 0 and out.is_file():
        return read_json(out)
    tail = out.with_suffix(".log").read_text()[-600:] if out.with_suffix(".log").is_file() else ""
    return {"error": f"exit code {rc}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}


def _plot(res: dict, path: Path) -> None:
    fig, ax = pyplot().subplots(1, 3, figsize=(16, 5.2))
    names = [m for m in res["methods"] if "error" not in res["methods"][m]]
    for m in names:
        c = np.asarray(res["methods"][m]["loss_curve"])
        ax[0].plot(c[:, 0], c[:, 1], label=m, lw=1)
    ax[0].set(title="glyph training loss", xlabel="step", ylabel="ArcFace CE (sampled classes)")
    ax[0].legend(fontsize=7)
    x = np.arange(len(names))
    ax[1].bar(x - 0.2, [res["methods"][m]["tar_at_far_1e-3"] for m in names], 0.4, label="TAR@FAR=1e-3")
    ax[1].bar(x + 0.2, [res["methods"][m]["acc10fold"] for m in names], 0.4, label="10-fold acc")
    ax[1].set_xticks(x, names, rotation=40, ha="right", fontsize=8)
    ax[1].set(title="unseen level-2 characters, unseen fonts", ylabel="%")
    ax[1].legend(loc="lower right", fontsize=8)
    for m in sorted({m for v in res["scaling"].values() for m in v}):
        pts = [(int(k), v[m]["step_ms"]) for k, v in res["scaling"].items() if m in v and "error" not in v[m]]
        if pts:
            ax[2].loglog(*zip(*pts), "o-", label=m)
    failed = [f"{m} @ {int(k):,}: failed" for k, v in res["scaling"].items() for m in v if "error" in v[m]]
    if failed:
        ax[2].text(
            0.03, 0.97, "\n".join(failed), transform=ax[2].transAxes, va="top", fontsize=8, color="red"
        )
    ax[2].set(title="synthetic ids: head step time", xlabel="identities", ylabel="ms / step")
    ax[2].legend()
    fig.tight_layout()
    save_figure(fig, path)


def _fmt(v, pat="{:.2f}"):
    return "error" if v is None else pat.format(v)


def _markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [
        "# Face-recognition heads on an open-set stand-in (CJK glyphs, not faces)",
        "",
        "No face images are reachable offline. Stand-in: train on the 3,755 GB2312 level-1 characters "
        "(class = character, samples = fonts), verify on the 3,008 unseen level-2 characters rendered in the "
        "unseen test fonts (genuine = same character in two fonts, impostor = two different characters).",
        f"Backbone IResNet-18 width {cfg['width']} (32x32 grey, 128-d), batch {cfg['batch']}, "
        f"{cfg['epochs']} epochs (max_steps={cfg['max_steps']}), SGD lr 0.1 poly decay, margin (1, 0.3, 0) s=32, "
        f"{cfg['threads']} thread(s) per run; the trainings of one invocation ran concurrently on a shared 2-core "
        "CPU (rows of different invocations, e.g. the variants and `_seed7`, ran under different load), so images/s "
        "compare the methods of one invocation, not absolute speed.",
        "Peak memory = peak RSS of the training process (dataset, backbone, head).",
        "",
        "| method | head sizes | steps | sampled classes / step | TAR@FAR=1e-4 | TAR@FAR=1e-3 | TAR@FAR=1e-2 | 10-fold acc | img/s | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, r in res["methods"].items():
        if "error" in r:
            lines.append(f"| {m} | | | | error: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {m} | {r['head_sizes']}{' rate ' + str(r['sample_rate']) if r['sample_rate'] else ''} | "
            f"{r['steps']} | {r['sampled_classes_mean']:.0f} | {r['tar_at_far_1e-4']:.2f} | {r['tar_at_far_1e-3']:.2f} | "
            f"{r['tar_at_far_1e-2']:.2f} | {r['acc10fold']:.2f} ± {r['acc10fold_std']:.2f} | {r['img_per_s']:.0f} | "
            f"{r['peak_mem_bytes'] / 2**20:.0f} |"
        )
    ev = next((r["eval"] for r in res["methods"].values() if "eval" in r), None)
    if ev:
        lines += [
            "",
            f"Eval set: {ev['images']} images of {ev['classes']} unseen characters; "
            f"{ev['genuine_pairs']} genuine + {ev['impostor_pairs']} impostor pairs for TAR@FAR; "
            f"{ev['balanced_pairs']} balanced pairs (10 folds) for accuracy.",
        ]
    lines += [
        "",
        f"## Synthetic identities: one head step (d={cfg['dim']}, batch {cfg['scale_batch']}, random embeddings, "
        f"{cfg['threads']} thread)",
        "",
        "Median wall time of forward + backward + optimizer step (full: torch SGD on a dense weight; "
        "PFC / MHS: LazySGD on row-sparse gradients); peak RSS of a fresh process, and its growth after imports.",
        "",
        "| identities | method | head sizes | sampled classes | step (ms) | peak RSS (MiB) | head memory (MiB) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for n, per in sorted(res["scaling"].items(), key=lambda kv: int(kv[0])):
        for m, r in per.items():
            if "error" in r:
                cap = (
                    f" (allocation cap {r['mem_budget_bytes'] / 2**30:.1f} GiB)"
                    if "mem_budget_bytes" in r
                    else ""
                )
                lines.append(f"| {int(n):,} | {m} | | | error{cap}: {r['error']} | | |")
            else:
                lines.append(
                    f"| {int(n):,} | {m} | {r['head_sizes']} | {r['sampled_classes']:.0f} | {r['step_ms']:.0f} | "
                    f"{r['peak_mem_bytes'] / 2**20:.0f} | {r['head_peak_mem_bytes'] / 2**20:.0f} |"
                )
    lines += ["", f"Total wall time: {res['wall_seconds'] / 60:.1f} min. Command: `{res['command']}`", ""]
    return "\n".join(lines)


def run(a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--train-dir", a.train_dir, "--eval-dir", a.eval_dir, "--threads", str(a.threads),
              "--width", str(a.width), "--epochs", str(a.epochs), "--warmup-epochs", str(a.warmup_epochs),
              "--batch", str(a.batch), "--work-dir", str(work), "--seed", str(a.seed),
              "--impostors", str(a.impostors), "--balanced-pairs", str(a.balanced_pairs),
              "--mhs-heads", *map(str, a.mhs_heads)]  # fmt: skip
    if a.max_steps:
        common += ["--max-steps", str(a.max_steps)]
    methods = {}
    if not a.skip_glyphs:
        procs = {
            m: _spawn("glyph-worker", ["--method", m, *common], work / f"glyph_{m}.json", a.threads)
            for m in a.methods
        }
        methods = {m + a.key_suffix: _collect(p, work / f"glyph_{m}.json") for m, p in procs.items()}
        for m, r in methods.items():
            print(
                f"[bench] {m}: "
                + (
                    r.get("error")
                    or f"TAR@FAR=1e-3 {r['tar_at_far_1e-3']:.2f} acc {r['acc10fold']:.2f} "
                    f"img/s {r['img_per_s']:.0f}"
                ),
                flush=True,
            )
    scaling = {}
    for n in a.scaling_ids:
        scaling[str(n)] = {}
        for m in a.methods:
            est = _estimate_bytes(m, n, a.dim, a.scale_batch, _mhs_scale_heads(n, a.scale_batch))
            budget = int(0.8 * mem_available_bytes())
            out = work / f"scale_{n}_{m}.json"
            args = ["--method", m, "--num-ids", str(n), "--dim", str(a.dim), "--batch", str(a.scale_batch),
                    "--steps", str(a.scale_steps), "--threads", str(a.threads), "--mem-budget", str(budget)]  # fmt: skip
            p = _spawn("scale-worker", args, out, a.threads)
            scaling[str(n)][m] = _collect(p, out)
            scaling[str(n)][m].update(estimated_bytes=est, mem_budget_bytes=budget)
            print(f"[bench] scaling {n} {m}: {scaling[str(n)][m]}", flush=True)
    out = Path(a.out)
    cfg_note = None
    command = "python -m insightface_ext.bench " + " ".join(a.argv)
    wall = time.perf_counter() - t0
    if a.merge and out.with_suffix(".json").is_file():
        old = read_json(out.with_suffix(".json"))
        methods = {**old.get("methods", {}), **methods}
        scaling = {
            n: {**old.get("scaling", {}).get(n, {}), **scaling.get(n, {})}
            for n in {*old.get("scaling", {}), *scaling}
        }
        command = f"{old['command']} && {command}"
        cfg_note = old.get("config")
        wall += old.get("wall_seconds", 0.0)
    res = {
        "methods": methods,
        "scaling": scaling,
        "config": cfg_note
        or {
            "width": a.width,
            "batch": a.batch,
            "epochs": a.epochs,
            "max_steps": a.max_steps,
            "threads": a.threads,
            "dim": a.dim,
            "scale_batch": a.scale_batch,
            "mhs_heads": list(a.mhs_heads),
            "train_dir": a.train_dir,
            "eval_dir": a.eval_dir,
            "machine": machine(),
        },
        "wall_seconds": wall,
        "command": command,
    }
    write_reports(out, res, _markdown(res), _plot if methods else None)
    return res


def _mhs_scale_heads(n: int, batch: int = 256) -> tuple[int, int]:
    """Scaling-run MHS split: groups of ceil(n / (10 * batch)) ids, so a batch scores <= ~10 % of the classes
    (the same budget as Partial FC at rate 0.1)."""
    per = max(1, math.ceil(n / (10 * batch)))
    return (math.ceil(n / per), per)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m insightface_ext.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    g = argparse.ArgumentParser(add_help=False)
    g.add_argument(
        "--train-dir", default="runs/data/glyphs_gb1", help="built with python -m timm_ext.datasets"
    )
    g.add_argument("--eval-dir", default="runs/data/glyphs_gb2", help="the gb2312-2 set, built the same way")
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--width", type=int, default=8)
    g.add_argument("--epochs", type=float, default=2)
    g.add_argument("--warmup-epochs", type=float, default=0.2)
    g.add_argument("--max-steps", type=int)
    g.add_argument("--batch", type=int, default=128)
    g.add_argument("--seed", type=int, default=2048)
    g.add_argument("--work-dir", default="runs/face_bench")
    g.add_argument("--impostors", type=int, default=300000)
    g.add_argument("--balanced-pairs", type=int, default=6000)
    g.add_argument("--mhs-heads", type=int, nargs=2, default=(751, 5))
    drv = sub.add_parser("run", parents=[g], help="the whole benchmark (default)")
    drv.add_argument(
        "--methods",
        nargs="*",
        default=list(METHODS),
        type=_method,
        help="arcface_full, pfc_<rate>, mhs (--mhs-heads) or mhs_<G>x<per>",
    )
    drv.add_argument("--merge", action="store_true", help="update the methods of an existing --out JSON")
    drv.add_argument(
        "--key-suffix", default="", help="appended to the method names in the results (e.g. _seed2)"
    )
    drv.add_argument("--scaling-ids", type=int, nargs="*", default=[100_000, 1_000_000])
    drv.add_argument("--dim", type=int, default=512)
    drv.add_argument("--scale-batch", type=int, default=256)
    drv.add_argument("--scale-steps", type=int, default=4)
    drv.add_argument("--skip-glyphs", action="store_true")
    drv.add_argument("--out", default=str(RESULTS / "face_glyphs"))
    gw = sub.add_parser("glyph-worker", parents=[g])
    gw.add_argument("--method", required=True, type=_method)
    gw.add_argument("--json", required=True)
    sw = sub.add_parser("scale-worker")
    sw.add_argument("--method", required=True, type=_method)
    sw.add_argument("--num-ids", type=int, required=True)
    sw.add_argument("--dim", type=int, default=512)
    sw.add_argument("--batch", type=int, default=256)
    sw.add_argument("--steps", type=int, default=4)
    sw.add_argument("--threads", type=int, default=1)
    sw.add_argument(
        "--mem-budget", type=int, default=0, help="bytes the head step may allocate (RLIMIT_DATA)"
    )
    sw.add_argument("--json", required=True)
    rep = sub.add_parser("report", help="re-render the .md/.png from an existing results JSON")
    rep.add_argument("--out", default=str(RESULTS / "face_glyphs"))
    if not argv or argv[0] not in ("run", "glyph-worker", "scale-worker", "report"):
        argv = ["run", *argv]
    a = p.parse_args(argv)
    a.argv = argv
    if a.cmd == "report":
        res = read_json(Path(a.out).with_suffix(".json"))
        write_reports(a.out, res, _markdown(res), _plot if res["methods"] else None)
        return res
    if a.cmd == "glyph-worker":
        a.mhs_heads = tuple(a.mhs_heads)
        res = glyph_worker(a)
    elif a.cmd == "scale-worker":
        res = scale_worker(a)
    else:
        a.mhs_heads = tuple(a.mhs_heads)
        return run(a)
    write_json(res, a.json)
    return res


if __name__ == "__main__":
    main()
