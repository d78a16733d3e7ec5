"""Corpus assembly: clean + dedupe pairs, a seeded source-disjoint valid/test split, joint sentencepiece BPE."""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from mhe_plugins.training import atomic_write_json, atomic_write_text

SPLITS = ("train", "valid", "test")


def clean_pairs(
    pairs: Iterable[tuple[str, str]], max_words: int = 150, max_ratio: float = 3.0
) -> list[tuple[str, str]]:
    """Whitespace-normalised, deduplicated pairs (first occurrence order), dropping empty/overlong/misaligned."""
    seen: set[tuple[str, str]] = set()
    out = []
    for s, t in pairs:
        s, t = re.sub(r"\s+", " ", s).strip(), re.sub(r"\s+", " ", t).strip()
        ns, nt = len(s.split()), len(t.split())
        if not ns or not nt or ns > max_words or nt > max_words:
            continue
        if max(ns, nt) > max_ratio * min(ns, nt) + 3:  # length ratio filter for paragraph misalignments
            continue
        if (s, t) not in seen:
            seen.add((s, t))
            out.append((s, t))
    return out


def split_by_source(
    pairs: list[tuple[str, str]], n_valid: int, n_test: int, seed: int
) -> dict[str, list[tuple[str, str]]]:
    """Seeded split over *distinct source sentences*, so no valid/test source ever appears in train."""
    sources = sorted({s for s, _ in pairs})
    if n_valid + n_test >= len(sources):
        raise ValueError(
            f"valid+test ({n_valid}+{n_test}) needs fewer than the {len(sources)} distinct sources"
        )
    random.Random(seed).shuffle(sources)
    which = {s: "test" for s in sources[:n_test]}
    which.update({s: "valid" for s in sources[n_test : n_test + n_valid]})
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in SPLITS}
    for s, t in pairs:
        out[which.get(s, "train")].append((s, t))
    return out


def write_split(out_dir: Path, name: str, pairs: list[tuple[str, str]], src: str, tgt: str) -> None:
    """``name.src`` / ``name.tgt`` line-aligned files (written atomically)."""
    atomic_write_text("".join(s + "\n" for s, _ in pairs), out_dir / f"{name}.{src}")
    atomic_write_text("".join(t + "\n" for _, t in pairs), out_dir / f"{name}.{tgt}")


def train_sentencepiece(
    texts: Iterable[str], model_prefix: Path, vocab_size: int, seed: int = 1, threads: int = 2
) -> Path:
    """Joint BPE model over source+target training text; returns the ``.model`` path."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.writelines(t + "\n" for t in texts)
        path = f.name
    try:
        spm.SentencePieceTrainer.train(
            input=path,
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=1_000_000,
            num_threads=threads,
            # fairseq's Dictionary adds its own <s>,<pad>,</s>,<unk>: keep spm's specials out of the pieces
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            unk_id=0,
            minloglevel=2,
        )
    finally:
        os.unlink(path)
    return model_prefix.with_suffix(".model")


def encode_split(model: Path, raw_dir: Path, bpe_dir: Path, name: str, langs: tuple[str, str]) -> None:
    """Apply the sentencepiece model to one split, writing space-separated pieces for fairseq-preprocess."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    for lang in langs:
        lines = (raw_dir / f"{name}.{lang}").read_text(encoding="utf-8").splitlines()
        pieces = sp.encode(lines, out_type=str)
        atomic_write_text("".join(" ".join(p) + "\n" for p in pieces), bpe_dir / f"{name}.{lang}")


def write_stats(out_dir: Path, stats: dict) -> None:
    atomic_write_json(stats, out_dir / "stats.json")
    print(json.dumps(stats, indent=1))
