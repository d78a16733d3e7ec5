"""``python -m fairseq_ext.bench`` end to end at tiny size: four output layers, the report's schema and
exact parameter counts, and a rerun that resumes instead of retraining; the targets over two sizes."""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fairseq")

from fairseq.modules import AdaptiveSoftmax  # noqa: E402

from fairseq_ext import bench  # noqa: E402
from fairseq_ext.datasets import corpus  # noqa: E402
from fairseq_ext.model import MHC_GROUPS, SHORTLIST_DIVISOR  # noqa: E402
from mhe_plugins import LabelCodec, build_head  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "ddtp_sample"


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tiny_bpe_data(root: Path, vocab: int = 300) -> Path:
    """DATA dir as ``python -m fairseq_ext.datasets ddtp`` leaves it, from the first lines of the sample."""
    data = root / "data"
    raw = data / "raw"
    raw.mkdir(parents=True)
    keep = {"train": 300, "valid": 20, "test": 20}
    for f in SAMPLE.glob("*.gz"):
        split = f.name.split(".")[0]
        with gzip.open(f, "rt", encoding="utf-8") as src:
            (raw / f.name[:-3]).write_text("".join(src.readlines()[: keep[split]]), "utf-8")
    train = [x for lang in ("en", "de") for x in (raw / f"train.{lang}").read_text().splitlines()]
    model = corpus.train_sentencepiece(train, data / f"spm{vocab}", vocab)
    for split in corpus.SPLITS:
        corpus.encode_split(model, raw, data / f"bpe{vocab}", split, ("en", "de"))
    return data


