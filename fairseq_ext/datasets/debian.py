"""Debian DDTP package descriptions (apt ``Translation-xx`` lists) aligned by Description-md5 and paragraph.

DDTP records carry the md5 of the English description they translate, so records of two languages that
share an md5 are translations of the same text; short description + each `` .``-separated paragraph
become one sentence pair when both sides have the same number of paragraphs.
"""

from __future__ import annotations

import glob
import gzip
import lzma
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

_FIELD = re.compile(r"^(Description-md5|Description-[\w@]+): ?(.*(?:\n .*)*)", re.M)


def find_translation_file(lists_dir: str | os.PathLike, lang: str, dist: str = "bookworm") -> Path:
    """The main-component ``Translation-<lang>`` list of `dist` in an apt lists dir (any compression)."""
    pats = [f"*_dists_{dist}_main_i18n_Translation-{lang}*", f"*Translation-{lang}", f"*Translation-{lang}.*"]
    for pat in pats:
        hits = sorted(p for p in glob.glob(os.path.join(lists_dir, pat)) if not p.endswith(".diff"))
        if hits:
            return Path(hits[0])
    raise FileNotFoundError(
        f'no Translation-{lang} list in {lists_dir}; run: apt-get update -o Acquire::Languages="en,{lang}" '
        "(or pass --apt-lists DIR holding Translation-xx files)"
    )


def read_text(path: str | os.PathLike) -> str:
    """Decompress an apt list by suffix (.lz4 via the lz4 tool apt itself uses, .gz, .xz, or plain)."""
    path = str(path)
    if path.endswith(".lz4"):
        try:
            out = subprocess.run(["lz4", "-dc", path], capture_output=True, check=True)
        except FileNotFoundError as e:
            raise RuntimeError(f"{path}: needs the 'lz4' command (apt-get install lz4)") from e
        return out.stdout.decode("utf-8")
    if path.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    if path.endswith(".xz"):
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return Path(path).read_text(encoding="utf-8")


def _paragraphs(value: str) -> list[str]:
    """Short description first, then the long description split at `` .`` lines (Debian policy 5.6.13)."""
    short, _, long = value.partition("\n")
    paras, cur = [short.strip()], []
    for line in long.split("\n"):
        body = line[1:] if line.startswith(" ") else line
        if body.strip() == ".":
            paras.append(" ".join(cur))
            cur = []
        else:
            cur.append(body.strip())
    paras.append(" ".join(cur))
    return [re.sub(r"\s+", " ", p).strip() for p in paras if p.strip()]


def parse_translation(text: str, source: str = "<text>") -> dict[str, list[str]]:
    """Map Description-md5 -> paragraphs for one ``Translation-xx`` file; malformed records raise with line."""
    out: dict[str, list[str]] = {}
    line_no = 1
    for rec in text.split("\n\n"):
        start = line_no
        line_no += rec.count("\n") + 2
        if not rec.strip():
            continue
        fields = dict(_FIELD.findall(rec))
        md5 = fields.pop("Description-md5", None)
        if md5 is None or not fields:
            raise ValueError(f"{source}:{start}: record without Description-md5/Description-xx: {rec[:80]!r}")
        if not re.fullmatch(r"[0-9a-f]{32}", md5):
            raise ValueError(f"{source}:{start}: bad Description-md5 {md5!r}")
        out[md5] = _paragraphs(next(iter(fields.values())))
    return out


def ddtp_pairs(src: dict[str, list[str]], tgt: dict[str, list[str]]) -> Iterator[tuple[str, str]]:
    """Paragraph pairs of descriptions present in both languages with equal paragraph counts."""
    for md5 in sorted(src.keys() & tgt.keys()):
        s, t = src[md5], tgt[md5]
        if len(s) != len(t):
            continue
        for a, b in zip(s, t):
            if a != b:
                yield a, b
