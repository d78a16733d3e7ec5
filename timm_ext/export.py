"""``mhe-timm-export``: one ONNX graph = backbone + MHE head + exact top-k decode over the global label space.

Outputs ``scores`` (B, k) float (log-probabilities; logits for MHS) and ``ids`` (B, k) int64 global class ids,
the same numbers as ``model.topk`` in PyTorch (checked with onnxruntime after export unless ``--no-check``).
Beside ``OUT.onnx`` it writes what a user needs to feed and read the graph: ``OUT.preprocess.json`` (timm
``pretrained_cfg``-style: input_size, mean, std, interpolation, crop_pct, crop_mode) and ``OUT.classes.json``
(``names[id]`` for every class id, ``null`` when the training data had no names).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mhe_plugins.datasets.lines import read_name_list
from mhe_plugins.training import atomic_write_json, load_checkpoint

from .train import EVAL_CROP_PCT, EVAL_INTERPOLATION
from .validate import load_model


def sidecar_paths(out: str | Path) -> tuple[Path, Path]:
    """(``<stem>.preprocess.json``, ``<stem>.classes.json``) beside the ONNX file."""
    out = Path(out)
    stem = out.name[: -len(".onnx")] if out.name.endswith(".onnx") else out.name
    return out.with_name(f"{stem}.preprocess.json"), out.with_name(f"{stem}.classes.json")


def preprocess_config(cfg: dict, top_k: int) -> dict:
    """timm ``pretrained_cfg``-style preprocessing of the exported graph (what ``mhe-timm-validate`` applies)."""
    return {
        "input_size": list(cfg["input_size"]),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "interpolation": cfg.get("interpolation", EVAL_INTERPOLATION),
        "crop_pct": cfg.get("crop_pct", EVAL_CROP_PCT),
        "crop_mode": "center",
        "num_classes": cfg["num_classes"],
        "input_name": "images",
        "outputs": {"scores": "log-probabilities" if cfg["head"] != "mhs" else "logits", "ids": "class ids"},
        "top_k": top_k,
        "head": cfg["head"],
        "head_sizes": cfg["head_sizes"],
        "model": cfg["model"],
    }


def read_class_names(path: str | Path, num_classes: int) -> list[str]:
    """One name per line (line i = class i), or a JSON list / ``{"names": [...]}``."""
    path = Path(path)
    if path.suffix == ".json":
        obj = json.loads(path.read_text(encoding="utf-8"))
        names = obj["names"] if isinstance(obj, dict) else obj
    else:
        names = read_name_list(path)  # blank / repeated lines are errors naming file:line
    if not isinstance(names, list) or len(names) != num_classes:
        got = len(names) if isinstance(names, list) else type(names).__name__
        raise ValueError(f"--classes {path}: expected {num_classes} class names, got {got}")
    return [str(n) for n in names]


class TopKGraph(nn.Module):
    """images -> (scores, ids) of the top-k classes; what gets exported."""

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.model, self.k = model, int(k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.pooled(x)
        return self.model.head.topk(feats, self.k)


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    top_k: int = 5,
    batch_size: int = 2,
    check: bool = True,
    opset: int = 18,
    classes: str | Path | None = None,
) -> dict:
    """Export and (optionally) compare onnxruntime with PyTorch on random inputs; returns the max deviation."""
    model, cfg = load_model(checkpoint, "cpu")
    k = min(int(top_k), cfg["num_classes"])
    graph = TopKGraph(model, k).eval()
    x = torch.randn(batch_size, *cfg["input_size"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        torch.onnx.export(
            graph,
            (x,),
            str(tmp),
            input_names=["images"],
            output_names=["scores", "ids"],
            dynamic_shapes={"x": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    tmp.replace(out)
    pre_path, cls_path = sidecar_paths(out)
    atomic_write_json(preprocess_config(cfg, k), pre_path)
    if classes is not None:
        names = read_class_names(classes, cfg["num_classes"])
    else:
        names = load_checkpoint(checkpoint).get("class_names")
    atomic_write_json({"num_classes": cfg["num_classes"], "names": names}, cls_path)
    report = {
        "onnx": str(out),
        "preprocess": str(pre_path),
        "classes": str(cls_path),
        "top_k": k,
        "input_size": cfg["input_size"],
        "head": cfg["head"],
    }
    if check:
        report.update(check_onnx(graph, out, torch.randn(batch_size + 1, *cfg["input_size"])))
    return report


def check_onnx(graph: nn.Module, path: str | Path, x: torch.Tensor) -> dict:
    """Run the ONNX file with onnxruntime and compare with PyTorch: ids must match, scores to 1e-4."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, ids = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref_scores, ref_ids = graph(x)
    max_err = float(np.abs(scores - ref_scores.numpy()).max())
    same_ids = bool((ids == ref_ids.numpy()).all())
    if not same_ids or max_err > 1e-3:
        raise RuntimeError(
            f"ONNX output differs from PyTorch: ids equal={same_ids}, max |score diff|={max_err:.2e}"
        )
    return {"max_abs_score_diff": max_err, "ids_equal": same_ids}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mhe-timm-export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--no-check", action="store_true")
    p.add_argument(
        "--classes", default=None, help="class names (one per line, or JSON) when the checkpoint has none"
    )
    a = p.parse_args(argv)
    rep = export_onnx(a.checkpoint, a.out, a.top_k, check=not a.no_check, opset=a.opset, classes=a.classes)
    print(rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
