"""``python -m fairseq_ext.datasets ddtp --langs en-de --out DIR``: build the en-de corpus from Debian;
``python -m fairseq_ext.datasets sample --out DIR``: the committed sample -> BPE + fairseq binaries."""

from __future__ import annotations

import argparse
from pathlib import Path

from .build import DEFAULT_CACHE, SOURCES, build
from .sample import DEFAULT_SAMPLE, build_sample


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
    sm = sub.add_parser("sample", help="data/ddtp_sample (.gz) -> raw/, spm{V}.model, bpe{V}/, bin{V}/")
    sm.add_argument("--out", required=True, type=Path)
    sm.add_argument(
        "--sample", type=Path, default=DEFAULT_SAMPLE, help="dir with {train,valid,test}.{en,de}.gz"
    )
    sm.add_argument("--vocab", type=int, default=600, help="joint BPE size (default 600)")
    sm.add_argument("--train-lines", type=int, default=None, help="keep only the first N training pairs")
    sm.add_argument("--no-binarize", action="store_true", help="stop before fairseq-preprocess")
    a = p.parse_args(argv)
    if a.cmd == "sample":
        build_sample(a.out, a.sample, vocab=a.vocab, train_lines=a.train_lines, binarize=not a.no_binarize)
        return {"out": str(a.out)}
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
