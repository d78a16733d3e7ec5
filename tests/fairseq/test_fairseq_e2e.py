"""Real fairseq CLIs on the committed DDTP sample: preprocess -> train -> resume -> generate, via
``--user-dir`` and via the ``mhe-fairseq-*`` wrappers."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fairseq")

from fairseq_ext import USER_DIR  # noqa: E402
from fairseq_ext.datasets import corpus  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "ddtp_sample"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = (
    "--task translation --arch transformer_mhe --criterion mhe_cross_entropy --mhe-heads 2 --label-smoothing 0.1 "
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
    raw = root / "raw"
    raw.mkdir()
    for f in SAMPLE.glob("*.gz"):
        with gzip.open(f, "rt", encoding="utf-8") as src:
            lines = src.read().splitlines(keepends=True)
        # 400 training pairs: enough to see a tiny model fit real text in ~100 CPU updates
        (raw / f.name[:-3]).write_text("".join(lines[:400] if f.name.startswith("train") else lines), "utf-8")
    train = [line for lang in ("en", "de") for line in (raw / f"train.{lang}").read_text().splitlines()]
    model = corpus.train_sentencepiece(train, root / "spm600", 600)
    for split in corpus.SPLITS:
        corpus.encode_split(model, raw, root / "bpe", split, ("en", "de"))
    b = str(root / "bpe")
    _cli(
        "fairseq-preprocess", "--source-lang", "en", "--target-lang", "de", "--trainpref", f"{b}/train",
        "--validpref", f"{b}/valid", "--testpref", f"{b}/test", "--destdir", str(root / "bin"),
        "--joined-dictionary", "--workers", "1",
    )  # fmt: skip
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
        str(data / "bin"),
        "--user-dir",
        USER_DIR,
        *TINY,
        "--max-update",
        "120",
        "--save-dir",
        str(ckpt),
    )
    assert "criterion: MHECrossEntropyCriterion" in log and "MHE output layer: |V|=" in log
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
        "mhe-fairseq-train", str(data / "bin"), *TINY, "--max-update", "125", "--save-dir", str(trained)
    )
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 120 updates\)", log), log[-3000:]
    assert _nll(log, "train")[-1][0] == 125


def test_generate_user_dir_and_wrapper_agree(data, trained):
    common = [
        str(data / "bin"),
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
    args = [str(data / "bin"), "--path", str(trained / "checkpoint_best.pt"), "--beam", "3", "--cpu"]
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
