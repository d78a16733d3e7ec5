"""MHC, multi-head cascade (single-label): head 1 picks among groups, each next head ranks the children of
the kept prefixes. A label is a root-to-leaf path; p(id) = prod_h p(digit_h | prefix), a softmax over
siblings at every level (hierarchical softmax over contiguous blocks of tree positions).

``shortlist=K`` puts K labels directly at the root, beside the tail's groups (adaptive softmax's head
cluster): for them p(id) is one root softmax entry; only the tail is factorised p(group) p(id | group).
``label_order`` says which labels are the short list and how the tail is grouped (:class:`LabelOrder`;
default: id order, i.e. frequency bins for a frequency-sorted vocabulary). The codec describes the tail
tree, over N - K tail positions.

Level 0: the short list's scores (a query ``Linear(d, hidden)`` against K label embeddings) next to
``Linear(d, C_0)`` group scores. Level h >= 1: a query projection ``Linear(d, hidden)`` and one embedding
per level-h node (prefix of h+1 digits); a child's logit = node embedding . query (+ node bias).
``group_mlp_dim > 0`` adds a GELU MLP (zero-initialised output, so training starts from the linear head) to
the scores of every group level: a group's exact log-mass is a log-sum-exp over its members' scores,
which a linear map of the features can only approximate (measured on NMT, docs/fairseq.md).
Training uses teacher forcing: each level's loss is the CE over the siblings of the ground-truth prefix,
so per step only K + sum_h C_h scores are computed, and the tail levels only for tail targets. Inference:
beam search of width ``beam`` over prefixes, merged with the short list. Nodes whose every completion is
>= the tail size are masked.

``sparse_grad=True``: the node tables' gradients are row-sparse (the sibling blocks a step scores, sorted
and unique), so a lazy optimiser (:class:`mhe_plugins.optim.LazyAdam`) updates only those rows. With dense
Adam every step touches all N node rows: at 10^7 labels that was 4.7 s per step of 512 examples (measured
in the scale benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import as_int, check_class_ids
from ..codec import LabelCodec
from ..decode import valid_first_topk
from .base import HeadOutput, MHEHead, check_smoothing, reduce_loss, upcast
from .label_order import LabelOrder
from .mhc_full import FullDistribution
from .mhc_layers import MHCOutput, TiedNodeEmbedding, _embedding, _Paths, _residual_mlp
from .mhc_pruned import PrunedDistribution
from .sparse_gather import gather_rows_sparse_grad

__all__ = ["MHCHead", "MHCOutput", "TiedNodeEmbedding"]


def _tracing() -> bool:
    """True under torch.export / ONNX export / TorchScript tracing, where data-dependent shapes fail."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


