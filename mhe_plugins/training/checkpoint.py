"""Checkpoints that survive ``kill -9`` and full disks at any moment, and never unpickle code.

Two shapes cover the trainers:

* :class:`~mhe_plugins.training.state.TrainState` — ``last.pt`` (the commit point) plus ``best.pt``, with
  roll-forward recovery (its own module).
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

__all__ = ["load_checkpoint", "latest_checkpoint", "ShardedCheckpoint", "CheckpointRef"]


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict:
    """Load a checkpoint written by :func:`atomic_save` with ``weights_only=True``.

    Our checkpoints hold only tensors and plain Python containers, so the safe unpickler suffices; a file
    that needs arbitrary code to unpickle is refused rather than executed. ``weights_only=True`` is passed
    explicitly, which torch keeps even under ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``.
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

    def recover(self) -> list[str]:
        """Finish what a kill interrupted after a commit: folders older than the newest complete checkpoint
        that are beyond ``keep`` or half-deleted. Newer incomplete folders are left (the next save of that
        step replaces them); nothing a resume could need is removed."""
        latest = self.latest()
        if latest is None:
            return []
        before = {p for _, p in self._scan()}
        self._prune(latest.step)
        return [
            f"removed {p.name} (pruning was interrupted)"
            for p in sorted(before - {p for _, p in self._scan()})
        ]

    def _prune(self, newest: int) -> None:
        complete = [r.step for r in self.complete()]
        keep = set(complete[-self.keep :])
        for s, p in self._scan():
            if s in keep or s > newest:
                continue
            shutil.rmtree(p, ignore_errors=True)
