"""Per-step time of the TF-IDF encoder with dense vs sparse bag gradients, measured interleaved in one process
(the machine is shared, so only the ratio within one run is meaningful).

    python -m xmc.steptime --data-dir data/wordnet_xmc --steps 20 --out benchmarks/results/xmc_steptime.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mhe_plugins.training import atomic_write_json
from xmc.batching import Collator
from xmc.data import load_dataset
from xmc.encoders import TfidfFeaturizer, l2_rows
from xmc.model import XMCModel
from xmc.train import _optimizers


def _model(sparse: bool, num_labels: int, num_features: int, args) -> XMCModel:
    torch.manual_seed(0)
    cfg = {
        "encoder": "tfidf",
        "head": args.head,
        "num_groups": None,
        "candidates_topk": args.candidates_topk,
        "hidden_dim": None,
        "permutation_seed": None,
        "dropout": 0.2,
        "tfidf_dim": args.tfidf_dim,
        "tfidf_layers": 0,
        "sparse_grad": sparse,
        "max_len": 128,
    }
    return XMCModel(cfg, num_labels, num_features)


def measure(args) -> dict:
    """Mean forward+backward and optimiser ms per step for each variant, alternating variants every step."""
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data_dir)
    tr = ds.splits["train"]
    if ds.format == "raw":
        feat = TfidfFeaturizer(max_features=args.max_features).fit(tr.texts)
        x, nf = feat.transform(tr.texts), feat.num_features
    else:
        x, nf = l2_rows(tr.features), ds.num_features
    col = Collator(tr.labels, features=x)
    rng = np.random.default_rng(0)
    variants = {}
    for name, sparse in (("dense", False), ("sparse", True)):
        m = _model(sparse, ds.num_labels, nf, args)
        variants[name] = (m, _optimizers(m, 0.01, 2e-3), {"fwd_bwd": [], "opt": []})
    for it in range(args.warmup + args.steps):
        batch = col(rng.choice(len(tr), args.batch_size, replace=False).tolist())
        for name in ("dense", "sparse") if it % 2 == 0 else ("sparse", "dense"):
            m, opts, times = variants[name]
            t0 = time.perf_counter()
            m(batch["inputs"], batch["labels"]).backward()
            t1 = time.perf_counter()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if it >= args.warmup:
                times["fwd_bwd"].append(t1 - t0)
                times["opt"].append(t2 - t1)
    res = {
        "setup": {
            "dataset": Path(args.data_dir).name,
            "num_features": nf,
            "num_labels": ds.num_labels,
            "batch_size": args.batch_size,
            "tfidf_dim": args.tfidf_dim,
            "head": args.head,
            "steps": args.steps,
            "threads": args.threads,
            "bag_parameters": nf * args.tfidf_dim,
        }
    }
    for name, (_, _, times) in variants.items():
        res[name] = {k: round(1000 * float(np.mean(v)), 1) for k, v in times.items()}
        res[name]["total"] = round(res[name]["fwd_bwd"] + res[name]["opt"], 1)
    res["speedup_total"] = round(res["dense"]["total"] / res["sparse"]["total"], 2)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m xmc.steptime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/wordnet_xmc")
    ap.add_argument("--head", default="mhc", choices=["mhc", "flat"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--tfidf-dim", type=int, default=1024)
    ap.add_argument("--candidates-topk", type=int, default=32)
    ap.add_argument("--max-features", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    res = measure(args)
    print(json.dumps(res, indent=1))
    if args.out:
        atomic_write_json(res, args.out)
    return res


if __name__ == "__main__":
    main()
