"""The cascade's exact full distribution (..., N): what beam search and evaluation need, kept apart from
the training path (teacher forcing never builds an N-wide tensor)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import upcast
from .workspace import reusable_output, scratch


class FullDistribution:
    """Mixin of :class:`~mhe_plugins.heads.mhc.MHCHead`: ``log_prob`` over all N labels, one matmul per
    level (needs the head's ``codec``, ``shortlist``, ``label_order``, node tables and ``_limits``)."""

    def _nodes(self, level: int) -> int:
        return math.prod(self.codec.head_sizes[: level + 1])

    def _level_logits_all(
        self, level: int, query: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of every level-``level`` node as one (B, hidden) x (hidden, nodes) matmul, masked
        (into ``out`` when given: inference only)."""
        nodes = self._nodes(level)
        if level == self.codec.num_heads - 1 and self.tied:
            rows, K = self.codec.num_labels, self.shortlist
            if self.label_order.identity:  # tail position t is label K + t: a slice, no gather
                weight = self.node_embed[-1].weight[K : K + rows]
            else:
                weight = self._embed(level, torch.arange(rows, device=query.device))
        else:
            rows, weight = nodes, self.node_embed[level - 1].weight
        bias = self.node_bias[level - 1].weight[:rows, 0]
        if out is not None and rows == nodes and query.dtype == weight.dtype == out.dtype:
            z = torch.addmm(bias, query, weight.t(), out=out)  # one fused matmul + bias, no new tensor
        else:
            z = F.linear(query, weight, bias)
        if rows < nodes:  # tied leaves: only the N - K tail positions have rows; the rest are invalid anyway
            z = F.pad(z, (0, nodes - rows), value=float("-inf"))
        if self._limits[level] < nodes - 1:  # only the last few nodes are invalid: fill that slice alone
            if z.requires_grad:
                z = torch.cat(
                    [
                        z[:, : self._limits[level] + 1],
                        z.new_full((z.shape[0], nodes - 1 - self._limits[level]), float("-inf")),
                    ],
                    1,
                )
            else:
                z[:, self._limits[level] + 1 :] = float("-inf")
        return z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact (..., N) log-probabilities (materialises N), one matmul per level: the queries times the
        node tables directly, the cost of a dense d x N output layer (what beam search needs).

        Per level one log-softmax over each parent's children plus the parent's log-prob, as a dense
        layer's one log-softmax; invalid nodes are filled by slice, so no pass over all N scores is spent
        on masking (profiled in fairseq-generate: logsumexp and full-width masked_fill cost MHC a third of
        its decoding speed)."""
        flat, lead = self._flat(x)
        if torch.is_grad_enabled() and (
            flat.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            out = self.label_order.to_label_columns(self._log_prob_differentiable(flat))
        else:
            out = self._log_prob_inference(flat)
        return out.reshape(*lead, self.num_labels)

    def _log_prob_differentiable(self, flat: torch.Tensor) -> torch.Tensor:
        K, tail = self.shortlist, self.codec.num_labels
        root = F.log_softmax(upcast(self._root_logits(flat)), -1)
        lp = root[:, K:]
        for h in range(1, self.codec.num_heads):
            z = upcast(self._level_logits_all(h, self.query(h, flat))).view(flat.shape[0], lp.shape[1], -1)
            lp = self._dead_parents(h, F.log_softmax(z, -1) + lp.unsqueeze(-1)).flatten(1)
        return torch.cat([root[:, :K], lp[:, :tail]], -1)

    def _dead_parents(self, level: int, child: torch.Tensor) -> torch.Tensor:
        """(B, P, C) child log-probs with the parents that have no valid child set to -inf (not NaN)."""
        dead = self._limits[level - 1] + 1
        if dead >= child.shape[1]:
            return child
        if not child.requires_grad:
            child[:, dead:] = float("-inf")
            return child
        pad = child.new_full((child.shape[0], child.shape[1] - dead, child.shape[2]), float("-inf"))
        return torch.cat([child[:, :dead], pad], 1)

    def _log_prob_inference(self, flat: torch.Tensor) -> torch.Tensor:
        """As the differentiable path (columns by label id), with every (B, nodes) temporary written into
        reused buffers and the result into a reused one when its last holder has let it go
        (:mod:`.workspace`). The last level adds its parents' log-probs straight into the result's tail
        columns: one pass over the N scores fewer than adding in place and then copying (a pass over |V|
        per beam step of fairseq-generate)."""
        K, tail, b, last = self.shortlist, self.codec.num_labels, flat.shape[0], self.codec.num_heads - 1
        root = F.log_softmax(upcast(self._root_logits(flat)), -1)
        shape, order = (b, K + tail), self.label_order
        by_position = (
            reusable_output(self, "out", shape, root) if order.identity else scratch(self, "pos", shape, root)
        )
        by_position[:, :K] = root[:, :K]
        lp = root[:, K:]
        if last == 0:
            by_position[:, K:] = lp[:, :tail]
        for h in range(1, last + 1):
            z = self._level_logits_all(
                h, self.query(h, flat), out=scratch(self, f"z{h}", (b, self._nodes(h)), flat)
            )
            z = upcast(z).view(b, lp.shape[1], -1)
            child = torch.log_softmax(z, -1, out=scratch(self, f"lp{h}", tuple(z.shape), z))
            if h < last:
                lp = self._dead_parents(h, child.add_(lp.unsqueeze(-1))).flatten(1)
            else:  # only positions < tail are kept: all under live parents, no dead-parent fill needed
                _add_parents_into(by_position[:, K:], child, lp, tail)
        if order.identity:
            return by_position
        return order.to_label_columns(by_position, out=reusable_output(self, "out", shape, by_position))


def _add_parents_into(out: torch.Tensor, child: torch.Tensor, parent: torch.Tensor, n: int) -> None:
    """``out[:, j] = child[:, j // C, j % C] + parent[:, j // C]`` for the first ``n`` positions j, with
    ``out`` (B, n) a strided view: whole parent blocks in one broadcast add, the partial last block apart."""
    b, _, c = child.shape
    full = n // c
    if full:
        torch.add(child[:, :full], parent[:, :full].unsqueeze(-1), out=out[:, : full * c].view(b, full, c))
    if n > full * c:
        torch.add(child[:, full, : n - full * c], parent[:, full : full + 1], out=out[:, full * c :])
