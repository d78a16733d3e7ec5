"""The committed DDTP sample (``data/ddtp_sample/*.gz``) -> raw text, joint BPE and fairseq binaries.

``fairseq-preprocess`` reads plain text only, so the ``.gz`` splits are unpacked first; the layout matches
what ``python -m fairseq_ext.datasets ddtp`` writes (``raw/``, ``spm{V}.model``, ``bpe{V}/``), plus the
binarised ``bin{V}/`` that ``fairseq-train`` reads.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

from mhe_plugins.training import atomic_write_text

from .corpus import SPLITS, encode_split, train_sentencepiece

DEFAULT_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "ddtp_sample"

__all__ = ["DEFAULT_SAMPLE", "build_sample"]


def build_sample(
    out: Path,
    sample: Path = DEFAULT_SAMPLE,
    langs: tuple[str, str] = ("en", "de"),
    vocab: int = 600,
    train_lines: int | None = None,
    binarize: bool = True,
) -> Path:
    """Unpack, BPE-encode and (``binarize``) run ``fairseq-preprocess --joined-dictionary``; returns ``out``."""
    missing = [
        f"{s}.{lang}.gz" for s in SPLITS for lang in langs if not (sample / f"{s}.{lang}.gz").is_file()
    ]
    if missing:
        raise FileNotFoundError(f"{sample}: missing {', '.join(missing)} (the committed data/ddtp_sample)")
    raw = out / "raw"
    counts = {}
    for split in SPLITS:
        for lang in langs:
            with gzip.open(sample / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
                lines = f.read().splitlines(keepends=True)
            if split == "train" and train_lines is not None:
                lines = lines[:train_lines]
            counts.setdefault(split, set()).add(len(lines))
            atomic_write_text("".join(lines), raw / f"{split}.{lang}")
    for split, n in counts.items():
        if len(n) != 1:
            raise ValueError(f"{sample}: {split} has different line counts per language {sorted(n)}")
    text = [x for lang in langs for x in (raw / f"train.{lang}").read_text(encoding="utf-8").splitlines()]
    model = train_sentencepiece(text, out / f"spm{vocab}", vocab)
    for split in SPLITS:
        encode_split(model, raw, out / f"bpe{vocab}", split, langs)
    if binarize:
        bpe, dest = out / f"bpe{vocab}", out / f"bin{vocab}"
        cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", langs[0]]
        cmd += ["--target-lang", langs[1], "--destdir", str(dest), "--joined-dictionary", "--workers", "1"]
        for split in SPLITS:
            cmd += [f"--{split}pref", str(bpe / split)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"fairseq-preprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"{out}: raw/, spm{vocab}.model, bpe{vocab}/" + (f", bin{vocab}/" if binarize else ""))
    return out
