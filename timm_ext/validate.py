"""``mhe-timm-validate``: top-1/top-5 of a ``mhe-timm-train`` checkpoint on one split, as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mhe_plugins.training import TrainState, atomic_write_json, load_checkpoint

from .data import build_dataset, build_loader, check_targets, stored_class_names
from .train import EVAL_CROP_PCT, EVAL_INTERPOLATION, build_model_from_config, evaluate


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, config) from a checkpoint written by ``mhe-timm-train``.

    Read-only: nothing in the run folder is written or deleted. A ``best.pt`` that a kill left older than
    the run's last commit is not evaluated as is: the committed best stored in ``last.pt`` is used instead
    (with a note on stderr), so the result matches the run's ``summary.json``.
    """
    path = Path(checkpoint)
    if path.name == "best.pt" and (path.parent / "last.pt").exists():
        ckpt, note = TrainState(path.parent).load_best(map_location=device)
        if note:
            print(f"{path}: {note}", file=sys.stderr)
    else:
        ckpt = load_checkpoint(checkpoint, map_location=device)
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{checkpoint} is not a mhe-timm-train checkpoint (needs 'model' and 'config')")
    model = build_model_from_config(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    model.class_names = ckpt.get("class_names")  # validate numbers folder splits by these
    return model.to(device).eval(), ckpt["config"]


def validate(
    data_dir: str,
    checkpoint: str,
    split: str = "test",
    dataset: str | None = None,
    batch_size: int = 256,
    workers: int = 0,
    beam: int | None = None,
) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(checkpoint, device)
    if beam is not None and hasattr(model.head, "beam"):
        model.head.beam = beam
    names = stored_class_names(checkpoint, model.class_names)  # the training ids, not this split's folders
    ds = build_dataset(
        cfg["dataset"] if dataset is None else dataset, data_dir, split, cfg["input_size"][0], names
    )
    check_targets(ds, cfg["num_classes"], split)
    loader = build_loader(
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
    res = evaluate(model, loader, device)
    return {
        "checkpoint": str(checkpoint),
        "split": split,
        "head": cfg["head"],
        "head_sizes": cfg["head_sizes"],
        **res,
    }


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
    a = p.parse_args(argv)
    res = validate(a.data_dir, a.checkpoint, a.split, a.dataset, a.batch_size, a.workers, a.beam)
    if a.out:
        atomic_write_json(res, a.out)
    json.dump(res, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
