"""Single-label classification metrics (top-k accuracy), in percent as timm reports them."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ._common import ArrayLike, _check_k

__all__ = ["topk_accuracy"]


def topk_accuracy(
    logits_or_ranked_ids: ArrayLike,
    targets: ArrayLike,
    ks: Iterable[int] = (1, 5),
    ignore_index: int | None = None,
) -> dict[str, float]:
    """Top-k accuracy in percent, ``{"top1": .., "top5": ..}``.

    Floating input is treated as (n, C) scores (top-k taken on the input's device, k clipped to C as
    timm does); integer input as (n, k') ranked ids (best first, ``-1`` padding; k > k' counts the
    missing ranks as misses). Rows whose target equals ``ignore_index`` are left out.
    """
    ks = [_check_k(k, "ks entry") for k in ks]
    if not ks:
        raise ValueError("ks must name at least one k")
    x = (
        logits_or_ranked_ids
        if isinstance(logits_or_ranked_ids, torch.Tensor)
        else torch.as_tensor(np.asarray(logits_or_ranked_ids))
    )
    t = targets if isinstance(targets, torch.Tensor) else torch.as_tensor(np.asarray(targets))
    if x.ndim != 2:
        raise ValueError(f"logits_or_ranked_ids must be 2-D (n, C) or (n, k), got shape {tuple(x.shape)}")
    t = t.reshape(-1).to(x.device)
    if t.numel() != x.shape[0]:
        raise ValueError(f"targets has {t.numel()} entries but logits_or_ranked_ids has {x.shape[0]} rows")
    if t.is_floating_point():
        raise ValueError(f"targets must be integer class ids, got dtype {t.dtype}")
    if ignore_index is not None:
        keep = t != ignore_index
        x, t = x[keep], t[keep]
    if t.numel() == 0:
        raise ValueError("topk_accuracy needs at least one (non-ignored) sample")
    if (t < 0).any():
        raise ValueError(f"targets must be >= 0 (or ignore_index), got {int(t.min())}")
    kmax = max(ks)
    if x.is_floating_point():
        ranked = x.topk(min(kmax, x.shape[1]), dim=1).indices
    else:
        ranked = x[:, :kmax]
    correct = ranked.eq(t[:, None])  # (n, k'), at most one True per row
    cum = correct.cumsum(dim=1).clamp_(max=1)
    n = t.numel()
    out = {}
    for k in ks:
        kk = min(k, cum.shape[1])
        hit = cum[:, kk - 1].sum().item() if kk > 0 else 0
        out[f"top{k}"] = 100.0 * hit / n
    return out
