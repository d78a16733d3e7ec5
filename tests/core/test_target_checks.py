"""Hard targets of every head must be integer class ids: a float target used to be truncated (MHS: 1.5 -> 1)
or accepted (3.0), and an out-of-range id must be refused with its value."""

from __future__ import annotations

import pytest
import torch

from insightface_ext.heads import MHSArcFace
from mhe_plugins import LabelCodec, MHCHead, MHPHead, MHSHead
from mhe_plugins.heads import build_head

D, N = 8, 10


def _heads() -> dict:
    codec = LabelCodec([4, 3], N)  # capacity 12 > N
    return {
        "mhp": MHPHead(D, codec),
        "mhc": MHCHead(D, codec, hidden_dim=8),
        "mhs": MHSHead(D, codec),
        "mhs_per_sample": MHSHead(D, codec, mode="per_sample", sampled_groups=2),
        "mhs_arcface": MHSArcFace(D, N, head_sizes=[4, 3], shard=False),
    }


@pytest.mark.parametrize("name", list(_heads()))
@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        (torch.tensor([0.0, 1.5, 2.0, 3.0]), r"integer.*float32.*1\.5"),  # MHS trained on 1 for 1.5
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), r"integer.*float32.*0\.0"),  # whole floats too: no guessing
        (torch.tensor([0, 1, 12, 3]), r"12 .*out of range \[0, 10\)"),  # an id < capacity but >= N
        (torch.tensor([0, -3, 2, 3]), r"-3 .*out of range \[0, 10\)"),
    ],
)
def test_bad_hard_targets_name_the_value(name, target, pattern):
    torch.manual_seed(0)
    head = _heads()[name]
    x = torch.randn(4, D)
    with pytest.raises(ValueError, match=pattern):
        head.compute_loss(x, target)


def test_integer_dtypes_of_any_width_still_train():
    torch.manual_seed(0)
    x = torch.randn(4, D)
    for name, head in _heads().items():
        for dt in (torch.int32, torch.int64, torch.uint8):
            loss = head.compute_loss(x, torch.tensor([0, 9, 4, 5], dtype=dt))
            assert torch.isfinite(loss), (name, dt)


def test_mhp_soft_digit_targets_and_ignore_index_still_work():
    head = MHPHead(D, LabelCodec([4, 3], N))
    x = torch.randn(4, D)
    soft = [torch.full((4, c), 1.0 / c) for c in (4, 3)]
    assert torch.isfinite(head.compute_loss(x, soft))
    assert torch.isfinite(head.compute_loss(x, torch.tensor([0, -100, 2, 3]), ignore_index=-100))
    with pytest.raises(ValueError, match=r"integer.*float32"):
        head.token_smoothed_loss(list(head.logits(x)), torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_mhc_exact_likelihood_paths_check_targets():
    head = MHCHead(D, LabelCodec([4, 3], N), hidden_dim=8)
    x = torch.randn(4, D)
    for fn in (head.target_log_prob, head.smoothed_nll, head.level_log_probs):
        with pytest.raises(ValueError, match=r"integer.*float32.*2\.5"):
            fn(x, torch.tensor([0.0, 2.5, 1.0, 1.0]))


def test_multilabel_head_targets():
    head = build_head("mhc_multilabel", D, N, num_groups=4, hidden_dim=8)
    x = torch.randn(2, D)
    assert torch.isfinite(head.compute_loss(x, torch.tensor([[0, 9], [3, -1]])))  # -1 = padding
    with pytest.raises(ValueError, match=r"integer.*float32.*1\.5"):
        head.compute_loss(x, torch.tensor([[0.0, 1.5], [3.0, -1.0]]))
    with pytest.raises(ValueError, match=r"-2 .*out of range \[0, 10\)"):
        head.compute_loss(x, torch.tensor([[0, 9], [3, -2]]))
    with pytest.raises(ValueError, match=r"10 .*out of range \[0, 10\)"):
        head.compute_loss(x, torch.tensor([[0, 10], [3, -1]]))


def test_check_class_ids_message_names_position():
    from mhe_plugins.checks import check_class_ids

    with pytest.raises(ValueError, match=r"target .*float64.*2\.5 at index \(1, 0\)"):
        check_class_ids(torch.tensor([[1.0], [2.5]], dtype=torch.float64), 5)
    with pytest.raises(ValueError, match=r"bool"):
        check_class_ids(torch.tensor([True, False]), 5)
    with pytest.raises(ValueError, match=r"tensor"):
        check_class_ids([1, 2], 5)
    ok = check_class_ids(torch.tensor([1, 4], dtype=torch.int32), 5)
    assert ok.dtype == torch.int64
