"""Run keys and the committed run store: what lets every benchmark skip the runs it already finished.

Why one place: a benchmark runs for hours and is killed, split over processes, or rerun on a fresh machine.
Each finished run's figures go to one small JSON file (``<store>/<name>.json``, committed beside the
results), so a rerun with the same arguments finds it and does not train again, even when the work dir
(checkpoints, logs) is gone. A record that carries a ``key`` (every setting that shapes the run) is reused
only on an exact match, and a mismatch is said out loud, never silently retrained or silently mixed in.

File formats (unchanged from the per-bench stores they replace, so stored results keep loading):
plain records (the run's own summary, e.g. timm's ``summary.json`` or xmc's figures) or keyed records
``{"key": {...}, ...}``; :class:`KeyedFile` keeps several keyed records in one file under names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..training import atomic_copy, atomic_write_json

__all__ = ["RunStore", "KeyedFile", "settings_key", "key_diff", "cached_result", "read_json"]

Say = Callable[[str], object]


def _print(msg: str) -> None:
    print(msg, flush=True)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def settings_key(settings: object, fields: Iterable[str], **fixed: Any) -> dict:
    """A run key: ``fixed`` entries first, then ``settings.<field>`` for every field (an argparse namespace)."""
    return {**fixed, **{k: getattr(settings, k) for k in fields}}


def key_diff(saved: Mapping | None, key: Mapping) -> list[str]:
    """The entries of ``key`` that ``saved`` lacks or holds with another value, sorted."""
    saved = saved or {}
    return sorted(k for k in key if saved.get(k) != key[k])


def _matches(record: Mapping, key: Mapping | None, where: object, say: Say) -> bool:
    if key is None or record.get("key") == key:
        return True
    diff = key_diff(record.get("key"), key)
    say(f"{where}: made with other settings ({', '.join(diff)} differ): not reused")
    return False


class RunStore:
    """One JSON file per finished run, ``root/<name><suffix>``; names are the bench's run names
    (``linear_seed0``, ``v8000_ce``, ...)."""

    def __init__(self, root: str | os.PathLike, suffix: str = ".json", say: Say = _print):
        self.root = Path(root)
        self.suffix = suffix
        self.say = say

    def path(self, name: str) -> Path:
        return self.root / f"{name}{self.suffix}"

    def names(self) -> list[str]:
        """Every stored run name, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(self.suffix)] for p in self.root.glob(f"*{self.suffix}") if p.is_file())

    def load(self, name: str, key: Mapping | None = None) -> dict | None:
        """The stored record of ``name`` (with ``key``: only when it was made with exactly that key)."""
        return self.find(name, key=key)

    def find(
        self, name: str, key: Mapping | None = None, local: str | os.PathLike | None = None
    ) -> dict | None:
        """The finished run's record: the work dir's own file ``local`` when it exists (the freshest copy),
        else the store's; None when neither exists or the record was made with another ``key``."""
        path = Path(local) if local is not None and Path(local).is_file() else self.path(name)
        if not path.is_file():
            return None
        record = read_json(path)
        return record if _matches(record, key, path, self.say) else None

    def save(self, name: str, record: Any) -> Path:
        """Store a finished run's record (atomic: the store never holds half a file)."""
        return atomic_write_json(record, self.path(name))

    def keep(self, name: str, src: str | os.PathLike) -> Path:
        """Store a byte copy of a finished run's own file (e.g. its ``summary.json``)."""
        return atomic_copy(src, self.path(name))

    def run_or_reuse(
        self,
        name: str,
        run: Callable[[], Any],
        key: Mapping | None = None,
        *,
        local: str | os.PathLike | None = None,
        done: Callable[[Any], bool] | None = None,
        may_run: bool = True,
        force: bool = False,
        on_stored: Callable[[], object] | None = None,
    ) -> Any:
        """The resume-skip rule every bench follows, for the run ``name``.

        Reuse the record found by :meth:`find` (made with ``key``; ``done(record)`` says whether it is
        finished) unless ``force``. Else, when ``may_run``, call ``run()`` and store its finished record (a
        byte copy of ``local`` when the run wrote one there, else the record) before ``on_stored()`` runs,
        e.g. to rewrite the report. None when there is nothing finished (another process runs it)."""
        finished = done or (lambda record: True)
        if not force:
            found = self.find(name, key, local)
            if found is not None and finished(found):
                return found
        if not may_run:
            return None
        record = run()
        if record is None or not finished(record):
            return None
        if local is not None and Path(local).is_file():
            self.keep(name, local)
        else:
            self.save(name, record)
        if on_stored is not None:
            on_stored()
        return record


class KeyedFile:
    """Several keyed results in one JSON file, ``{name: {"key": {...}, "result": ...}}``: a cache of
    measurements (e.g. timings) that an interrupted rerun completes instead of redoing."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict = read_json(self.path) if self.path.is_file() else {}

    def get(self, name: str, key: Mapping) -> Any | None:
        rec = self.records.get(name, {})
        return rec.get("result") if rec.get("key") == key else None

    def put(self, name: str, key: Mapping, result: Any) -> Any:
        self.records[name] = {"key": dict(key), "result": result}
        atomic_write_json(self.records, self.path)
        return result

    def get_or_compute(self, name: str, key: Mapping, compute: Callable[[], Any]) -> Any:
        found = self.get(name, key)
        return found if found is not None else self.put(name, key, compute())


def cached_result(path: str | os.PathLike, key: Mapping, compute: Callable[[], Any]) -> Any:
    """``compute()``'s result, kept in ``path`` as ``{"key", "result"}`` and reused while the key matches."""
    path = Path(path)
    if path.is_file():
        old = read_json(path)
        if old.get("key") == key:
            return old["result"]
    res = compute()
    atomic_write_json({"key": dict(key), "result": res}, path)
    return res
