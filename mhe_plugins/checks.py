"""Input checks shared by the core and the adapters: integer arguments, finiteness, soft-target rows.

They raise with the offending value named, because a silent ``int(3.7) == 3`` or a NaN loss that only
shows up epochs later costs far more than the check.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence

import numpy as np
import torch

__all__ = ["as_int", "check_finite", "check_soft_target"]


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
