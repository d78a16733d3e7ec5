"""Pieces of ``python -m insightface_ext.bench`` that decide its numbers: pair construction and head splits."""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from insightface_ext.bench import _head_args, _mhs_scale_heads, open_set_pairs, scale_worker


def test_open_set_pairs_against_brute_force():
    labels = np.array([3, 1, 3, 2, 1, 3, 0])
    genuine, impostor, balanced, same = open_set_pairs(labels, num_impostors=50, num_balanced=6, seed=1)
    brute = {(i, j) for i, j in itertools.combinations(range(len(labels)), 2) if labels[i] == labels[j]}
    assert {tuple(sorted(p)) for p in genuine.tolist()} == brute and len(genuine) == len(brute)
    assert (labels[impostor[:, 0]] != labels[impostor[:, 1]]).all() and len(impostor) == 50
    assert same.sum() == 3 and (~same).sum() == 3
    assert ((labels[balanced[:, 0]] == labels[balanced[:, 1]]) == same).all()


def test_method_head_splits():
    assert _head_args("arcface_full", 3755, (751, 5)) == {"head_sizes": (1, 3755), "sample_rate": None}
    assert _head_args("pfc_0.1", 3755, (751, 5)) == {"head_sizes": (3755, 1), "sample_rate": 0.1}
    assert _head_args("mhs", 3755, (751, 5)) == {"head_sizes": (751, 5), "sample_rate": None}
    for n in (100_000, 1_000_000):
        g, per = _mhs_scale_heads(n, 256)
        assert g * per >= n and per <= n / (10 * 256) + 1


def test_scale_worker_sampling_budgets():
    common = dict(num_ids=5_000, dim=16, batch=64, steps=2, threads=1, mem_budget=0)
    full = scale_worker(argparse.Namespace(method="arcface_full", **common))
    pfc = scale_worker(argparse.Namespace(method="pfc_0.1", **common))
    mhs = scale_worker(argparse.Namespace(method="mhs", **common))
    assert full["sampled_classes"] == 5_000 and pfc["sampled_classes"] == 500
    assert mhs["head_sizes"] == [625, 8] and mhs["sampled_classes"] <= 64 * 8
