"""Checkpoints that survive ``kill -9`` and full disks at any moment, and never unpickle code.

Two shapes cover the trainers:

* :class:`LastBestCheckpoint` — ``last.pt`` (everything needed to resume) plus ``best.pt`` (the weights that
  scored best on validation). ``last.pt`` is the commit point: ``best.pt`` is written first, the previous
  best is kept as ``best.pt.prev`` until ``last.pt`` is replaced, and :meth:`LastBestCheckpoint.recover`
  rolls an uncommitted ``best.pt`` back after a kill, so ``best.pt`` always matches what ``last.pt`` and the
  logs say.
* :class:`ShardedCheckpoint` — several files per checkpoint (e.g. one head shard per rank) in a
  ``step-<n>/`` folder that counts only once its ``MANIFEST.json``, written last by rank 0, names every
  file with its size. Resume takes the newest complete folder, so a kill between files loses at most the
  checkpoint being written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_save, atomic_write_json

__all__ = ["load_checkpoint", "latest_checkpoint", "LastBestCheckpoint", "ShardedCheckpoint", "CheckpointRef"]


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict:
    """Load a checkpoint written by :func:`atomic_save` with ``weights_only=True``.

    Our checkpoints hold only tensors and plain Python containers, so the safe unpickler suffices; a file
    that needs arbitrary code to unpickle is refused rather than executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # corrupt / truncated / foreign file
        raise RuntimeError(f"cannot load checkpoint {path}: {exc}") from exc


def latest_checkpoint(directory: str | os.PathLike, pattern: str = "checkpoint_*.pt") -> Path | None:
    """The most recently written checkpoint in ``directory`` (by mtime), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class LastBestCheckpoint:
    """``last.pt`` + ``best.pt`` in ``directory``, kept consistent across kills (see module docstring).

    Both states must carry an integer ``"epoch"`` (or whatever ``key`` names): it is how :meth:`recover`
    tells a committed ``best.pt`` from one written just before a kill.
    """

    def __init__(
        self, directory: str | os.PathLike, last: str = "last.pt", best: str = "best.pt", key: str = "epoch"
    ):
        self.dir = Path(directory)
        self.last, self.best, self.key = self.dir / last, self.dir / best, key
        self.prev = self.dir / f"{best}.prev"

    def _position(self, path: Path) -> int | None:
        if not path.is_file():
            return None
        try:
            return int(load_checkpoint(path, mmap=True)[self.key])
        except Exception:
            return None  # unreadable: treated as absent

    def recover(self) -> list[str]:
        """Undo what a kill left half-done; returns a message per repair (empty when nothing was needed)."""
        notes: list[str] = []
        committed = self._position(self.last)
        best_at = self._position(self.best)
        uncommitted_best = best_at is not None and (committed is None or best_at > committed)
        if self.prev.exists():
            if best_at is None or uncommitted_best:
                os.replace(self.prev, self.best)
                notes.append(
                    f"restored {self.best} from {self.prev.name} (the newer best was never committed)"
                )
            else:
                self.prev.unlink()
        elif uncommitted_best:
            self.best.unlink()
            notes.append(f"removed {self.best}: written at {self.key} {best_at} after the last commit")
        return notes

    def save(self, last_state: Mapping[str, Any], best_state: Mapping[str, Any] | None = None) -> None:
        """Write ``best_state`` (when given) then ``last_state``; ``last.pt`` is the commit point."""
        if best_state is not None:
            if self.best.exists():
                os.replace(self.best, self.prev)
            atomic_save(dict(best_state), self.best)
        atomic_save(dict(last_state), self.last)
        self.prev.unlink(missing_ok=True)

    def load_last(self, map_location: str | torch.device = "cpu") -> dict | None:
        return load_checkpoint(self.last, map_location) if self.last.is_file() else None


@dataclass(frozen=True)
class CheckpointRef:
    """A complete sharded checkpoint: its step, folder and manifest."""

    step: int
    path: Path
    manifest: dict = field(repr=False)

    def file(self, name: str) -> Path:
        return self.path / name

    def load(self, name: str, map_location: str | torch.device = "cpu") -> dict:
        return load_checkpoint(self.path / name, map_location)


class ShardedCheckpoint:
    """Checkpoints made of several files, committed by a manifest written last (see module docstring)."""

    MANIFEST = "MANIFEST.json"

    def __init__(self, root: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.keep = Path(root), int(keep)

    def folder(self, step: int) -> Path:
        return self.root / f"step-{int(step):010d}"

    def write(self, step: int, name: str, obj: Any) -> Path:
        """Write one file of the checkpoint at ``step`` (any rank; the checkpoint is not visible yet)."""
        return atomic_save(obj, self.folder(step) / name)

    def commit(self, step: int, names: Iterable[str], meta: Mapping[str, Any] | None = None) -> CheckpointRef:
        """Make the checkpoint at ``step`` visible (rank 0, after every rank wrote its files), then prune."""
        folder = self.folder(step)
        files = {}
        for name in names:
            p = folder / name
            if not p.is_file():
                raise FileNotFoundError(f"cannot commit checkpoint {folder}: {name} was not written")
            files[name] = p.stat().st_size
        manifest = {"step": int(step), "files": files, "meta": dict(meta or {})}
        atomic_write_json(manifest, folder / self.MANIFEST)
        self._prune(int(step))
        return CheckpointRef(int(step), folder, manifest)

    def _scan(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.glob("step-*"):
            try:
                found.append((int(p.name[5:]), p))
            except ValueError:
                continue
        return sorted(found)

    def _check(self, step: int, folder: Path) -> CheckpointRef | None:
        mf = folder / self.MANIFEST
        if not mf.is_file():
            return None
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
            ok = all(
                (folder / n).is_file() and (folder / n).stat().st_size == int(s)
                for n, s in manifest["files"].items()
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return CheckpointRef(step, folder, manifest) if ok else None

    def complete(self) -> list[CheckpointRef]:
        """Every complete checkpoint, oldest first."""
        return [r for s, p in self._scan() if (r := self._check(s, p)) is not None]

    def latest(self) -> CheckpointRef | None:
        """The newest complete checkpoint (incomplete newer folders are skipped), or None."""
        for s, p in reversed(self._scan()):
            ref = self._check(s, p)
            if ref is not None:
                return ref
        return None

    def _prune(self, newest: int) -> None:
        complete = [r.step for r in self.complete()]
        keep = set(complete[-self.keep :])
        for s, p in self._scan():
            if s in keep or s > newest:
                continue
            shutil.rmtree(p, ignore_errors=True)
