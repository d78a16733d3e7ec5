"""Synthetic extreme-classification data for ``python -m mhe_plugins.bench scale``, streamed from a seed.

Nothing is stored: every number is a counter-based hash (splitmix64) of (seed, stream, counters), so an
example, a class prototype or a permutation entry is computed from its index alone, in any order, in
O(batch) memory. 10^7 classes need no disk and no N x d table; the same seed always gives the same batch,
and a set computed in chunks equals the set computed at once.

The generative model (every parameter is a field of :class:`ScaleData`):

- **Long tail.** A class's frequency rank r in [0, N) has the Zipf-like probability
  ``P(r) = G(r + 2) - G(r + 1)`` with ``G(t) = (t^(1-s) - 1) / ((N+1)^(1-s) - 1)`` (``ln t / ln(N+1)`` at
  s = 1), i.e. the continuous Zipf law binned, so the prior is exact and sampled by inverting G.
- **Latent hierarchy.** Classes are the leaves of a 3-level tree: ``leaf_group`` leaves under each mid node
  and ``mid_group`` mid nodes under each top node. A class prototype mu sums one vector per ancestor:
  ``sqrt(w_top) T[top] + sqrt(w_mid) M[mid]`` on the last ``dim - leaf_dims`` features and
  ``sqrt(w_leaf) L[leaf]`` on the first ``leaf_dims`` (T, M, L: i.i.d. uniform entries of mean 0 and
  variance 1 per node; ``leaf_dims == dim`` puts every level on every feature). Siblings share all but the
  leaf term and are the hard confusions; cousins and other classes are far.
- **Popularity follows the tree.** Frequency ranks are dealt out by mid node: the mid nodes in a seeded
  random order, the siblings under one on adjacent ranks (a popular class has popular siblings, as in real
  taxonomies; a last partial mid node keeps the last ranks). So the prior rarely tells siblings apart, and
  the oracle's accuracy does not drift with N.
- **Nothing aligned with label ids.** A seeded pseudo-random permutation (a 4-round Feistel network with
  cycle walking, invertible and O(1) memory) maps class ids to tree leaves: neither the siblings nor the
  frequent classes form digit blocks of the id (what MHE heads group by).
  ``tree_aligned=True`` makes leaf = class id instead (tree nodes are id blocks: codes that follow the
  hierarchy, what a label clustering would give an MHE head), for comparison.
- **Noise.** An example of class c is ``x = mu_c + s * eps``, eps ~ N(0, I_D) (Box-Muller), with
  s = ``noise`` on the leaf features and ``noise_rest`` on the others: intra-class variation lives mostly in
  a few nuisance directions (as pose or lighting for faces), the ones that also carry the fine differences
  between siblings. So an example pins down its branch of the tree at any N, and telling siblings apart
  is a ``leaf_dims``-dimensional problem that a few examples per class can learn. A fraction
  ``label_noise`` of the *training* examples carries a random label instead, drawn from the prior (every
  class keeps the same fraction of wrong examples; a uniform draw would bury the rare classes). Held-out
  labels are clean, so the oracle below is the Bayes-optimal classifier of the held-out task.
- **Sizes.** ``train_per_class * N`` training examples (an epoch visits them in a seeded order, a new order
  every epoch) and ``eval_examples`` held-out examples, both drawn from the prior above.

The **oracle** knows the prototypes and the prior and ranks classes by the exact Gaussian posterior,
``log P(c) - sum_j (x_j - mu_cj)^2 / (2 s_j^2)``: :meth:`ScaleData.oracle_topk` streams the prototypes
leaf-chunk by leaf-chunk and merges top-k, so it runs at 10^7 classes in O(chunk) memory (fp32 scores: a
tie within fp32 rounding may rank either way).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..decode import merge_topk

__all__ = [
    "ScaleData",
    "FeistelPermutation",
    "hash64",
    "mix64",
    "normals",
    "unit_uniforms",
    "zipf_rank",
    "zipf_log_prob",
]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S40, _S11, _S8 = (np.uint64(v) for v in (30, 27, 31, 40, 11, 8))
_LO24, _LO16 = np.uint64(0xFFFFFF), np.uint64(0xFFFF)
# stream tags: one independent hash stream per kind of number
STREAMS = {"tree": 1, "freq": 2, "top": 3, "mid": 4, "leaf": 5, "cls": 6, "flip": 7, "rand": 8, "x": 9}
TRAIN, EVAL = 1, 2


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 words (a bijection of 64-bit words with full avalanche)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 products wrap modulo 2^64, on purpose
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def hash64(key: int | np.ndarray, *counters) -> np.ndarray:
    """A 64-bit hash of ``key`` and the ``counters`` (non-negative ints or arrays, broadcast together)."""
    h = np.asarray(key, dtype=np.uint64)
    for c in counters:
        with np.errstate(over="ignore"):
            h = mix64(h ^ (np.asarray(c, dtype=np.uint64) + _GOLDEN) * _M2)
    return h


def stream_key(seed: int, stream: str, *extra: int) -> np.uint64:
    return np.uint64(hash64(int(seed) & 0xFFFFFFFFFFFFFFFF, STREAMS[stream], *extra))


def uniforms(h: np.ndarray) -> np.ndarray:
    """Uniform float64 in (0, 1) from 64-bit hashes (53 bits each)."""
    return ((h >> _S11).astype(np.float64) + 0.5) * 2.0**-53


def _words(key: np.ndarray, count: int) -> np.ndarray:
    """(n, count) hash words of n keys."""
    with np.errstate(over="ignore"):
        return mix64(key[:, None] ^ (np.arange(count, dtype=np.uint64) + _GOLDEN) * _M1)


def normals(key: np.ndarray, dim: int) -> np.ndarray:
    """(n, dim) standard normals (float32) per key: Box-Muller on 24-bit uniforms, two per hash word
    (exact up to the 2^-24 grid: no draw beyond 5.9 sigma)."""
    h = _words(np.asarray(key, dtype=np.uint64).reshape(-1), (dim + 1) // 2)
    u1 = ((h >> _S40).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)
    u2 = (((h >> _S8) & _LO24).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    theta = np.float32(2.0 * math.pi) * u2
    return np.stack([r * np.cos(theta), r * np.sin(theta)], -1).reshape(h.shape[0], -1)[:, :dim]


def unit_uniforms(key: np.ndarray, dim: int) -> np.ndarray:
    """(n, dim) float32 uniforms on [-sqrt 3, sqrt 3] (mean 0, variance 1) per key, four per hash word."""
    h = _words(np.asarray(key, dtype=np.uint64).reshape(-1), (dim + 3) // 4)
    parts = np.stack([(h >> np.uint64(16 * i)) & _LO16 for i in range(4)], -1).astype(np.float32)
    out = (parts + np.float32(0.5)) * np.float32(2.0 * math.sqrt(3.0) / 65536.0) - np.float32(math.sqrt(3.0))
    return out.reshape(h.shape[0], -1)[:, :dim]


class FeistelPermutation:
    """A seeded bijection of [0, n) computed per element (4-round Feistel network on the smallest even bit
    width >= log2 n, cycle-walking until the value is < n); ``fwd`` and ``inv`` are inverse maps."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        self.n, self.key = int(n), np.uint64(key)
        bits = max(2, (self.n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self._h = np.uint64(self.half)

    def _f(self, x: np.ndarray, r: int) -> np.ndarray:
        return hash64(self.key, r, x) & self.mask

    def _fwd_once(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._h, x & self.mask
        for r in range(self.ROUNDS):
            left, right = right, left ^ self._f(right, r)
        return (left << self._h) | right

    def _inv_once(self, y: np.ndarray) -> np.ndarray:
        left, right = y >> self._h, y & self.mask
        for r in reversed(range(self.ROUNDS)):
            left, right = right ^ self._f(left, r), left
        return (left << self._h) | right

    def _walk(self, x: np.ndarray, once) -> np.ndarray:
        x = np.asarray(x, dtype=np.int64)
        if self.n <= 1:
            return np.zeros_like(x)
        y = once(x.astype(np.uint64))
        bad = np.nonzero(y >= np.uint64(self.n))[0] if y.ndim else None
        if y.ndim == 0:
            while y >= np.uint64(self.n):
                y = once(y)
            return np.asarray(y, dtype=np.int64)
        while bad.size:
            y[bad] = once(y[bad])
            bad = bad[y[bad] >= np.uint64(self.n)]
        return y.astype(np.int64)

    def fwd(self, x) -> np.ndarray:
        return self._walk(x, self._fwd_once)

    def inv(self, y) -> np.ndarray:
        return self._walk(y, self._inv_once)


def zipf_rank(u: np.ndarray, n: int, s: float) -> np.ndarray:
    """Frequency ranks in [0, n) from uniforms in (0, 1), by inverting G (see the module docstring)."""
    if abs(s - 1.0) < 1e-12:
        t = np.exp(u * math.log(n + 1.0))
    else:
        a = 1.0 - s
        t = (1.0 + u * ((n + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.clip(np.floor(t).astype(np.int64) - 1, 0, n - 1)


def zipf_log_prob(rank: np.ndarray, n: int, s: float) -> np.ndarray:
    """Exact log P(rank) (float64) of the binned continuous Zipf law over n ranks."""
    r1 = np.asarray(rank, dtype=np.float64) + 1.0
    if abs(s - 1.0) < 1e-12:
        return np.log(np.log1p(1.0 / r1)) - math.log(math.log(n + 1.0))
    a = 1.0 - s
    # (r+2)^a - (r+1)^a = (r+1)^a * expm1(a * log1p(1/(r+1))), without cancellation
    num = a * np.log(r1) + np.log(np.abs(np.expm1(a * np.log1p(1.0 / r1))))
    return num - math.log(abs((n + 1.0) ** a - 1.0))


@dataclass(frozen=True)
class ScaleData:
    """The seeded task (see the module docstring). Defaults: calibrated in ``docs/scale.md``."""

    num_classes: int
    seed: int = 0
    dim: int = 64
    zipf: float = 1.0
    leaf_group: int = 8
    mid_group: int = 32
    leaf_dims: int = 8
    w_top: float = 0.5
    w_mid: float = 0.5
    w_leaf: float = 0.5
    noise: float = 0.9
    noise_rest: float = 0.3
    label_noise: float = 0.05
    train_per_class: float = 10.0
    eval_examples: int = 10000
    tree_aligned: bool = False

    def __post_init__(self):
        if self.num_classes < 2 or self.dim < 1 or self.leaf_group < 1 or self.mid_group < 1:
            raise ValueError(f"invalid data sizes: {self}")
        if not 1 <= self.leaf_dims <= self.dim:
            raise ValueError(f"leaf_dims must be in [1, dim={self.dim}], got {self.leaf_dims}")
        if min(self.w_top, self.w_mid, self.w_leaf) < 0 or self.noise <= 0 or self.noise_rest <= 0:
            raise ValueError("level weights must be >= 0 and the noises > 0")
        if not 0.0 <= self.label_noise < 1.0 or self.train_per_class <= 0 or self.eval_examples < 1:
            raise ValueError("label_noise must be in [0, 1), train_per_class > 0, eval_examples >= 1")

    def settings(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------ structure
    @property
    def num_train(self) -> int:
        return int(round(self.train_per_class * self.num_classes))

    def _perm(self, stream: str) -> FeistelPermutation:
        return FeistelPermutation(self.num_classes, stream_key(self.seed, stream))

    def leaf_of(self, class_ids) -> np.ndarray:
        if self.tree_aligned:
            return np.asarray(class_ids, dtype=np.int64)
        return self._perm("tree").fwd(class_ids)

    def class_of_leaf(self, leaves) -> np.ndarray:
        if self.tree_aligned:
            return np.asarray(leaves, dtype=np.int64)
        return self._perm("tree").inv(leaves)

    def _mid_order(self) -> tuple[FeistelPermutation | None, int]:
        # mid nodes with all their leaves (a last partial one stays last)
        full = self.num_classes // self.leaf_group
        return (FeistelPermutation(full, stream_key(self.seed, "freq")) if full else None), full

    def rank_of_leaf(self, leaves) -> np.ndarray:
        """Frequency rank of tree leaves: mid nodes in a seeded random order, siblings on adjacent ranks."""
        leaves = np.asarray(leaves, dtype=np.int64)
        perm, full = self._mid_order()
        mid, j = np.divmod(leaves, self.leaf_group)
        if perm is not None:
            inside = mid < full
            mid = mid.copy()
            mid[inside] = perm.fwd(mid[inside])
        return mid * self.leaf_group + j

    def leaf_of_rank(self, ranks) -> np.ndarray:
        ranks = np.asarray(ranks, dtype=np.int64)
        perm, full = self._mid_order()
        mid, j = np.divmod(ranks, self.leaf_group)
        if perm is not None:
            inside = mid < full
            mid = mid.copy()
            mid[inside] = perm.inv(mid[inside])
        return mid * self.leaf_group + j

    def rank_of(self, class_ids) -> np.ndarray:
        return self.rank_of_leaf(self.leaf_of(class_ids))

    def log_prior(self, class_ids) -> np.ndarray:
        """Exact log P(class) (float64)."""
        return zipf_log_prob(self.rank_of(class_ids), self.num_classes, self.zipf)

    def _node_vectors(self, stream: str, nodes: np.ndarray, dim: int) -> np.ndarray:
        return unit_uniforms(hash64(stream_key(self.seed, stream), nodes.astype(np.uint64)), dim)

    @property
    def _split(self) -> tuple[slice, slice]:
        """(the leaf dims, the dims of the upper levels): disjoint unless leaf_dims == dim (all shared)."""
        r = self.leaf_dims
        return slice(0, r), (slice(r, self.dim) if r < self.dim else slice(0, self.dim))

    def noise_scales(self) -> np.ndarray:
        """(D,) float32 noise standard deviation per feature."""
        out = np.full(self.dim, self.noise_rest, dtype=np.float32)
        out[: self.leaf_dims] = self.noise
        return out

    def _leaf_prototypes(self, leaves: np.ndarray) -> np.ndarray:
        """(n, D) float32 prototypes of tree leaves; upper-level vectors are made once per distinct node."""
        leaves = np.asarray(leaves, dtype=np.int64)
        low, high = self._split
        out = np.zeros((len(leaves), self.dim), dtype=np.float32)
        out[:, low] = np.sqrt(np.float32(self.w_leaf)) * self._node_vectors(
            "leaf", leaves, low.stop - low.start
        )
        for stream, per, w in (
            ("mid", self.leaf_group, self.w_mid),
            ("top", self.leaf_group * self.mid_group, self.w_top),
        ):
            if w == 0:
                continue
            nodes, inverse = np.unique(leaves // per, return_inverse=True)
            vec = self._node_vectors(stream, nodes, high.stop - high.start)
            out[:, high] += np.sqrt(np.float32(w)) * vec[inverse.reshape(-1)]
        return out

    def prototypes(self, class_ids) -> np.ndarray:
        """(n, D) float32 class prototypes (mu) of ``class_ids``."""
        return self._leaf_prototypes(self.leaf_of(np.asarray(class_ids, dtype=np.int64).reshape(-1)))

    # ------------------------------------------------------------------ examples
    def examples(self, split: int, index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Examples ``index`` (int64 array) of ``split`` (``TRAIN``/``EVAL``): (x (n, D) float32, label
        (n,) int64 as trained on, clean class (n,) int64)."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1).astype(np.uint64)
        n = self.num_classes
        u = uniforms(hash64(stream_key(self.seed, "cls", split), idx))
        clean = self.class_of_leaf(self.leaf_of_rank(zipf_rank(u, n, self.zipf)))
        label = clean
        if split == TRAIN and self.label_noise > 0:
            flip = uniforms(hash64(stream_key(self.seed, "flip"), idx)) < self.label_noise
            ur = uniforms(hash64(stream_key(self.seed, "rand"), idx))
            rand = self.class_of_leaf(self.leaf_of_rank(zipf_rank(ur, n, self.zipf)))
            label = np.where(flip, rand, clean)
        eps = normals(hash64(stream_key(self.seed, "x", split), idx), self.dim)
        x = self.prototypes(clean) + self.noise_scales() * eps
        return torch.from_numpy(x), torch.from_numpy(label), torch.from_numpy(clean)

    def train_order(self, epoch: int) -> FeistelPermutation:
        """The epoch's visiting order of the training examples (position -> example index)."""
        return FeistelPermutation(self.num_train, stream_key(self.seed, "x", 1000 + int(epoch)))

    def train_batches(
        self, epoch: int, batch: int, start_step: int = 0, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, label) batches of ``epoch`` from step ``start_step``; with ``world`` > 1 each rank gets its
        slice of the global batch (``batch`` is global and must divide by ``world``). The last partial
        global batch is dropped (every rank needs the same local size)."""
        if batch % world:
            raise ValueError(f"global batch {batch} does not divide over {world} ranks")
        order, local = self.train_order(epoch), batch // world
        for step in range(start_step, self.num_train // batch):
            pos = np.arange(step * batch + rank * local, step * batch + (rank + 1) * local)
            x, y, _ = self.examples(TRAIN, order.fwd(pos))
            yield x, y

    def steps_per_epoch(self, batch: int) -> int:
        return self.num_train // batch

    def eval_batches(
        self, batch: int, limit: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, clean class) batches of the held-out set (the first ``limit`` examples when given)."""
        total = self.eval_examples if limit is None else min(limit, self.eval_examples)
        for a in range(0, total, batch):
            x, _, clean = self.examples(EVAL, np.arange(a, min(a + batch, total)))
            yield x, clean

    # ------------------------------------------------------------------ oracle
    @torch.no_grad()
    def oracle_topk(self, x: torch.Tensor, k: int = 5, chunk: int = 8192, progress=None):
        """Bayes-optimal top-k (log-posterior up to a per-row constant, class ids) of features ``x``
        (B, D), streaming the prototypes over leaf chunks: O(B * chunk) memory at any N."""
        inv_var = torch.from_numpy(self.noise_scales()) ** -2
        x = x.float() * inv_var
        best = None
        for a in range(0, self.num_classes, chunk):
            leaves = np.arange(a, min(a + chunk, self.num_classes))
            mu = torch.from_numpy(self._leaf_prototypes(leaves))
            cls = self.class_of_leaf(leaves)
            logp = zipf_log_prob(self.rank_of_leaf(leaves), self.num_classes, self.zipf)
            bias = torch.from_numpy(logp).float() - 0.5 * (mu * mu * inv_var).sum(1)
            scores = torch.addmm(bias[None, :], x, mu.t())
            v, i = scores.topk(min(k, scores.shape[1]), dim=1)
            best = merge_topk(best, (v, torch.from_numpy(cls)[i]), k)
            if progress is not None:
                progress(len(leaves))
        return best
