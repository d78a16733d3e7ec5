"""Train MHC and flat heads on the bundled WordNet-XMC (TF-IDF encoder, CPU) and compare them on its test split.

Writes under ``./runs/xmc_demo/`` of the current directory (``--output``); ``python -m mhe_plugins.demo`` (``make
demo``) runs it at a small budget beside the heads benchmark.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mhe_plugins.bundled import bundled_data
from xmc.evaluate import evaluate_model_dir
from xmc.train import TrainConfig, train

COLUMNS = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")


def run_demo(
    data_dir: Path,
    out_dir: Path,
    epochs: int = 2,
    batch_size: int = 256,
    threads: int | None = None,
    max_steps: int | None = None,
) -> dict:
    rows = {}
    for head in ("mhc", "flat"):
        print(f"== training {head} head (tfidf encoder, {epochs} epochs)", flush=True)
        t0 = time.time()
        cfg = TrainConfig(
            data_dir=str(data_dir),
            output=str(out_dir / head),
            head=head,
            epochs=epochs,
            batch_size=batch_size,
            threads=threads,
            overwrite=True,
            max_steps=max_steps,
            encoder="tfidf",
            ranker=False,  # the heads compared as trained; the learned ranker (xmc.bench rows) adds a fit
        )
        summary = train(cfg)
        res = evaluate_model_dir(cfg.output, data_dir, "test", out=Path(cfg.output) / "metrics.json")
        rows[head] = {
            **res,
            "train_s": time.time() - t0,
            "classifier_params": summary["classifier_parameters"],
        }
    header = "| head | " + " | ".join(COLUMNS) + " | train+eval s | classifier params |"
    lines = [header, "|---" * (len(COLUMNS) + 3) + "|"]
    for head, r in rows.items():
        vals = " | ".join(f"{r[c]:.2f}" for c in COLUMNS)
        lines.append(f"| {head} | {vals} | {r['train_s']:.0f} | {r['classifier_params']:,} |")
    table = "\n".join(lines)
    print("\nWordNet-XMC test split (percent; models selected on the valid split):\n" + table)
    (out_dir / "comparison.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m xmc.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="default: the bundled WordNet-XMC")
    ap.add_argument("--output", default="runs/xmc_demo", help="relative to the current directory")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None, help="stop each head early (smoke runs)")
    args = ap.parse_args(argv)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir) if args.data_dir else bundled_data("wordnet_xmc")
    run_demo(data_dir, Path(args.output), args.epochs, args.batch_size, args.threads, args.max_steps)


if __name__ == "__main__":
    main()
