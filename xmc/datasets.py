"""Build WordNet-XMC: a real multi-label text set from Debian's ``wordnet-base`` files.

One document per noun/verb synset; text = its lemmas and gloss; labels = every hypernym ancestor
(transitive closure of ``@`` and ``@i`` pointers). The few near-universal ancestors (entity, ...)
are dropped and labels need >= 2 documents. Output is the AttentionXML/LightXML raw-text format, so
the trainer reads it like any other dataset.

    python -m xmc.datasets wordnet --out data/wordnet_xmc [--wordnet-dir /usr/share/wordnet] [--compress xz]
    python -m xmc.datasets foldoc --out DIR [--dict-dir /usr/share/dictd]      # second set, see xmc.foldoc
"""

from __future__ import annotations

import argparse
import json
import lzma
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmc.foldoc import DEFAULT_DICT_DIR, build_foldoc_xmc
from xmc.io import atomic_directory

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
HYPERNYM_POINTERS = ("@", "@i")


@dataclass
class Synset:
    key: str  # pos + offset, e.g. "n02084071"
    lemmas: list[str]
    gloss: str
    hypernyms: list[str]

    @property
    def token(self) -> str:
        """Readable, unique label token: first lemma, pos, offset (``dog.n.02084071``)."""
        return f"{self.lemmas[0].lower().replace(' ', '_')}.{self.key[0]}.{self.key[1:]}"


