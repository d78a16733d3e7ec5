"""Build FOLDOC-XMC: a second real multi-label text set, from Debian's ``dict-foldoc`` (a dictd dictionary).

One document per dictionary entry; text = headword + definition with the cross-reference markup removed;
labels = the ``{cross-referenced}`` terms that are headwords themselves (a "see also" task, as
WikiSeeAlso in the XC repository). The linked words are deleted from the text (otherwise every label is
spelled out in its document and the task is a string match). Labels need ``min_docs`` documents; documents
left without a label are dropped; seeded 80/10/10 split. Deterministic for a given package version.

    mkdir -p runs && apt-get download dict-foldoc && dpkg -x dict-foldoc_*.deb runs/dict-foldoc
    python -m xmc.datasets foldoc --dict-dir runs/dict-foldoc/usr/share/dictd --out data/foldoc_xmc
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from pathlib import Path

import numpy as np

from xmc.io import InputFileError

DEFAULT_DICT_DIR = "/usr/share/dictd"
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_LINK = re.compile(r"\{([^{}]*)\}")
_URL = re.compile(r"\s*\([^()]*\)\s*$")  # "{text (url)}"


def _b64(s: str, path: Path, lineno: int) -> int:
    """dictd's base-64 offsets."""
    v = 0
    for ch in s:
        d = _B64.find(ch)
        if d < 0:
            raise InputFileError(f"{path}:{lineno}: bad base-64 number {s!r}")
        v = v * 64 + d
    return v


def read_dictd(dict_dir: str | Path, name: str = "foldoc") -> list[tuple[str, str]]:
    """(headword, entry text) for every index line, in index order; dictd's own ``00-database*`` skipped."""
    d = Path(dict_dir)
    index, data = d / f"{name}.index", d / f"{name}.dict.dz"
    if not index.is_file() or not data.is_file():
        raise FileNotFoundError(f"{d}: no {name}.index / {name}.dict.dz (apt-get download dict-foldoc)")
    blob = gzip.decompress(data.read_bytes())
    out = []
    for lineno, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 3:
            raise InputFileError(f"{index}:{lineno}: expected 'headword<TAB>offset<TAB>length', got {line!r}")
        head, off, size = parts[0], _b64(parts[1], index, lineno), _b64(parts[2], index, lineno)
        if head.startswith("00-database") or head.startswith("00database"):
            continue
        out.append((head, blob[off : off + size].decode("utf-8", "replace")))
    return out


def _norm(term: str) -> str:
    return " ".join(_URL.sub("", term).split()).lower()


def _token(term: str) -> str:
    return term.replace(" ", "_")


def build_foldoc_xmc(
    dict_dir: str | Path = DEFAULT_DICT_DIR, min_docs: int = 2, seed: int = 0
) -> tuple[dict[str, list[tuple[str, list[str]]]], dict]:
    """Splits ``{train, valid, test}`` of (text, label tokens) and statistics."""
    entries = read_dictd(dict_dir)
    heads = {_norm(h) for h, _ in entries}
    docs: dict[str, tuple[str, list[str]]] = {}  # one per normalised headword (first entry wins)
    for head, body in entries:
        key = _norm(head)
        if key in docs:
            continue
        lines = body.split("\n", 1)
        text = lines[1] if len(lines) > 1 and lines[0].strip().lower() == head.strip().lower() else body
        links = sorted({t for m in _LINK.findall(text) if (t := _norm(m)) in heads and t != key})
        text = " ".join(_LINK.sub(" ", text).split())
        docs[key] = (f"{head}: {text}", [_token(t) for t in links])
    counts = Counter(t for _, labs in docs.values() for t in labs)
    keep = {t for t, c in counts.items() if c >= min_docs}
    rows = [(text, [t for t in labs if t in keep]) for _, (text, labs) in sorted(docs.items())]
    rows = [r for r in rows if r[1]]
    perm = np.random.default_rng(seed).permutation(len(rows))
    n_va = n_te = len(rows) // 10
    parts = {"valid": perm[:n_va], "test": perm[n_va : n_va + n_te], "train": perm[n_va + n_te :]}
    splits = {s: [rows[i] for i in sorted(idx)] for s, idx in parts.items()}
    labels = {t for _, labs in rows for t in labs}
    stats = {
        "source": "Debian dict-foldoc (FOLDOC, GFDL)",
        "documents": len(rows),
        "labels": len(labels),
        "labels_per_doc": round(sum(len(labs) for _, labs in rows) / max(1, len(rows)), 3),
        "min_docs_per_label": min_docs,
        "seed": seed,
        "splits": {k: len(v) for k, v in splits.items()},
    }
    return {s: splits[s] for s in ("train", "valid", "test")}, stats
