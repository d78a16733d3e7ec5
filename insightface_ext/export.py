"""``mhe-face-export``: the backbone to ONNX (input ``(N, C, S, S)`` in [-1, 1], output the embedding),
checked with onnxruntime against torch on random inputs before the file is kept.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from .config import apply_overrides, load_config
from .evaluate import load_backbone

__all__ = ["export_onnx", "cli", "main"]


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike,
    input_size: int,
    in_chans: int = 3,
    opset: int = 17,
    check: bool = True,
    atol: float = 1e-4,
) -> dict:
    """Export with a dynamic batch axis; returns ``{"path", "max_abs_diff"}``; raises if ORT disagrees."""
    model = model.eval().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    x = torch.rand(2, in_chans, input_size, input_size) * 2 - 1
    torch.onnx.export(
        model,
        (x,),
        str(tmp),
        input_names=["input"],
        output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    diff = float("nan")
    if check:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        xs = torch.rand(5, in_chans, input_size, input_size) * 2 - 1
        got = sess.run(None, {"input": xs.numpy()})[0]
        with torch.no_grad():
            ref = model(xs).numpy()
        diff = float(np.abs(got - ref).max())
        if not diff <= atol * max(1.0, float(np.abs(ref).max())):
            tmp.unlink(missing_ok=True)
            raise RuntimeError(
                f"onnxruntime output differs from torch by {diff:.3g} (> {atol}); {path} not written"
            )
    os.replace(tmp, path)
    return {"path": str(path), "max_abs_diff": diff}


def cli(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and run; returns the results (``main`` is the console-script entry point)."""
    p = argparse.ArgumentParser(prog="mhe-face-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--weights", required=True, help="model.pt or checkpoint.pt")
    p.add_argument("--output", required=True, help="the .onnx file")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    cfg = apply_overrides(load_config(a.config), a.set)
    res = export_onnx(load_backbone(cfg, a.weights), a.output, cfg.input_size, cfg.in_chans, a.opset)
    print(f"wrote {res['path']} (onnxruntime vs torch max |diff| = {res['max_abs_diff']:.2e})")
    return res


def main(argv: list[str] | None = None) -> None:
    cli(argv)


if __name__ == "__main__":
    main()
