"""``python -m fairseq_ext.datasets ddtp --langs en-de --out DIR``: build the en-de corpus from Debian."""

from __future__ import annotations

import argparse
from pathlib import Path

from .build import DEFAULT_CACHE, SOURCES, build


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fairseq_ext.datasets", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("ddtp", help="Debian DDTP descriptions + LibreOffice help/UI parallel corpus")
    d.add_argument("--langs", default="en-de", help="SRC-TGT language pair (default en-de)")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--sources", default=",".join(SOURCES), help=f"comma list from {SOURCES}")
    d.add_argument(
        "--apt-lists", type=Path, default=Path("/var/lib/apt/lists"), help="dir with Translation-xx"
    )
    d.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where .deb packages are extracted")
    d.add_argument("--no-fetch", action="store_true", help="never call apt-get; use what is on disk")
    d.add_argument("--vocab-sizes", default="8000", help="joint BPE sizes, e.g. 8000,16000")
    d.add_argument("--valid", type=int, default=1500, help="valid sentences (distinct sources)")
    d.add_argument("--test", type=int, default=2000, help="test sentences (distinct sources)")
    d.add_argument("--max-words", type=int, default=150)
    d.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    langs = tuple(a.langs.split("-"))
    if len(langs) != 2 or not all(langs):
        p.error(f"--langs must look like en-de, got {a.langs!r}")
    return build(
        a.out,
        langs=langs,  # type: ignore[arg-type]
        sources=tuple(s for s in a.sources.split(",") if s),
        apt_lists=a.apt_lists,
        cache=a.cache,
        fetch=not a.no_fetch,
        vocab_sizes=tuple(int(v) for v in a.vocab_sizes.split(",")),
        n_valid=a.valid,
        n_test=a.test,
        seed=a.seed,
        max_words=a.max_words,
    )


if __name__ == "__main__":
    main()
