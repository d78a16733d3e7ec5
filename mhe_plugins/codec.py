"""Label codec: a global label id <-> H digits in a mixed radix (head 0 = most significant digit).

``id = sum_h digit_h * stride_h`` with ``stride_h = prod(head_sizes[h+1:])``. The product of the head sizes
(the *capacity*) may exceed the number of labels N; ids >= N are then "invalid" combinations that a
decoder must never emit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .checks import as_int

__all__ = ["LabelCodec", "group_split", "INT64_MAX"]

ArrayLike = torch.Tensor | np.ndarray
INT64_MAX = 2**63 - 1  # ids, strides and digit sums are int64


def _positive_int(value, what: str) -> int:
    try:
        out = as_int(value, what)
    except ValueError:
        out = 0
    if out < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return out


def _as_int64(values: ArrayLike, what: str) -> ArrayLike:
    """Integer ids/digits as int64; integral floats (3.0) pass, 1.7 / NaN / inf / bool raise naming the value."""
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_complex():
            raise ValueError(f"{what} must be integers, got dtype {values.dtype}")
        if values.is_floating_point():
            bad = ~torch.isfinite(values) | (values != values.round())
            if bool(bad.any()):
                raise ValueError(f"{what} must be integers, got {values[bad].reshape(-1)[0].item()}")
        return values.long()
    values = np.asarray(values)
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bool(bad.any()):
            raise ValueError(f"{what} must be integers, got {values[bad].reshape(-1)[0]}")
    elif values.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {values.dtype}")
    return values.astype(np.int64)


def _first_bad(values: ArrayLike, bad: ArrayLike) -> int:
    if isinstance(bad, torch.Tensor):
        return int(values[bad].reshape(-1)[0].item())
    return int(np.asarray(values)[bad].reshape(-1)[0])


class LabelCodec:
    """Mixed-radix codec over ``head_sizes`` for ``num_labels`` labels (default: the full product)."""

    def __init__(self, head_sizes: Sequence[int], num_labels: int | None = None):
        sizes = list(head_sizes) if head_sizes is not None else []
        if len(sizes) == 0:
            raise ValueError("head_sizes must be a non-empty sequence of positive ints, got []")
        checked = []
        for s in sizes:
            try:
                checked.append(_positive_int(s, "head size"))
            except ValueError:
                raise ValueError(
                    f"head sizes must be positive ints, got {s!r} in {list(head_sizes)!r}"
                ) from None
        self.head_sizes: tuple[int, ...] = tuple(checked)
        self.capacity: int = math.prod(self.head_sizes)
        self.num_labels: int = (
            self.capacity if num_labels is None else _positive_int(num_labels, "num_labels")
        )
        if self.capacity < self.num_labels:
            raise ValueError(
                f"product of head sizes {list(self.head_sizes)} is {self.capacity} < num_labels={self.num_labels}"
            )
        if self.capacity > INT64_MAX:
            raise ValueError(
                f"product of head sizes {list(self.head_sizes)} is {self.capacity} > 2**63 - 1: label ids and "
                "digit arithmetic are int64, so use fewer or smaller heads (the product only needs to reach "
                "num_labels)"
            )
        strides, acc = [], 1
        for s in reversed(self.head_sizes):
            strides.append(acc)
            acc *= s
        self.strides: tuple[int, ...] = tuple(reversed(strides))
        # digits of the largest valid id: the "boundary" path used to mask invalid combinations
        self.last_digits: tuple[int, ...] = tuple(
            ((self.num_labels - 1) // st) % sz for st, sz in zip(self.strides, self.head_sizes)
        )

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_spec(
        cls,
        num_labels: int,
        head_sizes: Sequence[int] | None = None,
        num_heads: int | None = None,
        num_groups: int | None = None,
    ) -> LabelCodec:
        """The one home of the sizing rule every toolkit uses.

        ``head_sizes`` given: exactly those (their product must cover ``num_labels``; ``num_heads``, when
        also given, must agree). Else ``num_groups`` given: two levels ``{G; ceil(N/G)}`` (contiguous id
        blocks, e.g. frequency bins). Else the balanced split into ``num_heads`` (default 2) sizes with the
        smallest sum.
        """
        if head_sizes:
            sizes = [int(c) for c in head_sizes]
            if num_heads is not None and int(num_heads) != len(sizes):
                raise ValueError(
                    f"num_heads={num_heads} disagrees with head_sizes {sizes} ({len(sizes)} sizes)"
                )
            return cls(sizes, num_labels=num_labels)
        if num_groups:
            if num_heads is not None and int(num_heads) != 2:
                raise ValueError(f"num_groups={num_groups} makes two levels, but num_heads={num_heads}")
            return cls.for_groups(num_labels, int(num_groups))
        return cls.balanced(num_labels, 2 if num_heads is None else num_heads)

    @classmethod
    def balanced(cls, num_labels: int, num_heads: int) -> LabelCodec:
        """Head sizes with product >= N and the smallest sum (sizes differ by at most one; larger first).

        An optimum exists with all sizes in {m, m+1}: if two sizes differ by >= 2, moving one unit from the
        larger to the smaller keeps the sum and does not decrease the product.
        """
        n, h = _positive_int(num_labels, "num_labels"), _positive_int(num_heads, "num_heads")
        root = max(1, int(math.floor(n ** (1.0 / h))))
        best: tuple[int, int, list[int]] | None = None
        for m in range(max(1, root - 2), root + 3):
            for j in range(h + 1):
                sizes = [m + 1] * j + [m] * (h - j)
                prod = math.prod(sizes)
                if prod >= n:
                    key = (sum(sizes), prod, sizes)
                    if best is None or key[:2] < best[:2]:
                        best = key
                    break
        assert best is not None
        return cls(best[2], num_labels=n)

    @classmethod
    def for_groups(cls, num_labels: int, num_groups: int) -> LabelCodec:
        """Two-level codec ``[G, per]`` from the XMC ``{G; per}`` rule (contiguous id blocks)."""
        g, per = group_split(num_labels, num_groups)
        return cls([g, per], num_labels=num_labels)

    # ------------------------------------------------------------------ properties
    @property
    def num_heads(self) -> int:
        return len(self.head_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each head's slice inside a concatenated (sum C_h) output."""
        out, acc = [], 0
        for s in self.head_sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    def __repr__(self) -> str:
        return f"LabelCodec(head_sizes={list(self.head_sizes)}, num_labels={self.num_labels})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, LabelCodec)
            and other.head_sizes == self.head_sizes
            and other.num_labels == self.num_labels
        )

    def __hash__(self) -> int:
        return hash((self.head_sizes, self.num_labels))

    def state_dict(self) -> dict:
        return {"head_sizes": list(self.head_sizes), "num_labels": self.num_labels}

    @classmethod
    def from_state_dict(cls, state: dict) -> LabelCodec:
        return cls(state["head_sizes"], state["num_labels"])

    # ------------------------------------------------------------------ encode / decode
    def _consts(self, like: ArrayLike):
        if isinstance(like, torch.Tensor):
            kw = {"dtype": torch.long, "device": like.device}
            return torch.tensor(self.strides, **kw), torch.tensor(self.head_sizes, **kw)
        return np.asarray(self.strides, dtype=np.int64), np.asarray(self.head_sizes, dtype=np.int64)

    def check_ids(self, ids: ArrayLike) -> None:
        """Raise ``ValueError`` naming the first id outside ``[0, num_labels)``."""
        bad = (ids < 0) | (ids >= self.num_labels)
        if bool(bad.any()):
            raise ValueError(f"label id {_first_bad(ids, bad)} is out of range [0, {self.num_labels})")

    def encode(self, ids: ArrayLike) -> ArrayLike:
        """Ids of any shape ``(...)`` -> digits ``(..., H)`` (int64), for torch tensors or numpy arrays."""
        ids = _as_int64(ids, "label ids")
        self.check_ids(ids)
        strides, sizes = self._consts(ids)
        return (ids[..., None] // strides) % sizes

    def decode(self, digits: ArrayLike, allow_invalid: bool = False) -> ArrayLike:
        """Digits ``(..., H)`` -> ids ``(...)``. Ids >= num_labels raise unless ``allow_invalid``."""
        digits = _as_int64(digits, "digits")
        if digits.ndim == 0 or digits.shape[-1] != self.num_heads:
            raise ValueError(f"digits must have last dim {self.num_heads}, got shape {tuple(digits.shape)}")
        strides, sizes = self._consts(digits)
        bad = (digits < 0) | (digits >= sizes)
        if bool(bad.any()):
            raise ValueError(
                f"digit {_first_bad(digits, bad)} is out of range for head sizes {list(self.head_sizes)}"
            )
        ids = (digits * strides).sum(-1)
        if not allow_invalid:
            inval = ids >= self.num_labels
            if bool(inval.any()):
                raise ValueError(
                    f"digits decode to id {_first_bad(ids, inval)} >= num_labels={self.num_labels}"
                )
        return ids

    def valid_mask(self, digits: ArrayLike) -> ArrayLike:
        """True where digits ``(..., H)`` decode to an id < num_labels."""
        return self.decode(digits, allow_invalid=True) < self.num_labels

    def digit_marginals(self, class_probs: torch.Tensor) -> list[torch.Tensor]:
        """A distribution over the N ids (..., N) -> its H per-digit marginals (..., C_h).

        Exact for the MHP ``ce_sum`` loss, which is linear in the target: the soft-class CE of a
        product model equals sum_h CE(marginal_h, head h). This is how Mixup/CutMix scores become digits.
        """
        if class_probs.shape[-1] != self.num_labels:
            raise ValueError(
                f"class distribution must have last dim num_labels={self.num_labels}, "
                f"got shape {tuple(class_probs.shape)}"
            )
        lead = class_probs.shape[:-1]
        full = torch.nn.functional.pad(class_probs, (0, self.capacity - self.num_labels))
        grid = full.reshape(*lead, *self.head_sizes)
        start = len(lead)
        return [
            grid.sum(dim=[start + j for j in range(self.num_heads) if j != h]) if self.num_heads > 1 else grid
            for h in range(self.num_heads)
        ]

    def prefix_limit(self, level: int) -> int:
        """Largest valid prefix id after ``level+1`` heads: prefix p is valid iff p <= this."""
        return (self.num_labels - 1) // self.strides[level]


def group_split(num_labels: int, num_groups: int) -> tuple[int, int]:
    """XMC ``{G; per}`` rule: ``per = ceil(N/G)``; lower G until the last group is non-empty.

    Groups are contiguous id ranges ``[g*per, (g+1)*per)``; the last one may be short.
    Examples: (670091, 8400) -> (8377, 80); (2812281, 8761) -> (8761, 321).
    """
    n = _positive_int(num_labels, "num_labels")
    g = min(_positive_int(num_groups, "num_groups"), n)
    while True:
        per = -(-n // g)
        if g * per - n < per:
            return g, per
        g -= 1
