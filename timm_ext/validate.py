"""``mhe-timm-validate``: top-1/top-5 of a ``mhe-timm-train`` checkpoint on one split, as JSON
(``--predictions FILE``: also every item's top-k ids, as CSV)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import torch

from mhe_plugins.training import atomic_write_json, atomic_write_text

from .data import build_dataset, build_loader, check_targets, dataset_targets, item_name, stored_class_names
from .train import EVAL_CROP_PCT, EVAL_INTERPOLATION, build_model_from_config, evaluate
from .train_loop import read_run_checkpoint


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, config) from a checkpoint written by ``mhe-timm-train``.

    Read-only: nothing in the run folder is written or deleted. A ``best.pt`` that a kill left older than
    the run's last commit is not evaluated as is: the committed best stored in ``last.pt`` is used instead
    (with a note on stderr), so the result matches the run's ``summary.json``.
    """
    ckpt = read_run_checkpoint(checkpoint, device)
    model = build_model_from_config(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    model.class_names = ckpt.get("class_names")  # validate numbers folder splits by these
    return model.to(device).eval(), ckpt["config"]


def eval_loader(ds, cfg: dict, batch_size: int, workers: int):
    """The evaluation loader a checkpoint's config prescribes (input size, normalisation, resize/crop)."""
    return build_loader(
        ds,
        input_size=tuple(cfg["input_size"]),
        batch_size=batch_size,
        is_training=False,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        workers=workers,
        interpolation=cfg.get("interpolation", EVAL_INTERPOLATION),
        crop_pct=cfg.get("crop_pct", EVAL_CROP_PCT),
    )


def validate(
    data_dir: str,
    checkpoint: str,
    split: str = "test",
    dataset: str | None = None,
    batch_size: int = 256,
    workers: int = 0,
    beam: int | None = None,
    predictions: str | Path | None = None,
) -> dict:
    """Top-1/top-5 of ``checkpoint`` on ``split``; ``predictions``: also write every item's top-5 ids (CSV
    ``item,filename,target,index_0..``, in the split's order) so single predictions can be checked."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(checkpoint, device)
    if beam is not None and hasattr(model.head, "beam"):
        model.head.beam = beam
    names = stored_class_names(checkpoint, model.class_names)  # the training ids, not this split's folders
    ds = build_dataset(
        cfg["dataset"] if dataset is None else dataset, data_dir, split, cfg["input_size"][0], names
    )
    check_targets(ds, cfg["num_classes"], split)
    loader = eval_loader(ds, cfg, batch_size, workers)
    if predictions:
        ids: list[torch.Tensor] = []
        res = evaluate(model, loader, device, collect=ids)
        _write_predictions(ds, torch.cat(ids) if ids else torch.zeros(0, 5, dtype=torch.long), predictions)
    else:
        res = evaluate(model, loader, device)
    return {
        "checkpoint": str(checkpoint),
        "split": split,
        "head": cfg["head"],
        "head_sizes": cfg["head_sizes"],
        **res,
    }


def _write_predictions(ds, ids: torch.Tensor, path: str | Path) -> None:
    """One CSV row per item: its index in the split, name (file, or glyph font/char), target, top-k ids."""
    targets = dataset_targets(ds).tolist()  # read without decoding the images
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["item", "filename", "target", *[f"index_{j}" for j in range(ids.shape[1])]])
    for i, row in enumerate(ids.tolist()):
        w.writerow([i, item_name(ds, i), targets[i], *row])
    atomic_write_text(buf.getvalue(), Path(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mhe-timm-validate", description=__doc__)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument(
        "--split",
        default="test",
        help="split/folder name (timm synonyms searched; missing = error; '.' = DATA_DIR)",
    )
    p.add_argument("--dataset", default=None, help="default: the dataset the checkpoint was trained on")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--beam", type=int, default=None, help="MHC beam width override")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument(
        "--predictions", default=None, metavar="FILE", help="also write every item's top-5 ids (CSV)"
    )
    a = p.parse_args(argv)
    res = validate(
        a.data_dir, a.checkpoint, a.split, a.dataset, a.batch_size, a.workers, a.beam, a.predictions
    )
    if a.out:
        atomic_write_json(res, a.out)
    json.dump(res, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
