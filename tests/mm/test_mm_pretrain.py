"""mmpretrain end to end (docs/mm.md): configs/mm/glyphs_resnet18_{mhp,mhc}.py through mmengine's Runner for one
epoch on the bundled glyphs, then mmpretrain's inferencer on the checkpoint. The docs' run block runs verbatim."""

from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "mm.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)
CONFIGS = ROOT / "configs" / "mm"


def test_docs_show_the_config_file_as_it_is():
    text = (CONFIGS / "glyphs_resnet18_mhp.py").read_text(encoding="utf-8")
    assert text in BLOCKS
    mhc = Config.fromfile(str(CONFIGS / "glyphs_resnet18_mhc.py"))
    assert mhc.model.head.type == "MHCClsHead" and mhc.model.head.beam == 5  # beam = first head size: exact
    keys = "type in_channels num_classes head_sizes hidden_dim beam loss topk".split()
    assert sorted(mhc.model.head) == sorted(keys)  # _delete_: nothing of the MHP head is left
    assert mhc.model.backbone == Config.fromfile(str(CONFIGS / "glyphs_resnet18_mhp.py")).model.backbone


@pytest.mark.slow
@pytest.mark.parametrize("head", ["mhp", "mhc"])
def test_config_trains_validates_and_predicts_through_mmpretrain(head, tmp_path, monkeypatch):
    (run,) = [b for b in BLOCKS if "runner.train()" in b]
    if head != "mhp":
        run = run.replace("glyphs_resnet18_mhp", f"glyphs_resnet18_{head}")
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the block runs from the repository root
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ns: dict = {}
        exec(compile(run, "docs/mm.md run block", "exec"), ns)
    finally:
        torch.set_num_threads(threads)
    runner, metrics, results, images = ns["runner"], ns["metrics"], ns["results"], ns["images"]

    # the Runner built the MHE head from the config and trained one epoch on 40 classes
    model = runner.model
    assert type(model.head).__name__ == f"{head.upper()}ClsHead" and model.head.num_classes == 40
    assert runner.epoch == 1 and runner.iter == 26
    ckpt = tmp_path / "runs" / "mm" / f"glyphs_resnet18_{head}" / "epoch_1.pth"
    assert ckpt.is_file()
    assert set(metrics) == {"accuracy/top1", "accuracy/top5"}
    assert metrics["accuracy/top5"] > 100 * 5 / 40  # above chance after one epoch (48 valid images)

    # Runner.resume reads the full checkpoint (optimizer, schedulers, message hub) with weights_only=True too
    cfg = ns["cfg"].copy()
    cfg.merge_from_dict({"resume": True, "load_from": str(ckpt), "work_dir": str(tmp_path / "resumed")})
    resumed = Runner.from_cfg(cfg)
    resumed.load_or_resume()
    assert resumed.epoch == 1 and resumed.iter == 26
    assert resumed.message_hub.get_scalar("train/loss").data[0].shape == (26,)

    # the inferencer loaded the checkpoint (weights-only) into an mmpretrain model equal to the trained one
    inferencer = ns["inferencer"]
    loaded = inferencer.model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded[key], value, msg=key)
    assert inferencer.classes == runner.train_dataloader.dataset.metainfo["classes"]

    # its predictions are the head's own top-1 (the core head's topk on the same features)
    model.eval()
    with torch.no_grad():
        batch = model.data_preprocessor(
            {"inputs": [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images]}, False
        )
        feats = model.extract_feat(batch["inputs"])[-1]
        own = model.head.head.topk(feats, 1)[1][:, 0].tolist()
    assert [r["pred_label"] for r in results] == own
    assert [r["pred_class"] for r in results] == [inferencer.classes[i] for i in own]
    samples = inferencer(images, return_datasamples=True)  # the head's own data samples
    assert [int(s.pred_label) for s in samples] == own
    for r, s in zip(results, samples):
        np.testing.assert_allclose(r["pred_scores"], s.pred_score.numpy(), rtol=1e-6)
        assert abs(float(r["pred_scores"].sum()) - 1) < 1e-4


def test_weights_only_load_stays_restricted_after_import():
    """The checkpoint shim in mhe_plugins.mm allows HistoryBuffer's methods, not getattr in general."""
    from mmengine.logging import HistoryBuffer

    import mhe_plugins.mm  # noqa: F401

    buf = HistoryBuffer()
    buf.update(1.5)
    buffer = io.BytesIO()
    torch.save({"hub": buf, "eta": np.float64(2.0), "stat": HistoryBuffer.mean}, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=True)
    assert back["hub"].mean() == 1.5 and back["eta"] == 2.0 and back["stat"] is HistoryBuffer.mean

    class Getattr:
        def __init__(self, obj, name):
            self.args = (obj, name)

        def __reduce__(self):
            return getattr, self.args

    for obj, name in (
        (np.ndarray, "tofile"),
        (HistoryBuffer, "_set_default_statistics"),
        (OrderedDict, "fromkeys"),
    ):
        buffer = io.BytesIO()
        torch.save({"x": Getattr(obj, name)}, buffer)
        buffer.seek(0)
        with pytest.raises(pickle.UnpicklingError, match="is not allowed"):
            torch.load(buffer, weights_only=True)
