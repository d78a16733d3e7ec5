"""What every trainer shares: atomic writes, checkpoints that resume, seeding, JSON-lines metric logs.

A crash or a full disk in the middle of a save must never leave a half-written file where a good one was:
everything is written to a temporary file in the same directory, fsynced, then ``os.replace``-d.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_save",
    "atomic_write_text",
    "atomic_write_json",
    "load_checkpoint",
    "latest_checkpoint",
    "JsonlLogger",
    "seed_everything",
    "rng_state",
    "set_rng_state",
]


def _atomic_replace(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename)."""
    return _atomic_replace(Path(path), lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return _atomic_replace(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    return atomic_write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n", path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`atomic_save` with ``weights_only=True``.

    Our checkpoints hold only tensors and plain Python containers, so the safe unpickler suffices; a file
    that needs arbitrary code to unpickle is refused rather than executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt / truncated / foreign file
        raise RuntimeError(f"cannot load checkpoint {path}: {exc}") from exc


def latest_checkpoint(directory: str | os.PathLike, pattern: str = "checkpoint_*.pt") -> Path | None:
    """The most recently written checkpoint in ``directory`` (by mtime), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class JsonlLogger:
    """Append one JSON object per line (flushed at once) so a crashed run keeps every metric logged so far."""

    def __init__(self, path: str | os.PathLike | None, enabled: bool = True):
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _to_jsonable(v) for k, v in record.items()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def read(self) -> list[dict]:
        if self.path is None or not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All RNG states as plain containers/tensors (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), *npst[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
