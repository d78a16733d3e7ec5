"""OpenMMLab heads: ``MHPClsHead``, ``MHCClsHead``, ``MHSClsHead`` in mmengine's ``MODELS`` registry.

Load them from any mmengine/mmpretrain config with ``custom_imports = dict(imports=['mhe_plugins.mm'])``
and use ``head=dict(type='MHPClsHead', in_channels=2048, num_classes=10000, head_sizes=[100, 100])``.
They follow mmpretrain's ``ClsHead`` interface: ``loss(feats, data_samples) -> dict`` and
``predict(feats, data_samples) -> list`` of samples carrying ``pred_score`` / ``pred_label``; ``feats`` is
the neck's tuple and the last element is used. Thin wrappers: all MHE logic is in the core heads.

The arguments every mmpretrain ``ClsHead`` config carries are accepted with mmpretrain's meaning:
``loss=dict(type='CrossEntropyLoss' | 'LabelSmoothLoss', loss_weight, label_smooth_val, use_soft, ...)``
(``loss_weight`` scales the loss, ``label_smooth_val`` becomes the head's label smoothing, ``mode=
'classy_vision'`` uses eps / (1 + eps), ``use_sigmoid`` selects MHP's ``bce`` variant), ``topk`` and
``cal_acc`` (adds ``accuracy_top-k`` in percent to the loss dict). Losses that cannot apply to an MHE head
(FocalLoss, class weights, ...) raise. Mixup/CutMix ``gt_score`` (a soft (num_classes,) vector per sample)
is used by MHP as per-digit marginals (exact for its product loss); MHC/MHS train on one hard label per
sample and refuse soft scores (one-hot scores are read as hard labels).

``GlyphClsDataset`` (mmengine's ``DATASETS``, found from mmpretrain configs like the heads) serves the
bundled glyph subset (or any set built by ``python -m timm_ext.datasets glyphs``) to an mmpretrain
pipeline, so ``configs/mm/glyphs_resnet18_mhp.py`` runs with no data preparation.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np
import torch
from mmengine.dataset import BaseDataset
from mmengine.model import BaseModule
from mmengine.registry import DATASETS, MODELS
from mmengine.structures import BaseDataElement

from .bundled import bundled_data
from .checks import as_int, check_soft_target
from .datasets.glyphs import load_glyph_split, read_classes
from .heads import build_head

__all__ = ["MHPClsHead", "MHCClsHead", "MHSClsHead", "GlyphClsDataset", "parse_cls_loss"]


def _history_buffer_method(obj, name: str):
    """``getattr`` for the weights-only unpickler, limited to ``HistoryBuffer``'s public methods."""
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and not name.startswith("_") and callable(getattr(HistoryBuffer, name, None)):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"weights-only load: getattr({obj!r}, {name!r}) is not allowed")


