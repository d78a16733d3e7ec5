"""Real fairseq CLIs on the committed DDTP sample, exactly as docs/fairseq.md types them: sample ->
binaries -> train (MHC, tied leaves) -> resume (also from a truncated checkpoint_last.pt) -> generate /
interactive, via ``--user-dir`` and via the ``mhe-fairseq-*`` wrappers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fairseq")

from fairseq_ext import USER_DIR  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = (
    "--task translation --arch transformer_mhe --mhe-method mhc --criterion mhe_cross_entropy --mhe-heads 2 "
    "--label-smoothing 0.1 "
    "--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 64 --decoder-embed-dim 64 "
    "--encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 --encoder-attention-heads 2 "
    "--decoder-attention-heads 2 --share-all-embeddings --dropout 0.0 --optimizer adam --lr 3e-3 "
    "--lr-scheduler inverse_sqrt --warmup-updates 10 --max-tokens 1500 --cpu --num-workers 0 --seed 1 "
    "--no-epoch-checkpoints --validate-interval 1000 --validate-interval-updates 60 --log-format json "
    "--log-interval 1000"
).split()


def _cli(name: str, *args: str) -> str:
    proc = subprocess.run([str(BIN / name), *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nmt")
    # docs/fairseq.md: the committed sample -> raw/, spm600.model, bpe600/, bin600/ (400 training pairs:
    # enough to see a tiny model fit real text in ~100 CPU updates)
    cmd = [sys.executable, "-m", "fairseq_ext.datasets", "sample", "--out", str(root), "--vocab", "600"]
    cmd += ["--train-lines", "400"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "bin600" / "dict.de.txt").is_file() and (root / "spm600.model").is_file()
    assert len((root / "raw" / "train.en").read_text().splitlines()) == 400
    return root


def _nll(log: str, tag: str) -> list[tuple[int, float]]:
    """(updates, nll_loss in bits) from fairseq's json epoch/validation lines."""
    out = []
    for m in re.finditer(rf"\| {tag} \| (\{{.*\}})", log):
        r = json.loads(m.group(1))
        out.append((int(r[f"{tag}_num_updates"]), float(r[f"{tag}_nll_loss"])))
    return out


@pytest.fixture(scope="module")
def trained(data) -> Path:
    ckpt = data / "ckpt"
    log = _cli(
        "fairseq-train",
        str(data / "bin600"),
        "--user-dir",
        USER_DIR,
        *TINY,
        "--max-update",
        "120",
        "--save-dir",
        str(ckpt),
    )
    assert "criterion: MHECrossEntropyCriterion" in log and "MHE output layer (mhc): |V|=" in log
    train, valid = _nll(log, "train"), _nll(log, "valid")
    print("train / valid nll (bits) by update:", train, valid)
    assert train[-1][0] == 120 and [u for u, _ in valid] == [60, 120]
    # it fits real text: from ~log2|V| (9 bits) at epoch 1 to well below, and valid improves too
    assert train[0][1] > 8.5 and train[-1][1] < train[0][1] - 1.2, train
    assert valid[1][1] < valid[0][1], valid
    return ckpt


def test_resume_with_wrapper_loads_checkpoint_safely(data, trained):
    # torch>=2.6 loads with weights_only=True; the plugin allow-lists argparse.Namespace only
    log = _cli(
        "mhe-fairseq-train", str(data / "bin600"), *TINY, "--max-update", "125", "--save-dir", str(trained)
    )
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 120 updates\)", log), log[-3000:]
    assert _nll(log, "train")[-1][0] == 125