def parse_data_file(path: Path, pos: str) -> dict[str, Synset]:
    """Parse a WordNet ``data.{noun,verb}`` file (format: wndb(5WN))."""
    out: dict[str, Synset] = {}
    with open(path, encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.startswith("  ") or not line.strip():
                continue  # licence header
            head, sep, gloss = line.partition(" | ")
            t = head.split()
            try:
                if not sep:
                    raise ValueError("no ' | ' gloss separator")
                w_cnt = int(t[3], 16)
                lemmas = [t[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
                p_cnt = int(t[4 + 2 * w_cnt])
                base = 5 + 2 * w_cnt
                ptrs = [t[base + 4 * i : base + 4 * i + 4] for i in range(p_cnt)]
                if any(len(p) != 4 for p in ptrs):
                    raise ValueError(f"declares {p_cnt} pointers but the line is shorter")
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: malformed synset line ({exc}): {line[:80]!r}") from exc
            key = pos + t[0]
            hyp = [p[2] + p[1] for p in ptrs if p[0] in HYPERNYM_POINTERS]
            out[key] = Synset(key, lemmas, gloss.strip(), hyp)
    return out


def ancestors(synsets: dict[str, Synset]) -> dict[str, frozenset[str]]:
    """Transitive closure of the hypernym relation, memoised, without recursion."""
    memo: dict[str, frozenset[str]] = {}
    for root in synsets:
        stack = [root]
        while stack:
            k = stack[-1]
            if k in memo:
                stack.pop()
                continue
            todo = [h for h in synsets[k].hypernyms if h not in memo]
            if todo:
                stack.extend(todo)
                continue
            acc: set[str] = set()
            for h in synsets[k].hypernyms:
                acc.add(h)
                acc |= memo[h]
            memo[k] = frozenset(acc)
            stack.pop()
    return memo


def build_wordnet_xmc(
    wordnet_dir: str | Path = DEFAULT_WORDNET_DIR,
    drop_top: int = 5,
    min_docs: int = 2,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> tuple[dict[str, list[tuple[str, list[str]]]], dict]:
    """Return ``{split: [(text, label_tokens), ...]}`` and a statistics dict."""
    wordnet_dir = Path(wordnet_dir)
    synsets: dict[str, Synset] = {}
    for pos, name in (("n", "data.noun"), ("v", "data.verb")):
        path = wordnet_dir / name
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: install Debian's wordnet-base (apt-get download wordnet-base && "
                "dpkg -x wordnet-base_*.deb DIR) and pass --wordnet-dir DIR/usr/share/wordnet"
            )
        synsets.update(parse_data_file(path, pos))
    anc = ancestors(synsets)
    freq = Counter(a for k in synsets for a in anc[k])
    dropped = [a for a, _ in freq.most_common(drop_top)]
    keep = {a for a, c in freq.items() if c >= min_docs} - set(dropped)
    docs = []
    for k, s in synsets.items():
        labels = sorted(synsets[a].token for a in anc[k] if a in keep)
        if labels:  # policy: documents left without labels after filtering are dropped
            text = ", ".join(s.lemmas) + "; " + " ".join(s.gloss.split())
            docs.append((text, labels))
    if not docs:
        raise ValueError(
            f"{wordnet_dir}: no document keeps a label (drop_top={drop_top}, min_docs={min_docs})"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    n_train = int(round(fractions[0] * len(docs)))
    n_valid = int(round(fractions[1] * len(docs)))
    cuts = {
        "train": order[:n_train],
        "valid": order[n_train : n_train + n_valid],
        "test": order[n_train + n_valid :],
    }
    splits = {name: [docs[i] for i in sorted(idx)] for name, idx in cuts.items()}
    n_labels = len({lab for _, labs in docs for lab in labs})
    stats = {
        "synsets_parsed": len(synsets),
        "documents": len(docs),
        "labels": n_labels,
        "labels_per_doc": round(sum(len(labs) for _, labs in docs) / len(docs), 3),
        "dropped_top_labels": [synsets[a].token for a in dropped],
        "min_docs_per_label": min_docs,
        "seed": seed,
        "splits": {k: len(v) for k, v in splits.items()},
    }
    return splits, stats


def _one_line(text: str, name: str, row: int) -> str:
    """``text`` if it is one line by the readers' rules (``xmc.io.read_lines``), else an error: a written
    ``\\n``, ``\\r`` or BOM would split the document or be refused when the set is read back."""
    for ch in ("\n", "\r", "\ufeff"):
        if ch in text:
            raise ValueError(f"{name}: row {row} contains {ch!r} ({text[:60]!r}); one document per line")
    return text


def write_raw_dataset(
    splits: dict[str, list[tuple[str, list[str]]]],
    out: str | Path,
    compress: str = "none",
    overwrite: bool = False,
    stats: dict | None = None,
) -> None:
    """Write ``{split}_texts.txt`` / ``{split}_labels.txt`` (+ stats.json) atomically (optionally ``.xz``)."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if stats is not None:
            (tmp / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        for split, rows in splits.items():
            for kind, lines in (
                ("texts", (t for t, _ in rows)),
                ("labels", (" ".join(ls) for _, ls in rows)),
            ):
                name = f"{split}_{kind}.txt"
                data = "".join(_one_line(line, name, i) + "\n" for i, line in enumerate(lines, 1))
                data = data.encode("utf-8")
                if compress == "xz":
                    (tmp / (name + ".xz")).write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
                else:
                    (tmp / name).write_bytes(data)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m xmc.datasets", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="name", required=True)
    wn = sub.add_parser("wordnet", help="build WordNet-XMC from wordnet-base files")
    wn.add_argument("--out", required=True, help="output directory (raw-text XMC format)")
    wn.add_argument("--wordnet-dir", default=DEFAULT_WORDNET_DIR, help="dir holding data.noun/data.verb")
    wn.add_argument("--drop-top", type=int, default=5, help="drop the N most frequent (trivial) labels")
    wn.add_argument("--min-docs", type=int, default=2, help="keep labels with at least this many documents")
    wn.add_argument("--seed", type=int, default=0, help="seed of the 80/10/10 train/valid/test split")
    wn.add_argument("--compress", choices=["none", "xz"], default="none")
    wn.add_argument("--overwrite", action="store_true")
    fd = sub.add_parser("foldoc", help="build FOLDOC-XMC (see-also labels) from dict-foldoc files")
    fd.add_argument("--out", required=True, help="output directory (raw-text XMC format)")
    fd.add_argument("--dict-dir", default=DEFAULT_DICT_DIR, help="dir holding foldoc.index/foldoc.dict.dz")
    fd.add_argument("--min-docs", type=int, default=2, help="keep labels with at least this many documents")
    fd.add_argument("--seed", type=int, default=0, help="seed of the 80/10/10 train/valid/test split")
    fd.add_argument("--compress", choices=["none", "xz"], default="none")
    fd.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:  # fail before the work, not after
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    if args.name == "foldoc":
        splits, stats = build_foldoc_xmc(args.dict_dir, args.min_docs, args.seed)
    else:
        splits, stats = build_wordnet_xmc(args.wordnet_dir, args.drop_top, args.min_docs, args.seed)
    write_raw_dataset(splits, out, compress=args.compress, overwrite=args.overwrite, stats=stats)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
