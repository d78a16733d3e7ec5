"""Choose defaults on the VALID split (never test): train named configurations one after the other and append
each one's best validation row to a JSON-lines file; finished names are skipped, so the sweep resumes.

    python -m xmc.tune --data-dir data/foldoc_xmc --out runs/tune/foldoc.jsonl \\
        --config 'old={"epochs": 5}' --config 'lex={"lexical": true}' --config omikuji
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mhe_plugins import metrics as M
from xmc.anchors import TREES
from xmc.data import load_dataset
from xmc.evaluate import compute_metrics
from xmc.train import TrainConfig, train


def _done(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["name"] for line in path.read_text().splitlines() if line.strip()}


def run_tree(name: str, data_dir: str, work: Path, threads: int) -> dict:
    """An anchor of the bench (omikuji, omikuji-bonsai, napkinxc, knn) on the same unigram TF-IDF, scored
    on valid."""
    from xmc.anchors import run_tree as run_anchor
    from xmc.encoders import TfidfFeaturizer, l2_rows

    ds = load_dataset(data_dir)
    tr, va = ds.splits["train"], ds.splits["valid"]
    if ds.format == "raw":
        feat = TfidfFeaturizer().fit(tr.texts)
        x_tr, x_va = feat.transform(tr.texts), feat.transform(va.texts)
    else:
        x_tr, x_va = l2_rows(tr.features), l2_rows(va.features)
    work.mkdir(parents=True, exist_ok=True)
    r = run_anchor(name, x_tr, tr.labels, {"valid": x_va}, threads, work)
    prop = M.jain_propensity(tr.labels, A=0.55, B=1.5)
    return {**compute_metrics(r["preds"]["valid"], va.labels, prop), "train_s": round(r["train_s"], 1)}


def run_config(name: str, kw: dict, data_dir: str, work: Path, threads: int) -> dict:
    cfg = TrainConfig(
        data_dir=data_dir, output=str(work / name), overwrite=True, threads=threads, progress=False, **kw
    )
    t0 = time.time()
    summary = train(cfg)
    best = summary["history"][[r["epoch"] for r in summary["history"]].index(summary["best_epoch"])]
    keep = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5", "epoch", "weights")
    row = {k: best[k] for k in keep}
    if summary.get("ranker"):  # the learned ranker's cross-fitted valid figures; the hand weights' beside
        row.update({k: summary["ranker"]["ranker_crossfit"][k] for k in keep if "@" in k})
        row["hand_weights"] = {k: summary["ranker"]["stage0"][k] for k in keep if "@" in k}
    return {
        **row,
        "curve_P@1": [r["P@1"] for r in summary["history"]],
        "train_s": round(time.time() - t0, 1),
        "total_s": summary.get("wall", {}).get("total_s"),
        "steps": summary["steps"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m xmc.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True, help="JSON-lines results (appended; finished names skipped)")
    ap.add_argument("--work-dir", default=None, help="model folders (default: next to --out)")
    ap.add_argument(
        "--config",
        action="append",
        required=True,
        help="NAME=JSON of TrainConfig fields, or an anchor: omikuji, omikuji-bonsai, napkinxc, knn",
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else out.with_suffix("")
    for spec in args.config:
        name, _, js = spec.partition("=")
        if name in _done(out):
            continue
        if name in TREES:
            res = run_tree(name, args.data_dir, work / name, args.threads)
            kw = {}
        else:
            kw = json.loads(js or "{}")
            res = run_config(name, kw, args.data_dir, work, args.threads)
        row = {"name": name, "config": kw, "dataset": Path(args.data_dir).name, **res}
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
