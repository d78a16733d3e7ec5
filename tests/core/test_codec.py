import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhe_plugins import LabelCodec, group_split

head_sizes = st.lists(st.integers(1, 12), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(sizes=head_sizes, data=st.data())
def test_round_trip_torch_and_numpy(sizes, data):
    cap = math.prod(sizes)
    n = data.draw(st.integers(1, cap))
    codec = LabelCodec(sizes, n)
    ids = torch.arange(n)
    digits = codec.encode(ids)
    assert digits.shape == (n, len(sizes))
    for h, c in enumerate(sizes):
        assert int(digits[:, h].min()) >= 0 and int(digits[:, h].max()) < c
    assert torch.equal(codec.decode(digits), ids)
    assert np.array_equal(codec.decode(codec.encode(ids.numpy())), ids.numpy())
    # head 0 is the most significant digit: ids are in lexicographic order of digits
    assert torch.equal((digits * torch.tensor(codec.strides)).sum(-1), ids)
    assert bool(codec.valid_mask(digits).all())


def test_encode_keeps_leading_shape_and_device():
    codec = LabelCodec([4, 5], 17)
    ids = torch.tensor([[0, 16], [5, 9]])
    d = codec.encode(ids)
    assert d.shape == (2, 2, 2) and d.device == ids.device
    assert d[0, 1].tolist() == [3, 1] and d[1, 1].tolist() == [1, 4]


def test_valid_mask_flags_ids_beyond_num_labels():
    codec = LabelCodec([4, 5], 17)
    all_digits = torch.cartesian_prod(torch.arange(4), torch.arange(5))
    mask = codec.valid_mask(all_digits)
    assert mask.sum().item() == 17 and not mask[17:].any()
    assert codec.prefix_limit(0) == 3 and codec.last_digits == (3, 1)


@pytest.mark.parametrize(
    "n,g,expected",
    [
        (670091, 8400, (8377, 80)),
        (2812281, 8761, (8761, 321)),
        (501070, 5630, (5630, 89)),
        (3956, 172, (172, 23)),
    ],
)
def test_group_split_matches_reference_rule(n, g, expected):
    assert group_split(n, g) == expected
    G, per = expected
    assert G * per >= n and G * per - n < per  # last group non-empty


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 10**6), h=st.integers(1, 4))
def test_balanced_is_minimal_sum(n, h):
    codec = LabelCodec.balanced(n, h)
    assert codec.capacity >= n and codec.num_heads == h
    s = sum(codec.head_sizes)
    # no head-size vector with a smaller sum reaches n: the best product for sum s-1 is the balanced split
    q, r = divmod(s - 1, h)
    best_smaller = (q + 1) ** r * q ** (h - r)
    assert best_smaller < n


def test_balanced_examples():
    assert LabelCodec.balanced(1_000_000, 2).head_sizes == (1000, 1000)
    assert math.prod(LabelCodec.balanced(8000, 2).head_sizes) >= 8000


@pytest.mark.parametrize(
    "args,match",
    [
        (([],), r"non-empty"),
        (([3, 0],), r"positive ints, got 0"),
        (([3, -2],), r"got -2"),
        (([3, 4], 13), r"is 12 < num_labels=13"),
        (([3, 4], 0), r"num_labels must be a positive int, got 0"),
        (([3, 2.5],), r"got 2.5"),
    ],
)
def test_bad_construction_names_the_value(args, match):
    with pytest.raises(ValueError, match=match):
        LabelCodec(*args)


def test_out_of_range_ids_name_the_value():
    codec = LabelCodec([4, 5], 17)
    with pytest.raises(ValueError, match=r"label id 17 is out of range \[0, 17\)"):
        codec.encode(torch.tensor([1, 17, 3]))
    with pytest.raises(ValueError, match=r"label id -1"):
        codec.encode(np.array([-1]))
    with pytest.raises(ValueError, match=r"decode to id 18"):
        codec.decode(torch.tensor([[3, 3]]))
    with pytest.raises(ValueError, match=r"digit 5 is out of range"):
        codec.decode(torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match=r"num_groups must be a positive int, got 0"):
        group_split(10, 0)