def _allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read the checkpoints mmengine's ``Runner`` writes.

    Why: torch >= 2.6 loads with ``weights_only=True`` by default and mmengine 0.10.7 (the newest on PyPI)
    calls ``torch.load`` without it, so ``load_checkpoint`` (mmpretrain's ``get_model`` / inferencer,
    ``Runner.resume``) fails on its own checkpoints (open-mmlab/mmengine#1655; the fix, #1650, is not
    released): their ``message_hub`` holds ``HistoryBuffer`` objects (numpy arrays, and statistic methods
    pickled as ``getattr(HistoryBuffer, 'min')``) and numpy scalars. This allows exactly those, and
    ``getattr`` only on ``HistoryBuffer``'s public methods, so weights-only loading stays restricted (a
    pickle calling ``getattr`` on anything else, or any other global, is still refused).
    """
    from mmengine.logging import HistoryBuffer

    reconstruct = np.zeros(1).__reduce__()[0]  # what pickles name: numpy._core.multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # (numpy.core.multiarray.* on numpy 1.x)
    dtypes = {type(np.dtype(t)) for t in (bool, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float16)}
    dtypes |= {type(np.dtype(t)) for t in (np.uint16, np.uint32, np.uint64, np.float32, np.float64)}
    torch.serialization.add_safe_globals(
        [
            HistoryBuffer,
            np.ndarray,
            np.dtype,
            *sorted(dtypes, key=lambda t: t.__name__),
            reconstruct,
            scalar,
            (_history_buffer_method, "builtins.getattr"),
        ]
    )


_allow_mmengine_checkpoints()

_LOSS_KEYS = {
    "CrossEntropyLoss": {"use_sigmoid", "use_soft", "reduction", "loss_weight", "class_weight", "pos_weight"},
    "LabelSmoothLoss": {"label_smooth_val", "num_classes", "use_sigmoid", "mode", "reduction", "loss_weight"},
}


def parse_cls_loss(loss: dict | None, num_classes: int, head: str) -> dict:
    """mmpretrain loss config -> ``{"loss_weight", "label_smoothing", "use_sigmoid", "reduction"}``.

    ``CrossEntropyLoss`` (also accepting ``label_smooth_val``) and ``LabelSmoothLoss`` (modes
    ``original`` / ``classy_vision``) map onto the MHE heads' own cross-entropy; anything else raises.
    """
    out = {"loss_weight": 1.0, "label_smoothing": 0.0, "use_sigmoid": False, "reduction": "mean"}
    if loss is None:
        return out
    if not isinstance(loss, dict):
        raise ValueError(
            f"{head}: loss must be a config dict like dict(type='CrossEntropyLoss'), got {loss!r}"
        )
    kind = loss.get("type")
    name = getattr(kind, "__name__", str(kind)).rsplit(".", 1)[-1]  # 'mmpretrain.CrossEntropyLoss' -> name
    if name not in _LOSS_KEYS:
        raise ValueError(
            f"{head}: loss type {kind!r} cannot apply to an MHE head (it computes its own cross-entropy per "
            f"head); use one of {sorted(_LOSS_KEYS)}"
        )
    allowed = _LOSS_KEYS[name] | {"label_smooth_val"}
    for key, value in loss.items():
        if key != "type" and key not in allowed:
            raise ValueError(f"{head}: {name} option {key}={value!r} is not supported by an MHE head")
    for key in ("class_weight", "pos_weight"):
        if loss.get(key) is not None:
            raise ValueError(
                f"{head}: {name} option {key} is not supported (no per-class weights over N classes)"
            )
    if loss.get("use_soft") and loss.get("use_sigmoid"):
        raise ValueError(f"{head}: use_sigmoid and use_soft cannot both be set (as in mmpretrain)")
    reduction = loss.get("reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{head}: loss reduction must be 'mean' or 'sum' (the loss dict needs a scalar), got {reduction!r}"
        )
    eps = float(loss.get("label_smooth_val", 0.0))
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"{head}: label_smooth_val must be in [0, 1), got {eps}")
    mode = loss.get("mode", "original")
    if mode == "classy_vision":
        eps = eps / (1 + eps)
    elif mode != "original":
        raise ValueError(
            f"{head}: LabelSmoothLoss mode {mode!r} is not supported (single-label heads); "
            "use 'original' or 'classy_vision'"
        )
    if loss.get("num_classes") is not None and as_int(loss["num_classes"], "loss num_classes") != num_classes:
        raise ValueError(
            f"{head}: loss num_classes={loss['num_classes']} differs from the head's num_classes={num_classes}"
        )
    out.update(
        loss_weight=float(loss.get("loss_weight", 1.0)),
        label_smoothing=eps,
        use_sigmoid=bool(loss.get("use_sigmoid") or False),
        reduction=reduction,
    )
    return out


def _targets(
    data_samples: Sequence, num_classes: int, device: torch.device, head: str, soft_ok: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hard labels (B,), soft scores (B, N) or None): ``gt_score`` wins when present, as in mmpretrain."""
    has_score = [getattr(s, "gt_score", None) is not None for s in data_samples]
    if any(has_score):
        if not all(has_score):
            raise ValueError(
                f"{head}: data sample {has_score.index(False)} has no gt_score but others have one"
            )
        scores = []
        for i, s in enumerate(data_samples):
            sc = torch.as_tensor(s.gt_score)
            if tuple(sc.shape) != (num_classes,):
                raise ValueError(
                    f"{head}: data sample {i} gt_score must have shape ({num_classes},), got {tuple(sc.shape)}"
                )
            scores.append(sc)
        soft = torch.stack(scores).to(device=device, dtype=torch.float32)
        check_soft_target(soft, num_classes, (len(scores),), f"{head}: gt_score (row = data sample)")
        hard = soft.argmax(-1)
        if soft_ok:
            return hard, soft
        one_hot = soft.gather(1, hard[:, None]).squeeze(1) == 1
        if not bool(one_hot.all()):
            i = int((~one_hot).nonzero()[0, 0])
            raise ValueError(
                f"{head}: data sample {i} has a soft gt_score (Mixup/CutMix); this head trains on one hard "
                "label per sample: use MHPClsHead for mixed targets or drop the batch augments"
            )
        return hard, None
    labels = []
    for i, s in enumerate(data_samples):
        gt = getattr(s, "gt_label", None)
        if gt is None:
            raise ValueError(f"{head}: data sample {i} has neither gt_label nor gt_score")
        gt = torch.as_tensor(gt).reshape(-1)
        if gt.numel() != 1:
            raise ValueError(f"data sample {i}: MHE cls heads are single-label, got gt_label {gt.tolist()}")
        labels.append(gt)
    if not labels:
        return torch.zeros(0, dtype=torch.long, device=device), None
    return torch.cat(labels).to(device), None