def test_resume_recovers_from_truncated_checkpoint_last(data, trained, tmp_path):
    # a kill in the middle of fairseq's copy to checkpoint_last.pt leaves half a file behind
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    last = ckpt / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    log = _cli(
        "fairseq-train", str(data / "bin600"), "--user-dir", USER_DIR, *TINY, "--max-update", "130",
        "--save-dir", str(ckpt),
    )  # fmt: skip
    assert re.search(
        r"checkpoint_last\.pt cannot be loaded \(.*\); resuming from .*checkpoint_best\.pt", log
    ), log[-3000:]
    assert re.search(r"Loaded checkpoint .*checkpoint_best\.pt \(epoch \d+ @ 1[23]\d updates\)", log), log[
        -3000:
    ]
    assert _nll(log, "train")[-1][0] == 130
    # the run's own save replaced the truncated file with a loadable one
    from fairseq_ext.checkpoints import check_loadable

    assert check_loadable(str(last)) is None


def test_stock_generate_without_plugin_cannot_load(data, trained):
    # docs/fairseq.md: torch >= 2.6 loads weights-only; fairseq pickles argparse.Namespace into checkpoints
    proc = subprocess.run(
        [str(BIN / "fairseq-generate"), str(data / "bin600"), "--path", str(trained / "checkpoint_best.pt"), "--cpu"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "argparse.Namespace" in proc.stderr, proc.stderr[-2000:]


def test_generate_user_dir_and_wrapper_agree(data, trained):
    common = [
        str(data / "bin600"),
        "--path",
        str(trained / "checkpoint_best.pt"),
        "--gen-subset",
        "test",
        "--beam",
        "5",
    ]
    common += [
        "--batch-size",
        "64",
        "--required-batch-size-multiple",
        "1",
        "--cpu",
        "--remove-bpe",
        "sentencepiece",
    ]
    common += ["--max-len-a", "1.2", "--max-len-b", "10", "--num-workers", "0"]
    a = _cli("fairseq-generate", *common, "--user-dir", USER_DIR)
    # wrapper, with a redundant --user-dir to the same package: must not double-register
    b = _cli("mhe-fairseq-generate", *common, "--user-dir", USER_DIR)
    hyp = lambda s: sorted(re.findall(r"^D-(\d+)\t(\S+)\t(.*)$", s, re.M))  # noqa: E731
    ha, hb = hyp(a), hyp(b)
    assert len(ha) == 150 and ha == hb
    assert all(float(score) < 0 for _, score, _ in ha)
    assert "Generate test with beam=5: BLEU4" in a


def test_interactive_wrapper_translates_raw_text(data, trained):
    args = [str(data / "bin600"), "--path", str(trained / "checkpoint_best.pt"), "--beam", "3", "--cpu"]
    args += [
        "--bpe",
        "sentencepiece",
        "--sentencepiece-model",
        str(data / "spm600.model"),
        "--max-len-b",
        "10",
    ]
    proc = subprocess.run(
        [str(BIN / "mhe-fairseq-interactive"), *args],
        input="This package contains the documentation.\nSearches for text.\n",
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(re.findall(r"^H-\d+\t-\d+\.\d+\t", proc.stdout, re.M)) == 2, proc.stdout[-2000:]


def test_label_order_file_trains_and_travels_in_the_checkpoint(data, tmp_path):
    """docs/fairseq.md: python -m fairseq_ext.grouping writes the order; training stores it in the
    checkpoint; fairseq-generate then needs neither the file nor the flag."""
    order = tmp_path / "order.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_ext.grouping", str(data / "bin600"), "-s", "en", "-t", "de",
         "--shortlist", "40", "--groups", "10", "--out", str(order)],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = order.read_text(encoding="utf-8").splitlines()
    dict_tokens = [line.split()[0] for line in (data / "bin600" / "dict.de.txt").read_text().splitlines()]
    assert sorted(tokens) == sorted(["<s>", "<pad>", "</s>", "<unk>", *dict_tokens])
    ckpt = tmp_path / "ckpt"
    log = _cli(
        "fairseq-train", str(data / "bin600"), "--user-dir", USER_DIR, *TINY, "--mhe-shortlist", "40",
        "--mhe-label-order", str(order), "--max-update", "10", "--save-dir", str(ckpt),
    )  # fmt: skip
    assert "is not the dictionary's order: every decoding step gathers" in log  # the hint to renumber
    import argparse

    import torch

    torch.serialization.add_safe_globals([argparse.Namespace])
    state = torch.load(ckpt / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    stored = state["decoder.output_projection.label_order.order"].tolist()
    from fairseq.data import Dictionary

    d = Dictionary.load(str(data / "bin600" / "dict.de.txt"))
    assert [d[i] for i in stored] == tokens  # by name, in the file's order
    order.rename(tmp_path / "moved.txt")  # decoding needs the checkpoint only
    out = _cli(
        "fairseq-generate", str(data / "bin600"), "--user-dir", USER_DIR, "--path", str(ckpt / "checkpoint_last.pt"),
        "--gen-subset", "valid", "--beam", "2", "--max-len-b", "5", "--cpu", "--batch-size", "16",
    )  # fmt: skip
    assert re.search(r"Translated \d+ sentences", out)


def test_renumbered_dictionary_makes_the_label_order_the_identity(data, tmp_path):
    """docs/fairseq.md: grouping --dict-out, binarised again with it: same sentences, token id = tree
    position, so the trained cascade's order is the identity (decoding gathers nothing) and it decodes."""
    order, tree_dict, tree_bin = tmp_path / "order.txt", tmp_path / "dict.tree.txt", tmp_path / "bin600.tree"
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_ext.grouping", str(data / "bin600"), "-s", "en", "-t", "de",
         "--shortlist", "40", "--groups", "10", "--out", str(order), "--dict-out", str(tree_dict)],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = order.read_text(encoding="utf-8").splitlines()
    assert tokens[:4] == ["<s>", "<pad>", "</s>", "<unk>"]  # the specials keep their ids
    assert [line.split()[0] for line in tree_dict.read_text(encoding="utf-8").splitlines()] == tokens[4:]
    bpe = data / "bpe600"
    _cli(
        "fairseq-preprocess", "--source-lang", "en", "--target-lang", "de", "--trainpref", str(bpe / "train"),
        "--validpref", str(bpe / "valid"), "--testpref", str(bpe / "test"), "--joined-dictionary",
        "--srcdict", str(tree_dict), "--destdir", str(tree_bin), "--workers", "1",
    )  # fmt: skip
    from fairseq.data import Dictionary, data_utils

    old_d, new_d = (Dictionary.load(str(b / "dict.de.txt")) for b in (data / "bin600", tree_bin))
    assert [new_d[i] for i in range(len(new_d))] == tokens  # token id = tree position
    for split in ("train", "test"):  # the same sentences, only the ids moved
        old_s, new_s = (
            data_utils.load_indexed_dataset(str(b / f"{split}.en-de.de"), d)
            for b, d in ((data / "bin600", old_d), (tree_bin, new_d))
        )
        assert len(old_s) == len(new_s) > 0
        for i in range(0, len(old_s), max(1, len(old_s) // 20)):
            assert old_d.string(old_s[i]) == new_d.string(new_s[i])
    ckpt = tmp_path / "ckpt"
    log = _cli(
        "fairseq-train", str(tree_bin), "--user-dir", USER_DIR, *TINY, "--mhe-shortlist", "40",
        "--mhe-label-order", str(order), "--max-update", "10", "--save-dir", str(ckpt),
    )  # fmt: skip
    assert "is not the dictionary's order" not in log
    import argparse

    import torch

    torch.serialization.add_safe_globals([argparse.Namespace])
    state = torch.load(ckpt / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    assert state["decoder.output_projection.label_order.order"].tolist() == list(range(len(new_d)))
    out = _cli(
        "fairseq-generate", str(tree_bin), "--user-dir", USER_DIR, "--path", str(ckpt / "checkpoint_last.pt"),
        "--gen-subset", "test", "--beam", "2", "--max-len-b", "5", "--cpu", "--batch-size", "16",
        "--required-batch-size-multiple", "1",
    )  # fmt: skip
    assert re.search(r"Translated 150 sentences", out)
