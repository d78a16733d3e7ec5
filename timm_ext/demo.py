"""``python -m timm_ext.demo``: a 2-minute MHP run on the committed 500-class glyph subset (held-out fonts)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .train import build_parser, train

DATA = Path(__file__).resolve().parents[1] / "data" / "glyphs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m timm_ext.demo", description=__doc__)
    p.add_argument("--head", default="mhp", choices=["linear", "mhp", "mhc", "mhs"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    out = a.output or tempfile.mkdtemp(prefix="mhe_timm_demo_")
    args = build_parser().parse_args(
        [
            "--data-dir",
            str(DATA),
            "--dataset",
            "glyphs",
            "--model",
            "resnet10t",
            "--model-kwargs",
            "channels=(16,32,64,64)",
            "--input-size",
            "1",
            "32",
            "32",
            "--head",
            a.head,
            "--epochs",
            str(a.epochs),
            "--batch-size",
            "64",
            "--lr",
            "0.1",
            "--extra-eval-split",
            "test",
            "--output",
            out,
            "--threads",
            "2",
        ]  # fmt: skip
    )
    last = train(args)["history"][-1]
    print(
        f"{a.head}: 500 classes, held-out fonts top-1 {last['test_top1']:.1f}% top-5 {last['test_top5']:.1f}% ({out})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
