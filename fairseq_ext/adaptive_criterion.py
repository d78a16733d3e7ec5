"""``adaptive_label_smoothed_loss``: fairseq's ``adaptive_loss`` with the label smoothing it lacks.

fairseq's adaptive softmax is trained by ``adaptive_loss``, which has no ``--label-smoothing``, while the
dense layer it is compared with is trained with eps = 0.1. This criterion closes that gap, so a benchmark
can say which part of a difference comes from smoothing. The target is fairseq's token-level smoothed one
(the true token keeps 1 - eps, every other token eps / (|V| - 1)), split over adaptive softmax's two-level
tree exactly as the MHC head does (:meth:`mhe_plugins.MHCHead.smoothed_nll`): the head softmax gets each
short-list token's share and each tail cluster its members' total share, the true token's cluster gets
the in-cluster target; clusters off the true path keep the model's own split (no |V|-wide scores).
``nll_loss`` is the exact -log p(token), logged like ``label_smoothed_cross_entropy``'s.
"""

# no `from __future__ import annotations`: fairseq builds argparse flags from real dataclass types

from dataclasses import dataclass, field

import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.criterions.adaptive_loss import AdaptiveLoss, AdaptiveLossConfig
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

from mhe_plugins.heads.base import upcast

__all__ = ["AdaptiveLabelSmoothedLoss", "AdaptiveLabelSmoothedConfig"]


@dataclass
class AdaptiveLabelSmoothedConfig(AdaptiveLossConfig):
    label_smoothing: float = field(
        default=0.0, metadata={"help": "epsilon for label smoothing, 0 means no label smoothing"}
    )


@register_criterion("adaptive_label_smoothed_loss", dataclass=AdaptiveLabelSmoothedConfig)
class AdaptiveLabelSmoothedLoss(AdaptiveLoss):
    def __init__(self, task, sentence_avg, label_smoothing=0.0):
        super().__init__(task, sentence_avg)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
        self.eps = float(label_smoothing)

    @classmethod
    def build_criterion(cls, cfg: AdaptiveLabelSmoothedConfig, task):
        AdaptiveLoss.build_criterion(cfg, task)  # its checks (refuses torch's DDP)
        return cls(task, cfg.sentence_avg, cfg.label_smoothing)

    def forward(self, model, sample, reduce=True):
        asm = getattr(model.decoder, "adaptive_softmax", None)
        if asm is None:
            raise ValueError(
                "criterion adaptive_label_smoothed_loss needs an adaptive softmax: add "
                "--adaptive-softmax-cutoff to the model"
            )
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output).reshape(-1)
        logits, targets = asm(net_output[0], target)
        _, rows = asm.adapt_target(target)
        loss, nll = self._tree_loss(asm, logits, targets, rows, target)
        keep = target.ne(self.padding_idx)
        loss, nll = loss * keep, nll * keep
        if reduce:
            loss, nll = loss.sum(), nll.sum()
        ntokens = int(keep.sum())
        sample_size = sample["target"].size(0) if self.sentence_avg else ntokens
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll.data,
            "ntokens": ntokens,
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        return loss, sample_size, logging_output

    def _tree_loss(self, asm, logits, targets, rows, target):
        """Per-token (smoothed loss, nll) over the head softmax and the true token's cluster."""
        eps, vocab = self.eps, asm.vocab_size
        u = eps / (vocab - 1)
        head_lp = F.log_softmax(upcast(logits[0]), -1)
        sizes = [1.0] * asm.cutoff[0] + [
            float(asm.cutoff[i + 1] - asm.cutoff[i]) for i in range(len(asm.tail))
        ]
        under = head_lp.new_tensor(sizes)
        head_t = targets[0].clamp(min=0)
        on = F.one_hot(head_t, head_lp.shape[1]).to(head_lp.dtype)
        mass = u * under + (1.0 - eps - u) * on
        loss = -(mass * head_lp).sum(-1)
        nll = -head_lp.gather(1, head_t[:, None]).squeeze(1)
        for i, idx in enumerate(rows):
            if idx is None:
                continue
            lp = F.log_softmax(upcast(logits[i + 1]), -1)
            t = targets[i + 1]
            on = F.one_hot(t, lp.shape[1]).to(lp.dtype)
            mass = u + (1.0 - eps - u) * on
            loss = loss.index_add(0, idx, -(mass * lp).sum(-1))
            nll = nll.index_add(0, idx, -lp.gather(1, t[:, None]).squeeze(1))
        return loss, nll

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """``loss``, ``nll_loss`` (base 2) and ``ppl`` as ``label_smoothed_cross_entropy`` logs them."""
        LabelSmoothedCrossEntropyCriterion.reduce_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
