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

__all__ = ["LabelCodec", "group_split"]

ArrayLike = torch.Tensor | np.ndarray


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
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or int(s) < 1:
                raise ValueError(f"head sizes must be positive ints, got {s!r} in {list(head_sizes)!r}")
        self.head_sizes: tuple[int, ...] = tuple(int(s) for s in sizes)
        self.capacity: int = math.prod(self.head_sizes)
        if num_labels is None:
            num_labels = self.capacity
        if isinstance(num_labels, bool) or int(num_labels) < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        self.num_labels: int = int(num_labels)
        if self.capacity < self.num_labels:
            raise ValueError(
                f"product of head sizes {list(self.head_sizes)} is {self.capacity} < num_labels={self.num_labels}"
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
    def balanced(cls, num_labels: int, num_heads: int) -> LabelCodec:
        """Head sizes with product >= N and the smallest sum (sizes differ by at most one; larger first).

        An optimum exists with all sizes in {m, m+1}: if two sizes differ by >= 2, moving one unit from the
        larger to the smaller keeps the sum and does not decrease the product.
        """
        if isinstance(num_labels, bool) or int(num_labels) < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        if isinstance(num_heads, bool) or int(num_heads) < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        n, h = int(num_labels), int(num_heads)
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
        is_torch = isinstance(ids, torch.Tensor)
        if not is_torch:
            ids = np.asarray(ids)
            if ids.dtype.kind not in "iu":
                raise ValueError(f"label ids must be integers, got dtype {ids.dtype}")
            ids = ids.astype(np.int64)
        elif ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"label ids must be integers, got dtype {ids.dtype}")
        else:
            ids = ids.long()
        self.check_ids(ids)
        strides, sizes = self._consts(ids)
        return (ids[..., None] // strides) % sizes

    def decode(self, digits: ArrayLike, allow_invalid: bool = False) -> ArrayLike:
        """Digits ``(..., H)`` -> ids ``(...)``. Ids >= num_labels raise unless ``allow_invalid``."""
        is_torch = isinstance(digits, torch.Tensor)
        if not is_torch:
            digits = np.asarray(digits).astype(np.int64)
        else:
            digits = digits.long()
        if digits.shape[-1] != self.num_heads:
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

    def prefix_limit(self, level: int) -> int:
        """Largest valid prefix id after ``level+1`` heads: prefix p is valid iff p <= this."""
        return (self.num_labels - 1) // self.strides[level]


def group_split(num_labels: int, num_groups: int) -> tuple[int, int]:
    """XMC ``{G; per}`` rule: ``per = ceil(N/G)``; lower G until the last group is non-empty.

    Groups are contiguous id ranges ``[g*per, (g+1)*per)``; the last one may be short.
    Examples: (670091, 8400) -> (8377, 80); (2812281, 8761) -> (8761, 321).
    """
    if isinstance(num_labels, bool) or int(num_labels) < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    if isinstance(num_groups, bool) or int(num_groups) < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    n, g = int(num_labels), min(int(num_groups), int(num_labels))
    while True:
        per = -(-n // g)
        if g * per - n < per:
            return g, per
        g -= 1
