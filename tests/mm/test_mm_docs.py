"""docs/mm.md: the config block builds through mmengine and trains one Mixup step."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.registry import MODELS
from mmengine.structures import BaseDataElement

DOC = Path(__file__).resolve().parents[2] / "docs" / "mm.md"


def test_docs_config_builds_and_runs_a_mixup_step(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 3  # this head config; the glyph config and its run block: test_mm_pretrain.py
    path = tmp_path / "cfg.py"
    path.write_text(blocks[0])
    cfg = Config.fromfile(str(path))
    head = MODELS.build(cfg.model.head)  # ImageClassifier/ResNet need mmpretrain: only the head is built here
    assert type(head).__name__ == "MHPClsHead" and head.topk == (1, 5) and head.label_smoothing == 0.1
    torch.manual_seed(0)
    x, y = torch.randn(4, 2048), torch.randint(0, 10000, (4,))
    one = F.one_hot(y, 10000).float()
    samples = [BaseDataElement(gt_score=s) for s in 0.6 * one + 0.4 * one.flip(0)]
    loss = head.loss((x,), samples)
    assert set(loss) == {"loss"} and torch.isfinite(loss["loss"])
    loss["loss"].backward()
    assert head.head.proj.weight.grad.abs().sum() > 0
