"""``python -m timm_ext.datasets glyphs --out DIR``: build the CJK glyph set (thin CLI over the core)."""

from __future__ import annotations

import argparse
import json
import sys

from mhe_plugins.datasets.glyphs import build_glyph_dataset, subset_glyph_dataset

from .glyph_builder import FONT_PACKAGES, ensure_fonts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m timm_ext.datasets", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("glyphs", help="render GB2312 hanzi from Debian CJK fonts, split by font")
    g.add_argument("--out", required=True, help="output dir (train/valid/test.npz, classes.txt, meta.json)")
    g.add_argument(
        "--fonts-dir",
        default=None,
        help="unpacked fonts (<pkg>/usr/share/fonts/...), all of them used; default: the 17 Debian packages "
        "in the user's font cache ($MHE_FONTS_DIR, else $XDG_CACHE_HOME/mhe-plugins/fonts, else "
        "~/.cache/mhe-plugins/fonts), fetched there first if missing (python -m timm_ext.glyph_builder)",
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
        packages = None if a.fonts_dir else FONT_PACKAGES  # the cache may hold more than the default set
        meta = build_glyph_dataset(
            a.out,
            fonts_dir=a.fonts_dir or ensure_fonts(None, FONT_PACKAGES),
            packages=packages,
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
