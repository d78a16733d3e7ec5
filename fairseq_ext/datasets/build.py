"""Build the DDTP (+ LibreOffice help/UI) parallel corpus from Debian packages: fetch, align, split, BPE."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from . import corpus, debian, libreoffice

SOURCES = ("ddtp", "lo-help", "lo-ui")
DEFAULT_CACHE = Path.home() / ".cache" / "mhe_plugins" / "ddtp"


def _lo_code(lang: str) -> str:
    """Debian package suffix of a LibreOffice language (English help is ``en-us``)."""
    return "en-us" if lang == "en" else lang.lower().replace("_", "-")


def fetch_lists(langs: tuple[str, str]) -> None:
    """``apt-get update`` with the DDTP languages enabled (needs root; it is how apt itself gets them)."""
    cmd = ["apt-get", "update", "-o", f"Acquire::Languages={','.join(langs)}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def fetch_package(pkg: str, cache: Path) -> Path:
    """``apt-get download`` + ``dpkg -x`` one package into ``cache/<pkg>`` (reused when present)."""
    dest = cache / pkg
    if dest.is_dir():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    for cmd in (["apt-get", "download", pkg],):
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=cache, stdout=subprocess.DEVNULL)
    debs = sorted(cache.glob(f"{pkg}_*.deb"))
    if not debs:
        raise FileNotFoundError(f"apt-get download {pkg} left no {pkg}_*.deb in {cache}")
    tmp = cache / f".{pkg}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(tmp)], check=True)
    tmp.rename(dest)
    return dest


def _help_dir(extracted: Path) -> Path:
    langs = [p for p in (extracted / "usr/share/libreoffice/help").iterdir() if (p / "text").is_dir()]
    if len(langs) != 1:
        raise FileNotFoundError(f"{extracted}: expected one language dir under usr/share/libreoffice/help")
    return langs[0]


def collect_pairs(
    langs: tuple[str, str], sources: tuple[str, ...], apt_lists: Path, cache: Path, fetch: bool
) -> dict[str, list[tuple[str, str]]]:
    """Raw aligned pairs per source (before cleaning)."""
    src, tgt = langs
    out: dict[str, list[tuple[str, str]]] = {}
    if "ddtp" in sources:
        try:
            paths = [debian.find_translation_file(apt_lists, lang) for lang in langs]
        except FileNotFoundError:
            if not fetch:
                raise
            fetch_lists(langs)
            paths = [debian.find_translation_file(apt_lists, lang) for lang in langs]
        maps = [debian.parse_translation(debian.read_text(p), str(p)) for p in paths]
        out["ddtp"] = list(debian.ddtp_pairs(*maps))
    if "lo-help" in sources or "lo-ui" in sources:
        get = (lambda pkg: fetch_package(pkg, cache)) if fetch else (lambda pkg: _existing(cache / pkg))
        if "lo-help" in sources:
            roots = [_help_dir(get(f"libreoffice-help-{_lo_code(lang)}")) for lang in langs]
            out["lo-help"] = list(libreoffice.help_pairs(*roots))
        if "lo-ui" in sources:
            if src != "en":
                raise ValueError(f"lo-ui pairs have English msgids; source language must be en, got {src!r}")
            out["lo-ui"] = list(libreoffice.ui_pairs(get(f"libreoffice-l10n-{_lo_code(tgt)}")))
    return out


def _existing(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: missing (run without --no-fetch, or dpkg -x the package there)")
    return path


def build(
    out: Path,
    langs: tuple[str, str] = ("en", "de"),
    sources: tuple[str, ...] = SOURCES,
    apt_lists: Path = Path("/var/lib/apt/lists"),
    cache: Path = DEFAULT_CACHE,
    fetch: bool = True,
    vocab_sizes: tuple[int, ...] = (8000,),
    n_valid: int = 1500,
    n_test: int = 2000,
    seed: int = 1,
    max_words: int = 150,
) -> dict:
    """Build ``out/raw/{split}.{lang}``, ``out/spm{V}.model`` and ``out/bpe{V}/{split}.{lang}``; returns stats."""
    bad = set(sources) - set(SOURCES)
    if bad:
        raise ValueError(f"unknown source(s) {sorted(bad)}; choose from {SOURCES}")
    per_source = collect_pairs(langs, sources, Path(apt_lists), Path(cache), fetch)
    pairs = corpus.clean_pairs((p for s in sources for p in per_source.get(s, [])), max_words=max_words)
    splits = corpus.split_by_source(pairs, n_valid, n_test, seed)
    raw = Path(out) / "raw"
    for name, ps in splits.items():
        corpus.write_split(raw, name, ps, *langs)
    train_text = [s for s, _ in splits["train"]] + [t for _, t in splits["train"]]
    for v in vocab_sizes:
        model = corpus.train_sentencepiece(train_text, Path(out) / f"spm{v}", v, seed=seed)
        for name in corpus.SPLITS:
            corpus.encode_split(model, raw, Path(out) / f"bpe{v}", name, langs)
    stats = {
        "langs": list(langs),
        "raw_pairs_per_source": {k: len(v) for k, v in per_source.items()},
        "unique_pairs_per_source": {k: len(set(v)) for k, v in per_source.items()},
        "pairs": len(pairs),
        "splits": {k: len(v) for k, v in splits.items()},
        "src_tokens_train": sum(len(s.split()) for s, _ in splits["train"]),
        "tgt_tokens_train": sum(len(t.split()) for _, t in splits["train"]),
        "vocab_sizes": list(vocab_sizes),
        "seed": seed,
    }
    corpus.write_stats(Path(out), stats)
    return stats
