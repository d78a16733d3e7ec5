"""Learning-rate multipliers for ``LambdaLR`` used by more than one trainer."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["warmup_linear_decay", "poly_warmup"]


def warmup_linear_decay(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total`` (BERT/LightXML style)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def poly_warmup(step: int, total: int, warmup: int, power: float = 2.0) -> float:
    """LR multiplier: linear warm-up from 0, then ``(1 - progress) ** power`` (arcface_torch's PolyScheduler)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    return max(0.0, 1.0 - (step - warmup) / max(1, total - warmup)) ** power
