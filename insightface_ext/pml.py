"""``MHSArcFaceLoss``: MHS-ArcFace as a pytorch-metric-learning loss, a drop-in for ``losses.ArcFaceLoss``.

Same constructor shape and margin convention as pml (``margin`` in **degrees**, 28.6 ~ 0.5 rad), cosine
similarity as the distance, ``get_logits`` for inference, weight regularizers via ``WeightRegularizerMixin``.
The class centres live in a core :class:`mhe_plugins.MHSHead` (not sharded: pml's ``DistributedLossWrapper``
does the gathering); a step only scores the groups hit by the batch. Miners work as in pml's classification
losses: each sample's loss is weighted by how often the miner's ``indices_tuple`` names it (``convert_to_
weights``), so a miner changes the loss exactly as it changes ``ArcFaceLoss``'s.
Like pml's ArcFaceLoss, it owns parameters: give them to an optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from mhe_plugins.codec import LabelCodec
from mhe_plugins.heads.mhs import MHSHead
from mhe_plugins.margins import CombinedMargin

__all__ = ["MHSArcFaceLoss"]


class MHSArcFaceLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """ArcFace over the classes of the sampled head-0 groups; equals ``ArcFaceLoss`` when every group is sampled."""

    def __init__(
        self,
        num_classes: int | None = None,
        embedding_size: int = 512,
        head_sizes: Sequence[int] | None = None,
        margin: float = 28.6,
        scale: float = 64.0,
        sample_rate: float | None = None,
        sparse: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        c_f.assert_distance_type(self, CosineSimilarity)
        self.margin, self.scale, self.num_classes = float(margin), float(scale), num_classes
        if head_sizes is None and num_classes is None:
            raise ValueError("MHSArcFaceLoss needs num_classes or head_sizes")
        n = int(num_classes) if num_classes is not None else None
        codec = LabelCodec.from_spec(n, head_sizes) if n is not None else LabelCodec(list(head_sizes))
        self.head = MHSHead(
            int(embedding_size),
            codec,
            margin=CombinedMargin(1.0, float(np.radians(margin)), 0.0, s=float(scale)),
            sample_rate=sample_rate,
            sparse_grad=sparse,
            sampling_correction=False,  # Partial FC's loss, as the face wrapper (unmeasured on faces)
        )
        self.num_classes = codec.num_labels
        self.head.init_class_weights_(self.weight_init_func)
        self.add_to_recordable_attributes(list_of_names=["num_classes", "margin", "scale"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=["num_sampled_classes"], is_stat=True)

    @property
    def W(self) -> torch.Tensor:  # noqa: N802 - pml's name for the class-centre matrix, (embedding_size, C)
        return self.head.class_weights().t()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        self.head.to(device=embeddings.device)
        labels = labels.to(embeddings.device)
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
        losses = self.head.compute_loss(embeddings, labels, reduction="none") * miner_weights
        if self.collect_stats:
            self.num_sampled_classes = self.head.last_num_sampled
        loss_dict = {
            "loss": {
                "losses": losses,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }
        self.add_weight_regularization_to_loss_dict(loss_dict, self.W.t())
        return loss_dict

    def get_default_distance(self):
        return CosineSimilarity()

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled cosines to every class (B, C), like ``ArcFaceLoss.get_logits`` (no margin)."""
        return self.distance(embeddings, self.W.t()) * self.scale
