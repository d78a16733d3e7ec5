"""Small data subsets shipped inside the package, so demos and tests work from a wheel as from the repo.

The files live in ``mhe_plugins/data/<name>/`` (the repository's top-level ``data`` is a symlink to it).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLED", "DATA_ROOT", "bundled_data"]

DATA_ROOT = Path(__file__).resolve().parent / "data"

#: name -> what it is (the sub-directory of ``DATA_ROOT``).
BUNDLED: dict[str, str] = {
    "glyphs": "500 GB2312 level-1 glyph classes, 32x32 grey, train/valid/test by font (timm, face, core tests)",
    "wordnet_xmc": "WordNet-XMC: 13,723 labels, raw text, xz (XMC)",
    "ddtp_sample": "Debian DDTP en-de sample pairs and source formats (fairseq)",
}


def bundled_data(name: str) -> Path:
    """Directory of the bundled subset ``name``; raises ``ValueError`` for an unknown name and
    ``FileNotFoundError`` if the installation lacks it (e.g. a wheel built without package data)."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled data set {name!r}; bundled: {sorted(BUNDLED)}")
    path = DATA_ROOT / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"bundled data set {name!r} is missing at {path}: this installation of mhe-plugins lacks its package data"
        )
    return path
