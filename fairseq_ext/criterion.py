"""``mhe_cross_entropy``: the training loss of an MHE output layer (``transformer_mhe``), MHP or MHC.

Subclasses fairseq's ``label_smoothed_cross_entropy`` so the logged ``loss`` / ``nll_loss`` (base 2) /
``ppl`` / ``accuracy`` come from the very same ``reduce_metrics``; only the per-token maths differs, and it
is the core head's: the model is asked for decoder features (``features_only=True``) and the head is called
through the one contract, ``head(features, target, label_smoothing=eps, smoothing="label")``, which returns
the loss and the exact log p(token). ``--label-smoothing eps`` means what it means in fairseq: the target
keeps 1 - eps on the true token (MHP: per-head eps_h = 1 - (1 - eps)^(1/H); MHC: exact on the tree).
``nll_loss`` is the exact -log p(token) under the distribution beam search uses (O(sum C_h) per token for
MHC), so perplexities compare 1:1 with the standard output layer. Accuracy (exact argmax over the full
vocabulary) is computed at validation only.
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

from mhe_plugins.heads.mhp import LOSS_VARIANTS

from .model import TransformerMHEDecoder

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
        # the head's own loss keywords; a variant the head does not have is refused by the head itself
        self.head_kwargs = {"variant": mhe_loss} if mhe_loss != "ce_sum" else {}

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
        """As ``label_smoothed_cross_entropy.forward``, on decoder features instead of |V| scores."""
        self._decoder(model)
        net_output = model(**sample["net_input"], features_only=True)
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        # exact accuracy needs every token's score: computed at validation only
        if self.report_accuracy and not model.training:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    def _features_and_target(self, model, net_output, sample) -> tuple[torch.Tensor, torch.Tensor]:
        features, target = net_output[0], model.get_targets(sample, net_output)
        if self.ignore_prefix_size > 0:
            features = features[:, self.ignore_prefix_size :, :]
            target = target[:, self.ignore_prefix_size :]
        return features, target

    def compute_loss(self, model, net_output, sample, reduce=True):
        """Token-level smoothed loss and exact nll on the non-padding positions of (B, T, d) features."""
        head = self._decoder(model).output_projection
        features, target = self._features_and_target(model, net_output, sample)
        mask = target.ne(self.padding_idx)
        try:
            out = head(
                features[mask],
                target[mask],
                label_smoothing=self.eps,
                smoothing="label",
                reduction="none",
                **self.head_kwargs,
            )
        except TypeError as exc:
            raise ValueError(
                f"--mhe-loss {self.mhe_loss} is not a loss of this output layer ({type(head).__name__}): {exc}"
            ) from None
        loss, nll = out.loss, -out.target_log_prob.detach()
        if reduce:
            return loss.sum(), nll.sum()
        full_loss = features.new_zeros(target.shape, dtype=loss.dtype).masked_scatter(mask, loss)
        full_nll = features.new_zeros(target.shape, dtype=nll.dtype).masked_scatter(mask, nll)
        return full_loss, full_nll

    def compute_accuracy(self, model, net_output, sample):
        head = self._decoder(model).output_projection
        features, target = self._features_and_target(model, net_output, sample)
        target = target.reshape(-1)
        mask = target.ne(self.padding_idx)
        feats = features.reshape(-1, features.shape[-1])
        with torch.no_grad():  # exact argmax over the full vocabulary, in row chunks
            pred = torch.cat([head.log_prob(c).argmax(-1) for c in feats.split(ACCURACY_CHUNK)])
        return (pred.eq(target) & mask).sum(), mask.sum()