class _MHEClsHead(BaseModule):
    """Shared mmpretrain-style plumbing around the core head of kind ``kind`` (``build_head``)."""

    kind = ""
    default_head_kwargs: dict = {}
    soft_targets = False  # does the core head train on soft class distributions?

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        head_sizes: Sequence[int] | None = None,
        num_heads: int | None = None,
        label_smoothing: float = 0.0,
        loss: dict | None = None,
        topk: int | Sequence[int] = (1,),
        cal_acc: bool = False,
        init_cfg: dict | None = None,
        **head_kwargs,
    ):
        super().__init__(init_cfg=init_cfg)
        name = type(self).__name__
        self.in_channels = as_int(in_channels, "in_channels", minimum=1)
        self.num_classes = as_int(num_classes, "num_classes", minimum=1)
        cfg = parse_cls_loss(loss, self.num_classes, name)
        if cfg["label_smoothing"] and label_smoothing and cfg["label_smoothing"] != float(label_smoothing):
            raise ValueError(
                f"{name}: label_smoothing={label_smoothing} conflicts with the loss label_smooth_val "
                f"(smoothing {cfg['label_smoothing']})"
            )
        self.label_smoothing = float(label_smoothing) or cfg["label_smoothing"]
        self.loss_weight, self.reduction = cfg["loss_weight"], cfg["reduction"]
        self._use_sigmoid(cfg["use_sigmoid"])
        ks = (topk,) if not isinstance(topk, (tuple, list)) else tuple(topk)
        self.topk = tuple(as_int(k, "topk", minimum=1) for k in ks)
        if not self.topk or max(self.topk) > self.num_classes:
            raise ValueError(
                f"{name}: topk must be ints in [1, num_classes={self.num_classes}], got {topk!r}"
            )
        self.cal_acc = bool(cal_acc)
        kw = {**self.default_head_kwargs, **head_kwargs}
        self.head = build_head(
            self.kind, self.in_channels, self.num_classes, head_sizes=head_sizes, num_heads=num_heads, **kw
        )

    def _use_sigmoid(self, flag: bool) -> None:
        if flag:
            raise ValueError(
                f"{type(self).__name__}: loss use_sigmoid=True has no equivalent for this head (softmax over "
                "siblings); MHPClsHead maps it to its per-digit 'bce' variant"
            )

    def _loss_kwargs(self) -> dict:
        return {"label_smoothing": self.label_smoothing, "reduction": self.reduction}

    def _soft_target(self, soft: torch.Tensor):  # pragma: no cover - only heads with soft_targets
        raise NotImplementedError

    def pre_logits(self, feats) -> torch.Tensor:
        return feats[-1] if isinstance(feats, (tuple, list)) else feats

    def forward(self, feats) -> torch.Tensor:
        """Full (B, N) log-probabilities (for ``tensor`` mode / export at moderate N)."""
        return self.head.log_prob(self.pre_logits(feats))

    def loss(self, feats, data_samples: Sequence, **kwargs) -> dict:
        """``{"loss": loss_weight * head loss}`` plus ``accuracy_top-k`` (percent) when ``cal_acc``."""
        name = type(self).__name__
        x = self.pre_logits(feats)
        hard, soft = _targets(data_samples, self.num_classes, x.device, name, self.soft_targets)
        target = hard if soft is None else self._soft_target(soft)
        loss = self.head.compute_loss(x, target, **{**self._loss_kwargs(), **kwargs})
        losses = {"loss": loss * self.loss_weight}
        if self.cal_acc:
            if soft is not None:
                raise ValueError(
                    f"{name}: cal_acc=True with gt_score (Mixup/CutMix targets): training accuracy is "
                    "meaningless there, set cal_acc=False (as mmpretrain asserts)"
                )
            losses.update(self.accuracy(x, hard))
        return losses

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, target: torch.Tensor) -> dict:
        """``accuracy_top-k`` in percent for every k of ``topk`` (mmpretrain's key names and scale)."""
        if target.numel() == 0:
            return {f"accuracy_top-{k}": x.new_zeros(()) for k in self.topk}
        ids = self.head.topk(x, max(self.topk))[1]
        hit = ids == target.reshape(-1, 1)
        return {f"accuracy_top-{k}": hit[:, :k].any(1).float().mean() * 100 for k in self.topk}

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
    """Multi-head product: one ``Linear(in_channels, sum C_h)``; ``loss_variant`` ce_sum | joint_softmax | bce.

    ``gt_score`` (Mixup/CutMix) trains on its per-digit marginals: for ``ce_sum`` this equals the soft-class
    cross-entropy of the product model exactly.
    """

    kind = "mhp"
    soft_targets = True

    def __init__(self, *args, loss_variant: str | None = None, **kwargs):
        self.loss_variant = loss_variant
        super().__init__(*args, **kwargs)
        if self.loss_variant is None:
            self.loss_variant = "ce_sum"

    def _use_sigmoid(self, flag: bool) -> None:
        if flag:
            if self.loss_variant not in (None, "bce"):
                raise ValueError(
                    f"MHPClsHead: loss use_sigmoid=True conflicts with loss_variant={self.loss_variant!r}"
                )
            self.loss_variant = "bce"

    def _soft_target(self, soft: torch.Tensor) -> list[torch.Tensor]:
        return self.head.codec.digit_marginals(soft)

    def _loss_kwargs(self) -> dict:
        return {**super()._loss_kwargs(), "variant": self.loss_variant}


