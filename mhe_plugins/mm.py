"""OpenMMLab heads: ``MHPClsHead``, ``MHCClsHead``, ``MHSClsHead`` in mmengine's ``MODELS`` registry.

Load them from any mmengine/mmpretrain config with ``custom_imports = dict(imports=['mhe_plugins.mm'])``
and use ``head=dict(type='MHPClsHead', in_channels=2048, num_classes=10000, head_sizes=[100, 100])``.
They follow mmpretrain's ``ClsHead`` interface: ``loss(feats, data_samples) -> dict`` and
``predict(feats, data_samples) -> list`` of samples carrying ``pred_score`` / ``pred_label``; ``feats`` is
the neck's tuple and the last element is used. Thin wrappers: all MHE logic is in the core heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from mmengine.structures import BaseDataElement

from . import LabelCodec, MHCHead, MHPHead, MHSHead

__all__ = ["MHPClsHead", "MHCClsHead", "MHSClsHead"]


def _codec(num_classes: int, head_sizes: Sequence[int] | None, num_heads: int) -> LabelCodec:
    if head_sizes:
        return LabelCodec(list(head_sizes), num_labels=num_classes)
    return LabelCodec.balanced(num_classes, num_heads)


def _gt_labels(data_samples: Sequence, device: torch.device) -> torch.Tensor:
    """One hard label per sample from ``gt_label`` (mmpretrain DataSample or any element with that field)."""
    labels = []
    for i, s in enumerate(data_samples):
        gt = getattr(s, "gt_label", None)
        if gt is None:
            raise ValueError(f"data sample {i} has no gt_label")
        gt = torch.as_tensor(gt).reshape(-1)
        if gt.numel() != 1:
            raise ValueError(f"data sample {i}: MHE cls heads are single-label, got gt_label {gt.tolist()}")
        labels.append(gt)
    return torch.cat(labels).long().to(device)


class _MHEClsHead(BaseModule):
    """Shared mmpretrain-style plumbing around a core head built by ``_build``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        head_sizes: Sequence[int] | None = None,
        num_heads: int = 2,
        label_smoothing: float = 0.0,
        init_cfg: dict | None = None,
        **head_kwargs,
    ):
        super().__init__(init_cfg=init_cfg)
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        self.label_smoothing = float(label_smoothing)
        self.head = self._build(int(in_channels), _codec(num_classes, head_sizes, num_heads), **head_kwargs)

    def _build(self, in_channels: int, codec: LabelCodec, **kw):  # pragma: no cover - abstract
        raise NotImplementedError

    def _loss_kwargs(self) -> dict:
        return {"label_smoothing": self.label_smoothing}

    def pre_logits(self, feats) -> torch.Tensor:
        return feats[-1] if isinstance(feats, (tuple, list)) else feats

    def forward(self, feats) -> torch.Tensor:
        """Full (B, N) log-probabilities (for ``tensor`` mode / export at moderate N)."""
        return self.head.log_prob(self.pre_logits(feats))

    def loss(self, feats, data_samples: Sequence, **kwargs) -> dict:
        x = self.pre_logits(feats)
        target = _gt_labels(data_samples, x.device)
        return {"loss": self.head.compute_loss(x, target, **{**self._loss_kwargs(), **kwargs})}

    @torch.no_grad()
    def predict(self, feats, data_samples: Sequence | None = None) -> list:
        """Samples with ``pred_score`` (B x N probabilities, as mmpretrain) and ``pred_label`` (top-1 id)."""
        x = self.pre_logits(feats)
        scores = self.head.log_prob(x).exp()
        labels = self.head.predict(x)
        if data_samples is None:
            data_samples = [BaseDataElement() for _ in range(x.shape[0])]
        out = []
        for s, score, label in zip(data_samples, scores, labels):
            s = BaseDataElement() if s is None else s
            if hasattr(s, "set_pred_score"):  # mmpretrain DataSample
                s.set_pred_score(score).set_pred_label(label)
            else:
                s.set_data({"pred_score": score, "pred_label": label.reshape(1)})
            out.append(s)
        return out


@MODELS.register_module()
class MHPClsHead(_MHEClsHead):
    """Multi-head product: one ``Linear(in_channels, sum C_h)``; ``loss_variant`` ce_sum | joint_softmax | bce."""

    def __init__(self, *args, loss_variant: str = "ce_sum", **kwargs):
        self.loss_variant = loss_variant
        super().__init__(*args, **kwargs)

    def _build(self, in_channels: int, codec: LabelCodec, **kw):
        return MHPHead(in_channels, codec, **kw)

    def _loss_kwargs(self) -> dict:
        return {**super()._loss_kwargs(), "variant": self.loss_variant}


@MODELS.register_module()
class MHCClsHead(_MHEClsHead):
    """Multi-head cascade (``hidden_dim``, ``beam``)."""

    def _build(self, in_channels: int, codec: LabelCodec, **kw):
        return MHCHead(in_channels, codec, **kw)


@MODELS.register_module()
class MHSClsHead(_MHEClsHead):
    """Multi-head sampling (``mode`` per_sample | batch_union, ``sampled_groups``, optional ``margin``)."""

    def _build(self, in_channels: int, codec: LabelCodec, **kw):
        kw.setdefault("mode", "per_sample")
        return MHSHead(in_channels, codec, **kw)
