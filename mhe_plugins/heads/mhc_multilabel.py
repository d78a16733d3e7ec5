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
truncation); :func:`pad_labels` builds one from lists. It is a :class:`~.linear.MultiLabelHead`: the one
contract (``head(x, target) -> HeadOutput``, ``topk``, ``predict`` = top-1, ``log_prob``); loss keywords
``candidate_loss`` (``bce``/``softmax``), ``group_bias`` (B, G) and ``label_bias`` (B, N) (external
logits added to the groups / the labels, e.g. a lexical score).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import as_int
from ..codec import LabelCodec
from .base import HeadOutput
from .linear import MultiLabelHead

__all__ = [
    "MHCMultiLabelHead",
    "MHCMultiLabelOutput",
    "pad_labels",
    "default_num_groups",
    "default_candidates_topk",
]


def default_num_groups(num_labels: int) -> int:
    """About sqrt(N) groups: the first size of :meth:`LabelCodec.from_spec`'s default (balanced) split."""
    return LabelCodec.from_spec(num_labels).head_sizes[0]


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


class MHCMultiLabelHead(MultiLabelHead):
    """Group head (``Linear(d, G)``) + candidate ranker (``Linear(d, hidden)`` query vs label embedding)
    over a two-level codec ``[G, per]`` (contiguous id blocks; :meth:`LabelCodec.from_spec`)."""

    kind = "mhc_multilabel"

    def __init__(
        self,
        in_features: int,
        codec: LabelCodec,
        hidden_dim: int = 256,
        candidates_topk: int | None = None,
        permutation_seed: int | None = None,
    ):
        super().__init__(in_features, codec)
        if codec.num_heads != 2:
            raise ValueError(f"the multi-label cascade has two levels [G, per], got {list(codec.head_sizes)}")
        num_labels = as_int(codec.num_labels, "num_labels", minimum=2)
        hidden_dim = as_int(hidden_dim, "hidden_dim", 1)
        if candidates_topk is not None:
            candidates_topk = as_int(candidates_topk, "candidates_topk", minimum=1)
        g, per = codec.head_sizes
        self.num_groups, self.group_size = g, per
        self.candidates_topk = min(candidates_topk or default_candidates_topk(g), g)
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
        target = self._labels(target)  # -1 = padding
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

    def candidates(
        self,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        group_bias: torch.Tensor | None = None,
        label_bias: torch.Tensor | None = None,
    ) -> MHCMultiLabelOutput:
        """The cascade's candidates (the fast path). Training (target given): teacher-forced groups;
        inference: the top-K groups by score.

        ``group_bias`` (B, G), optional: added to the group logits before the groups are chosen (an
        external signal such as a lexical score); the group loss then trains the sum. ``label_bias``
        (B, N): added to each candidate's logit.
        """
        x = self._cast(x)  # fp16/bf16 features into an fp32 head without autocast
        if x.dim() != 2:
            raise ValueError(f"features must be (B, {self.in_features}), got {tuple(x.shape)}")
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
        out = self._expand(q, groups, top, group_logits)
        if label_bias is not None:
            ids = self._global(out.candidates)
            extra = label_bias.gather(1, ids.clamp_min(0)).masked_fill(ids < 0, 0.0)
            out = out._replace(candidate_logits=out.candidate_logits + extra.to(out.candidate_logits.dtype))
        return out

    # ------------------------------------------------------------------ loss
    CANDIDATE_LOSSES = ("bce", "softmax")

    def _forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        candidate_loss: str = "bce",
        group_bias: torch.Tensor | None = None,
        label_bias: torch.Tensor | None = None,
    ) -> HeadOutput:
        out = self.candidates(x, target, group_bias, label_bias)
        bias = {"group_bias": group_bias, "label_bias": label_bias}
        return HeadOutput(
            self.loss_from_candidates(out, target, candidate_loss),
            compute=lambda: self.target_log_prob(x, target, **bias),
        )

    def loss_from_candidates(
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

    def group_of_global(self) -> torch.Tensor:
        """(N,) group index of every global label id (for group-level statistics of the labels)."""
        ids = torch.arange(self.num_labels, device=self.group.weight.device)
        internal = ids if self.to_internal is None else self.to_internal[ids]
        return internal // self.group_size

    def candidate_global_ids(self, out: MHCMultiLabelOutput) -> torch.Tensor:
        """Global label ids (B, M) of the candidates, -1 on dummy slots."""
        return self._global(out.candidates)

    def candidate_scores(
        self,
        x: torch.Tensor,
        group_bias: torch.Tensor | None = None,
        label_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(score = sigmoid(label) * sigmoid(group), global id) of every candidate; -1 ids on dummies."""
        out = self.candidates(x, None, group_bias, label_bias)
        scores = torch.sigmoid(out.candidate_logits.float()) * out.group_scores.float()
        ids = torch.where(out.candidate_mask, self._global(out.candidates), -1)
        return scores, ids

    # ------------------------------------------------------------------ inference
    def log_prob(
        self,
        x: torch.Tensor,
        group_bias: torch.Tensor | None = None,
        label_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log of all N product scores (B, N) in global id order; for checks and small N only."""
        n = self.num_labels
        x = self._cast(x)
        gl = self.group(x).float()
        if group_bias is not None:
            gl = gl + group_bias.float()
        ll = (self.query(x) @ self.embed.weight[:n].T).float()  # internal id order
        gl = gl.repeat_interleave(self.group_size, dim=1)[:, :n]
        if self.to_internal is not None:  # to global id order
            ll, gl = ll[:, self.to_internal], gl[:, self.to_internal]
        if label_bias is not None:
            ll = ll + label_bias.float()
        return F.logsigmoid(ll) + F.logsigmoid(gl)

    def full_scores(self, x: torch.Tensor) -> torch.Tensor:
        """All N product scores (B, N) in global id order; for checks and small N only."""
        return self.log_prob(x).exp()

    def classifier_parameters(self) -> int:
        """Label-side parameters (group head + query + embedding rows of real labels)."""
        dummies = (self.num_groups * self.group_size - self.num_labels) * self.hidden_dim
        return sum(p.numel() for p in self.parameters()) - dummies
