"""MHC, multi-head cascade (single-label): head 1 picks among groups, each next head ranks the children of
the kept prefixes. A label is a root-to-leaf path; p(id) = prod_h p(digit_h | prefix), a softmax over
siblings at every level (hierarchical softmax over contiguous id blocks, no clustering needed).

Level 0: ``Linear(d, C_0)``. Level h >= 1: a query projection ``Linear(d, hidden)`` and one embedding per
level-h node (prefix of h+1 digits); a child's logit = node embedding . query (+ node bias).
``group_mlp_dim > 0`` adds a GELU MLP (zero-initialised output, so training starts from the linear head) to
the scores of every group level, i.e. every level but the leaves. A group's exact log-mass is a
log-sum-exp over its members' scores, which a linear map of the features can only approximate; measured
on NMT, the linear root was the cascade's accuracy bottleneck (docs/fairseq.md).
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

from ..checks import as_int, check_class_ids
from ..codec import LabelCodec
from ..decode import valid_first_topk
from .base import HeadOutput, MHEHead, check_smoothing, reduce_loss, upcast

__all__ = ["MHCHead", "MHCOutput", "TiedNodeEmbedding"]


class TiedNodeEmbedding(nn.Module):
    """Leaf (= label) embeddings borrowed from elsewhere, e.g. a decoder's input embeddings (N, hidden).

    The last level has ``prod(C_h) >= N`` nodes but only N labels: node ids >= N are clamped to a real row
    and then masked to -inf by the head, so they never carry probability or gradient.
    """

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        return F.embedding(nodes.clamp(max=self.weight.shape[0] - 1), self.weight)


def _residual_mlp(in_features: int, width: int, out_features: int) -> nn.Sequential:
    """Linear-GELU-Linear whose output layer starts at zero (adds nothing until trained)."""
    mlp = nn.Sequential(nn.Linear(in_features, width), nn.GELU(), nn.Linear(width, out_features))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


class MHCOutput(NamedTuple):
    logits: list[torch.Tensor]  # per level (B, C_h): sibling logits under the ground-truth prefix
    targets: list[torch.Tensor]  # per level (B,): the ground-truth digit


class MHCHead(MHEHead):
    """Loss keywords: ``label_smoothing``, ``smoothing`` (``"head"``: every level's sibling CE smoothed by
    eps; ``"label"``: the true label keeps 1 - eps, :meth:`smoothed_nll`), ``reduction``."""

    kind = "mhc"

    def __init__(
        self,
        in_features: int,
        codec: LabelCodec,
        hidden_dim: int = 256,
        beam: int = 8,
        group_mlp_dim: int = 0,
    ):
        super().__init__(in_features, codec)
        if codec.num_heads < 2:
            raise ValueError(f"MHC needs at least 2 heads, got head sizes {list(codec.head_sizes)}")
        self.hidden_dim = as_int(hidden_dim, "hidden_dim", minimum=1)
        self.beam = as_int(beam, "beam", minimum=1)
        self.group_mlp_dim = as_int(group_mlp_dim, "group_mlp_dim", minimum=0)
        self.group = nn.Linear(in_features, codec.head_sizes[0])
        self.queries = nn.ModuleList(nn.Linear(in_features, hidden_dim) for _ in codec.head_sizes[1:])
        # group levels 0 .. H-2: an MLP added to the root logits (level 0) or to the query (levels >= 1)
        self.group_mlps = nn.ModuleList(
            _residual_mlp(in_features, self.group_mlp_dim, codec.head_sizes[0] if h == 0 else hidden_dim)
            for h in range(codec.num_heads - 1)
            if self.group_mlp_dim
        )
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
        return (
            f"head_sizes={list(self.codec.head_sizes)}, num_labels={self.num_labels}, beam={self.beam}, "
            f"group_mlp_dim={self.group_mlp_dim}"
        )

    def query(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """(B, hidden) query of ``level`` >= 1; its children's logits are node embedding . query + bias."""
        q = self.queries[level - 1](x)
        if self.group_mlps and level < self.codec.num_heads - 1:
            q = q + self.group_mlps[level](x)
        return q

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
        if self.group_mlps:
            logits = logits + self.group_mlps[0](x)
        limit = self._limits[0]
        if limit < logits.shape[-1] - 1:
            logits = logits.masked_fill(
                torch.arange(logits.shape[-1], device=x.device) > limit, float("-inf")
            )
        return logits

    def init_as_output_embedding(self) -> None:
        """fairseq's output-projection init: the group layer ~ N(0, d^-0.5) with zero bias, the node (token)
        embeddings ~ N(0, hidden^-0.5); queries and the zero-initialised group MLPs keep their init."""
        nn.init.normal_(self.group.weight, mean=0.0, std=self.in_features**-0.5)
        nn.init.zeros_(self.group.bias)
        for emb in self.node_embed:
            if isinstance(emb, nn.Embedding):
                nn.init.normal_(emb.weight, mean=0.0, std=self.hidden_dim**-0.5)

    def _forward(
        self, x: torch.Tensor, target, label_smoothing: float = 0.0, smoothing: str = "head", reduction="mean"
    ) -> HeadOutput:
        eps = check_smoothing(label_smoothing, smoothing)
        if smoothing == "label":
            loss, nll = self.smoothed_nll(x, target, eps)
            return HeadOutput(reduce_loss(loss, None, reduction), -nll)
        out = self.teacher_forced(x, target)
        lp = sum(
            F.log_softmax(upcast(z), -1).gather(1, t[:, None]).squeeze(1)
            for z, t in zip(out.logits, out.targets)
        )
        loss = self.loss_from_levels(out, reduction=reduction, label_smoothing=eps)
        if reduction == "none":
            loss = loss.reshape(target.shape)
        return HeadOutput(loss, lp.reshape(target.shape))

    def teacher_forced(self, x: torch.Tensor, target: torch.Tensor) -> MHCOutput:
        """Teacher-forced per-level sibling logits for ``target`` (the training fast path)."""
        flat, lead = self._flat(x)
        if not isinstance(target, torch.Tensor):
            raise ValueError(
                f"MHCHead trains on hard label ids (a tensor), got {type(target).__name__}; "
                "soft/mixed targets need MHPHead"
            )
        target = check_class_ids(target, self.num_labels)
        if tuple(target.shape) != tuple(lead):
            raise ValueError(f"target shape {tuple(target.shape)} does not match the features {tuple(lead)}")
        digits = self.codec.encode(target.reshape(-1))
        logits, targets = [self._root_logits(flat)], [digits[:, 0]]
        prefix = digits[:, 0]
        for h in range(1, self.codec.num_heads):
            q = self.query(h, flat)
            logits.append(self._children_logits(h, q, prefix[:, None]).squeeze(1))
            targets.append(digits[:, h])
            prefix = prefix * self.codec.head_sizes[h] + digits[:, h]
        return MHCOutput(logits, targets)

    def loss_from_levels(
        self, output: MHCOutput, reduction: str = "mean", label_smoothing: float = 0.0
    ) -> torch.Tensor:
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

    # ------------------------------------------------------------------ inference
    def _topk_flat(
        self, x: torch.Tensor, k: int, beam: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # the beam is widened to k so that k leaves always exist (beam=1, k=1 is greedy decoding)
        # Valid prefixes (every id < N below them) are always ranked above invalid ones, whatever the scores:
        # NaN/inf features gave NaN scores that outranked the -inf mask, and ids >= N came out. Ranked
        # valid-first, the beam keeps an invalid prefix only when too few valid ones exist, and since
        # beam >= k, the last level always has k valid leaves.
        beam = max(self.beam if beam is None else as_int(beam, "beam", minimum=1), k)
        lp = F.log_softmax(upcast(self._root_logits(x)), -1)
        roots = torch.arange(lp.shape[1], device=x.device)
        scores, prefix = valid_first_topk(lp, (roots > self._limits[0]).expand_as(lp), min(beam, lp.shape[1]))
        for h in range(1, self.codec.num_heads):
            q = self.query(h, x)
            child = self._child_log_probs(h, q, prefix)  # (B, P, C)
            total = (scores.unsqueeze(-1) + child).flatten(1)
            size = self.codec.head_sizes[h]
            ids = (prefix.unsqueeze(-1) * size + torch.arange(size, device=x.device)).flatten(1)
            keep = k if h == self.codec.num_heads - 1 else beam
            scores, pos = valid_first_topk(total, ids > self._limits[h], min(keep, total.shape[1]))
            prefix = ids.gather(1, pos)
        return scores[:, :k], prefix[:, :k]

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int, beam: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam-search top-k (beam defaults to ``self.beam``; beam >= C_0 * ... is exact)."""
        k = self._check_k(k)
        flat, lead = self._flat(x)
        values, indices = self._topk_flat(flat, k, beam)
        return values.reshape(*lead, k), indices.reshape(*lead, k)

    # ------------------------------------------------------------------ exact likelihood (NMT output layer)
    def tie_leaf_embedding(self, weight: nn.Parameter) -> None:
        """Share the last level's node embeddings with ``weight`` (N', hidden), N' >= num_labels.

        With contiguous id blocks the leaf of label v is node v, so a decoder's input embedding row of
        token v becomes that token's output embedding (weight tying, as ``--share-decoder-input-output-embed``).
        """
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise ValueError(f"tie_leaf_embedding needs a 2-D nn.Parameter, got {type(weight).__name__}")
        rows, width = weight.shape
        if width != self.hidden_dim:
            raise ValueError(
                f"cannot tie leaf embeddings: weight width {width} != MHC hidden_dim {self.hidden_dim}"
            )
        if rows < self.num_labels:
            raise ValueError(
                f"cannot tie leaf embeddings: weight has {rows} rows < num_labels={self.num_labels}"
            )
        self.node_embed[-1] = TiedNodeEmbedding(weight)

    def level_log_probs(self, x: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced log p(sibling | true prefix) per level, each (B, C_h) float; masked siblings -inf.

        Only the C_0 groups and the C_h children of the true prefix are scored (batched gathers + bmm);
        nothing |V|-wide is formed.
        """
        flat, _ = self._flat(x)
        target = check_class_ids(target, self.num_labels)
        digits = self.codec.encode(target.reshape(-1))
        logits, prefix = [self._root_logits(flat)], digits[:, 0]
        for h in range(1, self.codec.num_heads):
            logits.append(self._sibling_logits(h, self.query(h, flat), prefix))
            prefix = prefix * self.codec.head_sizes[h] + digits[:, h]
        return [F.log_softmax(upcast(z), -1) for z in logits]

    GROUPED_MAX_PARENTS = 512  # above this many distinct parents in a batch, score per item instead

    def _sibling_logits(self, level: int, query: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
        """(B, C_level) logits of the children of ``parent`` (B,), masked; nothing |V|-wide.

        Items are sorted by parent and each parent's children are scored for all its items with one
        (n_p, hidden) x (hidden, C) matmul: dense GEMMs instead of gathering a (B, C, hidden) copy of the
        node table (4-10x faster on CPU at |V| = 8k-32k). With very many distinct parents (deep trees)
        it falls back to the per-item product.
        """
        size = self.codec.head_sizes[level]
        weight, bias = self.node_embed[level - 1].weight, self.node_bias[level - 1].weight
        uniq, inverse, counts = torch.unique(parent, return_inverse=True, return_counts=True)
        nodes = parent[:, None] * size + torch.arange(size, device=parent.device)
        if uniq.numel() > self.GROUPED_MAX_PARENTS:
            emb = self.node_embed[level - 1](nodes)  # (B, C, hidden)
            z = (emb * query[:, None, :]).sum(-1) + bias[:, 0][nodes]
        else:
            rows = bias.shape[0]  # prod(C[: level + 1]) nodes; a tied leaf table may have fewer rows
            if weight.shape[0] < rows:
                weight = F.pad(weight, (0, 0, 0, rows - weight.shape[0]))
            tables = weight.view(-1, size, weight.shape[1]).index_select(0, uniq).unbind(0)
            biases = bias.view(-1, size).index_select(0, uniq).unbind(0)
            order = torch.argsort(inverse, stable=True)
            pieces = query.index_select(0, order).split(counts.tolist())
            z_sorted = torch.cat([q @ t.t() + b for q, t, b in zip(pieces, tables, biases)])
            z = z_sorted.index_select(0, torch.argsort(order))
        return z.masked_fill(nodes > self._limits[level], float("-inf"))

    def target_log_prob(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Exact log p(target) per item, shaped like ``target``: sum over levels of log p(digit | prefix)."""
        target = check_class_ids(target, self.num_labels)
        digits = self.codec.encode(target.reshape(-1))
        lps = self.level_log_probs(x, target)
        logp = sum(lp.gather(1, digits[:, h : h + 1]).squeeze(1) for h, lp in enumerate(lps))
        return logp.reshape(target.shape)

    def _leaves_under(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Number of valid labels (< N) below each level-``level`` node id."""
        stride = self.codec.strides[level]
        return (self.num_labels - nodes * stride).clamp(0, stride)

    def smoothed_nll(
        self, x: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, nll) per item for the token-level smoothed target fairseq users expect.

        Target over labels: q(true) = 1 - eps, q(v) = eps / (N - 1) for every other label (fairseq's
        ``label_smoothed_nll_loss``). Its cross-entropy splits over the tree, H(q, p) = sum over internal
        nodes m of Q(m) * CE(q(.|m), p(.|m)), with Q(m) the target mass below m. The terms on the true path
        are kept exactly (children of the true prefix only); off-path subtrees take the model's own
        conditional as their target (zero gradient), since scoring them would need every label. So every
        group and every sibling of the true label get exactly their uniform share, the true label 1 - eps.
        ``nll`` = -log p(target), exact. With eps = 0 both are equal.
        """
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        eps = float(label_smoothing)
        target = check_class_ids(target, self.num_labels)
        flat_t = target.reshape(-1)
        digits = self.codec.encode(flat_t)
        lps = self.level_log_probs(x, target)
        u = eps / (self.num_labels - 1) if self.num_labels > 1 else 0.0
        nll = torch.zeros_like(lps[0][:, 0])
        loss = torch.zeros_like(nll)
        prefix = torch.zeros_like(flat_t)
        for h, lp in enumerate(lps):
            size = self.codec.head_sizes[h]
            sib = torch.arange(size, device=lp.device)
            nodes = prefix[:, None] * size + sib  # (B, C_h) ids of the siblings at level h
            on_path = sib == digits[:, h : h + 1]
            mass = u * self._leaves_under(h, nodes).to(lp.dtype) + (1.0 - eps - u) * on_path.to(lp.dtype)
            loss = loss - (mass * lp.masked_fill(mass == 0, 0.0)).sum(-1)
            nll = nll - lp.gather(1, digits[:, h : h + 1]).squeeze(1)
            prefix = prefix * size + digits[:, h]
        return loss.reshape(target.shape), nll.reshape(target.shape)

    def _level_logits_all(self, level: int, query: torch.Tensor) -> torch.Tensor:
        """Logits of every level-``level`` node as one (B, hidden) x (hidden, nodes) matmul, masked."""
        nodes = math.prod(self.codec.head_sizes[: level + 1])
        weight = self.node_embed[level - 1].weight
        rows = min(nodes, weight.shape[0])
        bias = self.node_bias[level - 1].weight[:rows, 0]
        z = F.linear(query, weight[:rows], bias)  # one fused matmul + bias, as fast as nn.Linear
        if rows < nodes:  # tied leaf table with N rows < prod(C_h) nodes: the rest are invalid anyway
            z = F.pad(z, (0, nodes - rows), value=float("-inf"))
        if self._limits[level] < nodes - 1:
            z = z.masked_fill(torch.arange(nodes, device=z.device) > self._limits[level], float("-inf"))
        return z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact (..., N) log-probabilities (materialises N), one matmul per level: the queries times the
        node tables directly, the cost of a dense d x N output layer (what beam search needs)."""
        flat, lead = self._flat(x)
        lp = F.log_softmax(upcast(self._root_logits(flat)), -1)
        for h in range(1, self.codec.num_heads):
            z = upcast(self._level_logits_all(h, self.query(h, flat))).view(flat.shape[0], lp.shape[1], -1)
            # log p(child) = z - (logsumexp over siblings - log p(parent)): one pass over the (B, N) scores,
            # in place when no gradient is needed (beam search), instead of log_softmax + add + nan_to_num
            lse = torch.logsumexp(z, -1, keepdim=True)
            offset = torch.where(torch.isneginf(lse), math.inf, lse - lp.unsqueeze(-1))  # all-masked group
            lp = (z - offset if z.requires_grad else z.sub_(offset)).flatten(1)
        return lp[:, : self.num_labels].reshape(*lead, self.num_labels)
