"""Where each label sits in a cascade (MHC): a short list at the root, then the tail in tree order.

A cascade scores a label through its *tree position*. Positions ``0 .. K-1`` are the short list: leaves of
the root softmax next to the tail's group nodes, so the labels that carry most of the probability mass pay
no group decision (adaptive softmax's head cluster, Grave et al. 2017). Positions ``K .. N-1`` are the
tail, factorised by the head's codec (tail position ``t = position - K``: group = first digit, ...).
``order[position] = label``: the identity puts labels in id order (for a frequency-sorted vocabulary such
as fairseq's dictionary: the K most frequent ids first, then frequency bins); a learned order (e.g.
:func:`mhe_plugins.grouping.cascade_order`) groups the tail by likelihood instead. The order is a
buffer of the head, so a checkpoint carries it and decoding needs nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..checks import as_int

__all__ = ["LabelOrder"]


class LabelOrder(nn.Module):
    """Label <-> tree position map of a cascade with a ``shortlist`` of K root leaves (K = 0: none)."""

    def __init__(
        self, num_labels: int, shortlist: int = 0, order: Sequence[int] | torch.Tensor | None = None
    ):
        super().__init__()
        self.num_labels = as_int(num_labels, "num_labels", minimum=1)
        self.shortlist = as_int(shortlist, "shortlist", minimum=0)
        if self.shortlist >= self.num_labels:
            raise ValueError(
                f"shortlist={shortlist} must be smaller than the number of labels ({num_labels}): "
                "the tail needs at least one label"
            )
        self.register_buffer("order", torch.arange(self.num_labels))
        self.register_buffer("position", torch.arange(self.num_labels), persistent=False)
        self.identity, self.pending = True, False
        if order is not None:
            self.set(order)

    def extra_repr(self) -> str:
        state = "pending" if self.pending else ("identity" if self.identity else "learned")
        return f"num_labels={self.num_labels}, shortlist={self.shortlist}, order={state}"

    @property
    def tail_size(self) -> int:
        return self.num_labels - self.shortlist

    # ------------------------------------------------------------------ setting the order
    def set(self, order: Sequence[int] | torch.Tensor) -> None:
        """Set ``order[position] = label`` (a permutation of the label ids). Set it before training: the
        cascade's untied tables are indexed by position, so a later change would re-map trained rows."""
        order = torch.as_tensor(order)
        if order.dtype.is_floating_point or order.dtype == torch.bool or order.shape != (self.num_labels,):
            raise ValueError(
                f"label order must be {self.num_labels} integer label ids (a permutation), got "
                f"{order.dtype} of shape {tuple(order.shape)}"
            )
        with torch.no_grad():
            self.order.copy_(order.to(self.order))
        self._refresh()

    def expect_from_checkpoint(self) -> None:
        """Mark the order as unknown until a state dict provides it (a model rebuilt for decoding whose
        order file is not at hand): every use raises until then, nothing falls back to the identity."""
        with torch.no_grad():
            self.order.fill_(-1)
        self.pending, self.identity = True, False

    def _refresh(self) -> None:
        order = self.order
        counts = torch.bincount(order.clamp(0, self.num_labels - 1), minlength=self.num_labels)
        if bool(((order < 0) | (order >= self.num_labels)).any()) or bool((counts != 1).any()):
            bad = order[(order < 0) | (order >= self.num_labels)]
            what = (
                f"id {int(bad[0])} out of range [0, {self.num_labels})"
                if bad.numel()
                else f"label {int((counts != 1).nonzero()[0])} appears {int(counts[counts != 1][0])} times"
            )
            raise ValueError(f"label order is not a permutation of the {self.num_labels} labels: {what}")
        position = torch.empty_like(order)
        position[order] = torch.arange(self.num_labels, device=order.device)
        self.position = position
        self.identity = bool((order == torch.arange(self.num_labels, device=order.device)).all())
        self.pending = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "order"
        if key not in state_dict and not self.pending:  # a checkpoint from before label orders: id order
            state_dict = {**state_dict, key: torch.arange(self.num_labels)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if key in state_dict:
            self._refresh()

    def check_ready(self) -> None:
        if self.pending:
            raise RuntimeError(
                "this cascade's label order is not set: it was built without its order file and no "
                "checkpoint has provided it yet (load the trained checkpoint, or pass the order file)"
            )

    # ------------------------------------------------------------------ mapping
    def positions(self, labels: torch.Tensor) -> torch.Tensor:
        self.check_ready()
        return labels if self.identity else self.position[labels]

    def labels(self, positions: torch.Tensor) -> torch.Tensor:
        self.check_ready()
        return positions if self.identity else self.order[positions]

    def tail_labels(self, tail_positions: torch.Tensor) -> torch.Tensor:
        """Label of each tail position (clamped into range: callers mask positions >= the tail size)."""
        pos = tail_positions.clamp(max=self.tail_size - 1) + self.shortlist
        return self.labels(pos)

    def shortlist_labels(self) -> torch.Tensor:
        return self.labels(torch.arange(self.shortlist, device=self.order.device))

    def to_label_columns(self, by_position: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(..., N) scores by position -> (..., N) scores by label id (into ``out`` when given: a gather
        into a reused buffer costs a third of one into a fresh tensor on CPU, measured at 320 x 31k)."""
        self.check_ready()
        if self.identity:
            return by_position
        if out is None:
            return by_position.index_select(-1, self.position)
        return torch.index_select(by_position, -1, self.position, out=out)