@MODELS.register_module()
class MHCClsHead(_MHEClsHead):
    """Multi-head cascade (``hidden_dim``, ``beam``); hard labels only."""

    kind = "mhc"


@MODELS.register_module()
class MHSClsHead(_MHEClsHead):
    """Multi-head sampling (``mode`` per_sample | batch_union, ``sampled_groups``, optional ``margin``)."""

    kind = "mhs"
    default_head_kwargs = {"mode": "per_sample"}


@DATASETS.register_module()
class GlyphClsDataset(BaseDataset):
    """One split of a glyph set (``train``/``valid``/``test`` npz, see ``mhe_plugins.datasets.glyphs``).

    ``data_root=None`` is the bundled 500-class subset; ``num_classes=K`` keeps the first K classes (labels
    < K), as ``subset_glyph_dataset`` does. Images are held in memory, so the pipeline starts without
    ``LoadImageFromFile``: each item carries ``img`` (S x S x 3 uint8, the grey glyph in 3 equal channels,
    as ``GlyphDataset(mode="RGB")``), ``img_shape``, ``ori_shape`` and ``gt_label``. ``metainfo['classes']``
    are the characters, which the Runner saves in the checkpoint and mmpretrain's inferencer reports as
    ``pred_class``. ``get_cat_ids`` / ``get_gt_labels`` are mmpretrain ``BaseDataset``'s.
    """

    def __init__(
        self,
        split: str = "train",
        num_classes: int | None = None,
        data_root: str | None = None,
        pipeline: Sequence = (),
        **kwargs,
    ):
        root = bundled_data("glyphs") if data_root is None else data_root
        classes = read_classes(root)
        keep = len(classes) if num_classes is None else as_int(num_classes, "num_classes", minimum=1)
        if keep > len(classes):
            raise ValueError(f"GlyphClsDataset: num_classes={keep} > {len(classes)} classes in {root}")
        self.split = split
        metainfo = {"classes": tuple(classes[:keep]), **(kwargs.pop("metainfo", None) or {})}
        super().__init__(data_root=str(root), metainfo=metainfo, pipeline=list(pipeline), **kwargs)

    def load_data_list(self) -> list[dict]:
        images, labels, _ = load_glyph_split(self.data_root, self.split)
        keep = labels < len(self.metainfo["classes"])
        return [{"img": im, "gt_label": int(y)} for im, y in zip(images[keep], labels[keep])]

    def get_data_info(self, idx: int) -> dict:
        info = super().get_data_info(idx)
        img = np.repeat(info["img"][..., None], 3, axis=-1)  # grey (S, S) -> (S, S, 3), BGR = RGB
        info.update(img=img, img_shape=img.shape[:2], ori_shape=img.shape[:2])
        return info

    def get_cat_ids(self, idx: int) -> list[int]:
        return [int(self.get_data_info(idx)["gt_label"])]

    def get_gt_labels(self) -> np.ndarray:
        return np.array([self.get_data_info(i)["gt_label"] for i in range(len(self))])
