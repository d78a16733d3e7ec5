"""MHC, multi-head cascade (single-label): head 1 picks among groups, each next head ranks the children of
the kept prefixes. A label is a root-to-leaf path; p(id) = prod_h p(digit_h | prefix), a softmax over
siblings at every level (hierarchical softmax over contiguous id blocks, no clustering needed).

Level 0: ``Linear(d, C_0)``. Level h >= 1: a query projection ``Linear(d, hidden)`` and one embedding per
level-h node (prefix of h+1 digits); a child's logit = node embedding . query (+ node bias).
Training uses teacher forcing: each level's loss is the CE over the siblings of the ground-truth prefix,
so per step only sum_h C_h scores are computed. Inference: beam search of width ``beam`` over prefixes.
Nodes whose every completion is >= N are masked.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import as_int
from ..codec import LabelCodec
from .base import MHEHead, reduce_loss, upcast

__all__ = ["MHCHead", "MHCOutput"]


class MHCOutput(NamedTuple):
    logits: list[torch.Tensor]  # per level (B, C_h): sibling logits under the ground-truth prefix
    targets: list[torch.Tensor]  # per level (B,): the ground-truth digit


class MHCHead(MHEHead):
    def __init__(self, in_features: int, codec: LabelCodec, hidden_dim: int = 256, beam: int = 8):
        super().__init__(in_features, codec)
        if codec.num_heads < 2:
            raise ValueError(f"MHC needs at least 2 heads, got head sizes {list(codec.head_sizes)}")
        self.hidden_dim = as_int(hidden_dim, "hidden_dim", minimum=1)
        self.beam = as_int(beam, "beam", minimum=1)
        self.group = nn.Linear(in_features, codec.head_sizes[0])
        self.queries = nn.ModuleList(nn.Linear(in_features, hidden_dim) for _ in codec.head_sizes[1:])
        self.node_embed = nn.ModuleList()
        self.node_bias = nn.ModuleList()
        for h in range(1, codec.num_heads):
            nodes = math.prod(codec.head_sizes[: h + 1])
            emb = nn.Embedding(nodes, hidden_dim)
            nn.init.xavier_uniform_(emb.weight)
            bias = nn.Embedding(nodes, 1)
            nn.init.zeros_(bias.weight)
            self.node_embed.append(emb)
            self.node_bias.append(bias)
        # largest valid prefix id per level (prefix p valid iff p <= limit)
        self._limits = [codec.prefix_limit(h) for h in range(codec.num_heads)]

    def extra_repr(self) -> str:
        return f"head_sizes={list(self.codec.head_sizes)}, num_labels={self.num_labels}, beam={self.beam}"

    # ------------------------------------------------------------------ scoring
    def _children_logits(self, level: int, query: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """Logits of the children of ``parents`` (B, P) at ``level`` >= 1 -> (B, P, C_level), masked."""
        size = self.codec.head_sizes[level]
        nodes = parents.unsqueeze(-1) * size + torch.arange(size, device=parents.device)  # (B, P, C)
        emb = self.node_embed[level - 1](nodes)  # (B, P, C, hidden)
        logits = torch.einsum("bpch,bh->bpc", emb, query) + self.node_bias[level - 1](nodes).squeeze(-1)
        return logits.masked_fill(nodes > self._limits[level], float("-inf"))

    def _child_log_probs(self, level: int, query: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """log p(child | parent); children of an invalid parent (all masked) get -inf, not NaN."""
        lp = F.log_softmax(upcast(self._children_logits(level, query, parents)), -1)
        return lp.nan_to_num(nan=float("-inf"))

    def _root_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.group(x)
        limit = self._limits[0]
        if limit < logits.shape[-1] - 1:
            logits = logits.masked_fill(
                torch.arange(logits.shape[-1], device=x.device) > limit, float("-inf")
            )
        return logits

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> MHCOutput:
        """Teacher-forced per-level sibling logits for ``target`` (required in training)."""
        if target is None:
            raise ValueError(
                "MHCHead.forward needs the target (teacher forcing); use topk/predict at test time"
            )
        flat, lead = self._flat(x)
        if not isinstance(target, torch.Tensor):
            raise ValueError(
                f"MHCHead trains on hard label ids (a tensor), got {type(target).__name__}; "
                "soft/mixed targets need MHPHead"
            )
        if tuple(target.shape) != tuple(lead):
            raise ValueError(f"target shape {tuple(target.shape)} does not match the features {tuple(lead)}")
        digits = self.codec.encode(target.reshape(-1))
        logits, targets = [self._root_logits(flat)], [digits[:, 0]]
        prefix = digits[:, 0]
        for h in range(1, self.codec.num_heads):
            q = self.queries[h - 1](flat)
            logits.append(self._children_logits(h, q, prefix[:, None]).squeeze(1))
            targets.append(digits[:, h])
            prefix = prefix * self.codec.head_sizes[h] + digits[:, h]
        return MHCOutput(logits, targets)

    def loss(self, output: MHCOutput, reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
        """Sum over levels of the CE among siblings (masked siblings get no smoothing mass)."""
        per = 0.0
        for z, t in zip(output.logits, output.targets):
            z = upcast(z)
            if label_smoothing:
                logp = F.log_softmax(z, -1)
                finite = torch.isfinite(logp)
                smooth = -(logp.masked_fill(~finite, 0).sum(-1)) / finite.sum(-1)
                nll = -logp.gather(1, t[:, None]).squeeze(1)
                per = per + (1 - label_smoothing) * nll + label_smoothing * smooth
            else:
                per = per + F.cross_entropy(z, t, reduction="none")
        return reduce_loss(per, None, reduction)

    def compute_loss(self, x: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.loss(self(x, target), **kwargs)

    # ------------------------------------------------------------------ inference
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact (..., N) log-probabilities by expanding every node (materialises N)."""
        flat, lead = self._flat(x)
        lp = F.log_softmax(upcast(self._root_logits(flat)), -1)  # (B, C0)
        parents = torch.arange(self.codec.head_sizes[0], device=flat.device).expand(flat.shape[0], -1)
        for h in range(1, self.codec.num_heads):
            q = self.queries[h - 1](flat)
            child = self._child_log_probs(h, q, parents)  # (B, P, C)
            lp = (lp.unsqueeze(-1) + child).flatten(1)
            parents = torch.arange(lp.shape[1], device=flat.device).expand(flat.shape[0], -1)
        return lp[:, : self.num_labels].reshape(*lead, self.num_labels)

    def _topk_flat(
        self, x: torch.Tensor, k: int, beam: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # the beam is widened to k so that k leaves always exist (beam=1, k=1 is greedy decoding)
        beam = max(self.beam if beam is None else as_int(beam, "beam", minimum=1), k)
        lp = F.log_softmax(upcast(self._root_logits(x)), -1)
        scores, prefix = lp.topk(min(beam, lp.shape[1]), dim=1)
        for h in range(1, self.codec.num_heads):
            q = self.queries[h - 1](x)
            child = self._child_log_probs(h, q, prefix)  # (B, P, C)
            total = (scores.unsqueeze(-1) + child).flatten(1)
            size = self.codec.head_sizes[h]
            ids = (prefix.unsqueeze(-1) * size + torch.arange(size, device=x.device)).flatten(1)
            keep = k if h == self.codec.num_heads - 1 else beam
            scores, pos = total.topk(min(keep, total.shape[1]), dim=1)
            prefix = ids.gather(1, pos)
        return scores[:, :k], prefix[:, :k]

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int, beam: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam-search top-k (beam defaults to ``self.beam``; beam >= C_0 * ... is exact)."""
        k = self._check_k(k)
        flat, lead = self._flat(x)
        values, indices = self._topk_flat(flat, k, beam)
        return values.reshape(*lead, k), indices.reshape(*lead, k)
