"""``mhe-timm-export``: one ONNX graph = backbone + MHE head + exact top-k decode over the global label space.

Outputs ``scores`` (B, k) float (log-probabilities; logits for MHS) and ``ids`` (B, k) int64 global class ids,
the same numbers as ``model.topk`` in PyTorch (checked with onnxruntime after export unless ``--no-check``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .validate import load_model


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
    report = {"onnx": str(out), "top_k": k, "input_size": cfg["input_size"], "head": cfg["head"]}
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
    a = p.parse_args(argv)
    rep = export_onnx(a.checkpoint, a.out, a.top_k, check=not a.no_check, opset=a.opset)
    print(rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
