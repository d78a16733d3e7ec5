"""Benchmark on one dataset and split: MHC and flat (this package) vs omikuji (Parabel) and napkinxc (PLT),
all on the same TF-IDF features; writes a Markdown table, the same figures as JSON, and a PNG chart.

    python -m xmc.bench --data-dir data/wordnet_xmc      # -> benchmarks/results/xmc_wordnet.{md,json,png}
    python -m xmc.bench --data-dir data/foldoc_xmc       # -> benchmarks/results/xmc_foldoc.{md,json,png}

Resumable per method: each finished method's figures are kept in ``WORK/<method>.result.json`` and reused
(``--force`` recomputes); a killed neural run continues from its checkpoint. ``mhc-perm`` is the MHC run with
randomly permuted label ids (the paper's "grouping needs no clustering" check).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from mhe_plugins import metrics as M
from mhe_plugins.bench.env import machine, set_threads
from mhe_plugins.bench.report import pyplot, save_figure, write_reports
from mhe_plugins.bench.store import RunStore
from xmc.data import load_dataset
from xmc.encoders import TfidfFeaturizer
from xmc.evaluate import TrainedModel, compute_metrics, evaluate_model_dir
from xmc.train import TrainConfig, train

COLUMNS = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _ranker_buffer_bytes(model_dir: str) -> int:
    """Bytes of the lexical centroids and the neighbour documents/labels stored in ``model.pt``."""
    from mhe_plugins.training import load_checkpoint

    state = load_checkpoint(Path(model_dir) / "model.pt", map_location="cpu")["state_dict"]
    return int(
        sum(
            t.numel() * t.element_size()
            for k, t in state.items()
            if k.startswith(("lexical.", "neighbours."))
        )
    )


def _head_config(model_dir: str) -> dict:
    """The MHC sizes actually used (defaults resolved)."""
    h = TrainedModel(model_dir).model.head
    return {
        "groups": f"{{{h.num_groups}; {h.group_size}}}",
        "candidates_topk": h.candidates_topk,
        "hidden_dim": h.hidden_dim,
        "permutation_seed": h.permutation_seed,
    }


NEURAL = {"mhc": "mhc", "flat": "flat", "mhc-perm": "mhc"}


def _train_config(method: str, data_dir: str, work: Path, args) -> TrainConfig:
    """Trainer defaults unless a bench flag overrides them."""
    kw = {
        k: getattr(args, k)
        for k in ("epochs", "batch_size", "tfidf_dim", "max_features", "num_groups", "candidates_topk")
        if getattr(args, k) is not None
    }
    kw.update(json.loads(args.train_json) if args.train_json else {})
    if method == "mhc-perm":
        kw["permutation_seed"] = args.permutation_seed if args.permutation_seed is not None else 0
    elif method == "mhc" and args.permutation_seed is not None:
        kw["permutation_seed"] = args.permutation_seed
    out = work / method
    return TrainConfig(
        data_dir=data_dir,
        output=str(out),
        head=NEURAL[method],
        threads=args.threads,
        resume=(out / "checkpoint.pt").exists(),  # a killed run continues
        progress=args.progress,
        **kw,
    )


def run_neural(method: str, data_dir: str, work: Path, args) -> dict:
    cfg = _train_config(method, data_dir, work, args)
    done = Path(cfg.output) / "train_summary.json"
    if done.exists() and (Path(cfg.output) / "model.pt").exists():
        summary = json.loads(done.read_text())  # finished earlier: evaluate it again
    else:
        summary = train(cfg)
    t0 = time.time()
    res = evaluate_model_dir(
        cfg.output, data_dir, "test", device="cpu", out=Path(cfg.output) / "metrics.json"
    )
    predict_s = time.time() - t0
    return {
        **res,
        "train_s": summary["train_s"],
        "predict_s": round(predict_s, 2),
        "classifier_params": summary["classifier_parameters"],
        # label-side weights + the data the ranker carries (lexical centroids, neighbour documents)
        "model_bytes": 4 * summary["classifier_parameters"] + _ranker_buffer_bytes(cfg.output),
        "best_epoch": summary["best_epoch"],
        "config": _head_config(cfg.output) if cfg.head == "mhc" else {},
        "train_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data_dir", "output")},
    }


def _write_xc(path: Path, x: sp.csr_matrix, y: sp.csr_matrix) -> None:
    """XC BoW format, as omikuji reads it."""
    with open(path, "w") as fh:
        fh.write(f"{x.shape[0]} {x.shape[1]} {y.shape[1]}\n")
        for i in range(x.shape[0]):
            labs = ",".join(map(str, y.indices[y.indptr[i] : y.indptr[i + 1]]))
            s, e = x.indptr[i], x.indptr[i + 1]
            feats = " ".join(f"{j}:{v:.6g}" for j, v in zip(x.indices[s:e], x.data[s:e]))
            fh.write(f"{labs} {feats}".rstrip() + "\n")  # omikuji rejects a trailing space


def run_omikuji(x_tr, y_tr, x_te, threads: int, work: Path) -> tuple[np.ndarray, float, int]:
    import omikuji

    path = work / "omikuji_train.txt"
    _write_xc(path, x_tr, y_tr)
    t0 = time.time()
    hp = omikuji.Model.default_hyper_param()  # Parabel-like defaults: 3 trees, balanced 2-means, hinge
    model = omikuji.Model.train_on_data(str(path), hp, n_threads=threads)
    train_s = time.time() - t0
    model.save(str(work / "omikuji_model"))
    pred = np.full((x_te.shape[0], 5), -1, dtype=np.int64)
    t1 = time.time()
    for i in range(x_te.shape[0]):
        s, e = x_te.indptr[i], x_te.indptr[i + 1]
        out = model.predict(list(zip(x_te.indices[s:e].tolist(), x_te.data[s:e].tolist())), top_k=5)
        pred[i, : len(out)] = [lab for lab, _ in out]
    run_omikuji.predict_s = time.time() - t1
    return pred, train_s, _dir_bytes(work / "omikuji_model")


def run_napkinxc(x_tr, y_tr, x_te, threads: int, work: Path) -> tuple[np.ndarray, float, int]:
    from napkinxc.models import PLT

    model = PLT(str(work / "napkinxc_model"), threads=threads, seed=0)
    labels = [y_tr.indices[y_tr.indptr[i] : y_tr.indptr[i + 1]].tolist() for i in range(y_tr.shape[0])]
    t0 = time.time()
    model.fit(x_tr, labels)
    train_s = time.time() - t0
    t1 = time.time()
    out = model.predict(x_te, top_k=5)
    run_napkinxc.predict_s = time.time() - t1
    pred = np.full((x_te.shape[0], 5), -1, dtype=np.int64)
    for i, row in enumerate(out):
        pred[i, : len(row)] = row
    return pred, train_s, _dir_bytes(work / "napkinxc_model")


def notes(result: dict) -> str:
    """The sentences under the table (MHC shape, targets); kept in the JSON as ``notes``."""
    out = []
    if "mhc" in result["methods"]:
        c = result["methods"]["mhc"]["config"]
        out.append(
            f"MHC head: groups {c['groups']} ({{G; per}}), {c['candidates_topk']} candidate groups per document, "
            f"label-embedding width {c['hidden_dim']}, permutation seed {c['permutation_seed']}."
        )
    if "targets" in result:
        t = result["targets"]
        out.append(
            f"Targets: MHC P@1 - flat P@1 = {t['mhc_P@1_minus_flat_P@1']:+.2f} (target >= -1); "
            f"MHC P@1 - omikuji P@1 = {t['mhc_vs_omikuji_P@1']:+.2f} (target >= 0); "
            f"MHC P@5 - omikuji P@5 = {t.get('mhc_vs_omikuji_P@5', float('nan')):+.2f} (target >= 0); "
            f"flat / MHC classifier parameters = {t['classifier_params_ratio_flat_over_mhc']:.2f}x (target > 1)."
        )
    return "\n\n".join(out)


def markdown(result: dict) -> str:
    rows = [
        "| method | " + " | ".join(COLUMNS) + " | train s | predict s | classifier params | model MB |",
        "|---" * (len(COLUMNS) + 5) + "|",
    ]
    for name, m in result["methods"].items():
        params = f"{m['classifier_params']:,}" if m.get("classifier_params") else "n/a (sparse trees)"
        rows.append(
            f"| {name} | "
            + " | ".join(f"{m[c]:.2f}" for c in COLUMNS)
            + f" | {m['train_s']:.0f} | {m.get('predict_s', float('nan')):.1f} | {params}"
            + f" | {m['model_bytes'] / 1e6:.1f} |"
        )
    s = result["setup"]
    return (
        f"# XMC benchmark: {s['dataset']}\n\n"
        f"Test split ({s['n_test']:,} docs), {s['num_labels']:,} labels, {s['n_train']:,} train docs; "
        f"all methods on the same TF-IDF features ({s['num_features']:,} unigrams). "
        f"Percentages; PSP with Jain propensities (A={s['propensity_a']}, B={s['propensity_b']}). "
        f"Neural models: trainer defaults unless listed in the JSON (`train_config`), {s['threads']} thread(s), "
        "selected on the valid split. "
        f"Tree baselines: library defaults, {s['threads']} thread(s). Train time includes validation passes "
        f"for the neural models. Machine: {s['machine']}.\n\n"
        + "\n".join(rows)
        + "\n\n"
        + result.get("notes", "")
        + "\n"
    )


def plot(result: dict, png: Path) -> None:
    s = result["setup"]
    names = list(result["methods"])
    fig, ax = pyplot().subplots(figsize=(8, 4))
    w = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = [result["methods"][name][c] for c in COLUMNS]
        ax.bar(np.arange(len(COLUMNS)) + j * w, vals, w, label=name)
    ax.set_xticks(np.arange(len(COLUMNS)) + w * (len(names) - 1) / 2, COLUMNS)
    ax.set_ylabel("%")
    ax.set_title(f"{s['dataset']} test: MHC vs flat vs tree baselines")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m xmc.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/wordnet_xmc")
    ap.add_argument("--methods", default="mhc,flat,omikuji,napkinxc")
    ap.add_argument("--epochs", type=int, default=None, help="default: the trainer's")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the trainer's")
    ap.add_argument("--tfidf-dim", type=int, default=None, help="default: the trainer's")
    ap.add_argument("--max-features", type=int, default=None, help="default: the trainer's")
    ap.add_argument("--train-json", default=None, help="more TrainConfig fields, e.g. '{\"lexical\": false}'")
    ap.add_argument("--force", action="store_true", help="recompute methods whose results are in --work-dir")
    ap.add_argument("--num-groups", type=int, default=None)
    ap.add_argument("--candidates-topk", type=int, default=None)
    ap.add_argument("--permutation-seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", default=None, help="default runs/xmc_bench/<dataset>")
    ap.add_argument(
        "--results",
        default=None,
        help="path prefix for .md/.json/.png (default benchmarks/results/xmc_<dataset>)",
    )
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--reuse", action="store_true", help="(always on now; kept for old command lines)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    name = Path(args.data_dir).name.removesuffix("_xmc")
    work = Path(args.work_dir or f"runs/xmc_bench/{name}")
    args.results = args.results or f"benchmarks/results/xmc_{name}"
    work.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(args.data_dir)
    tr, te = ds.splits["train"], ds.splits["test"]
    methods = args.methods.split(",")
    result: dict = {"methods": {}}
    prop = M.jain_propensity(tr.labels, A=0.55, B=1.5)
    trees = [m for m in methods if m in ("omikuji", "napkinxc")]
    if trees and ds.format == "raw":
        feat = TfidfFeaturizer(max_features=args.max_features or 100_000).fit(tr.texts)
        x_tr, x_te = feat.transform(tr.texts), feat.transform(te.texts)
        num_features = feat.num_features
    else:
        x_tr, x_te, num_features = tr.features, te.features, ds.num_features
    store = RunStore(work, suffix=".result.json")  # WORK/<method>.result.json: a rerun reuses it

    def run_method(m: str) -> dict:
        if m in NEURAL:
            return run_neural(m, args.data_dir, work, args)
        if m not in ("omikuji", "napkinxc"):
            raise ValueError(f"unknown method {m!r} (mhc, flat, mhc-perm, omikuji, napkinxc)")
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            runner = run_omikuji if m == "omikuji" else run_napkinxc
            pred, train_s, nbytes = runner(x_tr, tr.labels, x_te, args.threads, Path(tmp))
        return {
            **compute_metrics(pred, te.labels, prop),
            "train_s": round(train_s, 2),
            "predict_s": round(runner.predict_s, 2),
            "classifier_params": None,
            "model_bytes": nbytes,
        }

    for m in methods:
        print(f"== {m}", flush=True)
        result["methods"][m] = store.run_or_reuse(m, lambda m=m: run_method(m), force=args.force)
        print(json.dumps(result["methods"][m]), flush=True)
    result["setup"] = {
        "dataset": Path(args.data_dir).name,
        "n_train": len(tr),
        "n_test": len(te),
        "num_labels": ds.num_labels,
        "num_features": num_features,
        "threads": args.threads,
        "propensity_a": 0.55,
        "propensity_b": 1.5,
        "machine": f"{machine()}, shared with other jobs",
    }
    if "mhc" in result["methods"] and "flat" in result["methods"]:
        mh, fl = result["methods"]["mhc"], result["methods"]["flat"]
        result["targets"] = {
            "mhc_P@1_minus_flat_P@1": round(mh["P@1"] - fl["P@1"], 3),
            "mhc_vs_omikuji_P@1": round(
                mh["P@1"] - result["methods"].get("omikuji", {}).get("P@1", float("nan")), 3
            ),
            "mhc_vs_omikuji_P@5": round(
                mh["P@5"] - result["methods"].get("omikuji", {}).get("P@5", float("nan")), 3
            ),
            "classifier_params_ratio_flat_over_mhc": round(
                fl["classifier_params"] / mh["classifier_params"], 3
            ),
        }
    result["notes"] = notes(result)
    paths = write_reports(args.results, result, markdown(result), plot)
    print(paths["md"].read_text())
    return result


if __name__ == "__main__":
    main()
