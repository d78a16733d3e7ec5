"""MHS-ArcFace: the Partial-FC replacement, ``loss = head(local_emb, local_labels).loss``.

A thin wrapper of the core :class:`mhe_plugins.MHSHead` (sharding over ranks, sampling, margins, fp32 margin
maths under autocast, row-sparse gradients all live there; the call is the core contract): it keeps
arcface_torch's constructor vocabulary (margin triple + ``scale``, ``sample_rate``, ``sparse``) and shards
over the default process group when one is initialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from mhe_plugins.codec import LabelCodec
from mhe_plugins.distributed import dist_softmax_cross_entropy, shard_range
from mhe_plugins.heads.mhs import MHSHead
from mhe_plugins.margins import CombinedMargin

__all__ = ["MHSArcFace", "dist_softmax_cross_entropy", "shard_range"]


class MHSArcFace(MHSHead):
    """Multi-Head-Sampling ArcFace with Partial FC's call shape (a :class:`MHSHead` with a margin).

    ``margin`` is the combined-margin triple (m1, m2, m3): ArcFace (1, 0.5, 0), CosFace (1, 0, 0.35), or
    arcface_torch's margin-loss module itself (``CombinedMarginLoss(s, m1, m2, m3)``: its m1, m2, m3 and s
    are read, and the core's NaN-safe :class:`CombinedMargin` applies them; ``scale`` is then ignored).
    :meth:`from_partial_fc` takes ``PartialFC_V2``'s arguments in their order, for a one-line swap.
    ``shard=True`` shards the groups over ``process_group`` (default: the world group when
    ``torch.distributed`` is initialised); ``shard=False`` keeps a full rank-local head (e.g. inside pml's
    ``DistributedLossWrapper``, which gathers itself).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int | None = None,
        head_sizes: Sequence[int] | None = None,
        margin: Sequence[float] = (1.0, 0.5, 0.0),
        scale: float = 64.0,
        mode: str = "batch_union",
        sample_rate: float | None = None,
        sparse: bool = True,
        shard: bool = True,
        process_group=None,
        init_std: float = 0.01,
        sampling_correction: bool = False,
        sampled_groups: int | None = None,
    ):
        if head_sizes is None and num_classes is None:
            raise ValueError("MHSArcFace needs num_classes or head_sizes")
        n = int(num_classes) if num_classes is not None else None
        codec = LabelCodec.from_spec(n, head_sizes) if n is not None else LabelCodec(list(head_sizes))
        if codec.num_heads < 2:
            raise ValueError(
                f"MHSArcFace needs at least 2 heads (group, member), got {list(codec.head_sizes)}"
            )
        if isinstance(margin, torch.nn.Module):
            margin, scale = _margin_of_module(margin)
        m = tuple(float(v) for v in margin)
        if len(m) != 3:
            raise ValueError(f"margin must be the triple (m1, m2, m3), got {margin!r}")
        if shard and process_group is None and dist.is_available() and dist.is_initialized():
            process_group = dist.group.WORLD
        super().__init__(
            int(embedding_size),
            codec,
            mode=mode,
            margin=CombinedMargin(*m, s=float(scale)),
            sparse_grad=sparse,
            init_std=init_std,
            sample_rate=sample_rate,
            sampled_groups=sampled_groups,
            sampling_correction=sampling_correction,
            process_group=process_group if shard else None,
        )
        self.embedding_size, self.num_classes = int(embedding_size), codec.num_labels
        self.margin_triple, self.scale, self.sparse = m, float(scale), bool(sparse)

    @classmethod
    def from_partial_fc(
        cls,
        margin_loss: torch.nn.Module,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        fp16: bool = False,
        **kwargs,
    ) -> MHSArcFace:
        """``PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate, fp16)``'s arguments, in its
        order. ``fp16`` is accepted for the swap and has no effect: the margin maths runs in fp32 anyway
        (under autocast too). Further keywords (``head_sizes``, ``mode``, ...) go to the constructor."""
        del fp16
        return cls(embedding_size, num_classes, margin=margin_loss, sample_rate=sample_rate, **kwargs)

    @torch.no_grad()
    def local_centres(self) -> torch.Tensor:
        """This rank's class centres (local_groups * S, d), global ids starting at ``group_start * S``."""
        return self.weight.detach().view(-1, self.embedding_size)


def _margin_of_module(module: torch.nn.Module) -> tuple[tuple[float, float, float], float]:
    """((m1, m2, m3), s) of an arcface_torch-style margin-loss module (``CombinedMarginLoss``)."""
    try:
        triple = (float(module.m1), float(module.m2), float(module.m3))
        scale = float(module.s)
    except AttributeError:
        raise TypeError(
            f"margin module {type(module).__name__} has no m1/m2/m3/s attributes (expected arcface_torch's "
            "CombinedMarginLoss(s, m1, m2, m3)); pass the triple margin=(m1, m2, m3) and scale=s instead"
        ) from None
    if float(getattr(module, "interclass_filtering_threshold", 0) or 0) > 0:
        raise ValueError("interclass_filtering_threshold > 0 is not supported by MHSArcFace")
    return triple, scale
