"""Any timm backbone with an MHE head (MHP / MHC / MHS) or the one-hot linear baseline in place of its classifier.

The wrapper keeps timm's model conventions (``forward_features``, ``forward_head(x, pre_logits)``,
``get_classifier``, ``reset_classifier``, ``pretrained_cfg``, ``num_classes``, ``num_features``), so timm's
data config, optimizer factory (``no_weight_decay``/``group_matcher``) and scripts treat it like any model.
``forward`` returns full-class log-probabilities (B, N); training at extreme N should call
``compute_loss`` instead, which never materialises the N scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from mhe_plugins.heads import MHEHead
from mhe_plugins.heads import build_head as core_build_head

HEADS = ("linear", "mhp", "mhc", "mhs")


def build_head(
    head: str,
    in_features: int,
    num_classes: int,
    head_sizes: Sequence[int] | None = None,
    num_heads: int | None = None,
    **head_kwargs: Any,
) -> MHEHead:
    """One of ``HEADS`` through the core's ``build_head``; timm's only default of its own: MHS samples per
    sample (the reference's image-classification MHS)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head == "linear":
        if head_sizes:
            raise ValueError("head_sizes is meaningless for the linear (one-hot) head")
        return core_build_head("linear", in_features, num_classes, **head_kwargs)
    if head == "mhs":
        head_kwargs.setdefault("mode", "per_sample")
    return core_build_head(
        head, in_features, num_classes, head_sizes=head_sizes, num_heads=num_heads, **head_kwargs
    )


def build_neck(in_features: int, neck_dim: int | None) -> nn.Module:
    """Linear(d, neck_dim) + BatchNorm + ReLU in front of the head, or Identity when ``neck_dim`` is falsy.

    Why: a product head scores class (r, c) as W_0[r] + W_1[c], so the features must place every image on
    an arbitrary (row, col) code; extra width right before the head is what helped most in our checks.
    """
    if not neck_dim:
        return nn.Identity()
    if int(neck_dim) < 1:
        raise ValueError(f"neck_dim must be a positive width, got {neck_dim}")
    return nn.Sequential(
        nn.Linear(in_features, int(neck_dim), bias=False),
        nn.BatchNorm1d(int(neck_dim)),
        nn.ReLU(inplace=True),
    )


def use_small_input_stem(model: nn.Module) -> nn.Module:
    """Adapt a timm ResNet-family stem to small (32x32) inputs: drop the max-pool (stride 4 -> 2).

    CIFAR-style ResNets do the same; without it a 32x32 glyph is 1x1 after the last stage.
    """
    if not hasattr(model, "maxpool") or not hasattr(model, "conv1"):
        raise ValueError(
            f"small_stem needs a ResNet-style backbone (conv1 + maxpool), got {type(model).__name__}"
        )
    model.maxpool = nn.Identity()
    if hasattr(model, "feature_info"):
        for info in model.feature_info:
            if info.get("reduction", 1) >= 4:
                info["reduction"] //= 2
    return model


class MHEClassifier(nn.Module):
    """timm backbone (classifier removed) + MHE head; a timm-compatible model."""

    def __init__(
        self,
        backbone: nn.Module,
        head: str = "mhp",
        num_classes: int = 1000,
        head_sizes: Sequence[int] | None = None,
        num_heads: int | None = None,
        head_kwargs: dict | None = None,
        neck_dim: int | None = None,
    ):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.head_type = head
        self.num_heads_requested = num_heads
        self.head_kwargs = dict(head_kwargs or {})
        # pooled feature width (timm: head_hidden_size when the head has a pre-logits MLP/norm)
        self.num_features = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        self.neck_dim = int(neck_dim) if neck_dim else None
        self.neck = build_neck(self.num_features, self.neck_dim)
        self.head = build_head(
            head, self.head_in_features, num_classes, head_sizes, num_heads, **self.head_kwargs
        )
        self.num_classes = int(num_classes)
        cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
        cfg.update(num_classes=self.num_classes, classifier="head")
        self.pretrained_cfg = cfg
        self.default_cfg = cfg

    # ------------------------------------------------------------------ timm conventions
    @property
    def head_in_features(self) -> int:
        """Width of the head's input: the neck's width when there is a neck, else the backbone's."""
        return self.neck_dim or self.num_features

    @property
    def head_sizes(self) -> list[int] | None:
        """The MHE head sizes (None for the linear head and the identity head)."""
        codec = getattr(self.head, "codec", None)
        return list(codec.head_sizes) if codec is not None and self.head_type != "linear" else None

    def mhe_config(self) -> dict:
        """Everything needed to rebuild this model (stored in checkpoints)."""
        return {
            "head": self.head_type,
            "num_classes": self.num_classes,
            "head_sizes": self.head_sizes,
            "neck_dim": self.neck_dim,
            "head_kwargs": {
                k: v for k, v in self.head_kwargs.items() if isinstance(v, (int, float, str, bool))
            },
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> (B, head_in_features) features after pooling and the optional neck: the head's input."""
        return self.neck(self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        feats = self.neck(self.backbone.forward_head(x, pre_logits=True))
        return feats if pre_logits else self.head.log_prob(feats)

    def forward(self, x: torch.Tensor, target=None, **loss_kwargs: Any) -> torch.Tensor:
        """Full-class log-probabilities (B, N): timm's CrossEntropy on them is the MHE product loss.

        With ``target`` the training loss instead (``compute_loss``), so a DDP-wrapped model can train
        through its ``forward`` without materialising the N scores.
        """
        if target is not None:
            return self.compute_loss(x, target, **loss_kwargs)
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(
        self,
        num_classes: int,
        global_pool: str | None = None,
        head_sizes: Sequence[int] | None = None,
        head: str | None = None,
    ) -> None:
        """New head for ``num_classes`` (balanced split unless ``head_sizes``); ``num_classes=0`` -> identity."""
        if global_pool is not None:
            self.backbone.reset_classifier(0, global_pool)
            self.num_features = int(
                getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
            )
            self.neck = build_neck(self.num_features, self.neck_dim)
        self.head_type = head or self.head_type
        self.num_classes = int(num_classes)
        if num_classes == 0:
            self.head = _IdentityHead()
        else:
            self.head = build_head(
                self.head_type,
                self.head_in_features,
                num_classes,
                head_sizes,
                self.num_heads_requested,
                **self.head_kwargs,
            )
        self.pretrained_cfg["num_classes"] = self.num_classes

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in inner()} if callable(inner) else set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        inner = self.backbone.group_matcher(coarse=coarse)

        def prefix(v):
            if isinstance(v, str):
                return "^backbone\\." + v.lstrip("^")
            return [(("^backbone\\." + p.lstrip("^")), *rest) for p, *rest in v]

        return {k: prefix(v) for k, v in inner.items()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ MHE
    def compute_loss(self, x: torch.Tensor, target, **kwargs: Any) -> torch.Tensor:
        """Images + targets -> training loss through the core head (no N-sized scores for MHE heads)."""
        return self.head.compute_loss(self.pooled(x), target, **kwargs)

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k (log-prob scores for MHP/MHC/linear, logits for MHS) and global ids."""
        return self.head.topk(self.pooled(x), k)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.predict(self.pooled(x))


class _IdentityHead(nn.Identity):
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return x


def create_model(
    model_name: str,
    head: str = "mhp",
    num_classes: int = 1000,
    head_sizes: Sequence[int] | None = None,
    num_heads: int | None = None,
    pretrained: bool = False,
    small_stem: bool = False,
    head_kwargs: dict | None = None,
    backbone_kwargs: dict | None = None,
    neck_dim: int | None = None,
    **timm_kwargs: Any,
) -> MHEClassifier:
    """``timm.create_model(model_name, num_classes=0, ...)`` + an MHE head over ``num_classes`` labels.

    ``head``: ``linear`` (one-hot baseline), ``mhp``, ``mhc`` or ``mhs``; ``head_sizes`` defaults to the
    balanced split of ``num_classes`` into ``num_heads``; ``head_kwargs`` go to the core head
    (e.g. ``hidden_dim``/``beam`` for MHC, ``sampled_groups``/``mode`` for MHS).
    ``small_stem`` removes a ResNet's stem max-pool for 32x32 inputs. ``num_heads`` means MHE heads here;
    a backbone argument of the same name (a ViT's attention heads) goes in ``backbone_kwargs``.
    ``neck_dim`` puts Linear(d, neck_dim) + BatchNorm + ReLU between the pooled features and the head.
    """
    timm_kwargs = {**timm_kwargs, **(backbone_kwargs or {})}
    backbone = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **timm_kwargs)
    if small_stem:
        use_small_input_stem(backbone)
    return MHEClassifier(backbone, head, num_classes, head_sizes, num_heads, head_kwargs, neck_dim)


def head_parameters(model: MHEClassifier) -> int:
    """Parameters after the backbone: the head plus the optional neck (the neck is part of the head's cost)."""
    return sum(p.numel() for p in model.head.parameters()) + sum(p.numel() for p in model.neck.parameters())