def test_parallel_processes_binarise_once_and_never_see_a_partial_dataset(tmp_path):
    """Two ``--methods`` processes share a work dir: one binarises under the lock, the other waits; a dir
    left half-written by an interrupted run is rebuilt, never used."""
    data = _tiny_bpe_data(tmp_path)
    work = tmp_path / "work"
    (work / "bin300.partial").mkdir(parents=True)
    (work / "bin300.partial" / "dict.de.txt").write_text("stale 1\n")
    code = (
        "import sys; from pathlib import Path; from fairseq_ext import bench; "
        f"print(bench.preprocess(Path({str(data)!r}), 300, Path({str(work)!r}), ('en', 'de')))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert {o[0].strip().splitlines()[-1] for o in outs} == {str(work / "bin300")}
    assert not (work / "bin300.partial").exists()
    log = (work / "preprocess.log").read_text()
    assert log.count("Wrote preprocessed data") == 1  # binarised exactly once
    dict_lines = (work / "bin300" / "dict.de.txt").read_text().splitlines()
    assert len(dict_lines) > 100 and "stale 1" not in dict_lines
    for split in ("train", "valid", "test"):
        for lang in ("en", "de"):
            assert (work / "bin300" / f"{split}.en-de.{lang}.idx").stat().st_size > 0


def test_bench_tiny_end_to_end_and_resume(tmp_path):
    data = _tiny_bpe_data(tmp_path)
    out = tmp_path / "results"
    argv = ["--data-dir", str(data), "--out-dir", str(out), "--vocabs", "300", "--dim", "16"]
    argv += [
        "--layers",
        "1",
        "--heads",
        "2",
        "--max-update",
        "4",
        "--warmup",
        "1",
        "--valid-every",
        "2",
        "--max-tokens",
        "800",
    ]
    argv += ["--beam", "2", "--scaling-vocabs", "300,1200", "--scaling-dim", "8", "--scaling-tokens", "16"]
    argv += ["--scaling-reps", "1", "--time-updates", "100"]
    # docs: methods may run as separate processes; a run with a subset trains those and writes a PARTIAL report
    part = bench.main([*argv, "--methods", "ce,adaptive"])
    assert part["by_vocab"]["300"]["methods"].keys() == {"ce", "adaptive"} and part["partial"]
    assert part["by_vocab"]["300"]["missing"] == ["ce0", "adaptive_ls", "mhp", "mhc"]
    md = (out / "nmt_ende.md").read_text()
    assert "PARTIAL RESULTS" in md and "mhp at 300" in md and "pending" in md
    assert [t["met"] for t in part["targets"]] == [None] * 5  # every target needs MHC
    stored = out / "runs" / "nmt_ende"
    assert sorted(f.name for f in stored.iterdir()) == ["v300_adaptive.json", "v300_ce.json"]

    # a fresh machine (work dir gone) finds ce + adaptive in the committed store and trains only the rest
    import shutil

    shutil.rmtree(data / "bench")
    res = bench.main(argv)
    ce_now = dict(res["by_vocab"]["300"]["methods"]["ce"])  # the stored run, plus its timing alone
    ce_now["train_wps"], _ = ce_now.pop("train_wps_run"), ce_now.pop("timing")
    ce_now["gen_sent_per_s"], _ = ce_now.pop("gen_sent_per_s_run"), ce_now.pop("gen_timing")
    assert ce_now == part["by_vocab"]["300"]["methods"]["ce"]
    assert not res["partial"] and not list((data / "bench" / "v300").glob("ce.*"))
    # the default schedule anneals to zero at --max-update (fairseq's cosine with period max_update - warmup)
    # MHC trains with the bench's defaults: MHC_GROUPS bins, a group MLP 4 x --dim wide (its own run dir)
    log = (
        data
        / "bench"
        / "v300"
        / f"mhc.g{MHC_GROUPS}.mlp64.k1of{SHORTLIST_DIVISOR}.context.cosine4"
        / "train.log"
    ).read_text()
    assert "'lr_scheduler': {'_name': 'cosine', 'warmup_updates': 1," in log

    saved = json.loads((out / "nmt_ende.json").read_text())
    bench_args = argparse.Namespace(
        mhc_groups=MHC_GROUPS,
        mhc_group_mlp_dim=64,
        mhc_head_sizes=None,
        mhc_shortlist=-1,
        mhc_grouping="context",
    )
    assert saved["by_vocab"].keys() == {"300"} and saved["methods"].keys() == set(bench.METHODS)
    assert saved["methods"] == saved["by_vocab"]["300"]["methods"]
    for res_v in saved["by_vocab"].values():
        v = res_v["vocab_size"]
        codec = LabelCodec.balanced(v, 2)
        m = res_v["methods"]
        assert m["ce"]["output_params"] == 16 * v  # Linear(d, |V|), no bias
        assert m["mhp"]["output_params"] == 16 * sum(codec.head_sizes)  # Linear(d, sum C_h)
        mhc = build_head(
            "mhc",
            16,
            v,
            num_groups=MHC_GROUPS,
            hidden_dim=16,
            group_mlp_dim=64,
            shortlist=v // SHORTLIST_DIVISOR,
        )
        assert m["mhc"]["output_params"] == _params(mhc)  # untied here, the default short list
        assert m["adaptive_ls"]["output_params"] == m["adaptive"]["output_params"]
        assert m["ce0"]["output_params"] == m["ce"]["output_params"]
        cut = [int(c) for c in res_v["adaptive_cutoffs"].split(",")]
        assert cut == [v // 4, v * 3 // 4]
        assert m["adaptive"]["output_params"] == _params(AdaptiveSoftmax(v, 16, cut, dropout=0.0, factor=4.0))
        assert len({r["total_params"] - r["output_params"] for r in m.values()}) == 1  # same transformer
        for k, r in m.items():
            assert 0 <= r["bleu"] <= 100 and 0 <= r["chrf"] <= 100 and r["train_wps"] > 0
            # train words/s is the method timed alone (100 updates, the first 50 left out); the whole
            # run's average is kept beside it, equal to the stored run's
            assert r["timing"]["updates"] == 50 and r["train_wps"] == r["timing"]["train_wps"]
            assert (
                r["train_wps_run"]
                == json.loads((stored / f"v300_{k}.json").read_text())["result"]["train_wps"]
            )
            timing = data / "bench" / "v300" / "timing"
            tag = bench.method_tag(k, bench_args)
            timing_log = (timing / tag / "train.log").read_text()
            assert "'max_update': 100," in timing_log and not list((timing / tag).glob("*.pt"))
            assert r["gen_sent_per_s"] > 0 and r["valid_nll_bits"] > 0
            # generation is timed alone for every method, ce and adaptive included although their run
            # checkpoints went with the first work dir: a short-trained checkpoint, every hypothesis forced
            # to --gen-fixed-len tokens (its positional scores: 20 tokens + EOS)
            assert r["gen_timing"]["gen_sent_per_s"] == r["gen_sent_per_s"] and r["gen_sent_per_s_run"] > 0
            assert r["gen_timing"]["fixed_len"] == 20
            each = r["gen_timing"]["gen_sent_per_s_each"]  # the median of --gen-reps 3 decodes
            assert len(each) == 3 and sorted(each)[1] == r["gen_sent_per_s"]
            # MHC (learned order) is timed on the dictionary renumbered to its order (no gather), and with
            # the order file over the original ids under "gathered"
            dirs = [f"gen.{tag}.tree", f"gen.{tag}"] if k == "mhc" else [f"gen.{tag}"]
            if k == "mhc":
                gathered = r["gen_timing"]["gathered"]
                assert len(gathered["gen_sent_per_s_each"]) == 3 and gathered["gen_sent_per_s"] > 0
                assert r["gen_timing"]["dictionary"].startswith("renumbered")
                torch.serialization.add_safe_globals([argparse.Namespace])  # fairseq pickles its args
                warm = torch.load(
                    timing / f"genckpt.{tag}.tree" / "checkpoint_last.pt",
                    map_location="cpu",
                    weights_only=True,
                )["model"]["decoder.output_projection.label_order.order"]
                assert warm.tolist() == list(range(res_v["vocab_size"]))  # the identity
            else:
                assert "gathered" not in r["gen_timing"]
            for rep, d in itertools.product(range(3), dirs):
                gen_log = (timing / d / f"generate.{rep}.log").read_text()
                lens = {len(ln.split("\t")[1].split()) for ln in gen_log.splitlines() if ln.startswith("P-")}
                assert lens == {21}
            assert r["num_updates"] == 4 and [p["updates"] for p in r["valid_curve"]] == [2, 4]
            assert r["threads"] == 1  # recorded with the run (not part of its key)
        # valid points at 2 and 4: nothing inside the last fifth to compare with, so never "converged"
        assert res_v["convergence"]["ce"] == {
            "from_update": None,
            "to_update": 4,
            "delta_bits": None,
            "converged": False,
        }
    assert len(saved["targets"]) == 5 and all(isinstance(t["met"], bool) for t in saved["targets"])
    s1200 = saved["scaling"]["by_vocab"]["1200"]
    assert s1200["ce_params"] == 8 * 1200
    # the timed MHC has the runs' shape: MHC_GROUPS bins, group MLP 4 x --scaling-dim
    scaled = build_head(
        "mhc",
        8,
        1200,
        num_groups=MHC_GROUPS,
        hidden_dim=8,
        group_mlp_dim=32,
        shortlist=1200 // SHORTLIST_DIVISOR,
    )
    assert s1200["mhc_params"] == _params(scaled) and s1200["mhc_head_sizes"] == list(scaled.codec.head_sizes)
    md = (out / "nmt_ende.md").read_text()
    assert all(name in md for name in bench.NAMES.values()) and "## Targets" in md
    assert (
        "each method timed alone" in md
        and "words/s (timed alone)" in md
        and "decoded alone, 20 tokens each)" in md
        and "(the median of 3 decodes)" in md
        and "without renumbering its dictionary" in md  # MHC's gathered layout, timed in the same pass
        and "dictionary renumbered to the order" in md
    )
    assert (
        f"MHC: a short list of |V|//{SHORTLIST_DIVISOR} at the root, {MHC_GROUPS} tail context clusters, group MLP 64 wide"
        in md
    )
    assert "4 updates x 800 tokens" in md and "CPU, 1 thread(s) per training run" in md
    assert (out / "nmt_ende.png").stat().st_size > 10_000

    # re-running resumes: nothing is retrained or re-decoded, the numbers are identical
    t0 = time.perf_counter()
    again = bench.main(argv)
    assert time.perf_counter() - t0 < 30
    assert again["by_vocab"] == res["by_vocab"] and again["scaling"] == res["scaling"]
    assert not part["by_vocab"]["300"]["methods"]["ce"].get("timing")  # a PARTIAL report times nothing
    # a worker that trains one size still reports every --vocabs size; --report-only trains nothing
    assert bench.main([*argv, "--report-only"])["by_vocab"] == res["by_vocab"]
    shutil.rmtree(data / "bench")
    empty = bench.main([*argv, "--report-only", "--name", "other"])
    assert empty["partial"] and empty["by_vocab"]["300"]["methods"] == {} and not (data / "bench").exists()


def test_run_dir_per_schedule_and_budget(tmp_path, capsys):
    """inverse_sqrt ignores --max-update, so a larger budget continues the same run; cosine anneals at
    --max-update, so each budget trains in its own dir (and never continues another budget's checkpoint)."""
    import argparse

    ns = lambda sched, n: argparse.Namespace(lr_scheduler=sched, max_update=n)  # noqa: E731
    assert bench.run_dir(tmp_path, "ce", ns("inverse_sqrt", 8000)) == tmp_path / "ce"
    assert bench.run_dir(tmp_path, "ce", ns("inverse_sqrt", 16000)) == tmp_path / "ce"
    cos = {bench.run_dir(tmp_path, "ce", ns("cosine", n)) for n in (8000, 16000)}
    assert len(cos) == 2 and tmp_path / "ce" not in cos
    assert "lr_scheduler" in bench.RUN_KEYS
    # a differently shaped MHC layer never resumes another's checkpoint, and is part of only MHC's run key
    mhc = lambda mlp, sizes, groups=16: argparse.Namespace(  # noqa: E731
        lr_scheduler="cosine", max_update=8000, mhc_group_mlp_dim=mlp, mhc_head_sizes=sizes, mhc_groups=groups
    )
    dirs = {
        bench.run_dir(tmp_path, "mhc", mhc(m, s, g))
        for m in (0, 512)
        for s in (None, "20,400")
        for g in (0, 16)
    }
    assert len(dirs) == 6  # --mhc-head-sizes overrides --mhc-groups
    assert (
        tmp_path / "mhc.h20x400.mlp512.cosine8000" in dirs and tmp_path / "mhc.g16.mlp512.cosine8000" in dirs
    )
    assert (
        bench.run_dir(
            tmp_path, "mhc", argparse.Namespace(**{**vars(mhc(0, None, 0)), "lr_scheduler": "inverse_sqrt"})
        )
        == tmp_path / "mhc"
    )
    assert bench.run_dir(tmp_path, "ce", mhc(512, "20,400")) == tmp_path / "ce.cosine8000"
    assert bench.method_args("mhc", 8000, mhc(512, "20,400"))[-6:] == [
        "--mhe-head-sizes",
        "20,400",
        "--mhe-shortlist",
        "0",
        "--mhe-group-mlp-dim",
        "512",
    ]
    assert bench.method_args("mhc", 8000, mhc(512, None))[-6:] == [
        "--mhe-groups",
        "16",
        "--mhe-shortlist",
        "0",
        "--mhe-group-mlp-dim",
        "512",
    ]
    # the short list (default: the model's |V| // SHORTLIST_DIVISOR), grouping and seed shape dir, key, name
    var = argparse.Namespace(
        **{**vars(mhc(512, None)), "mhc_shortlist": -1, "mhc_grouping": "context", "seed": 2}
    )
    assert bench.method_args("mhc", 8000, var)[-4:-2] == ["--mhe-shortlist", str(8000 // SHORTLIST_DIVISOR)]
    assert (
        bench.run_dir(tmp_path, "mhc", var)
        == tmp_path / f"mhc.g16.mlp512.k1of{SHORTLIST_DIVISOR}.context.seed2.cosine8000"
    )
    assert bench.method_settings("mhc", var)["mhc_shortlist"] == f"|V|//{SHORTLIST_DIVISOR}"
    assert bench.method_settings("ce", var) == {"seed": 2}
    assert bench.run_name(8000, "mhc", var) == "v8000_mhc_seed2"
    # tied output embeddings: their own dir, key and name, fairseq's sharing flag; only where a layer ties
    tie = argparse.Namespace(**{**vars(var), "tie_embeddings": True})
    assert bench.method_args("mhc", 8000, tie)[-1] == "--share-decoder-input-output-embed"
    assert bench.method_args("ce", 8000, tie)[-1] == "--share-decoder-input-output-embed"
    assert "--share-decoder-input-output-embed" not in bench.method_args("mhc", 8000, var)
    assert bench.run_name(8000, "mhc", tie) == "v8000_mhc_seed2_tied"
    assert bench.run_dir(tmp_path, "ce", tie) == tmp_path / "ce.seed2.tied.cosine8000"
    assert bench.method_settings("ce", tie) == {"seed": 2, "tied": True}
    with pytest.raises(ValueError, match="adaptive cannot tie"):
        bench.method_args("adaptive", 8000, tie)
    with pytest.raises(SystemExit):
        bench.main(["--data-dir", str(tmp_path), "--tie-embeddings", "--methods", "ce,mhp"])
    assert "--tie-embeddings: only ce, ce0, mhc" in capsys.readouterr().err
    fixed = argparse.Namespace(**{**vars(mhc(0, None)), "lr_scheduler": "fixed"})
    assert bench.run_name(8000, "ce", fixed) == "v8000_ce_fixed"
    assert bench.run_dir(tmp_path, "ce", fixed) == tmp_path / "ce.fixed"
    assert bench.method_settings("mhc", mhc(512, None)) == {
        "mhc_groups": 16,
        "mhc_group_mlp_dim": 512,
        "mhc_head_sizes": None,
    }
    assert bench.method_settings("ce", mhc(512, None)) == {}
    with pytest.raises(SystemExit, match="2"):  # a size to train must be one of the reported sizes
        bench.main(["--data-dir", str(tmp_path), "--vocabs", "8000", "--train-vocabs", "32000"])
    assert "must be a subset of --vocabs 8000" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # cosine would never leave warm-up: refused before anything runs
        bench.main(["--data-dir", str(tmp_path), "--max-update", "200", "--warmup", "200"])
    with pytest.raises(SystemExit):  # a timing must keep a window after the start-up one
        bench.main(["--data-dir", str(tmp_path), "--time-updates", "60"])
    assert "--time-updates 60: use 0 (off) or >= 100" in capsys.readouterr().err


def test_budget_per_vocabulary(tmp_path, capsys):
    """--max-update is one budget for all sizes or one per --vocabs size; each size's run dir and run key
    carry its own budget, and the thread count shapes neither (it changes speed, not what is learnt)."""
    import argparse

    assert bench.budgets("8000", [8000, 32000]) == {8000: 8000, 32000: 8000}
    assert bench.budgets("8000,4000", [8000, 32000]) == {8000: 8000, 32000: 4000}
    for bad in ("8000,4000,2000", "8000,x", "0"):
        with pytest.raises(ValueError, match="--max-update"):
            bench.budgets(bad, [8000, 32000])
    a = argparse.Namespace(
        lr_scheduler="cosine", max_update="8000,4000", max_updates={8000: 8000, 32000: 4000}
    )
    assert bench.run_dir(tmp_path, "ce", bench.for_vocab(a, 32000)) == tmp_path / "ce.cosine4000"
    assert bench.run_dir(tmp_path, "ce", bench.for_vocab(a, 8000)) == tmp_path / "ce.cosine8000"
    assert a.max_update == "8000,4000"  # the caller's namespace is left alone
    assert "threads" not in bench.RUN_KEYS
    c = {"max_update": "8000,4000", "max_updates": {"8000": 8000, "32000": 4000}}
    assert bench.budget_words(c) == "updates 8,000 at 8,000, 4,000 at 32,000"
    assert bench.budget_words({"max_update": "8000", "max_updates": {"8000": 8000}}) == "8000 updates"
    with pytest.raises(SystemExit):  # one budget per size, refused before anything runs
        bench.main(["--data-dir", str(tmp_path), "--vocabs", "8000,32000", "--max-update", "8000,4000,1"])
    assert "give one budget >= 1, or one per --vocabs size [8000, 32000]" in capsys.readouterr().err


def test_convergence_check():
    curve = [{"updates": u, "nll_loss": n} for u, n in [(200, 9.0), (400, 7.0), (800, 6.0), (1000, 5.97)]]
    c = bench.convergence(curve, 1000)
    assert c["from_update"] == 800 and c["to_update"] == 1000 and c["converged"]
    assert c["delta_bits"] == pytest.approx(-0.03)
    c = bench.convergence(curve[:3] + [{"updates": 1000, "nll_loss": 5.9}], 1000)
    assert not c["converged"] and c["delta_bits"] == pytest.approx(-0.1)
    assert bench.convergence(curve[:1], 200)["converged"] is False  # one point says nothing


def _methods(bleu: dict, nll: dict, wps: dict, gen: dict | None = None) -> dict:
    gen = gen or {k: 10.0 for k in bleu}
    return {
        "methods": {
            k: {"bleu": bleu[k], "valid_nll_bits": nll[k], "train_wps": wps[k], "gen_sent_per_s": gen[k]}
            for k in bleu
        }
    }


def test_targets_over_two_vocabularies():
    """Controls count at the better of their smoothing settings; speed targets at the largest |V|."""
    small = _methods(
        {"ce": 20.0, "ce0": 19.0, "adaptive": 18.0, "adaptive_ls": 19.0, "mhp": 15.0, "mhc": 19.6},
        {"ce": 4.0, "ce0": 3.9, "adaptive": 4.1, "adaptive_ls": 4.2, "mhp": 5.0, "mhc": 4.05},
        {
            "ce": 1000.0,
            "ce0": 1000.0,
            "adaptive": 1100.0,
            "adaptive_ls": 1100.0,
            "mhp": 2000.0,
            "mhc": 1200.0,
        },
    )
    big = _methods(
        {"ce": 20.0, "ce0": 20.5, "adaptive": 19.5, "adaptive_ls": 19.0, "mhp": 15.0, "mhc": 19.9},
        {"ce": 4.0, "ce0": 3.9, "adaptive": 4.1, "adaptive_ls": 4.2, "mhp": 5.0, "mhc": 4.25},
        {"ce": 500.0, "ce0": 500.0, "adaptive": 900.0, "adaptive_ls": 900.0, "mhp": 2000.0, "mhc": 950.0},
        {"ce": 40.0, "ce0": 40.0, "adaptive": 41.0, "adaptive_ls": 41.0, "mhp": 50.0, "mhc": 39.0},
    )
    rows = bench.targets({"8000": small, "32000": big})
    assert [t["vocab"] for t in rows] == ["8000"] * 3 + ["32000"] * 5
    # 8k: 19.6 >= 20.0 - 0.5; 19.6 >= 19.0 + 0.5; 4.05 <= 4.0 + 0.1
    # 32k: 19.9 < 20.5 (ce0, the better dense) - 0.5; 19.9 >= 19.5 + 0.5 (the better adaptive: no smoothing)
    assert [t["met"] for t in rows] == [True, True, True, False, False, False, True, False]
    assert "(ce0; -0.60)" in rows[3]["measured"] and "(adaptive; +0.40)" in rows[4]["measured"]
    assert "whole-run averages" in rows[-2]["measured"] and "whole-run decodes" in rows[-1]["measured"]
    for m in big["methods"].values():
        m["timing"] = {"train_wps": m["train_wps"]}
        m["gen_timing"] = {}
    rows = bench.targets({"8000": small, "32000": big})
    assert "timed alone" in rows[-2]["measured"] and "(ce, decoded alone)" in rows[-1]["measured"]
    # a second seed is stated at the size that has it
    small["repeats"] = {"ce": {"bleu": 19.8}, "mhc": {"bleu": 19.9}}
    seeds = [t for t in bench.targets({"8000": small, "32000": big}) if t["target"].startswith("seed")]
    assert len(seeds) == 1 and seeds[0]["met"] is None
    assert (
        seeds[0]["measured"]
        == "ce: 20.00 / 19.80 (-0.20); mhc: 19.60 / 19.90 (+0.30); MHC - dense at seed 2: +0.10"
    )
    # MHC tied has the lower validation nll: it is the MHC the targets count, and until dense tied is in,
    # the dense and nll targets wait for it (a tied MHC is compared with a tied dense layer)
    small["tied"] = {"mhc": {"bleu": 20.1, "valid_nll_bits": 3.95}}
    picked = bench.targets({"8000": small, "32000": big})
    assert [t["measured"] == "pending" for t in picked[:3]] == [True, False, True]
    assert picked[1]["measured"] == "20.10 (MHC tied) vs 19.00 (adaptive_ls; +1.10)"
    small["tied"]["ce"] = {"bleu": 20.3, "valid_nll_bits": 3.9}
    picked = bench.targets({"8000": small, "32000": big})
    assert picked[0]["measured"] == "20.10 (MHC tied) vs 20.30 (ce_tied; -0.20)" and picked[0]["met"]
    assert picked[2]["measured"] == "3.950 (MHC tied) vs 3.900 (ce_tied; +0.050)" and picked[2]["met"]
    small["tied"]["mhc"]["valid_nll_bits"] = 4.1  # worse than untied on validation: untied is counted
    assert (
        bench.targets({"8000": small, "32000": big})[0]["measured"] == "19.60 (MHC) vs 20.30 (ce_tied; -0.70)"
    )
    small["tied"]["mhc"]["valid_nll_bits"] = 3.95
    # the tied lever is stated against the untied MHC and the better dense layer (and dense tied if run)
    lever = [t for t in bench.targets({"8000": small, "32000": big}) if t["target"].startswith("next lever")]
    assert len(lever) == 1 and lever[0]["met"] is None
    cells = [
        bench.report.verdict_cell(t)
        for t in (seeds[0], rows[0], rows[3], {"measured": "pending", "met": None})
    ]
    assert cells == ["-", "yes", "**NO**", "pending"]  # stated rows are neither met nor pending
    assert lever[0]["measured"] == (
        "MHC tied 20.10 BLEU / 3.950 bits vs untied 19.60 / 4.050 (+0.50 BLEU); vs dense 20.00 (ce; +0.10); "
        "dense tied 20.30 (MHC tied -0.20)"
    )


def test_stored_run_reused_only_with_the_same_settings(tmp_path, capsys):
    key = {"vocab": 8000, "method": "ce", "data": {"train": 10}, "max_update": 8000, "lr": 0.0015}
    path = tmp_path / "v8000_ce.json"
    bench.atomic_write_json({"key": key, "vocab_size": 7976, "result": {"bleu": 20.0}}, path)
    assert bench.load_stored(path, key)["result"] == {"bleu": 20.0}
    assert bench.load_stored(path, {**key, "max_update": 4000}) is None  # another budget: retrain, and say so
    assert "max_update differ" in capsys.readouterr().out
    assert bench.load_stored(tmp_path / "absent.json", key) is None


def test_train_speed_counts_a_resumed_window_once():
    """A run killed after update 250 resumes from the checkpoint at 200: the window logged at 250 again covers
    50 updates (not a negative span), and words/s is total words over total time."""
    line = lambda n, wps: {"num_updates": n, "wpb": 100.0, "wps": wps}  # noqa: E731
    inner = [line(50, 1000.0), line(100, 1000.0), line(150, 1000.0), line(200, 1000.0), line(250, 1000.0)]
    inner += [line(250, 500.0), line(300, 500.0)]  # resumed at 200
    words, wall = bench.train_words_and_wall(inner, [])
    assert words == 100.0 * 50 * 7
    assert wall == pytest.approx(100.0 * 50 * (5 / 1000.0 + 2 / 500.0))
    # no inner lines (shorter than one interval): the epoch lines count from update 0
    assert bench.train_words_and_wall([], [line(30, 300.0)]) == (3000.0, 10.0)
