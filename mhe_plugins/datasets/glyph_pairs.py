"""Verification pairs from a glyph split, written as an insightface ``.bin`` (the face trainer's val format).

Why: ``mhe-face-train glyphs_r18_mhs`` verifies during training like arcface_torch does on LFW; the bundled
``data/glyphs/verify_test.bin`` is built by :func:`write_glyph_pairs_bin` from the bundled subset's test
split (held-out fonts).  A genuine pair is one character in two different fonts, an impostor pair two
different characters.  The ``.bin`` is insightface's: a pickle of ``(list of PNG bytes, list of bool)``
with the two images of pair i at positions 2i and 2i+1.

    python -m mhe_plugins.datasets.glyph_pairs --glyphs data/glyphs --out data/glyphs/verify_test.bin
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
from pathlib import Path

import numpy as np

from .glyphs import load_glyph_split

__all__ = ["glyph_pairs", "write_glyph_pairs_bin"]


def glyph_pairs(labels: np.ndarray, fonts: np.ndarray, n_genuine: int, n_impostor: int, seed: int = 0):
    """Index pairs ``(i, j)`` (n, 2) and ``issame`` (n,): genuine pairs first, then impostors, no repeats."""
    rng = np.random.default_rng(seed)
    by_label: dict[int, np.ndarray] = {}
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        if len(np.unique(fonts[idx])) >= 2:
            by_label[int(lab)] = idx
    if len(by_label) < n_genuine:
        raise ValueError(
            f"only {len(by_label)} classes have >= 2 fonts; cannot make {n_genuine} genuine pairs"
        )
    genuine = []
    for lab in rng.choice(sorted(by_label), size=n_genuine, replace=False):
        idx = by_label[int(lab)]
        i = int(rng.choice(idx))
        j = int(rng.choice(idx[fonts[idx] != fonts[i]]))
        genuine.append((i, j))
    impostor, seen = [], set()
    while len(impostor) < n_impostor:
        i, j = (int(v) for v in rng.choice(len(labels), size=2, replace=False))
        if labels[i] != labels[j] and (min(i, j), max(i, j)) not in seen:
            seen.add((min(i, j), max(i, j)))
            impostor.append((i, j))
    pairs = np.asarray(genuine + impostor, dtype=np.int64)
    issame = np.asarray([True] * n_genuine + [False] * n_impostor)
    return pairs, issame


def write_glyph_pairs_bin(
    glyph_dir: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "test",
    n_pairs: int = 600,
    seed: int = 0,
) -> Path:
    """Write ``n_pairs`` (half genuine) pairs of ``glyph_dir``'s ``split`` to ``out`` in insightface's format."""
    from PIL import Image

    if n_pairs < 2 or n_pairs % 2:
        raise ValueError(f"n_pairs must be an even number >= 2, got {n_pairs}")
    images, labels, fonts = load_glyph_split(glyph_dir, split)
    pairs, issame = glyph_pairs(labels, fonts, n_pairs // 2, n_pairs // 2, seed)
    bins = []
    for k in pairs.reshape(-1):
        buf = io.BytesIO()
        Image.fromarray(images[k]).save(buf, format="PNG", optimize=True)
        bins.append(buf.getvalue())
    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as fh:
        pickle.dump((bins, [bool(s) for s in issame]), fh, protocol=4)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m mhe_plugins.datasets.glyph_pairs", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--glyphs", required=True, help="a built glyph set (train/valid/test.npz)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--pairs", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = write_glyph_pairs_bin(a.glyphs, a.out, a.split, a.pairs, a.seed)
    print(f"{path}: {a.pairs} pairs ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
