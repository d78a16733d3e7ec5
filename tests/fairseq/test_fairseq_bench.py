"""``python -m fairseq_ext.bench`` end to end on a tiny slice of the committed sample (schema + exact counts)."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("fairseq")

from fairseq_ext import bench  # noqa: E402
from fairseq_ext.datasets import corpus  # noqa: E402
from mhe_plugins import LabelCodec  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "ddtp_sample"


def test_bench_tiny_end_to_end_and_resume(tmp_path):
    data = tmp_path / "data"
    raw = data / "raw"
    raw.mkdir(parents=True)
    keep = {"train": 300, "valid": 20, "test": 20}
    for f in SAMPLE.glob("*.gz"):
        split = f.name.split(".")[0]
        with gzip.open(f, "rt", encoding="utf-8") as src:
            (raw / f.name[:-3]).write_text("".join(src.readlines()[: keep[split]]), "utf-8")
    train = [x for lang in ("en", "de") for x in (raw / f"train.{lang}").read_text().splitlines()]
    model = corpus.train_sentencepiece(train, data / "spm300", 300)
    for split in corpus.SPLITS:
        corpus.encode_split(model, raw, data / "bpe300", split, ("en", "de"))
    out = tmp_path / "results"
    argv = ["--data-dir", str(data), "--out-dir", str(out), "--vocab", "300", "--dim", "16", "--layers", "1"]
    argv += ["--heads", "2", "--max-update", "4", "--valid-every", "2", "--max-tokens", "800", "--beam", "2"]
    argv += [
        "--scaling-vocabs",
        "300,1200",
        "--scaling-dim",
        "8",
        "--scaling-tokens",
        "16",
        "--scaling-reps",
        "1",
    ]
    res = bench.main(argv)

    saved = json.loads((out / "nmt_ende.json").read_text())
    assert saved["methods"].keys() == {"ce", "mhe"} and saved["scaling"]["by_vocab"].keys() == {"300", "1200"}
    v = saved["vocab_size"]
    sizes = LabelCodec.balanced(v, 2).head_sizes
    assert saved["methods"]["ce"]["output_params"] == 16 * v  # Linear(d, |V|), no bias
    assert saved["methods"]["mhe"]["output_params"] == 16 * sum(sizes)  # Linear(d, sum C_h)
    for m in saved["methods"].values():
        assert 0 <= m["bleu"] <= 100 and m["train_wps"] > 0 and m["gen_sent_per_s"] > 0
        assert m["num_updates"] == 4 and [p["updates"] for p in m["valid_curve"]][-1] == 4
    s1200 = saved["scaling"]["by_vocab"]["1200"]
    assert s1200["ce_params"] == 8 * 1200 and s1200["mhe_params"] == 8 * sum(
        LabelCodec.balanced(1200, 2).head_sizes
    )
    assert "| mhe_cross_entropy + transformer_mhe |" in (out / "nmt_ende.md").read_text()
    assert (out / "nmt_ende.png").stat().st_size > 10_000

    # re-running resumes: nothing is retrained or re-decoded, the numbers are identical
    t0 = time.perf_counter()
    again = bench.main(argv)
    assert time.perf_counter() - t0 < 20
    assert again["methods"] == res["methods"] and again["scaling"] == res["scaling"]
