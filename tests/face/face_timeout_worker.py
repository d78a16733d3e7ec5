"""Run under torchrun by test_face_train.py: ``mhe-face-train`` whose rank 1 freezes in its 3rd head call."""

from __future__ import annotations

import sys
import time

from insightface_ext import heads, train
from mhe_plugins.distributed import get_rank

_forward = heads.MHSArcFace.forward
_calls = [0]


def _frozen_on_rank1(self, *args, **kwargs):
    _calls[0] += 1
    if get_rank() == 1 and _calls[0] == 3:
        time.sleep(3600)  # alive, but never joins the head's all-gather
    return _forward(self, *args, **kwargs)


heads.MHSArcFace.forward = _frozen_on_rank1
train.main(sys.argv[1:])
