"""arcface_torch-style face-recognition training with MHS-ArcFace (the Partial-FC replacement) sharded over ranks.

Public pieces: :class:`MHSArcFace` (``loss = head(local_embeddings, local_labels).loss``), :class:`LazySGD` (no
decay/momentum drift on unsampled class centres), ``insightface_ext.pml.MHSArcFaceLoss`` (pytorch-metric-
learning loss), the ``mhe-face-train`` / ``mhe-face-eval`` / ``mhe-face-export`` CLIs and
``python -m insightface_ext.bench``.
"""

from .heads import MHSArcFace, dist_softmax_cross_entropy, shard_range
from .optim import LazySGD, sum_allreduce_hook

__all__ = ["MHSArcFace", "LazySGD", "sum_allreduce_hook", "dist_softmax_cross_entropy", "shard_range"]
