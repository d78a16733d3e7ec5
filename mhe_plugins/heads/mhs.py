"""MHS, multi-head sampling: the classifier stored as (C_1, C_rest, d) groups of rows (group = head-0 digit);
a training step only scores the classes of the sampled groups. The drop-in for Partial FC at 10^6-10^7
classes, and the only MHS implementation (the face and pytorch-metric-learning heads wrap it).

Parameters (documented once, here):

- ``mode="batch_union"``: the groups hit by the (global) batch: every positive is present, its siblings
  are the negatives; ``mode="per_sample"``: each sample scores its own group plus ``sampled_groups - 1``
  random other groups (the reference's image-classification MHS, vectorised).
- ``sampled_groups`` (int): batch_union: top the union up with random groups to this many (split over the
  ranks in proportion to their groups when sharded); per_sample: groups per sample (default 4). ``sample_rate`` (float in (0, 1], batch_union only): top up to this
  fraction of the groups, as Partial FC's ``sample_rate`` (with ``(N, 1)`` heads it *is* Partial FC).
- ``sampling_correction`` (default on): sampled-softmax correction: the logits of randomly sampled groups
  get ``-log q`` added, q the group's inclusion probability under the sampling mode; the true group and the
  groups of the batch are never corrected. It only acts when random groups are drawn. Measured on the
  3,755-class glyph benchmark (per-sample, 16 groups): test top-1 96.01 vs 95.53 without (mean of 2 seeds,
  validation 99.77 vs 99.72), so it is the default; the face wrapper keeps Partial FC's uncorrected loss.
- ``margin``: a :mod:`mhe_plugins.margins` module (ArcFace/CosFace/combined): logits are scaled cosines with
  the margin on the target; without, plain dot products.
- ``group_shared``: each class row is its own row plus a row shared by its group (``group_weight``, zero
  at start). When the codes put alike labels in one group (codes that follow a label clustering), the
  shared row learns what siblings have in common from all their examples and a class's own row only the
  difference, a two-level prior like a cascade's without its extra decision; the score stays one dot
  product per class. Measured in the scale benchmark (``mhs@mhs_shared=true``, docs/scale.md).
- ``sparse_grad``: the weight's gradient is row-sparse over groups (sorted, coalesced), so
  :class:`mhe_plugins.optim.LazySGD` (or SparseAdam) touches only the sampled groups.
- ``process_group``: shard the groups over the ranks of this group (contiguous blocks, nothing replicated):
  embeddings and labels are all-gathered (with gradient), each rank scores the sampled groups it owns and
  the softmax cross-entropy is reduced across ranks; the loss is the global-batch loss on every rank. With
  ``None`` (or one process) it is the plain cross-entropy.

Inference uses the full classifier (chunked over classes for top-k). Ids >= N (when prod C_h > N) have rows
but are masked out everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checks import check_class_ids
from ..codec import LabelCodec
from ..decode import chunked_topk, merge_topk
from ..distributed import all_gather_batch, dist_softmax_cross_entropy, group_world_rank, shard_range
from ..margins import CombinedMargin
from .base import HeadOutput, MHEHead, check_smoothing, upcast
from .sparse_gather import gather_rows_sparse_grad

__all__ = ["MHSHead", "MHSOutput"]

MODES = ("batch_union", "per_sample")


class MHSOutput(NamedTuple):
    logits: torch.Tensor  # (B, K) logits over the sampled classes this rank scores (B = global batch)
    target: torch.Tensor  # (B,) column of the true class in ``logits``; -1 when another rank owns it
    groups: torch.Tensor  # (K / C_rest,) batch_union or (B, S) per_sample: global group ids of the columns


class MHSHead(MHEHead):
    """Loss keywords: ``label_smoothing`` (over the sampled real classes; ``smoothing`` "head" and "label"
    are the same for one softmax), ``reduction``. ``target_log_prob`` of the output is computed only when
    read (it needs every class: a chunked pass over the full classifier)."""

    kind = "mhs"

    def __init__(
        self,
        in_features: int,
        codec: LabelCodec,
        mode: str = "batch_union",
        sampled_groups: int | None = None,
        margin: CombinedMargin | None = None,
        sparse_grad: bool = False,
        init_std: float = 0.01,
        chunk_size: int = 65536,
        sample_rate: float | None = None,
        sampling_correction: bool = True,
        process_group=None,
        group_shared: bool = False,
    ):
        super().__init__(in_features, codec)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        num_groups = codec.head_sizes[0]
        if mode == "per_sample" and sampled_groups is None:
            sampled_groups = min(4, num_groups)
        if sampled_groups is not None and not 1 <= int(sampled_groups) <= num_groups:
            raise ValueError(f"sampled_groups must be in [1, {num_groups}], got {sampled_groups}")
        if sample_rate is not None:
            if mode != "batch_union" or sampled_groups is not None:
                raise ValueError("sample_rate is for mode='batch_union' without sampled_groups")
            if not 0.0 < float(sample_rate) <= 1.0:
                raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if margin is not None and not isinstance(margin, CombinedMargin):
            raise TypeError(
                f"margin must be a mhe_plugins.margins.CombinedMargin, got {type(margin).__name__}"
            )
        self.mode, self.margin = mode, margin
        self.sampled_groups = None if sampled_groups is None else int(sampled_groups)
        self.sample_rate = None if sample_rate is None else float(sample_rate)
        self.sampling_correction = bool(sampling_correction)
        self.sparse_grad, self.chunk_size = bool(sparse_grad), int(chunk_size)
        self.num_groups = num_groups
        self.group_size = codec.capacity // num_groups
        if process_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group was given but torch.distributed is not initialised")
        self.process_group = process_group
        self.world_size, self.rank = group_world_rank(process_group) if process_group is not None else (1, 0)
        if self.world_size > num_groups:
            raise ValueError(f"{num_groups} groups cannot be sharded over {self.world_size} ranks")
        self.group_start, self.group_end = shard_range(num_groups, self.rank, self.world_size)
        n_local = self.group_end - self.group_start
        self.weight = nn.Parameter(torch.randn(n_local, self.group_size, in_features) * init_std)
        self.group_weight = nn.Parameter(torch.zeros(n_local, in_features)) if group_shared else None
        # which local (group, slot) rows are real classes (id < N)
        ids = torch.arange(self.group_start * self.group_size, self.group_end * self.group_size)
        self.register_buffer(
            "valid", (ids < codec.num_labels).view(n_local, self.group_size), persistent=False
        )
        self._last_sampled: torch.Tensor | int = 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def extra_repr(self) -> str:
        shard = f", groups[{self.group_start}:{self.group_end}] rank {self.rank}/{self.world_size}"
        return (
            f"head_sizes={list(self.codec.head_sizes)}, num_labels={self.num_labels}, mode={self.mode}, "
            f"sampled_groups={self.sampled_groups}, sample_rate={self.sample_rate}, "
            f"sampling_correction={self.sampling_correction}, group_shared={self.group_weight is not None}"
            + (shard if self.sharded else "")
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dim() == 2 and w.numel() == self.weight.numel():
            state_dict[prefix + "weight"] = w.reshape(self.weight.shape)  # (groups, C_rest * d) layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ sampling
    def _group_rows(self, groups: torch.Tensor) -> torch.Tensor:
        """Class rows of sorted unique local groups (G, C_rest, d); row-sparse gradients if ``sparse_grad``."""
        take = gather_rows_sparse_grad if self.sparse_grad else (lambda w, g: w.index_select(0, g))
        rows = take(self.weight, groups)
        if self.group_weight is not None:
            rows = rows + take(self.group_weight, groups)[:, None, :]
        return rows

    def _scores(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (B, d) against class rows w (M, d): cosines when a margin is used, else dot products."""
        if self.margin is not None:
            return F.linear(F.normalize(x, dim=-1), F.normalize(w, dim=-1))
        return F.linear(x, w)

    def _target_count(self, n_local: int, positives: int) -> int:
        """Groups a rank scores in batch_union: its positives, topped up per sampled_groups / sample_rate."""
        if self.sample_rate is not None:
            k = math.ceil(self.sample_rate * n_local)
        elif self.sampled_groups is not None:
            k = math.ceil(self.sampled_groups * n_local / self.num_groups)
        else:
            k = 0
        return min(max(k, positives), n_local)

    def union_inclusion_prob(self, positives: int) -> float:
        """Probability that a given non-positive group of this rank is drawn as a random extra (batch_union)."""
        n_local = self.group_end - self.group_start
        k = self._target_count(n_local, positives)
        return (k - positives) / (n_local - positives) if n_local > positives else 1.0

    def per_sample_inclusion_prob(self) -> float:
        """Probability that a given other group is among a sample's ``sampled_groups - 1`` negatives."""
        return (self.sampled_groups - 1) / (self.num_groups - 1) if self.num_groups > 1 else 1.0

    def sample_groups(self, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """batch_union: (sorted local group indices to score, bool: drawn at random), from global own groups."""
        n_local = self.group_end - self.group_start
        mine = own[(own >= self.group_start) & (own < self.group_end)] - self.group_start
        positives = torch.unique(mine)
        k = self._target_count(n_local, positives.numel())
        if k <= positives.numel():
            return positives, torch.zeros_like(positives, dtype=torch.bool)
        if k == n_local:
            sel = torch.arange(n_local, device=own.device)
        else:
            noise = torch.rand(n_local, device=own.device)
            noise[positives] = 2.0  # positives first
            sel = noise.topk(k).indices.sort().values
        is_random = torch.ones_like(sel, dtype=torch.bool)
        is_random[torch.searchsorted(sel, positives)] = False
        return sel, is_random

    def _negatives(self, own: torch.Tensor) -> torch.Tensor:
        """per_sample: (B, S - 1) distinct random global groups other than each sample's own."""
        b = own.shape[0]
        noise = torch.rand(b, self.num_groups, device=own.device)
        noise.scatter_(1, own[:, None], -1.0)  # never the own group
        return noise.topk(self.sampled_groups - 1, dim=1).indices

    def _gather(self, x: torch.Tensor, target: torch.Tensor, extra: torch.Tensor | None):
        """Global batch from all ranks: embeddings (with gradient), labels and per-sample extra ids."""
        if not self.sharded:
            return x, target, extra
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.empty_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n, group=self.process_group)
        if len({int(s) for s in sizes}) != 1:
            raise ValueError(
                f"a sharded MHSHead needs the same local batch size on every rank, got {[int(s) for s in sizes]}"
            )
        ids = target[:, None] if extra is None else torch.cat([target[:, None], extra], 1)
        ids = all_gather_batch(ids, self.process_group, grad=False)
        xg = all_gather_batch(x, self.process_group)
        return xg, ids[:, 0], (None if extra is None else ids[:, 1:])

    # ------------------------------------------------------------------ training
    def _forward(
        self, x: torch.Tensor, target, label_smoothing: float = 0.0, smoothing: str = "head", reduction="mean"
    ) -> HeadOutput:
        eps = check_smoothing(label_smoothing, smoothing)
        if self.margin is not None:  # angular margins need fp32 cosines, even under autocast
            with torch.autocast(device_type=x.device.type, enabled=False):
                loss = self.loss_from_sampled(self.sampled_logits(x.float(), target), reduction, eps)
        else:
            loss = self.loss_from_sampled(self.sampled_logits(x, target), reduction, eps)
        return HeadOutput(loss, compute=lambda: self.target_log_prob(x, target))

    def target_log_prob(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Exact log p(target) under the full classifier, chunked over classes (no B x N tensor)."""
        target = check_class_ids(target, self.num_labels)
        flat, lead = self._flat(x)
        w = self.class_weights()
        scale = self.margin.s if self.margin is not None else 1.0
        lse = None
        for start in range(0, self.num_labels, self.chunk_size):
            part = torch.logsumexp(upcast(self._scores(flat, w[start : start + self.chunk_size])) * scale, -1)
            lse = part if lse is None else torch.logaddexp(lse, part)
        t = target.reshape(-1)
        own = upcast(self._rowwise(flat, w[t])) * scale
        return (own - lse).reshape(target.shape)

    def _rowwise(self, flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Score of each item against its own class row (B,)."""
        if self.margin is not None:
            return (F.normalize(flat, dim=-1) * F.normalize(rows, dim=-1)).sum(-1)
        return (flat * rows).sum(-1)

    def sampled_logits(self, x: torch.Tensor, target: torch.Tensor) -> MHSOutput:
        """Logits of the sampled classes for the global batch (this rank's columns when sharded)."""
        flat, _ = self._flat(x)
        target = check_class_ids(target, self.num_labels).reshape(-1)  # .long() truncated 1.5 to 1
        if target.shape[0] != flat.shape[0]:
            raise ValueError(f"{target.shape[0]} labels for {flat.shape[0]} embeddings")
        s = self.group_size
        negs = self._negatives(target // s) if self.mode == "per_sample" else None
        flat, target, negs = self._gather(flat, target, negs)
        own, member = target // s, target % s
        if self.mode == "batch_union":
            sel, is_random = self.sample_groups(own)
            scores = self._scores(flat, self._group_rows(sel).reshape(-1, self.in_features))
            loc = own - self.group_start
            if sel.numel():
                pos = torch.searchsorted(sel, loc).clamp(max=sel.numel() - 1)
                hit = sel[pos] == loc
            else:
                pos, hit = torch.zeros_like(loc), torch.zeros_like(loc, dtype=torch.bool)
            col = torch.where(hit, pos * s + member, torch.full_like(member, -1))
            valid = self.valid[sel].reshape(-1)
            bias = self._union_bias(is_random, valid, s)
            groups = sel + self.group_start
            self._last_sampled = self._count_union(own)
        else:
            groups = torch.cat([own[:, None], negs], 1)  # (B, S): own group first
            scores, valid = self._per_sample_scores(flat, groups)
            col = torch.where(valid[:, 0], member, torch.full_like(member, -1))  # own block owned here?
            valid = valid.repeat_interleave(s, 1) & self.valid_of(groups).flatten(1)
            bias = self._per_sample_bias(valid, s)
            self._last_sampled = torch.unique(groups).numel() * s
        logits = self.margin(scores, col) if self.margin is not None else scores
        if bias is not None:
            logits = logits + bias
        return MHSOutput(logits, col, groups)

    def valid_of(self, groups: torch.Tensor) -> torch.Tensor:
        """(..., C_rest) which slots of the given *global* groups are real classes."""
        ids = groups[..., None] * self.group_size + torch.arange(self.group_size, device=groups.device)
        return ids < self.num_labels

    def _per_sample_scores(self, flat: torch.Tensor, groups: torch.Tensor):
        """(B, S * C_rest) scores of each sample's groups owned here, and (B, S) which groups are owned."""
        owned = (groups >= self.group_start) & (groups < self.group_end)
        loc = (groups - self.group_start).clamp(0, self.group_end - self.group_start - 1)
        uniq = torch.unique(loc[owned])
        if uniq.numel() == 0:  # keep the graph connected to the gathered embeddings (backward all-reduces)
            uniq = torch.zeros(1, dtype=torch.long, device=flat.device)
        s_all = self._scores(flat, self._group_rows(uniq).reshape(-1, self.in_features))
        s_all = s_all.view(flat.shape[0], uniq.numel(), self.group_size)
        idx = torch.searchsorted(uniq, loc).clamp(max=uniq.numel() - 1)
        scores = s_all.gather(1, idx[..., None].expand(-1, -1, self.group_size)).flatten(1)
        return scores, owned

    def _union_bias(self, is_random: torch.Tensor, valid: torch.Tensor, s: int) -> torch.Tensor | None:
        """Additive column bias: -inf on padded ids, -log q on random extra groups (with the correction)."""
        corr = self.sampling_correction and bool(is_random.any())
        if not corr and bool(valid.all()):
            return None
        bias = torch.zeros(valid.shape, device=valid.device)
        if corr:
            q = self.union_inclusion_prob(int((~is_random).sum()))
            bias = bias.masked_fill(is_random.repeat_interleave(s), -math.log(q))
        return bias.masked_fill(~valid, -math.inf)

    def _per_sample_bias(self, valid: torch.Tensor, s: int) -> torch.Tensor | None:
        corr = self.sampling_correction and self.sampled_groups > 1
        if not corr and bool(valid.all()):
            return None
        bias = torch.zeros(valid.shape, device=valid.device)
        if corr:
            bias[:, s:] = -math.log(self.per_sample_inclusion_prob())  # every block but the own group
        return bias.masked_fill(~valid, -math.inf)

    def _count_union(self, own: torch.Tensor) -> torch.Tensor:
        """Classes scored over all ranks, computed locally (every rank knows the global labels and shards)."""
        u = torch.unique(own)
        total = 0
        for r in range(self.world_size):
            a, b = shard_range(self.num_groups, r, self.world_size)
            total += self._target_count(b - a, int(((u >= a) & (u < b)).sum()))
        return torch.tensor(total * self.group_size)

    @property
    def last_num_sampled(self) -> int:
        """Classes scored in the last step, summed over ranks (for logging)."""
        return int(self._last_sampled)

    def loss_from_sampled(
        self, output: MHSOutput, reduction: str = "mean", label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Cross-entropy of the sampled softmax (across ranks when sharded); 0 connected to the graph for B=0."""
        logits = upcast(output.logits)
        if logits.shape[0] == 0:
            if reduction == "none":
                return logits.sum(1)
            return logits.sum() * 0.0
        if self.sharded:
            if label_smoothing:
                raise ValueError("label_smoothing is not supported by a sharded MHSHead")
            per = dist_softmax_cross_entropy(logits, output.target, self.process_group, True)
            return _reduce(per, reduction)
        if label_smoothing:
            # smoothing mass only over real classes (masked columns are -inf)
            logp = F.log_softmax(logits, -1)
            nll = -logp.gather(1, output.target[:, None]).squeeze(1)
            finite = torch.isfinite(logp)
            smooth = -(logp.masked_fill(~finite, 0).sum(-1)) / finite.sum(-1)
            return _reduce((1 - label_smoothing) * nll + label_smoothing * smooth, reduction)
        return F.cross_entropy(logits, output.target, reduction=reduction)

    # ------------------------------------------------------------------ sharded state
    def shard_state(self) -> dict:
        """What a rank writes to its checkpoint shard (re-shardable: carries its group range)."""
        extra = {} if self.group_weight is None else {"group_weight": self.group_weight.detach().cpu()}
        return {
            **extra,
            "weight": self.weight.detach().cpu(),
            "group_start": self.group_start,
            "group_end": self.group_end,
            "head_sizes": list(self.codec.head_sizes),
            "num_classes": self.num_labels,
        }

    @torch.no_grad()
    def load_shards(self, shards: Sequence[dict], key: str = "weight") -> torch.Tensor:
        """This rank's block of ``key`` from shards that together cover all groups (any old world size).

        ``key="weight"`` loads it into the head (and the shared group rows, with ``group_shared``); other
        keys (e.g. an optimizer's momentum) are returned only.
        """
        for sh in shards:
            if (
                list(sh["head_sizes"]) != list(self.codec.head_sizes)
                or int(sh["num_classes"]) != self.num_labels
            ):
                raise ValueError(
                    f"checkpoint head {sh['head_sizes']}/{sh['num_classes']} does not match "
                    f"{list(self.codec.head_sizes)}/{self.num_labels}"
                )
        pos = 0
        for a, b in sorted((sh["group_start"], sh["group_end"]) for sh in shards):
            if a > pos:
                break
            pos = max(pos, b)
        if pos < self.num_groups:
            raise ValueError(f"checkpoint shards cover groups [0, {pos}) only, need [0, {self.num_groups})")
        if key == "weight" and self.group_weight is not None:
            if any("group_weight" not in sh for sh in shards):
                raise ValueError("this MHSHead has group_shared rows but the checkpoint shards have none")
            self.group_weight.copy_(self._shard_block(shards, "group_weight", self.group_weight))
        block = self._shard_block(shards, key, self.weight)
        if key == "weight":
            self.weight.copy_(block)
        return block

    def _shard_block(self, shards: Sequence[dict], key: str, like: torch.Tensor) -> torch.Tensor:
        block = torch.empty_like(like)
        flat = block.view(block.shape[0], -1)
        for sh in shards:
            lo, hi = max(sh["group_start"], self.group_start), min(sh["group_end"], self.group_end)
            if lo < hi:
                src = sh[key][lo - sh["group_start"] : hi - sh["group_start"]]
                flat[lo - self.group_start : hi - self.group_start] = src.reshape(hi - lo, -1).to(block)
        return block

    # ------------------------------------------------------------------ inference (full classifier)
    def _check_unsharded(self) -> None:
        if self.sharded:
            raise RuntimeError(
                "inference needs the full classifier: load every rank's shard_state() into an unsharded "
                "MHSHead with load_shards() (each rank holds only its groups)"
            )

    @torch.no_grad()
    def init_class_weights_(self, init_fn) -> None:
        """Re-initialise the class rows in place with ``init_fn(weight)`` (e.g. a pml ``weight_init_func``),
        the named hook adapters use instead of reaching into the head."""
        init_fn(self.weight)

    def local_class_rows(self) -> torch.Tensor:
        """(this rank's groups x C_rest, d) class rows as scored (own + shared group row), padded ids included."""
        w = self.weight if self.group_weight is None else self.weight + self.group_weight[:, None, :]
        return w.reshape(-1, self.in_features)

    def class_weights(self) -> torch.Tensor:
        """(N, d) rows of the real classes (a view unless ``group_shared``)."""
        self._check_unsharded()
        return self.local_class_rows()[: self.num_labels]

    def full_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., N) logits of every class (scaled cosines without margin when a margin is set)."""
        flat, lead = self._flat(x)
        out = self._scores(flat, self.class_weights())
        if self.margin is not None:
            out = out * self.margin.s
        return out.reshape(*lead, self.num_labels)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(upcast(self.full_logits(x)), -1)

    #: classes per chunk of :meth:`topk` (at most ``chunk_size``)
    TOPK_CHUNK = 4096

    def _topk_flat(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k of the full classifier's logits, classes in chunks and queries in blocks
        (:func:`~mhe_plugins.decode.chunked_topk`: B x N scores never coexist, at any B).

        Values are logits (scaled cosines under a margin), like a dense classifier's ``topk``; the
        softmax normaliser would cost more than the matmul itself. ``log_prob`` gives normalised values.
        """
        self._check_unsharded()
        return self.local_topk(x, k)

    def local_topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k over this rank's classes (all of them unsharded), with global class ids; a sharded
        run merges the ranks' k-lists. Needs k <= this rank's real classes."""
        chunk = min(self.chunk_size, self.TOPK_CHUNK)
        score = {
            "cosine": self.margin is not None,
            "scale": self.margin.s if self.margin is not None else None,
        }
        first = self.group_start * self.group_size
        if self.group_weight is None:  # the rows are a view: no copy at all
            rows = self.weight.reshape(-1, self.in_features)[: max(0, self.num_labels - first)]
            return chunked_topk(x, rows, k, chunk=chunk, offset=first, **score)
        # shared group rows: build the scored rows a block of groups at a time (never a copy of all N rows:
        # at 10^7 classes that was a 2.6 GB tensor per query batch)
        per = max(1, chunk // self.group_size)
        best = None  # a running top-k: per-block results kept in a list fragmented the heap (+10 GB at 10^7)
        for g0 in range(0, self.weight.shape[0], per):
            start = first + g0 * self.group_size
            if start >= self.num_labels:
                break
            rows = (self.weight[g0 : g0 + per] + self.group_weight[g0 : g0 + per, None, :]).reshape(
                -1, self.in_features
            )[: self.num_labels - start]
            new = chunked_topk(x, rows, min(k, rows.shape[0]), chunk=chunk, offset=start, **score)
            best = merge_topk(best, new, k)
        return best


def _reduce(per: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "mean":
        return per.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
