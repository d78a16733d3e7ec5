"""Multi-label Multi-Head Cascade (MHC) head for extreme multi-label classification (LightXML-style).

Labels are split into ``G`` contiguous id blocks of ``per`` ids by the core's ``{G; per}`` rule (a two-digit
``LabelCodec([G, per])``): no clustering, which is the paper's point. Head 1 scores the groups; head 2 scores
the children of the top-K groups against a low-rank label embedding. Everything is batched tensor code
(no per-sample Python loops), so it runs the same on CPU and CUDA.

Differences to the reference code, on purpose:
* teacher forcing keeps *every* ground-truth group among the selected groups (K grows to the batch's
  largest positive-group count when needed) instead of overwriting candidate slots;
* the ragged last group is padded with masked dummy ids (never edge-padding), so no label is scored
  twice and top-k never holds duplicates;
* an optional fixed random permutation of label ids (``permutation_seed``) shows grouping needs no
  semantic order.

Targets are a padded ``LongTensor (B, L)`` of global label ids with ``-1`` as padding (any L, no
truncation); :func:`pad_labels` builds one from lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mhe_plugins.checks import as_int, check_class_ids
from mhe_plugins.codec import LabelCodec, group_split
from mhe_plugins.decode import valid_first_topk

__all__ = [
    "MHCMultiLabelHead",
    "MHCMultiLabelOutput",
    "pad_labels",
    "default_num_groups",
    "default_candidates_topk",
]


def default_num_groups(num_labels: int) -> int:
    """About sqrt(N) groups: the balanced two-head split (smallest G + per)."""
    return LabelCodec.balanced(num_labels, 2).head_sizes[0]


def default_candidates_topk(num_groups: int) -> int:
    """Groups kept per sample: about sqrt(G), at least 16 (never more than G)."""
    return min(num_groups, max(16, round(math.sqrt(num_groups))))


def pad_labels(
    label_lists: Sequence[Sequence[int]], device: torch.device | str | None = None
) -> torch.Tensor:
    """Lists of label ids -> ``LongTensor (B, max_len)`` padded with -1 (at least one column)."""
    width = max([len(r) for r in label_lists] + [1])
    out = torch.full((len(label_lists), width), -1, dtype=torch.long)
    for i, r in enumerate(label_lists):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out.to(device) if device is not None else out


class MHCMultiLabelOutput(NamedTuple):
    group_logits: torch.Tensor  # (B, G)
    candidates: torch.Tensor  # (B, M) internal ids of the candidates (dummies >= N)
    candidate_logits: torch.Tensor  # (B, M)
    candidate_mask: torch.Tensor  # (B, M) bool, False on dummy slots
    group_scores: torch.Tensor  # (B, M) sigmoid score of each candidate's group


class MHCMultiLabelHead(nn.Module):
    """Group head (``Linear(d, G)``) + candidate ranker (``Linear(d, hidden)`` query vs label embedding)."""

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        num_groups: int | None = None,
        hidden_dim: int = 256,
        candidates_topk: int | None = None,
        permutation_seed: int | None = None,
    ):
        super().__init__()
        num_labels = as_int(num_labels, "num_labels", minimum=2)
        in_features, hidden_dim = as_int(in_features, "in_features", 1), as_int(hidden_dim, "hidden_dim", 1)
        if candidates_topk is not None:
            candidates_topk = as_int(candidates_topk, "candidates_topk", minimum=1)
        g, per = group_split(num_labels, num_groups or default_num_groups(num_labels))
        self.codec = LabelCodec([g, per], num_labels=num_labels)
        self.num_labels, self.num_groups, self.group_size = num_labels, g, per
        k = candidates_topk or default_candidates_topk(g)
        if not 1 <= k:
            raise ValueError(f"candidates_topk must be >= 1, got {k}")
        self.candidates_topk = min(k, g)
        self.hidden_dim = hidden_dim
        self.permutation_seed = permutation_seed
        self.group = nn.Linear(in_features, g)
        self.query = nn.Linear(in_features, hidden_dim)
        self.embed = nn.Embedding(g * per, hidden_dim)  # rows >= N are masked dummies of the last group
        nn.init.xavier_uniform_(self.embed.weight)
        if permutation_seed is not None:
            gen = torch.Generator().manual_seed(permutation_seed)
            perm = torch.randperm(num_labels, generator=gen)
            self.register_buffer("to_internal", perm, persistent=True)
            self.register_buffer("to_global", torch.argsort(perm), persistent=True)
        else:
            self.to_internal = self.to_global = None
        self.register_buffer("_offsets", torch.arange(per), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"num_labels={self.num_labels}, groups={{{self.num_groups}; {self.group_size}}}, "
            f"candidates_topk={self.candidates_topk}, hidden_dim={self.hidden_dim}, "
            f"permutation_seed={self.permutation_seed}"
        )

    # ------------------------------------------------------------------ id helpers
    def _internal(self, target: torch.Tensor) -> torch.Tensor:
        target = check_class_ids(target, self.num_labels, allow=-1)  # -1 = padding
        valid = target >= 0
        if self.to_internal is None:
            return torch.where(valid, target, -1)
        return torch.where(valid, self.to_internal[target.clamp_min(0)], -1)

    def _global(self, internal: torch.Tensor) -> torch.Tensor:
        valid = (internal >= 0) & (internal < self.num_labels)
        ids = internal.clamp(0, self.num_labels - 1)
        if self.to_global is not None:
            ids = self.to_global[ids]
        return torch.where(valid, ids, -1)

    def _group_targets(self, internal: torch.Tensor) -> torch.Tensor:
        """Multi-hot (B, G) of the ground-truth groups."""
        b = internal.shape[0]
        g = torch.where(internal >= 0, internal // self.codec.strides[0], self.num_groups)
        hot = torch.zeros(b, self.num_groups + 1, device=internal.device)
        hot.scatter_(1, g, 1.0)
        return hot[:, : self.num_groups]

    # ------------------------------------------------------------------ scoring
    def _candidate_logits(self, q: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, per) of every child of the selected groups (B, K)."""
        table = self.embed.weight.view(self.num_groups, self.group_size, -1)
        uniq, inv = torch.unique(groups, return_inverse=True)
        if uniq.numel() <= 8 * groups.shape[1]:  # shared groups: one dense GEMM, then gather
            scores = (q @ table[uniq].reshape(-1, q.shape[1]).T).view(
                q.shape[0], uniq.numel(), self.group_size
            )
            return scores.gather(1, inv.unsqueeze(-1).expand(-1, -1, self.group_size))
        return torch.einsum("bkph,bh->bkp", table[groups], q)

    def _expand(self, q: torch.Tensor, groups: torch.Tensor, group_scores: torch.Tensor, group_logits):
        cands = groups.unsqueeze(-1) * self.group_size + self._offsets  # (B, K, per)
        logits = self._candidate_logits(q, groups)
        b = q.shape[0]
        gs = group_scores.unsqueeze(-1).expand_as(logits)
        return MHCMultiLabelOutput(
            group_logits,
            cands.reshape(b, -1),
            logits.reshape(b, -1),
            cands.reshape(b, -1) < self.num_labels,
            gs.reshape(b, -1),
        )

    def forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None, group_bias: torch.Tensor | None = None
    ) -> MHCMultiLabelOutput:
        """Training (target given): teacher-forced groups. Inference: the top-K groups by score.

        ``group_bias`` (B, G), optional: added to the group logits before the groups are chosen (an
        external signal such as a lexical score); the group loss then trains the sum.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(
                f"features must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}"
            )
        x = x.to(self.group.weight.dtype)  # fp16/bf16 features into an fp32 head without autocast
        group_logits = self.group(x)
        if group_bias is not None:
            group_logits = group_logits + group_bias.to(group_logits.dtype)
        q = self.query(x)
        scores = torch.sigmoid(group_logits.detach())
        k = self.candidates_topk
        if target is not None:
            hot = self._group_targets(self._internal(target))
            k = min(self.num_groups, max(k, int(hot.sum(1).max().item()) if hot.numel() else k))
            scores = scores + hot  # ground-truth groups (score >= 1) always win the top-k
        top, groups = scores.topk(k, dim=1)
        return self._expand(q, groups, top, group_logits)

    # ------------------------------------------------------------------ loss
    CANDIDATE_LOSSES = ("bce", "softmax")

    def loss(
        self, out: MHCMultiLabelOutput, target: torch.Tensor, candidate_loss: str = "bce"
    ) -> torch.Tensor:
        """Candidate loss + BCE on all groups (mean-reduced).

        ``candidate_loss="bce"``: BCE on candidate children (dummies masked, mean over real candidates).
        ``"softmax"``: per document, the mean over its positives of ``-log softmax`` over its real candidates
        (a few positives among thousands of candidates: the BCE mean is dominated by easy negatives);
        documents without a positive candidate add nothing.
        """
        if candidate_loss not in self.CANDIDATE_LOSSES:
            raise ValueError(f"candidate_loss must be one of {self.CANDIDATE_LOSSES}, got {candidate_loss!r}")
        internal = self._internal(target)
        big = torch.iinfo(torch.long).max
        truth = torch.sort(torch.where(internal >= 0, internal, big), dim=1).values
        pos = torch.searchsorted(truth, out.candidates).clamp_max(truth.shape[1] - 1)
        cand_target = (truth.gather(1, pos) == out.candidates).to(out.candidate_logits.dtype)
        mask = out.candidate_mask.to(out.candidate_logits.dtype)
        if candidate_loss == "bce":
            bce = F.binary_cross_entropy_with_logits(out.candidate_logits, cand_target, reduction="none")
            cand_loss = (bce * mask).sum() / mask.sum().clamp_min(1.0)
        else:
            z = out.candidate_logits.float().masked_fill(~out.candidate_mask, float("-inf"))
            logp = torch.log_softmax(z, dim=1).masked_fill(~out.candidate_mask, 0.0)
            npos = cand_target.sum(1)
            per_doc = -(logp * cand_target).sum(1) / npos.clamp_min(1.0)
            cand_loss = per_doc.sum() / (npos > 0).sum().clamp_min(1)
        group_loss = F.binary_cross_entropy_with_logits(
            out.group_logits, self._group_targets(internal).to(out.group_logits.dtype)
        )
        return cand_loss + group_loss

    def compute_loss(
        self, x: torch.Tensor, target: torch.Tensor, candidate_loss: str = "bce"
    ) -> torch.Tensor:
        return self.loss(self(x, target), target, candidate_loss)

    def group_of_global(self) -> torch.Tensor:
        """(N,) group index of every global label id (for group-level statistics of the labels)."""
        ids = torch.arange(self.num_labels, device=self.group.weight.device)
        internal = ids if self.to_internal is None else self.to_internal[ids]
        return internal // self.group_size

    def candidate_global_ids(self, out: MHCMultiLabelOutput) -> torch.Tensor:
        """Global label ids (B, M) of the candidates, -1 on dummy slots (for per-candidate extra scores)."""
        return self._global(out.candidates)

    def topk_from_output(self, out: MHCMultiLabelOutput, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`topk` on an output whose candidate logits the caller adjusted (e.g. a lexical term)."""
        k = as_int(k, "k", minimum=1)
        scores = torch.sigmoid(out.candidate_logits.float()) * out.group_scores.float()
        kk = min(k, scores.shape[1])
        # real candidates first whatever the scores (``vals >= 0`` turned NaN scores into -1 ids)
        vals, idx = valid_first_topk(scores, ~out.candidate_mask, kk)
        real = out.candidate_mask.gather(1, idx)
        vals = torch.where(real, vals, torch.full_like(vals, -1.0))
        ids = self._global(torch.where(real, out.candidates.gather(1, idx), -1))
        if kk < k:
            vals = F.pad(vals, (0, k - kk), value=-1.0)
            ids = F.pad(ids, (0, k - kk), value=-1)
        return vals, ids

    # ------------------------------------------------------------------ inference
    def topk(self, x: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, global ids) with score = sigmoid(label) * sigmoid(group); -1 ids if fewer exist."""
        return self.topk_from_output(self(x), k)

    def predict(self, x: torch.Tensor, k: int = 5) -> torch.Tensor:
        return self.topk(x, k)[1]

    def full_scores(self, x: torch.Tensor) -> torch.Tensor:
        """All N product scores (B, N) in global id order; for checks and small N only."""
        n = self.num_labels
        x = x.to(self.group.weight.dtype)
        gs = torch.sigmoid(self.group(x).float())
        ls = torch.sigmoid((self.query(x) @ self.embed.weight[:n].T).float())
        internal = ls * gs.repeat_interleave(self.group_size, dim=1)[:, :n]
        if self.to_internal is None:
            return internal
        return internal[:, self.to_internal]

    def classifier_parameters(self) -> int:
        """Label-side parameters (group head + query + embedding rows of real labels)."""
        dummies = (self.num_groups * self.group_size - self.num_labels) * self.hidden_dim
        return sum(p.numel() for p in self.parameters()) - dummies
