"""Property: every head's ``topk`` / ``predict`` returns only real ids (in [0, N)), distinct per row, whatever
the features hold (NaN, +-inf, 3e38, mixed) when the head sizes cover more than N ids. MHC returned ids >= N
for such features (a NaN score ties with the -inf mask); ids must never depend on the score values."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhe_plugins import LabelCodec, MHCHead, MHPHead, MHSHead
from mhe_plugins.heads import build_head

KINDS = ("normal", "nan", "+inf", "-inf", "3e38", "-3e38", "mixed")
SPECIAL = (float("nan"), float("inf"), float("-inf"), 3e38, -3e38)


def _features(kind: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    x = torch.randn(*shape, generator=g)
    if kind == "normal":
        return x
    if kind == "mixed":  # a random mix of normal and special values, element by element
        pick = torch.randint(0, len(SPECIAL) + 1, shape, generator=g)
        for i, v in enumerate(SPECIAL):
            x = torch.where(pick == i + 1, torch.full_like(x, v), x)
        return x
    value = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf"), "3e38": 3e38, "-3e38": -3e38}
    return torch.full(shape, value[kind])


def _check(ids: torch.Tensor, n: int, k: int, rows: int, what: str) -> None:
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (rows, k), (what, ids.shape)
    flat = ids.tolist()
    for row in flat:
        assert all(0 <= i < n for i in row), f"{what}: id out of [0, {n}) in {row}"
        assert len(set(row)) == k, f"{what}: duplicate ids in {row}"


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 6), min_size=2, max_size=3),
    data=st.data(),
    head=st.sampled_from(["mhp", "mhc", "mhs", "mhc_multilabel"]),
    kind=st.sampled_from(KINDS),
)
def test_topk_and_predict_return_valid_distinct_ids(sizes, data, head, kind):
    cap = math.prod(sizes)
    n = data.draw(st.integers(2, cap - 1), label="num_labels")  # head sizes cover more than n ids
    d = data.draw(st.integers(1, 6), label="d")
    b = data.draw(st.integers(1, 4), label="batch")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000), label="seed"))
    torch.manual_seed(data.draw(st.integers(0, 10_000), label="init_seed"))
    x = _features(kind, (b, d), g)
    codec = LabelCodec(sizes, n)
    if head == "mhc_multilabel":
        m = build_head("mhc_multilabel", d, n, num_groups=sizes[0], hidden_dim=4,
                              candidates_topk=data.draw(st.integers(1, sizes[0]), label="cand"),
                              permutation_seed=data.draw(st.sampled_from([None, 0]), label="perm"))  # fmt: skip
        per, groups = m.group_size, m.num_groups
        # real candidates when the (ragged) last group is among the kept ones: k never needs -1 padding
        fewest = (m.candidates_topk - 1) * per + (n - (groups - 1) * per)
        k = data.draw(st.integers(1, max(1, min(fewest, n))), label="k")
        _check(m.topk(x, k)[1], n, k, b, f"{head} topk {kind}")
        _check(m.predict(x)[:, None], n, 1, b, f"{head} predict {kind}")
        return
    if head == "mhp":
        m = MHPHead(d, codec)
    elif head == "mhc":
        m = MHCHead(d, codec, hidden_dim=4, beam=data.draw(st.integers(1, 8), label="beam"))
    else:
        m = MHSHead(d, codec, chunk_size=data.draw(st.integers(1, 8), label="chunk"))
    k = data.draw(st.integers(1, n), label="k")
    _check(m.topk(x, k)[1], n, k, b, f"{head} topk {kind}")
    pred = m.predict(x)
    _check(pred[:, None], n, 1, b, f"{head} predict {kind}")
    # leading dims are kept (B, T, d)
    _check(m.topk(x[:, None, :], k)[1].reshape(b, k), n, k, b, f"{head} topk 3-d {kind}")
