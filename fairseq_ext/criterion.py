"""``mhe_cross_entropy``: the training loss of an MHE output layer (``transformer_mhe``), MHP or MHC.

Subclasses fairseq's ``label_smoothed_cross_entropy`` so the logged ``loss`` / ``nll_loss`` (base 2) /
``ppl`` / ``accuracy`` come from the very same ``reduce_metrics``; only the per-token maths differs.
``--label-smoothing eps`` means what it means there: the target keeps 1 - eps on the true token.

- MHP: sum over heads of CE against per-head targets smoothed with eps_h = 1 - (1 - eps)^(1/H)
  (``MHPHead.token_smoothed_loss``), so the product target keeps exactly 1 - eps on the true token.
- MHC: the model is asked for decoder features only (``features_only=True``); ``MHCHead.smoothed_nll``
  scores the C_0 groups and the C_1 siblings of each target token, nothing |V|-wide.
``nll_loss`` is the exact -log p(token) under the distribution beam search uses (O(sum C_h) per token),
so perplexities compare 1:1 with the standard output layer.
"""

# no `from __future__ import annotations`: fairseq builds argparse flags from real dataclass types

from dataclasses import dataclass, field

import torch
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from mhe_plugins.decode import log_valid_mass
from mhe_plugins.heads.mhp import LOSS_VARIANTS, per_head_smoothing

from .model import TransformerMHEDecoder, digit_log_probs

__all__ = ["MHECrossEntropyCriterion", "MHECrossEntropyConfig"]

ACCURACY_CHUNK = 1024  # rows of full-vocabulary MHC log-probs at a time when computing exact accuracy


@dataclass
class MHECrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig):
    mhe_loss: str = field(
        default="ce_sum",
        metadata={
            "help": f"MHP loss variant, one of {LOSS_VARIANTS} (ce_sum = the paper's sum of head CEs); "
            "MHC supports ce_sum only"
        },
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

    def forward(self, model, sample, reduce=True):
        """As ``label_smoothed_cross_entropy.forward``; an MHC model returns features, not |V| scores."""
        decoder = self._decoder(model)
        if decoder.method == "mhc" and self.mhe_loss != "ce_sum":
            raise ValueError(
                f"--mhe-loss {self.mhe_loss} is an MHP variant; --mhe-method mhc trains ce_sum only"
            )
        net_output = model(**sample["net_input"], features_only=decoder.method == "mhc")
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        # MHC: exact accuracy needs every token's score, so it is computed at validation only
        if self.report_accuracy and (decoder.method == "mhp" or not model.training):
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    def _output_and_target(self, model, net_output, sample) -> tuple[torch.Tensor, torch.Tensor]:
        out, target = net_output[0], model.get_targets(sample, net_output)
        if self.ignore_prefix_size > 0:
            out = out[:, self.ignore_prefix_size :, :]
            target = target[:, self.ignore_prefix_size :]
        return out, target

    def compute_loss(self, model, net_output, sample, reduce=True):
        decoder = self._decoder(model)
        out, target = self._output_and_target(model, net_output, sample)
        if decoder.method == "mhc":
            return self._mhc_loss(decoder, out, target, reduce)
        head, codec = decoder.output_projection, decoder.codec
        per_head = out.split(list(codec.head_sizes), dim=-1)
        reduction = "sum" if reduce else "none"
        if self.mhe_loss == "ce_sum":
            loss = head.token_smoothed_loss(
                per_head, target, self.eps, ignore_index=self.padding_idx, reduction=reduction
            )
        else:
            loss = head.loss(
                per_head,
                target,
                variant=self.mhe_loss,
                label_smoothing=per_head_smoothing(self.eps, codec.num_heads),
                ignore_index=self.padding_idx,
                reduction=reduction,
            )
        with torch.no_grad():
            nll = self._token_nll(codec, out, target)
            nll = nll.sum() if reduce else nll
        return loss, nll

    def _mhc_loss(self, decoder, features, target, reduce: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-level smoothed loss and exact nll on the non-padding positions of (B, T, d) features."""
        mask = target.ne(self.padding_idx)
        loss, nll = decoder.output_projection.smoothed_nll(features[mask], target[mask], self.eps)
        if reduce:
            return loss.sum(), nll.detach().sum()
        full_loss = features.new_zeros(target.shape, dtype=loss.dtype).masked_scatter(mask, loss)
        full_nll = features.new_zeros(target.shape, dtype=nll.dtype).masked_scatter(mask, nll.detach())
        return full_loss, full_nll

    def _token_nll(self, codec, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MHP: -log p(target) under the renormalised product distribution, 0 on padding."""
        lps = digit_log_probs(codec, logits)
        mask = target.ne(self.padding_idx)
        digits = codec.encode(target.masked_fill(~mask, 0))
        logp = sum(lp.gather(-1, digits[..., h : h + 1]).squeeze(-1) for h, lp in enumerate(lps))
        return -(logp - log_valid_mass(lps, codec)) * mask

    def compute_accuracy(self, model, net_output, sample):
        decoder = self._decoder(model)
        head = decoder.output_projection
        out, target = self._output_and_target(model, net_output, sample)
        target = target.reshape(-1)
        mask = target.ne(self.padding_idx)
        if decoder.method == "mhc":  # exact argmax over the full vocabulary, in row chunks
            feats = out.reshape(-1, out.shape[-1])
            with torch.no_grad():
                pred = torch.cat([head.log_prob_batched(c).argmax(-1) for c in feats.split(ACCURACY_CHUNK)])
        else:
            digit_logits = [z.reshape(-1, z.shape[-1]) for z in out.split(list(head.codec.head_sizes), -1)]
            pred = head.topk_from_logits(digit_logits, 1)[1][:, 0]  # exact argmax over valid ids
        return (pred.eq(target) & mask).sum(), mask.sum()
