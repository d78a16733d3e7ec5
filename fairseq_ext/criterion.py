"""``mhe_cross_entropy``: sum over heads of (label-smoothed) CE on the digits of each target token.

Subclasses fairseq's ``label_smoothed_cross_entropy`` so the logged ``loss`` / ``nll_loss`` (base 2) /
``ppl`` / ``accuracy`` come from the very same ``reduce_metrics``; only the per-token maths differs:
``loss`` = sum_h CE_h(label_smoothing) (the MHE training objective, via ``MHPHead.loss``) and
``nll_loss`` = -log p(token) under the renormalised product distribution that beam search uses, computed
in O(sum C_h) per token, so perplexities are comparable with the standard output layer.
"""

# no `from __future__ import annotations`: fairseq builds argparse flags from real dataclass types

from dataclasses import dataclass, field

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from mhe_plugins.decode import log_valid_mass
from mhe_plugins.heads.mhp import LOSS_VARIANTS

from .model import TransformerMHEDecoder, digit_log_probs

__all__ = ["MHECrossEntropyCriterion", "MHECrossEntropyConfig"]


@dataclass
class MHECrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    mhe_loss: str = field(
        default="ce_sum",
        metadata={"help": f"MHE loss variant, one of {LOSS_VARIANTS} (ce_sum = the paper's sum of head CEs)"},
    )


@register_criterion("mhe_cross_entropy", dataclass=MHECrossEntropyConfig)
class MHECrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        report_accuracy=False,
        mhe_loss="ce_sum",
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        if mhe_loss not in LOSS_VARIANTS:
            raise ValueError(f"--mhe-loss must be one of {LOSS_VARIANTS}, got {mhe_loss!r}")
        self.mhe_loss = mhe_loss

    @staticmethod
    def _decoder(model) -> TransformerMHEDecoder:
        decoder = getattr(model, "decoder", None)
        if not isinstance(decoder, TransformerMHEDecoder):
            raise TypeError(
                "criterion mhe_cross_entropy needs an MHE output layer: use --arch transformer_mhe "
                f"(or transformer_mhe_iwslt_de_en); got decoder {type(decoder).__name__}"
            )
        return decoder

    def _logits_and_target(self, model, net_output, sample) -> tuple[torch.Tensor, torch.Tensor]:
        logits, target = net_output[0], model.get_targets(sample, net_output)
        if self.ignore_prefix_size > 0:
            logits = logits[:, self.ignore_prefix_size :, :]
            target = target[:, self.ignore_prefix_size :]
        return logits, target

    def compute_loss(self, model, net_output, sample, reduce=True):
        decoder = self._decoder(model)
        head, codec = decoder.output_projection, decoder.codec
        logits, target = self._logits_and_target(model, net_output, sample)
        per_head = logits.split(list(codec.head_sizes), dim=-1)
        reduction = "sum" if reduce else "none"
        loss = head.loss(
            per_head,
            target,
            variant=self.mhe_loss,
            label_smoothing=self.eps,
            ignore_index=self.padding_idx,
            reduction=reduction,
        )
        with torch.no_grad():
            nll = self._token_nll(codec, logits, target)
            nll = nll.sum() if reduce else nll
        return loss, nll

    def _token_nll(self, codec, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log p(target) under the renormalised product distribution, 0 on padding."""
        lps = digit_log_probs(codec, logits)
        mask = target.ne(self.padding_idx)
        digits = codec.encode(target.masked_fill(~mask, 0))
        logp = sum(lp.gather(-1, digits[..., h : h + 1]).squeeze(-1) for h, lp in enumerate(lps))
        return -(logp - log_valid_mass(lps, codec)) * mask

    def compute_accuracy(self, model, net_output, sample):
        head = self._decoder(model).output_projection
        logits, target = self._logits_and_target(model, net_output, sample)
        digit_logits = [z.reshape(-1, z.shape[-1]) for z in logits.split(list(head.codec.head_sizes), -1)]
        pred = head.topk_from_logits(digit_logits, 1)[1][:, 0]  # exact argmax over valid ids, no |V| scores
        target = target.reshape(-1)
        mask = target.ne(self.padding_idx)
        return (pred.eq(target) & mask).sum(), mask.sum()
