"""``python -m timm_ext.datasets glyphs --out DIR``: build the CJK glyph set (thin CLI over the core)."""

from __future__ import annotations

import argparse
import json
import sys

from mhe_plugins.datasets.glyphs import build_glyph_dataset, subset_glyph_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m timm_ext.datasets", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("glyphs", help="render GB2312 hanzi from Debian CJK fonts, split by font")
    g.add_argument("--out", required=True, help="output dir (train/valid/test.npz, classes.txt, meta.json)")
    g.add_argument(
        "--fonts-dir",
        default=None,
        help="unpacked fonts (<pkg>/usr/share/fonts/...); default: "
        "/work/cache/fonts or $MHE_FONTS_DIR, filled with apt-get download + dpkg -x",
    )
    g.add_argument("--charset", default="gb2312-1", choices=["gb2312-1", "gb2312-2"])
    g.add_argument("--size", type=int, default=32)
    g.add_argument("--num-classes", type=int, default=None, help="keep only the first K characters")
    g.add_argument("--valid-fraction", type=float, default=0.05)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=2)
    s = sub.add_parser("subset", help="copy the first K classes of a built set")
    s.add_argument("--src", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--num-classes", type=int, required=True)
    a = p.parse_args(argv)
    if a.cmd == "glyphs":
        meta = build_glyph_dataset(
            a.out,
            fonts_dir=a.fonts_dir,
            charset=a.charset,
            size=a.size,
            num_classes=a.num_classes,
            valid_fraction=a.valid_fraction,
            seed=a.seed,
            workers=a.workers,
        )
        for name, st in meta["splits"].items():
            print(f"{name}: {st['images']} images, {st['classes_present']} classes, {len(st['faces'])} faces")
    else:
        meta = subset_glyph_dataset(a.src, a.out, a.num_classes)
        print(json.dumps(meta["split_images"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
