"""The files of a ``mhe-timm-train`` run folder besides the checkpoints: which files make a folder "a run"
(what ``--overwrite`` replaces and what nothing else may write over), ``summary.csv`` / ``summary.json``.

Why apart from ``train.py``: the trainer keeps the training logic; the folder policy is shared with the
benchmark driver (``bench.py`` reads ``RUN_FILES``).
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from mhe_plugins.training import RunExistsError, atomic_write_json, atomic_write_text, prepare_output_dir
from mhe_plugins.training.dist import barrier

#: files whose presence means "a run lives in this folder" (what --overwrite deletes)
RUN_FILES = (
    "last.pt",
    "best.pt",
    "best.pt.prev",
    "best.pt.uncommitted",
    "log.jsonl",
    "summary.csv",
    "summary.json",
    "config.json",
    "classes.json",
    "tensorboard",
)


def prepare_output(args: argparse.Namespace, main: bool) -> Path:
    """Refuse to write over a run unless --resume/--overwrite; every rank decides before anyone writes."""
    out = Path(args.output)
    if not main and not args.resume and not args.overwrite and out.is_dir():
        if any(p for pattern in RUN_FILES for p in out.glob(pattern)):
            raise RunExistsError(f"{out} already holds a training run: pass --resume or --overwrite")
    barrier()
    out = prepare_output_dir(out, resume=bool(args.resume), overwrite=args.overwrite, run_files=RUN_FILES,
                             main_process=main)  # fmt: skip
    barrier()
    return out


def summary_dict(
    config: dict, head_params: int, best: float, history: list[dict], epochs: int, weights: str = "model"
) -> dict:
    """``summary.json``; ``best_weights`` says which weights ``best.pt`` holds ("model", or "ema")."""
    return {
        "config": config,
        "head_params": head_params,
        "best_val_top1": best,
        "best_weights": weights,
        "epochs": epochs,
        "finished": len(history) >= epochs,
        "history": history,
    }


def write_summaries(out: Path, summary: dict) -> None:
    """``summary.csv`` (one row per epoch) and ``summary.json``, each written atomically."""
    rows = summary["history"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), out / "summary.csv")
    atomic_write_json(summary, out / "summary.json")


def plain(d: dict) -> dict:
    """Tuples as lists, so ``config.json`` reads back as it was written."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
