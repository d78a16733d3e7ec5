"""A resumed scale run owns its optimiser state: nothing of it stays a view of the checkpoint file (at
10^7 classes that mapping stayed resident beside the live state and evaluation hit the memory cap)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mhe_plugins.bench.scale_ckpt import Checkpointer, Progress


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings (Linux)")
def test_loaded_optimiser_state_keeps_no_mapping_of_the_checkpoint_file(tmp_path):
    def model_and_opt():
        torch.manual_seed(0)
        m = torch.nn.Linear(64, 512)
        return m, torch.optim.Adam(m.parameters(), lr=1e-2)

    m, opt = model_and_opt()
    m(torch.randn(8, 64)).square().mean().backward()
    opt.step()
    ckpt = Checkpointer(tmp_path, every=1.0)
    ckpt.save(Progress(step=1), {"m": m}, [opt])
    m2, opt2 = model_and_opt()
    assert ckpt.load({"m": m2}, [opt2]).step == 1
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)  # restored exactly
    maps = Path("/proc/self/maps").read_text()
    assert str(ckpt.path) not in maps, "the optimiser state still maps the checkpoint file"
    m2(torch.randn(8, 64)).square().mean().backward()
    opt2.step()  # and it trains on


def test_an_evaluation_that_cannot_allocate_is_retried_from_the_trained_state_without_training(
    tmp_path, monkeypatch
):
    from mhe_plugins.bench import scale_ckpt, scale_train
    from mhe_plugins.bench.scale import DEFAULTS, plan

    tiny = dict(DEFAULTS, train_per_class=3.0, epochs=1.0, eval_examples=200, batch=64, hidden=16,
                embed_dim=8, threads=1, log_every=2)  # fmt: skip
    spec = plan(tiny, [400], ["mhs"], [], 1)[1]["spec"]
    spec.update(progress=False, checkpoint_every=3600.0)  # no mid-run save: only the one before evaluation
    ref = scale_train.run_spec({**spec, "work_dir": str(tmp_path / "ref")})
    work = tmp_path / "run"
    real_eval = scale_train.evaluate

    def no_memory(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 16777216 bytes")

    monkeypatch.setattr(scale_train, "evaluate", no_memory)
    failed = scale_train.run_spec({**spec, "work_dir": str(work)})
    assert failed["status"] == "oom" and failed["steps"] == ref["steps"] == 18
    assert scale_ckpt.checkpoint_files(work)  # the trained state, saved before evaluating
    monkeypatch.setattr(scale_train, "evaluate", real_eval)
    steps = []
    monkeypatch.setattr(scale_train, "_lr_factor", lambda *a: steps.append(1) or 1.0)
    again = scale_train.run_spec({**spec, "work_dir": str(work)})
    assert again["status"] == "ok" and again["resumes"] == 1 and not steps  # evaluated, not trained again
    assert (again["top1"], again["top5"], again["final_loss"]) == (
        ref["top1"],
        ref["top5"],
        ref["final_loss"],
    )
