"""``mhe-face-eval``: verification of a trained backbone on insightface ``.bin`` sets and on user pair lists.

``mhe-face-eval --config glyphs_r18_mhs --weights OUT/model.pt --bin lfw.bin cfp_fp.bin --pairs pairs.txt``
prints (and with ``--json`` writes) 10-fold accuracy and TAR@FAR=1e-4/1e-3/1e-2 per set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mhe_plugins.training import atomic_write_json, load_checkpoint

from .backbones import get_model
from .config import apply_overrides, load_config
from .verification import evaluate_bin, evaluate_pairs

__all__ = ["load_backbone", "evaluate", "cli", "main"]


def load_backbone(cfg, weights: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The config's backbone with ``weights`` (a ``model.pt`` state dict or a trainer ``checkpoint.pt``)."""
    model = get_model(cfg.network, cfg.embedding_size, cfg.input_size, cfg.in_chans, cfg.width, cfg.dropout)
    state = load_checkpoint(weights, map_location="cpu")
    if "backbone" in state and isinstance(state["backbone"], dict):
        state = state["backbone"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{weights}: does not match network {cfg.network!r} of the config: {exc}") from exc
    return model.to(device).eval()


def evaluate(cfg, weights, bins=(), pairs=None, root=None, device="cpu", batch_size: int = 256) -> dict:
    model = load_backbone(cfg, weights, device)
    size = cfg.val_image_size or cfg.input_size
    results = {}
    for b in bins:
        results[Path(b).stem] = evaluate_bin(model, b, size, cfg.in_chans, batch_size)
    if pairs:
        results[Path(pairs).stem] = evaluate_pairs(model, pairs, root, size, cfg.in_chans, batch_size)
    return results


def cli(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and run; returns the results (``main`` is the console-script entry point)."""
    p = argparse.ArgumentParser(prog="mhe-face-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the training config (network, sizes)")
    p.add_argument("--weights", required=True, help="model.pt or checkpoint.pt")
    p.add_argument("--bin", nargs="*", default=[], help="insightface verification .bin files")
    p.add_argument("--pairs", help="pair list 'img1 img2 0|1' (paths relative to --root)")
    p.add_argument("--root", help="image root for --pairs (default: the pair file's dir)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    if not a.bin and not a.pairs:
        p.error("give --bin and/or --pairs")
    cfg = apply_overrides(load_config(a.config), a.set)
    res = evaluate(cfg, a.weights, a.bin, a.pairs, a.root, a.device, a.batch_size)
    print(json.dumps(res, indent=2))
    if a.json:
        atomic_write_json(res, a.json)
    return res


def main(argv: list[str] | None = None) -> None:
    cli(argv)


if __name__ == "__main__":
    main()
