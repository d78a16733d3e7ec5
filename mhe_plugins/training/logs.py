"""JSON-lines metric logs that survive crashes and do not duplicate rows after a resume."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write_text, write_error

__all__ = ["JsonlLogger"]


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
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
        except OSError as exc:
            raise write_error(self.path, exc) from exc

    def read(self) -> list[dict]:
        """Every complete row; a last line cut short by a kill is ignored."""
        if self.path is None or not self.path.exists():
            return []
        rows = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if line.endswith("\n"):
                        raise ValueError(f"{self.path}: corrupt log line {line[:80]!r}") from None
        return rows

    def truncate(self, keep: Callable[[dict], bool]) -> int:
        """Keep only rows for which ``keep(row)`` holds (call on resume with "logged at or before the
        checkpoint"), so rows the resumed run will log again appear once. Returns how many rows went."""
        if not self.enabled or not self.path.exists():
            return 0
        rows = self.read()
        kept = [r for r in rows if keep(r)]
        atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), self.path)
        return len(rows) - len(kept)


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
