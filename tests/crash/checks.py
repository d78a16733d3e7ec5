"""Comparisons the invariants need: checkpoint tensors, JSON-lines logs. Pure functions over files, so
they hold whatever code wrote the files."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .trainers import Trainer

# fairseq pickles an argparse.Namespace into its checkpoints (the plugin allow-lists exactly this class)
torch.serialization.add_safe_globals([argparse.Namespace])


def load(path: Path) -> Any:
    """A checkpoint, loaded the safe way (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts/lists, by dotted path."""
    found: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        found[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            found.update(tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found.update(tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return found


def _tensor_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], limit: int = 3) -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            out.append(f"{key} only in {'recovered' if x is None else 'reference'}")
        elif x.dtype != y.dtype or x.shape != y.shape:
            out.append(f"{key} {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
        elif not torch.equal(x, y):
            if x.is_floating_point():
                diff = (x.double() - y.double()).abs().nan_to_num(float("inf")).max().item()
                out.append(f"{key} differs (max |diff| {diff:.3g})")
            else:
                out.append(f"{key} differs")
        if len(out) >= limit:
            out.append("...")
            break
    return out


def _split(flat: dict[str, torch.Tensor], keys: Iterable[str]) -> tuple[dict, dict]:
    """(weights, rest): a tensor is a weight when its path starts with one of ``keys`` ('' = all)."""
    keys = tuple(keys)
    weights, rest = {}, {}
    for path, t in flat.items():
        is_weight = any(k == "" or path == k or path.startswith(k + ".") for k in keys)
        (weights if is_weight else rest)[path] = t
    return weights, rest


def _drop(flat: dict[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    prefixes = tuple(prefixes)
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in prefixes)}


def compare_checkpoints(trainer: Trainer, ref: Path, out: Path) -> list[tuple[str, str]]:
    """(a): every checkpoint of the reference run exists in the recovered run with bit-identical weights
    (``weights_equal``) and identical other tensors: optimizer, RNG, SWA... (``state_equal``)."""
    problems = []
    got = trainer.checkpoints(out)
    for name, ref_path in trainer.checkpoints(ref).items():
        path = got.get(name)
        if path is None or not path.is_file():
            problems.append(("weights_equal", f"{name}: missing after recovery"))
            continue
        try:
            a, b = tensors(load(ref_path)), tensors(load(path))
        except Exception as exc:
            problems.append(("weights_equal", f"{name}: cannot load {path.name}: {exc}"))
            continue
        keys = trainer.weight_keys.get(name, trainer.default_weight_keys)
        a, b = _drop(a, trainer.state_ignore), _drop(b, trainer.state_ignore)
        (wa, ra), (wb, rb) = _split(a, keys), _split(b, keys)
        if diff := _tensor_diff(wa, wb):
            problems.append(("weights_equal", f"{name}: " + "; ".join(diff)))
        if diff := _tensor_diff(ra, rb):
            problems.append(("state_equal", f"{name}: " + "; ".join(diff)))
    return problems


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines log; a last line cut short by a kill is kept as ``{"_torn": text}``."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append({"_torn": line[:80]})
    return rows


def duplicate_rows(rows: list[dict], key: Callable[[dict], Hashable]) -> list[Hashable]:
    """(d): keys (epoch/step...) that appear in more than one row."""
    seen: dict[Hashable, int] = {}
    for r in rows:
        k = key(r)
        seen[k] = seen.get(k, 0) + 1
    return [k for k, n in seen.items() if n > 1]


def _strip(value: Any, drop: frozenset[str]) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip(v, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [_strip(v, drop) for v in value]
    return value


def rows_differ(ref: list[dict], got: list[dict], timing: frozenset[str]) -> str | None:
    """Where the recovered log departs from the reference log (timing fields ignored), or None."""
    a, b = _strip(ref, timing), _strip(got, timing)
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            return f"row {i} differs in {keys[:6]}: reference {_short(x)} vs recovered {_short(y)}"
    return f"{len(b)} rows instead of {len(a)} (last recovered row: {_short(b[-1]) if b else None})"


def _short(row: Any, n: int = 160) -> str:
    text = json.dumps(row, sort_keys=True, default=str)
    return text if len(text) <= n else text[:n] + "..."


def json_without(path: Path, timing: frozenset[str]) -> Any:
    """A JSON file with its timing fields removed (for comparing summaries between runs)."""
    return _strip(json.loads(path.read_text(encoding="utf-8")), timing)


def trace_notes(events: list[Any]) -> list[str]:
    """Durability notes from the uninterrupted run's event trace (power loss, which kill -9 does not
    exercise): a file renamed into place without an fsync of its data, or a rename whose folder is never
    fsynced afterwards (the new name may be lost)."""
    notes = []
    written: dict[str, bool] = {}  # path -> fsynced since opened for writing
    for i, e in enumerate(events):
        if e.kind == "open":
            written[e.path] = False
        elif e.kind in ("fsync", "fdatasync"):
            written[e.path] = True
        elif e.kind == "rename":
            src, _, dst = e.path.partition(" -> ")
            if written.get(src) is False:
                notes.append(f"{e.n} rename {src} -> {dst}: data never fsynced before the rename")
            folder = str(Path(dst).parent) if dst else "."
            later = events[i + 1 :]
            if not any(x.kind == "fsync" and x.path == folder for x in later):
                notes.append(f"{e.n} rename -> {dst}: folder {folder!r} not fsynced afterwards")
    return notes
