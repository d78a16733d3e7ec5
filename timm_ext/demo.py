"""``python -m timm_ext.demo``: a short MHP run on the bundled 500-class glyph subset (held-out fonts).

Writes under ``./runs/timm_demo_<head>/`` of the current directory unless ``--output`` is given.
"""

from __future__ import annotations

import argparse

from mhe_plugins.bundled import bundled_data

from .train import build_parser, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m timm_ext.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--head", default="mhp", choices=["linear", "mhp", "mhc", "mhs"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    out = a.output or f"runs/timm_demo_{a.head}"
    args = build_parser().parse_args(
        [
            "--data-dir",
            str(bundled_data("glyphs")),
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
