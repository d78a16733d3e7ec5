"""The one door into the heads: ``build_head`` builds every kind, and for every kind ``head(x, target)``
returns a ``HeadOutput`` whose exact ``target_log_prob`` equals ``log_prob(x).gather(target)``; adapters
reach no head internals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhe_plugins import LabelCodec
from mhe_plugins.heads import HEADS, HeadOutput, MultiLabelHead, build_head

ROOT = Path(__file__).resolve().parents[2]
SINGLE = ["linear", "mhp", "mhc", "mhs"]
MULTI = ["linear_multilabel", "mhc_multilabel"]


def test_registry_has_every_kind():
    assert set(HEADS) == set(SINGLE + MULTI)
    for kind, cls in HEADS.items():
        assert cls.kind == kind
    assert issubclass(HEADS["mhc_multilabel"], MultiLabelHead)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(SINGLE + MULTI),
    n=st.integers(3, 60),
    d=st.integers(1, 9),
    b=st.integers(1, 7),
    seed=st.integers(0, 10_000),
    smoothing=st.sampled_from([0.0, 0.1]),
)
def test_target_log_prob_is_log_prob_gathered(kind, n, d, b, seed, smoothing):
    torch.manual_seed(seed)
    head = build_head(kind, d, n)
    x = torch.randn(b, d, dtype=torch.float64)
    head = head.double()
    if kind in MULTI:
        target = torch.randint(0, n, (b, 3))
        out = head(x, target)
    else:
        target = torch.randint(0, n, (b,))
        out = head(x, target, label_smoothing=smoothing)
    assert isinstance(out, HeadOutput)
    loss, lp = out  # unpacks like a tuple
    assert loss.dim() == 0 and torch.isfinite(loss)
    want = head.log_prob(x).gather(-1, target if target.dim() == 2 else target[:, None])
    want = want if target.dim() == 2 else want[:, 0]
    torch.testing.assert_close(lp, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(head.target_log_prob(x, target), want, rtol=1e-9, atol=1e-9)
    assert torch.equal(head.predict(x), head.topk(x, 1)[1][:, 0])  # predict is top-1 everywhere
    loss.backward()


@pytest.mark.parametrize("kind", ["linear", "mhp", "mhc", "mhs"])
def test_label_smoothing_by_label_is_the_token_level_target(kind):
    """``smoothing="label"`` keeps 1 - eps on the true label (a dense layer's meaning): for one softmax it is
    the same as per-head smoothing; MHP and MHC route it to their exact token-level forms."""
    torch.manual_seed(0)
    n, eps = 23, 0.1
    head = build_head(kind, 6, n).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, n, (5,))
    got = head(x, y, label_smoothing=eps, smoothing="label", reduction="none").loss
    if kind == "mhp":
        want = head.token_smoothed_loss(head.logits(x), y, eps, reduction="none")
    elif kind == "mhc":
        want = head.smoothed_nll(x, y, eps)[0]
    else:
        want = head(x, y, label_smoothing=eps, smoothing="head", reduction="none").loss
    torch.testing.assert_close(got, want)
    if kind == "linear":  # and it is the dense cross-entropy with label smoothing
        ref = torch.nn.functional.cross_entropy(head.logits(x), y, label_smoothing=eps, reduction="none")
        torch.testing.assert_close(got, ref)


def test_from_spec_is_the_sizing_rule():
    assert LabelCodec.from_spec(1000).head_sizes == LabelCodec.balanced(1000, 2).head_sizes
    assert LabelCodec.from_spec(1000, num_heads=3).head_sizes == (10, 10, 10)
    assert LabelCodec.from_spec(1000, [40, 25]).head_sizes == (40, 25)
    assert LabelCodec.from_spec(1000, num_groups=7).head_sizes == (7, 143)
    with pytest.raises(ValueError, match="disagrees"):
        LabelCodec.from_spec(1000, [10, 10, 10], num_heads=2)
    with pytest.raises(ValueError, match="one dense layer"):
        build_head("linear", 4, 10, head_sizes=[2, 5])


ADAPTERS = ["timm_ext", "xmc", "insightface_ext", "fairseq_ext"]
INTERNALS = re.compile(
    r"(head|output_projection)\.(proj|group|queries|query|node_embed|node_bias|group_mlps|fc|embed)\b"
)


def _adapter_files():
    for pkg in ADAPTERS:
        yield from sorted((ROOT / pkg).rglob("*.py"))
    yield ROOT / "mhe_plugins" / "mm.py"


def test_adapters_touch_only_the_public_surface():
    """No adapter reads or initialises a head's submodules, builds a classifier with nn.Linear, or decides
    head sizes itself (``.balanced(`` lives in ``LabelCodec.from_spec`` only)."""
    bad = []
    for path in _adapter_files():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            if INTERNALS.search(code) or ".balanced(" in code:
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
            if "nn.Linear(" in code and re.search(r"num_classes|num_labels|vocab", code):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
    core = [p for p in (ROOT / "mhe_plugins").rglob("*.py") if ".balanced(" in p.read_text(encoding="utf-8")]
    assert [p.name for p in core] == ["codec.py"]
