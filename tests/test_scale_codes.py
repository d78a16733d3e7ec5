"""Learned label codes of the scale benchmark: PIFA vectors are the labels' mean training inputs, and the
balanced tree over them puts a class next to its latent siblings (what an MHE head's digit blocks need)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mhe_plugins.bench.scale import DEFAULTS, parse_method, resolve
from mhe_plugins.bench.scale_codes import LabelCodes, pifa_vectors
from mhe_plugins.bench.scale_data import TRAIN
from mhe_plugins.bench.scale_train import data_of
from mhe_plugins.grouping import balanced_tree_order


def test_pifa_vectors_are_the_mean_training_input_of_each_label():
    data = data_of(dict(DEFAULTS, num_classes=300, train_per_class=4.0))
    x, y, _ = data.examples(TRAIN, np.arange(data.num_train))
    got = pifa_vectors(data, batch=97)  # batches that do not divide the set
    for c in (int(y[0]), int(y[5]), int(y[-1])):
        assert np.allclose(got[c], x[y == c].mean(0).numpy(), atol=1e-5)
    empty = np.setdiff1d(np.arange(300), y.numpy())
    assert len(empty) and np.allclose(got[empty], x.mean(0).numpy(), atol=1e-5)


def test_pifa_codes_put_latent_siblings_side_by_side():
    n = 4096
    data = data_of(dict(DEFAULTS, num_classes=n))
    mid_by_id = data.leaf_of(np.arange(n)) // data.leaf_group
    order = balanced_tree_order(pifa_vectors(data), 8)
    mid_by_code = mid_by_id[order]
    adjacent = float(np.mean(mid_by_code[1:] == mid_by_code[:-1]))
    assert np.mean(mid_by_id[1:] == mid_by_id[:-1]) < 0.01  # ids carry no structure
    assert adjacent > 0.6, adjacent  # (a mid node's 8 leaves: at most 7 of 8 neighbours are siblings)


def test_label_codes_round_trip_and_refuse_a_non_permutation():
    codes = LabelCodes(5)
    assert not codes.learned
    codes.set(np.array([3, 0, 4, 1, 2]), seconds=1.5)
    labels = torch.tensor([0, 1, 2, 3, 4])
    assert codes.to_codes(labels).tolist() == [1, 3, 4, 0, 2]
    assert torch.equal(codes.to_labels(codes.to_codes(labels)), labels) and codes.learned
    with pytest.raises(ValueError, match="permutation of 5 labels"):
        codes.set(np.array([0, 0, 1, 2, 3]), seconds=1.0)


def test_codes_apply_to_mhe_heads_only_and_bad_values_are_refused():
    for m in ("pfc", "linear"):
        spec = dict(DEFAULTS, method=m, num_classes=100, world=1, codes="pifa")
        assert resolve(spec)["codes"] == "id"
    assert resolve(dict(DEFAULTS, method="mhs", num_classes=100, world=1, codes="pifa"))["codes"] == "pifa"
    assert parse_method("mhc@codes=pifa") == ("mhc", {"codes": "pifa"})
    with pytest.raises(ValueError, match="codes must be one of"):
        resolve(dict(DEFAULTS, method="mhs", num_classes=100, world=1, codes="kmeans"))
