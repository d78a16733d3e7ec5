"""``build_head``: the one constructor every toolkit uses, over a registry of head kinds.

The sizing rule (explicit head sizes, else ``num_groups`` levels, else the balanced split) lives in
:meth:`LabelCodec.from_spec`; dense kinds get the one-head codec ``[N]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..codec import LabelCodec
from .base import MHEHead
from .linear import LinearHead, LinearMultiLabelHead
from .mhc import MHCHead
from .mhc_multilabel import MHCMultiLabelHead
from .mhp import MHPHead
from .mhs import MHSHead

__all__ = ["HEADS", "build_head", "register_head", "codec_for"]

HEADS: dict[str, type[MHEHead]] = {}
DENSE = {"linear", "linear_multilabel"}


def register_head(cls: type[MHEHead]) -> type[MHEHead]:
    """Add a head class under its ``kind`` (usable as a decorator by third-party heads)."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind to register under")
    HEADS[cls.kind] = cls
    return cls


for _cls in (LinearHead, LinearMultiLabelHead, MHPHead, MHCHead, MHSHead, MHCMultiLabelHead):
    register_head(_cls)


def codec_for(
    kind: str,
    num_labels: int,
    head_sizes: Sequence[int] | None = None,
    num_heads: int | None = None,
    num_groups: int | None = None,
) -> LabelCodec:
    """The codec ``build_head`` gives ``kind`` (``[N]`` for the dense kinds)."""
    if kind in DENSE:
        if head_sizes or num_groups or (num_heads not in (None, 1)):
            raise ValueError(
                f"head kind {kind!r} is one dense layer: head_sizes/num_heads/num_groups do not apply"
            )
        return LabelCodec([int(num_labels)], num_labels=int(num_labels))
    return LabelCodec.from_spec(num_labels, head_sizes, num_heads, num_groups)


def build_head(
    kind: str,
    in_features: int,
    num_labels: int,
    *,
    head_sizes: Sequence[int] | None = None,
    num_heads: int | None = None,
    num_groups: int | None = None,
    **options: Any,
) -> MHEHead:
    """A head of ``kind`` (one of :data:`HEADS`) over ``num_labels`` labels on ``in_features``-dim inputs.

    ``options`` go to the head's constructor (e.g. ``hidden_dim``/``beam``/``shortlist``/``label_order``
    for MHC, whose head sizes then describe the tail tree over N - shortlist labels, ``mode``/
    ``sampled_groups``/``margin`` for MHS, ``bias`` for the linear kinds).
    """
    if kind not in HEADS:
        raise ValueError(f"head kind must be one of {sorted(HEADS)}, got {kind!r}")
    cls = HEADS[kind]
    # a head may cover part of the labels with its codec (MHC's short list sits at the root)
    codec = codec_for(kind, cls.codec_labels(num_labels, options), head_sizes, num_heads, num_groups)
    return cls(in_features, codec, **options)
