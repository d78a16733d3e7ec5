"""XMC model = encoder (tfidf | hf) + head (flat BCE | MHC cascade from the core).

Both heads take the padded label tensor (B, L; -1 = padding) and expose ``compute_loss`` and
``topk(x, k) -> (scores, ids)``, so the trainer never branches on the head type.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mhe_plugins.heads.mhc_multilabel import MHCMultiLabelHead
from xmc.encoders import HFEncoder, SparseEncoder


class FlatHead(nn.Module):
    """Dense one-vs-all BCE over all N labels (LightXML's small-dataset baseline)."""

    def __init__(self, in_features: int, num_labels: int):
        super().__init__()
        self.num_labels = num_labels
        self.fc = nn.Linear(in_features, num_labels)

    def multi_hot(self, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if bool((target >= self.num_labels).any()):
            bad = int(target[target >= self.num_labels][0])
            raise ValueError(f"label id {bad} is out of range [0, {self.num_labels})")
        hot = torch.zeros(target.shape[0], self.num_labels + 1, device=target.device, dtype=dtype)
        hot.scatter_(1, torch.where(target >= 0, target, self.num_labels), 1.0)
        return hot[:, : self.num_labels]

    def compute_loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x)
        return F.binary_cross_entropy_with_logits(logits, self.multi_hot(target, logits.dtype))

    def topk(self, x: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.fc(x).float()).topk(min(k, self.num_labels), dim=1)

    def classifier_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def default_hidden_dim(feature_dim: int) -> int:
    """Label-embedding width for MHC: a quarter of the feature, 32..300 (LightXML used 300-500 on 3840)."""
    return int(min(300, max(32, feature_dim // 4)))


class XMCModel(nn.Module):
    def __init__(self, cfg: dict[str, Any], num_labels: int, num_features: int | None = None, hf_config=None):
        """``cfg`` is the saved model config (encoder/head settings); ``hf_config`` rebuilds an HF
        encoder without its pretrained weights (they come from our checkpoint)."""
        super().__init__()
        self.cfg = dict(cfg)
        if cfg["encoder"] == "tfidf":
            self.encoder = SparseEncoder(num_features, cfg["tfidf_dim"], cfg["dropout"])
        else:
            self.encoder = HFEncoder(
                cfg.get("model_path"), cfg["feature_layers"], cfg["dropout"], config=hf_config
            )
        d = self.encoder.out_features
        if cfg["head"] == "flat":
            self.head = FlatHead(d, num_labels)
        elif cfg["head"] == "mhc":
            self.head = MHCMultiLabelHead(
                d,
                num_labels,
                num_groups=cfg.get("num_groups"),
                hidden_dim=cfg.get("hidden_dim") or default_hidden_dim(d),
                candidates_topk=cfg.get("candidates_topk"),
                permutation_seed=cfg.get("permutation_seed"),
            )
        else:
            raise ValueError(f"unknown head {cfg['head']!r} (mhc|flat)")

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**inputs)

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Training loss (forward is the loss so DDP sees one call per step)."""
        return self.head.compute_loss(self.features(inputs), labels)

    @torch.no_grad()
    def topk(self, inputs: dict[str, torch.Tensor], k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.topk(self.features(inputs), k)
