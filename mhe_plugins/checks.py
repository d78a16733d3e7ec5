"""Input checks shared by the core and the adapters: integer arguments, class-id targets, finiteness,
soft-target rows.

They raise with the offending value named, because a silent ``int(3.7) == 3`` or a NaN loss that only
shows up epochs later costs far more than the check.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = ["as_int", "check_class_ids", "check_finite", "check_soft_target"]


def as_int(value, name: str, minimum: int | None = None) -> int:
    """``value`` as a Python int; integral floats (3.0) pass, 3.7 / NaN / bools / strings raise ValueError."""
    out = None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()  # 0-d / one-element tensors: judge the number they hold
    if not isinstance(value, (bool, np.bool_)):
        try:
            out = operator.index(value)  # int, numpy ints, 0-d integer tensors
        except TypeError:
            if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
                out = int(value)
    if out is None:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def _first_nonfinite(t: torch.Tensor) -> str:
    bad = ~torch.isfinite(t.detach())
    count = int(bad.sum())
    idx = tuple(int(i) for i in bad.nonzero()[0])
    return f"{count} non-finite value(s) of {t.numel()}, first {t.detach()[idx].item()} at index {idx}"


def check_finite(name: str, value):
    """Raise ``FloatingPointError`` naming ``name`` (and the key/position) if any float is NaN or +-inf.

    ``value`` is a tensor, a sequence or a mapping of tensors (non-float entries are skipped); it is
    returned unchanged so calls chain: ``loss = check_finite("loss", head.compute_loss(x, y))``.
    Opt-in: it syncs with the device, so trainers call it where a bad batch must stop the run.
    """
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            if not bool(torch.isfinite(value).all()):
                raise FloatingPointError(f"{name} has {_first_nonfinite(value)}")
        return value
    items = (
        value.items()
        if isinstance(value, Mapping)
        else enumerate(value)
        if isinstance(value, Sequence)
        else None
    )
    if items is None:
        raise TypeError(
            f"check_finite({name!r}) needs a tensor, sequence or mapping, got {type(value).__name__}"
        )
    for key, v in items:
        check_finite(f"{name}[{key!r}]", v)
    return value


def check_soft_target(q: torch.Tensor, size: int, lead: tuple[int, ...], name: str) -> None:
    """A soft target must be ``lead + (size,)``, finite, non-negative, each row summing to 1.

    Tolerance 1e-3 (1e-2 for fp16/bf16, whose rows of mixed one-hots are off by ~1e-3).
    """
    if not isinstance(q, torch.Tensor) or not q.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {type(q).__name__} {getattr(q, 'dtype', '')}")
    if tuple(q.shape) != (*lead, size):
        raise ValueError(f"{name} must have shape {(*lead, size)}, got {tuple(q.shape)}")
    if q.numel() == 0:
        return
    flat = q.detach().reshape(-1, size)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name} has {_first_nonfinite(flat)} (row, class)")
    neg = flat < 0
    if bool(neg.any()):
        row, col = (int(i) for i in neg.nonzero()[0])
        raise ValueError(f"{name} has negative entry {flat[row, col].item()} at row {row}, class {col}")
    sums = flat.sum(-1, dtype=torch.float64)
    tol = 1e-2 if q.dtype in (torch.float16, torch.bfloat16) else 1e-3
    off = (sums - 1).abs() > tol
    if bool(off.any()):
        row = int(off.nonzero()[0, 0])
        raise ValueError(
            f"{name}: row {row} sums to {sums[row].item():.6g}, expected 1 (tolerance {tol:.2g})"
        )


def _at(t: torch.Tensor, bad: torch.Tensor) -> str:
    """``value at index (i, j)`` of the first True of ``bad``."""
    idx = tuple(int(i) for i in bad.nonzero()[0])
    return f"{t.detach()[idx].item()!r} at index {idx}"


def check_class_ids(target, num_labels: int, name: str = "target", allow: int | None = None) -> torch.Tensor:
    """Hard targets of every head: an integer tensor of ids in ``[0, num_labels)`` (plus ``allow``, e.g. an
    ``ignore_index`` or -1 padding); returned as int64.

    Why: a float target was truncated by ``.long()`` (1.5 trained class 1) or passed as a "whole" float;
    a float tensor is more likely a soft target or a bug than ids, so any float dtype is refused with its
    first (preferably fractional) value, and an out-of-range id with its value and position.
    """
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of integer class ids, got {type(target).__name__}")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        where = ""
        if target.is_floating_point() and target.numel():
            t = target.detach()
            frac = ~torch.isfinite(t) | (t != t.round())
            first = frac if bool(frac.any()) else torch.ones_like(frac)
            where = f"; first {'non-integer ' if first is frac else ''}value {_at(t, first)}"
        raise ValueError(
            f"{name} must be an integer tensor of class ids, got dtype {target.dtype}{where} "
            "(soft targets: MHPHead takes one distribution per head, see timm_ext.mixup.DigitMixup)"
        )
    bad = (target < 0) | (target >= num_labels)
    if allow is not None:
        bad &= target != allow
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        also = f", nor {allow}" if allow is not None else ""
        raise ValueError(
            f"{name}: label id {target[idx].item()} is out of range [0, {num_labels}){also} (at index {idx})"
        )
    return target.long()