class MHCHead(FullDistribution, PrunedDistribution, MHEHead):
    """Loss keywords: ``label_smoothing``, ``smoothing`` (``"head"``: every level's sibling CE smoothed by
    eps; ``"label"``: the true label keeps 1 - eps, :meth:`smoothed_nll`), ``reduction``."""

    kind = "mhc"

    @staticmethod
    def codec_labels(num_labels: int, options: dict[str, Any]) -> int:
        """The codec covers the tail: N minus the short list."""
        n = as_int(num_labels, "num_labels", minimum=1)
        k = as_int(options.get("shortlist", 0) or 0, "shortlist", minimum=0)
        if k >= n:
            raise ValueError(
                f"shortlist={k} must be smaller than the number of labels ({n}): the tail needs a label"
            )
        return n - k

    def __init__(
        self,
        in_features: int,
        codec: LabelCodec,
        hidden_dim: int = 256,
        beam: int = 8,
        group_mlp_dim: int = 0,
        shortlist: int = 0,
        label_order: Sequence[int] | torch.Tensor | None = None,
        sparse_grad: bool = False,
    ):
        super().__init__(in_features, codec)
        self.sparse_grad = bool(sparse_grad)
        if codec.num_heads < 2:
            raise ValueError(f"MHC needs at least 2 heads, got head sizes {list(codec.head_sizes)}")
        self.hidden_dim = as_int(hidden_dim, "hidden_dim", minimum=1)
        self.beam = as_int(beam, "beam", minimum=1)
        self.group_mlp_dim = as_int(group_mlp_dim, "group_mlp_dim", minimum=0)
        self.shortlist = as_int(shortlist, "shortlist", minimum=0)
        self.label_order = LabelOrder(self.shortlist + codec.num_labels, self.shortlist, label_order)
        self.group = nn.Linear(in_features, codec.head_sizes[0])
        self.queries = nn.ModuleList(nn.Linear(in_features, hidden_dim) for _ in codec.head_sizes[1:])
        # group levels 0 .. H-2: an MLP added to the root's group logits (level 0) or the query (levels >= 1)
        self.group_mlps = nn.ModuleList(
            _residual_mlp(in_features, self.group_mlp_dim, codec.head_sizes[0] if h == 0 else hidden_dim)
            for h in range(codec.num_heads - 1)
            if self.group_mlp_dim
        )
        if self.shortlist:
            self.short_query = nn.Linear(in_features, hidden_dim)
            self.short_embed, self.short_bias = _embedding(self.shortlist, hidden_dim)
        self.node_embed = nn.ModuleList()
        self.node_bias = nn.ModuleList()
        for h in range(1, codec.num_heads):
            emb, bias = _embedding(math.prod(codec.head_sizes[: h + 1]), hidden_dim)
            self.node_embed.append(emb)
            self.node_bias.append(bias)
        # largest valid prefix id per level (prefix p valid iff p <= limit)
        self._limits = [codec.prefix_limit(h) for h in range(codec.num_heads)]

    @property
    def num_labels(self) -> int:
        return self.shortlist + self.codec.num_labels

    @property
    def tied(self) -> bool:
        return isinstance(self.node_embed[-1], TiedNodeEmbedding)

    def extra_repr(self) -> str:
        return (
            f"head_sizes={list(self.codec.head_sizes)}, num_labels={self.num_labels}, beam={self.beam}, "
            f"group_mlp_dim={self.group_mlp_dim}, shortlist={self.shortlist}"
            + (", sparse_grad=True" if self.sparse_grad else "")
        )

    def set_label_order(self, order: Sequence[int] | torch.Tensor) -> None:
        """``order[position] = label``: the first K are the short list, the rest the tail in tree order."""
        self.label_order.set(order)

    def query(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """(B, hidden) query of ``level`` >= 1; its children's logits are node embedding . query + bias."""
        q = self.queries[level - 1](x)
        if self.group_mlps and level < self.codec.num_heads - 1:
            q = q + self.group_mlps[level](x)
        return q

    # ------------------------------------------------------------------ scoring
    def _embed(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Embeddings of level-``level`` nodes; tied leaves are looked up by the label at that position."""
        if level == self.codec.num_heads - 1 and self.tied:
            return self.node_embed[-1](self.label_order.tail_labels(nodes))
        return self.node_embed[level - 1](nodes)

    def _children_logits(self, level: int, query: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """Logits of the children of ``parents`` (B, P) at ``level`` >= 1 -> (B, P, C_level), masked.

        Eager inference (beam search) goes through :meth:`_sibling_logits`: the (B, P, C, hidden) gather
        below was 39 GB for 320 rows, beam 10 at |V| = 256k. Export and tracing keep the gather, since
        the grouping by distinct parent is data-dependent and cannot be traced."""
        size = self.codec.head_sizes[level]
        if not torch.is_grad_enabled() and not _tracing():
            flat = query.repeat_interleave(parents.shape[1], 0)
            return self._sibling_logits(level, flat, parents.reshape(-1)).view(*parents.shape, size)
        if self.sparse_grad and torch.is_grad_enabled() and not (self.tied and level == len(self.node_embed)):
            emb, bias, nodes = self._sibling_blocks(level, parents)
        else:
            nodes = parents.unsqueeze(-1) * size + torch.arange(size, device=parents.device)  # (B, P, C)
            emb, bias = self._embed(level, nodes), self.node_bias[level - 1](nodes).squeeze(-1)
        logits = torch.einsum("bpch,bh->bpc", emb, query) + bias  # emb (B, P, C, hidden)
        return logits.masked_fill(nodes > self._limits[level], float("-inf"))

    def _sibling_blocks(
        self, level: int, parents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeddings, biases, node ids) of the children of ``parents`` (B, P), read once per distinct
        parent with a row-sparse gradient: the blocks of distinct sorted parents are sorted unique rows."""
        size = self.codec.head_sizes[level]
        uniq, inv = parents.unique(return_inverse=True)
        rows = (uniq.unsqueeze(-1) * size + torch.arange(size, device=parents.device)).flatten()
        table = gather_rows_sparse_grad(self.node_embed[level - 1].weight, rows).view(len(uniq), size, -1)
        bias = gather_rows_sparse_grad(self.node_bias[level - 1].weight, rows).view(len(uniq), size)
        flat = inv.reshape(-1)  # index_select: its backward is an index_add, 3x cheaper than index_put's
        return (
            table.index_select(0, flat).view(*inv.shape, size, -1),
            bias.index_select(0, flat).view(*inv.shape, size),
            rows.view(len(uniq), size).index_select(0, flat).view(*inv.shape, size),
        )

    def _child_log_probs(self, level: int, query: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """log p(child | parent); children of an invalid parent (all masked) get -inf, not NaN."""
        lp = F.log_softmax(upcast(self._children_logits(level, query, parents)), -1)
        return lp.nan_to_num(nan=float("-inf"))

    def _group_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.group(x)
        if self.group_mlps:
            logits = logits + self.group_mlps[0](x)
        limit = self._limits[0]
        if limit < logits.shape[-1] - 1:
            logits = logits.masked_fill(
                torch.arange(logits.shape[-1], device=x.device) > limit, float("-inf")
            )
        return logits

    def _short_table(self) -> torch.Tensor:
        if self.tied:
            return self.node_embed[-1](self.label_order.shortlist_labels())
        return self.short_embed.weight

    def _root_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K + C_0): the short list's labels, then the tail's groups."""
        groups = self._group_logits(x)
        if not self.shortlist:
            return groups
        short = F.linear(self.short_query(x), self._short_table(), self.short_bias.weight[:, 0])
        return torch.cat([short, groups], -1)

    def init_as_output_embedding(self) -> None:
        """fairseq's output-projection init: the group layer ~ N(0, d^-0.5) with zero bias, the node (token)
        embeddings ~ N(0, hidden^-0.5); queries and the zero-initialised group MLPs keep their init."""
        nn.init.normal_(self.group.weight, mean=0.0, std=self.in_features**-0.5)
        nn.init.zeros_(self.group.bias)
        tables = [*self.node_embed, getattr(self, "short_embed", None)]
        for emb in tables:
            if isinstance(emb, nn.Embedding):
                nn.init.normal_(emb.weight, mean=0.0, std=self.hidden_dim**-0.5)

    # ------------------------------------------------------------------ teacher forcing
    def _paths(self, target: torch.Tensor) -> _Paths:
        """Root node and tail digits of each (flat, checked) target."""
        pos = self.label_order.positions(target)
        if not self.shortlist:
            digits = self.codec.encode(pos)
            return _Paths(digits[:, 0], None, digits)
        rows = (pos >= self.shortlist).nonzero().squeeze(1)
        digits = self.codec.encode(pos.index_select(0, rows) - self.shortlist)
        root = pos.index_put((rows,), digits[:, 0] + self.shortlist)
        return _Paths(root, rows, digits)

    @staticmethod
    def _rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return x if rows is None else x.index_select(0, rows)

    @staticmethod
    def _scatter_rows(base: torch.Tensor, rows: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
        return base + values if rows is None else base.index_add(0, rows, values)

    def _checked_target(self, x: torch.Tensor, target) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
        flat, lead = self._flat(x)
        if not isinstance(target, torch.Tensor):
            raise ValueError(
                f"MHCHead trains on hard label ids (a tensor), got {type(target).__name__}; "
                "soft/mixed targets need MHPHead"
            )
        target = check_class_ids(target, self.num_labels)
        if tuple(target.shape) != tuple(lead):
            raise ValueError(f"target shape {tuple(target.shape)} does not match the features {tuple(lead)}")
        return flat, target.reshape(-1), lead

    def _forward(
        self, x: torch.Tensor, target, label_smoothing: float = 0.0, smoothing: str = "head", reduction="mean"
    ) -> HeadOutput:
        eps = check_smoothing(label_smoothing, smoothing)
        if smoothing == "label":
            loss, nll = self.smoothed_nll(x, target, eps)
            return HeadOutput(reduce_loss(loss, None, reduction), -nll)
        out = self.teacher_forced(x, target)
        lp = torch.zeros(target.numel(), dtype=upcast(out.logits[0]).dtype, device=out.logits[0].device)
        for z, t, rows in zip(out.logits, out.targets, out.rows):
            own = F.log_softmax(upcast(z), -1).gather(1, t[:, None]).squeeze(1)
            lp = self._scatter_rows(lp, rows, own)
        loss = self.loss_from_levels(out, reduction=reduction, label_smoothing=eps)
        if reduction == "none":
            loss = loss.reshape(target.shape)
        return HeadOutput(loss, lp.reshape(target.shape))

    def teacher_forced(self, x: torch.Tensor, target: torch.Tensor) -> MHCOutput:
        """Teacher-forced per-level sibling logits for ``target`` (the training fast path); tail levels
        cover the tail targets only (``rows``)."""
        flat, target, _ = self._checked_target(x, target)
        paths = self._paths(target)
        tail = self._rows(flat, paths.rows)
        logits, targets, rows = [self._root_logits(flat)], [paths.root], [None]
        prefix = paths.digits[:, 0]
        for h in range(1, self.codec.num_heads):
            logits.append(self._children_logits(h, self.query(h, tail), prefix[:, None]).squeeze(1))
            targets.append(paths.digits[:, h])
            rows.append(paths.rows)
            prefix = prefix * self.codec.head_sizes[h] + paths.digits[:, h]
        return MHCOutput(logits, targets, rows)

    def loss_from_levels(
        self, output: MHCOutput, reduction: str = "mean", label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Sum over levels of the CE among siblings (masked siblings get no smoothing mass)."""
        rows_per_level = output.rows or [None] * len(output.logits)
        per = torch.zeros(
            output.targets[0].shape[0], dtype=upcast(output.logits[0]).dtype, device=output.logits[0].device
        )
        for z, t, rows in zip(output.logits, output.targets, rows_per_level):
            z = upcast(z)
            if label_smoothing:
                logp = F.log_softmax(z, -1)
                finite = torch.isfinite(logp)
                smooth = -(logp.masked_fill(~finite, 0).sum(-1)) / finite.sum(-1)
                nll = -logp.gather(1, t[:, None]).squeeze(1)
                level = (1 - label_smoothing) * nll + label_smoothing * smooth
            else:
                level = F.cross_entropy(z, t, reduction="none")
            per = self._scatter_rows(per, rows, level)
        return reduce_loss(per, None, reduction)

    # ------------------------------------------------------------------ inference
    def _tail_topk(self, x: torch.Tensor, group_lp: torch.Tensor, k: int, beam: int):
        """Beam search over the tail tree from the groups' log-probs: (values, tail positions), k each."""
        roots = torch.arange(group_lp.shape[1], device=x.device)
        scores, prefix = valid_first_topk(
            group_lp, (roots > self._limits[0]).expand_as(group_lp), min(beam, group_lp.shape[1])
        )
        for h in range(1, self.codec.num_heads):
            child = self._child_log_probs(h, self.query(h, x), prefix)  # (B, P, C)
            total = (scores.unsqueeze(-1) + child).flatten(1)
            size = self.codec.head_sizes[h]
            ids = (prefix.unsqueeze(-1) * size + torch.arange(size, device=x.device)).flatten(1)
            keep = k if h == self.codec.num_heads - 1 else beam
            scores, pos = valid_first_topk(total, ids > self._limits[h], min(keep, total.shape[1]))
            prefix = ids.gather(1, pos)
        return scores[:, :k], prefix[:, :k]

    def _topk_flat(
        self, x: torch.Tensor, k: int, beam: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # the beam is widened to k so that k leaves always exist (beam=1, k=1 is greedy decoding)
        # Valid prefixes (every id < N below them) are always ranked above invalid ones, whatever the scores:
        # NaN/inf features gave NaN scores that outranked the -inf mask, and ids >= N came out. Ranked
        # valid-first, the beam keeps an invalid prefix only when too few valid ones exist, and since
        # beam >= k, the last level always has k valid leaves.
        beam = max(self.beam if beam is None else as_int(beam, "beam", minimum=1), k)
        K = self.shortlist
        lp = F.log_softmax(upcast(self._root_logits(x)), -1)
        k_tail = min(k, self.codec.num_labels)
        values, tail = self._tail_topk(x, lp[:, K:], k_tail, beam)
        if not K:
            return values, self.label_order.labels(tail)
        short_v, short_pos = lp[:, :K].topk(min(k, K), dim=1)
        cand_v = torch.cat([short_v, values], 1)
        cand_pos = torch.cat([short_pos, tail + K], 1)
        v, pick = valid_first_topk(cand_v, cand_pos >= self.num_labels, k)
        return v, self.label_order.labels(cand_pos.gather(1, pick))

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int, beam: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam-search top-k (beam defaults to ``self.beam``; beam >= C_0 * ... is exact)."""
        k = self._check_k(k)
        flat, lead = self._flat(x)
        values, indices = self._topk_flat(flat, k, beam)
        return values.reshape(*lead, k), indices.reshape(*lead, k)

    # ------------------------------------------------------------------ exact likelihood (NMT output layer)
    def tie_leaf_embedding(self, weight: nn.Parameter) -> None:
        """Share the label embeddings (tail leaves and short list) with ``weight`` (N', hidden), N' >= N,
        indexed by label id: a decoder's input embedding row of token v becomes that token's output
        embedding (weight tying, as ``--share-decoder-input-output-embed``)."""
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
        if self.sparse_grad:  # the tied table's owner (a decoder embedding) takes dense gradients
            raise ValueError(
                "cannot tie leaf embeddings of a sparse_grad MHC head: build it with sparse_grad=False"
            )
        self.node_embed[-1] = TiedNodeEmbedding(weight)
        if self.shortlist:
            del self.short_embed

    def level_log_probs(self, x: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced log p(sibling | true prefix) per level, float; masked siblings -inf. Level 0 is
        (B, K + C_0) for every item; tail levels (T, C_h) for the T tail items (all items when K = 0).

        Only the root and the C_h children of the true prefix are scored (batched gathers + GEMMs);
        nothing |V|-wide is formed.
        """
        flat, target, _ = self._checked_target(x, target)
        return self._level_log_probs(flat, self._paths(target))

    def _level_log_probs(self, flat: torch.Tensor, paths: _Paths) -> list[torch.Tensor]:
        tail = self._rows(flat, paths.rows)
        logits, prefix = [self._root_logits(flat)], paths.digits[:, 0]
        for h in range(1, self.codec.num_heads):
            logits.append(self._sibling_logits(h, self.query(h, tail), prefix))
            prefix = prefix * self.codec.head_sizes[h] + paths.digits[:, h]
        return [F.log_softmax(upcast(z), -1) for z in logits]

    GROUPED_MAX_PARENTS = 512  # above this many distinct parents in a batch, score per item instead
    PER_ITEM_ELEMENTS = 1 << 25  # per-item scoring gathers at most this many embedding values at a time

    def _sibling_logits(self, level: int, query: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
        """(B, C_level) logits of the children of ``parent`` (B,), masked; nothing |V|-wide.

        Items are sorted by parent and each parent's children are scored for all its items with one
        (n_p, hidden) x (hidden, C) matmul: dense GEMMs instead of gathering a (B, C, hidden) copy of the
        node table (4-10x faster on CPU at |V| = 8k-32k). With very many distinct parents (deep trees)
        it falls back to the per-item product.
        """
        size = self.codec.head_sizes[level]
        if not parent.numel():  # an empty batch: no parent to group by
            return query.new_zeros(0, size)
        bias = self.node_bias[level - 1]
        arange = torch.arange(size, device=parent.device)
        nodes = parent[:, None] * size + arange
        uniq, inverse, counts = torch.unique(parent, return_inverse=True, return_counts=True)
        if uniq.numel() > self.GROUPED_MAX_PARENTS:  # in row blocks: the (rows, C, hidden) copy stays bounded
            step = max(1, self.PER_ITEM_ELEMENTS // (size * self.hidden_dim))
            blocks = zip(nodes.split(step), query.split(step))
            z = torch.cat([(self._embed(level, n) * q[:, None, :]).sum(-1) for n, q in blocks])
            z = z + bias(nodes)[..., 0]
        else:
            kids = uniq[:, None] * size + arange  # (U, C)
            tables, biases = self._embed(level, kids).unbind(0), bias(kids)[..., 0].unbind(0)
            order = torch.argsort(inverse, stable=True)
            pieces = query.index_select(0, order).split(counts.tolist())
            z_sorted = torch.cat([q @ t.t() + b for q, t, b in zip(pieces, tables, biases)])
            z = z_sorted.index_select(0, torch.argsort(order))
        return z.masked_fill(nodes > self._limits[level], float("-inf"))

    def target_log_prob(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Exact log p(target) per item, shaped like ``target``: sum over levels of log p(digit | prefix)."""
        flat, flat_t, _ = self._checked_target(x, target)
        paths = self._paths(flat_t)
        lps = self._level_log_probs(flat, paths)
        logp = lps[0].gather(1, paths.root[:, None]).squeeze(1)
        for h, lp in enumerate(lps[1:], start=1):
            logp = self._scatter_rows(logp, paths.rows, lp.gather(1, paths.digits[:, h : h + 1]).squeeze(1))
        return logp.reshape(target.shape)

    def _weighted_children_sum(self, level: int, lp: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """sum_j leaves_under(child j) * lp[:, j] over the valid children of each item's ``prefix`` (the
        invalid ones are -inf in ``lp`` and hold no leaves). Every valid child holds ``stride`` leaves but
        under the last parent, whose rows are recomputed exactly; NaN stays NaN."""
        size, stride = self.codec.head_sizes[level], self.codec.strides[level]
        total = torch.where(torch.isneginf(lp), 0.0, lp).sum(-1) * stride
        if stride == 1:
            return total
        rows = ((prefix + 1) * size * stride > self.codec.num_labels).nonzero().squeeze(1)
        if not rows.numel():
            return total
        kids = prefix.index_select(0, rows)[:, None] * size + torch.arange(size, device=lp.device)
        w = self._leaves_under(level, kids).to(lp.dtype)
        exact = (w * lp.index_select(0, rows).masked_fill(w == 0, 0.0)).sum(-1)
        return total.index_put((rows,), exact)

    def _leaves_under(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Number of valid tail positions below each level-``level`` node id."""
        stride = self.codec.strides[level]
        return (self.codec.num_labels - nodes * stride).clamp(0, stride)

    def smoothed_nll(
        self, x: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, nll) per item for the token-level smoothed target fairseq users expect.

        Target over labels: q(true) = 1 - eps, q(v) = eps / (N - 1) for every other label (fairseq's
        ``label_smoothed_nll_loss``). Its cross-entropy splits over the tree, H(q, p) = sum over internal
        nodes m of Q(m) * CE(q(.|m), p(.|m)), with Q(m) the target mass below m. The terms on the true path
        are kept exactly (children of the true prefix only); off-path subtrees take the model's own
        conditional as their target (zero gradient), since scoring them would need every label. So every
        root leaf, every group and every sibling of the true label get exactly their uniform share, the
        true label 1 - eps. ``nll`` = -log p(target), exact. With eps = 0 both are equal.
        """
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        eps, K = float(label_smoothing), self.shortlist
        flat, flat_t, _ = self._checked_target(x, target)
        paths = self._paths(flat_t)
        lps = self._level_log_probs(flat, paths)
        u = eps / (self.num_labels - 1) if self.num_labels > 1 else 0.0
        keep = 1.0 - eps - u  # the true node's mass beyond its uniform share u x (leaves below it)
        # per level: keep * (-log p(true child)) - u * sum_children leaves_under(child) * log p(child), as a
        # gather and a weighted row sum: no (items, children) mass tensor (a third of MHC's training step)
        root = lps[0]
        nll = -root.gather(1, paths.root[:, None]).squeeze(1)
        loss = keep * nll
        if u:
            valid = K + self._limits[0] + 1  # short list, then the groups that hold labels (the rest: -inf)
            groups = torch.arange(valid - K, device=root.device)
            under = torch.cat([root.new_ones(K), self._leaves_under(0, groups).to(root.dtype)])
            loss = loss - u * (root[:, :valid] @ under)
        prefix = paths.digits[:, 0]
        for h, lp in enumerate(lps[1:], start=1):
            own = -lp.gather(1, paths.digits[:, h : h + 1]).squeeze(1)
            level = keep * own
            if u:
                level = level - u * self._weighted_children_sum(h, lp, prefix)
            loss = self._scatter_rows(loss, paths.rows, level)
            nll = self._scatter_rows(nll, paths.rows, own)
            prefix = prefix * self.codec.head_sizes[h] + paths.digits[:, h]
        return loss.reshape(target.shape), nll.reshape(target.shape)
