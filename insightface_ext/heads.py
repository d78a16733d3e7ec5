"""MHS-ArcFace: the Partial-FC replacement, with the (C1, C2, d) class-centre tensor sharded over ranks.

Why sharded: at millions of identities the classifier is the model's largest tensor.  Each rank owns a
contiguous block of head-0 groups; a step all-gathers the embeddings (with gradient) and labels, every
rank scores the sampled groups it owns, and the softmax cross-entropy is computed across ranks
(distributed max and sum).  Because nothing is replicated, rank-local copies cannot drift apart (the
reference MHS implementation keeps a full, un-synchronised copy per rank).

Sampling (``mode="batch_union"``): the classes scored in a step are all classes of the groups hit by the
global batch, as the reference ``ArcFaceMHS_B1`` does.  ``sample_rate`` additionally samples random
negative groups per rank until ``sample_rate`` of the rank's groups are scored (with ``head_sizes=(N, 1)``
that is exactly Partial FC's class sampling; with ``head_sizes=(1, N)`` it is full ArcFace).

The shard is stored as ``weight`` of shape ``(local_groups, C2 * d)`` (one row per group) so that
``sparse=True`` gives row-sparse gradients; :class:`insightface_ext.optim.LazySGD` then updates only the
sampled groups (no weight decay or momentum drift on untouched rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mhe_plugins.codec import LabelCodec
from mhe_plugins.distributed import all_gather_with_grad
from mhe_plugins.margins import CombinedMargin

__all__ = ["MHSArcFace", "dist_softmax_cross_entropy", "shard_range"]


def shard_range(num_groups: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [start, end) block of groups owned by ``rank`` (the first ``num_groups % world`` get one more)."""
    base, extra = divmod(num_groups, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _pg_world_rank(group) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


class _DistSoftmaxCE(torch.autograd.Function):
    """Per-sample softmax CE whose classes are split over ranks by columns.

    ``logits`` (B, n_local) hold this rank's columns; ``target`` (B,) is the local column of the true
    class or -1 when another rank owns it.  Forward reduces max / sum / target logit across ranks; backward
    is local (softmax - onehot), so every rank gets the exact gradient of its own columns.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group, distributed: bool) -> torch.Tensor:
        b, n = logits.shape
        if n > 0:
            row_max = logits.max(dim=1).values
        else:
            row_max = torch.full((b,), -torch.inf, dtype=logits.dtype, device=logits.device)
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = torch.exp(logits - row_max[:, None])
        denom = exp.sum(dim=1)
        owned = target >= 0
        tgt = torch.zeros(b, dtype=logits.dtype, device=logits.device)
        if n > 0:
            tgt = torch.where(owned, logits.gather(1, target.clamp_min(0)[:, None]).squeeze(1), tgt)
        if distributed:
            dist.all_reduce(denom, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(tgt, op=dist.ReduceOp.SUM, group=group)
        loss = torch.log(denom) + row_max - tgt
        ctx.save_for_backward(exp / denom[:, None], target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        prob, target = ctx.saved_tensors
        grad = prob.clone()
        owned = torch.nonzero(target >= 0).squeeze(1)
        if owned.numel():
            grad[owned, target[owned]] -= 1.0
        return grad * grad_loss[:, None], None, None, None


def dist_softmax_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group=None, distributed: bool | None = None
) -> torch.Tensor:
    """Per-sample CE over classes whose columns are spread across the ranks of ``group``."""
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    return _DistSoftmaxCE.apply(logits, target, group, distributed)


class MHSArcFace(nn.Module):
    """Multi-Head-Sampling ArcFace head with Partial FC's call shape: ``loss = head(local_emb, local_labels)``.

    ``margin`` is the combined-margin triple (m1, m2, m3): ArcFace (1, 0.5, 0), CosFace (1, 0, 0.35),
    SphereFace-like (1.35, 0, 0).  Works with or without an initialised ``torch.distributed``.
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
    ):
        super().__init__()
        if head_sizes is None:
            if num_classes is None:
                raise ValueError("MHSArcFace needs num_classes or head_sizes")
            codec = LabelCodec.balanced(int(num_classes), 2)
        else:
            codec = LabelCodec(list(head_sizes), num_labels=num_classes)
        if codec.num_heads < 2:
            raise ValueError(
                f"MHSArcFace needs at least 2 heads (group, member), got head_sizes={list(codec.head_sizes)}"
            )
        if mode != "batch_union":
            raise ValueError(
                f"mode={mode!r} is not supported by the sharded head; use 'batch_union' (+ sample_rate)"
            )
        if sample_rate is not None and not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        m = tuple(float(v) for v in margin)
        if len(m) != 3:
            raise ValueError(f"margin must be the triple (m1, m2, m3), got {margin!r}")
        self.codec = codec
        self.embedding_size = int(embedding_size)
        self.num_classes = codec.num_labels
        self.num_groups = codec.head_sizes[0]
        self.group_size = codec.strides[0]  # classes per head-0 group (C2 * ... * CH)
        self.margin = m
        self.scale = float(scale)
        self.margin_fn = CombinedMargin(*m, s=self.scale)  # clamps cosines (the reference can NaN)
        self.mode = mode
        self.sample_rate = None if sample_rate is None else float(sample_rate)
        self.sparse = bool(sparse)
        self.process_group = process_group
        # shard=False: a full, rank-local head (e.g. inside pml's DistributedLossWrapper, which gathers itself)
        self.world_size, self.rank = _pg_world_rank(process_group) if shard else (1, 0)
        self.group_start, self.group_end = shard_range(self.num_groups, self.rank, self.world_size)
        n_local = self.group_end - self.group_start
        self.weight = nn.Parameter(
            torch.normal(0.0, init_std, (n_local, self.group_size * self.embedding_size))
        )
        if shard and process_group is not None:
            raise NotImplementedError("a custom process_group is not supported yet; use the default group")
        self._last_sampled: torch.Tensor | int = 0

    # ------------------------------------------------------------------ helpers
    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, head_sizes={list(self.codec.head_sizes)}, "
            f"num_classes={self.num_classes}, margin={self.margin}, scale={self.scale}, "
            f"groups[{self.group_start}:{self.group_end}] of {self.num_groups} (rank {self.rank}/{self.world_size}), "
            f"sample_rate={self.sample_rate}"
        )

    def _check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise ValueError(f"label {bad} out of range [0, {self.num_classes}) for MHSArcFace")

    def _sample_local_groups(self, groups: torch.Tensor) -> torch.Tensor:
        """Sorted local group indices to score: positives owned here, plus random negatives if sample_rate."""
        n_local = self.group_end - self.group_start
        mine = groups[(groups >= self.group_start) & (groups < self.group_end)] - self.group_start
        positives = torch.unique(mine)
        if self.sample_rate is None or n_local == 0:
            return positives
        k = max(int(math.ceil(self.sample_rate * n_local)), positives.numel())
        if k >= n_local:
            return torch.arange(n_local, device=groups.device)
        score = torch.rand(n_local, device=groups.device)
        score[positives] = 2.0
        return torch.sort(torch.topk(score, k).indices).values

    @property
    def last_num_sampled(self) -> int:
        """Classes scored in the last step, summed over ranks (for logging; synchronises only when read)."""
        return int(self._last_sampled)

    def _count_sampled(self, groups: torch.Tensor) -> torch.Tensor:
        """Global number of scored classes, computed locally: every rank knows the global labels and the shards."""
        u = torch.unique(groups)
        if self.sample_rate is None:
            return torch.tensor(u.numel() * self.group_size)
        starts = torch.tensor(
            [shard_range(self.num_groups, r, self.world_size)[0] for r in range(self.world_size)]
            + [self.num_groups],
            device=groups.device,
        )
        sizes = starts[1:] - starts[:-1]
        pos = torch.bincount(torch.bucketize(u, starts[1:-1], right=True), minlength=self.world_size)
        k = torch.maximum(torch.ceil(self.sample_rate * sizes).long(), pos).minimum(sizes)
        return k.sum() * self.group_size

    def gather(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global batch (embeddings with gradient, labels) from all ranks of the process group."""
        if self.world_size == 1:
            return embeddings, labels
        labs = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(labs, labels.contiguous())
        return all_gather_with_grad(embeddings), torch.cat(labs)

    # ------------------------------------------------------------------ training
    def forward(
        self, local_embeddings: torch.Tensor, local_labels: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """Mean ArcFace CE over the *global* batch (identical value on every rank); ``reduction="none"`` gives per-sample losses."""
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be (B, {self.embedding_size}), got {tuple(local_embeddings.shape)}"
            )
        local_labels = local_labels.reshape(-1).long()
        if local_labels.shape[0] != local_embeddings.shape[0]:
            raise ValueError(f"{local_labels.shape[0]} labels for {local_embeddings.shape[0]} embeddings")
        self._check_labels(local_labels)
        with torch.autocast(device_type=local_embeddings.device.type, enabled=False):
            emb, labels = self.gather(local_embeddings.float(), local_labels)
            groups = torch.div(labels, self.group_size, rounding_mode="floor")
            members = labels - groups * self.group_size
            sel = self._sample_local_groups(groups)
            rows = F.embedding(sel, self.weight, sparse=self.sparse)  # (n_sel, S*d)
            centres = rows.view(-1, self.embedding_size)  # (n_sel*S, d)
            cos = F.linear(F.normalize(emb), F.normalize(centres))
            # local column of each sample's class, -1 when its group is not scored on this rank
            loc = groups - self.group_start
            if sel.numel():
                pos = torch.searchsorted(sel, loc).clamp(max=sel.numel() - 1)
                hit = sel[pos] == loc
            else:
                pos, hit = torch.zeros_like(loc), torch.zeros_like(loc, dtype=torch.bool)
            target = torch.where(hit, pos * self.group_size + members, torch.full_like(members, -1))
            logits = self.margin_fn(cos, target)
            if self.codec.capacity > self.num_classes:  # padded ids of the last group are not classes
                gid = (
                    (sel + self.group_start)[:, None] * self.group_size
                    + torch.arange(self.group_size, device=sel.device)
                ).reshape(-1)
                logits = logits.masked_fill((gid >= self.num_classes)[None, :], -torch.inf)
            self._last_sampled = self._count_sampled(groups.detach())
            losses = dist_softmax_cross_entropy(logits, target, self.process_group, self.world_size > 1)
        if reduction == "none":
            return losses
        if reduction == "sum":
            return losses.sum()
        if reduction == "mean":
            return losses.mean()
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

    # ------------------------------------------------------------------ inference / state
    @torch.no_grad()
    def local_centres(self) -> torch.Tensor:
        """This rank's class centres (local_groups * S, d), global ids starting at ``group_start * S``."""
        return self.weight.detach().view(-1, self.embedding_size)

    def shard_state(self) -> dict:
        """What a rank writes to its checkpoint shard (re-shardable: carries its group range)."""
        return {
            "weight": self.weight.detach().cpu(),
            "group_start": self.group_start,
            "group_end": self.group_end,
            "head_sizes": list(self.codec.head_sizes),
            "num_classes": self.num_classes,
        }

    @torch.no_grad()
    def load_shards(self, shards: Sequence[dict], key: str = "weight") -> torch.Tensor:
        """This rank's block of ``key`` from shards that together cover all groups (any old world size).

        ``key="weight"`` loads it into the head; other keys (e.g. an optimizer's momentum) are returned only.
        """
        for s in shards:
            if (
                list(s["head_sizes"]) != list(self.codec.head_sizes)
                or int(s["num_classes"]) != self.num_classes
            ):
                raise ValueError(
                    f"checkpoint head {s['head_sizes']}/{s['num_classes']} does not match "
                    f"{list(self.codec.head_sizes)}/{self.num_classes}"
                )
        pos = 0
        for a, b in sorted((s["group_start"], s["group_end"]) for s in shards):
            if a > pos:
                break
            pos = max(pos, b)
        if pos < self.num_groups:
            raise ValueError(f"checkpoint shards cover groups [0, {pos}) only, need [0, {self.num_groups})")
        block = torch.empty_like(self.weight)
        for s in shards:
            lo, hi = max(s["group_start"], self.group_start), min(s["group_end"], self.group_end)
            if lo < hi:
                src = s[key][lo - s["group_start"] : hi - s["group_start"]]
                block[lo - self.group_start : hi - self.group_start] = src.reshape(hi - lo, -1).to(block)
        if key == "weight":
            self.weight.copy_(block)
        return block
