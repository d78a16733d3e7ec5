"""The cascade's full distribution pruned to what a beam search can pick: exact log-probs for every label
that can rank in its row's top k, -inf for tail groups that cannot.

Why: a beam search keeps the best 2 x beam continuations of each hypothesis, yet ``log_prob`` pays a dense
layer's d x N matmul per step. In a trained cascade most rows put their top k in the short list, and a tail
node's log-prob bounds every label below it, so whole groups can be skipped exactly: at N = 256k the short
list is N / 16 and a skipped group is N / 10 of the dense cost.

When it does not pay: a group is skipped only when its whole mass is below one token's log-prob (the k-th
best), so a few large groups rarely qualify (in the trained en-de cascades, 10 tail groups and k = 13,
nearly every group stays live). Above ``MAX_LIVE_FRACTION`` live groups the full distribution is
computed instead, so pruning never costs much more than :meth:`log_prob`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import as_int
from .base import upcast
from .workspace import reusable_output, scratch

MAX_LIVE_FRACTION = 0.5  # more live root groups than this: the full distribution is cheaper than pruning


class PrunedDistribution:
    """Mixin of :class:`~mhe_plugins.heads.mhc.MHCHead` (needs its root, queries, sibling scoring and order)."""

    @torch.no_grad()
    def pruned_log_prob(self, x: torch.Tensor, k: int, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(..., N) log-probs: exact for every label whose log-prob reaches its row's k-th largest, and
        for the labels in ``keep`` (e.g. EOS, which a decoder may force); any other entry is either exact
        or -inf. So the top k of each row, values and ids, equal those of :meth:`log_prob`.

        The bound: the k-th best short-list log-prob is at most the row's k-th best, and a tail node's
        log-prob is at least that of every label below it, so a node below the bound holds no top-k
        label. Without a short list of at least k labels nothing is pruned (the result is exact).
        """
        k = as_int(k, "k", minimum=1)
        flat, lead = self._flat(x)
        out = self._pruned_by_position(flat, k)
        if out is None:  # most groups live: the exact full distribution, no -inf
            return self.log_prob(x)
        order = self.label_order
        if not order.identity:
            out = order.to_label_columns(out, out=reusable_output(self, "out", tuple(out.shape), out))
        if keep is not None and keep.numel():
            for label in keep.reshape(-1).tolist():
                target = torch.full((flat.shape[0],), label, dtype=torch.long, device=flat.device)
                out[:, label] = self.target_log_prob(flat, target).to(out.dtype)
        return out.reshape(*lead, self.num_labels)

    def _pruned_by_position(self, flat: torch.Tensor, k: int) -> torch.Tensor | None:
        """Position-space scores, or None when more than ``MAX_LIVE_FRACTION`` of the root's groups
        are live (nothing worth skipping)."""
        K, tail, last = self.shortlist, self.codec.num_labels, self.codec.num_heads - 1
        b = flat.shape[0]
        root = F.log_softmax(upcast(self._root_logits(flat)), -1)
        if K >= k:
            bound = root[:, :K].topk(k, dim=1).values[:, -1]
        else:
            bound = root.new_full((b,), float("-inf"))
        groups = root[:, K:]
        live = groups >= bound.unsqueeze(1)  # -inf (invalid) groups never pass a finite bound...
        live &= torch.isfinite(groups)  # ...nor an infinite one
        if int(live.sum()) > MAX_LIVE_FRACTION * live.numel():
            return None
        make = scratch if not self.label_order.identity else reusable_output
        out = make(self, "pruned", (b, K + tail), root)
        out.fill_(float("-inf"))
        out[:, :K] = root[:, :K]
        rows, prefix = live.nonzero(as_tuple=True)
        scores = groups[rows, prefix]
        for h in range(1, last + 1):
            if not rows.numel():
                break
            size = self.codec.head_sizes[h]
            query = self.query(h, flat).index_select(0, rows)
            child = F.log_softmax(upcast(self._sibling_logits(h, query, prefix)), -1) + scores.unsqueeze(1)
            if h < last:
                keep = (child >= bound.index_select(0, rows).unsqueeze(1)) & torch.isfinite(child)
                pair, digit = keep.nonzero(as_tuple=True)
                rows, prefix, scores = rows[pair], prefix[pair] * size + digit, child[pair, digit]
                continue
            _write_groups(out[:, K:], rows, prefix, child.to(out.dtype), size)
        return out


def _write_groups(
    tail: torch.Tensor, rows: torch.Tensor, prefix: torch.Tensor, child: torch.Tensor, size: int
) -> None:
    """``tail[rows, prefix * size + j] = child[:, j]`` for the j inside the tail, written as whole group
    slices (a per-element scatter of rows x size indices cost more than the matmuls it saved)."""
    whole = tail.shape[1] // size
    full = prefix < whole
    if bool(full.any()):
        tail[:, : whole * size].view(tail.shape[0], whole, size)[rows[full], prefix[full]] = child[full]
    if whole * size < tail.shape[1] and not bool(full.all()):  # the last, partial group
        part = ~full
        tail[:, whole * size :][rows[part]] = child[part, : tail.shape[1] - whole * size]
