"""Stop a run at the first non-finite loss, with where it happened (timm and fairseq do the same)."""

from __future__ import annotations

import math

import torch

__all__ = ["check_finite_loss"]


def check_finite_loss(loss: torch.Tensor | float, **where: object) -> float:
    """Return ``loss`` as a float; raise ``FloatingPointError`` naming ``where`` (step, epoch, ...) if not finite.

    A NaN usually comes from non-finite inputs or a diverged learning rate; continuing would only write NaN
    weights over the last good checkpoint.
    """
    value = float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        at = " ".join(f"{k} {v}" for k, v in where.items())
        raise FloatingPointError(
            f"non-finite loss {value} at {at}: check the inputs for NaN/inf and lower the learning rate; "
            "the last checkpoint was not overwritten"
        )
    return value
