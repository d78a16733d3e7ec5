"""MHC pruned decoding in fairseq's beam search: the same hypotheses and scores as the full distribution,
with tail groups skipped, and the full distribution wherever something reads beyond each row's top."""

from __future__ import annotations

import argparse

import pytest
import torch

pytest.importorskip("fairseq")

from fairseq.data import Dictionary  # noqa: E402
from fairseq.dataclass.configs import CommonEvalConfig, GenerationConfig  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402

from fairseq_ext.pruned_decoding import decode_top  # noqa: E402


@pytest.fixture
def nmt(tiny_nmt):
    """A 60-word task and an MHC model with a 16-token short list, its mass mostly there (as trained)."""
    make_task, make_model = tiny_nmt
    task = make_task(60)
    model = make_model(task, mhe_method="mhc", mhe_shortlist=16, mhe_head_sizes="6,8").eval()
    head = model.decoder.output_projection
    with torch.no_grad():
        torch.nn.init.normal_(head.short_bias.weight, mean=2.0)
        for b in head.node_bias:
            torch.nn.init.normal_(b.weight)
    return task, model


def _cfg(path: str = "model.pt", **generation) -> argparse.Namespace:
    return argparse.Namespace(
        generation=GenerationConfig(**generation),
        common_eval=CommonEvalConfig(path=path),
        task=argparse.Namespace(_name="translation"),
    )


def _sample(d: Dictionary, bsz=6, src_len=7) -> dict:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(d.nspecial, len(d), (bsz, src_len), generator=g)
    return {"net_input": {"src_tokens": src, "src_lengths": torch.full((bsz,), src_len)}}


@pytest.mark.parametrize("beam", [1, 3])
def test_pruned_beam_search_equals_the_full_one_and_skips_tail_groups(nmt, beam):
    task, model = nmt
    d = task.target_dictionary
    sample = _sample(d)
    gen = SequenceGenerator([model], d, beam_size=beam, max_len_b=8, min_len=2)
    full = gen.forward(sample)
    model.prepare_for_inference_(_cfg(beam=beam))
    assert model.decoder.decode_top == 0  # off by default
    model.args.mhe_decode_pruning = "auto"  # --mhe-decode-pruning auto
    model.prepare_for_inference_(_cfg(beam=beam))
    assert model.decoder.decode_top == 2 * beam + 3
    skipped = []
    layer = model.decoder.output_layer

    def spy(features):
        out = layer(features)
        skipped.append(int(torch.isneginf(out).sum()))
        return out

    model.decoder.output_layer = spy
    pruned = gen.forward(sample)
    assert sum(skipped) > 0  # whole tail groups were skipped
    for a, b in zip(full, pruned):
        assert len(a) == len(b)
        for ha, hb in zip(a, b):
            assert torch.equal(ha["tokens"], hb["tokens"])
            torch.testing.assert_close(ha["positional_scores"], hb["positional_scores"])


def test_pruning_is_off_wherever_more_than_the_top_is_read(nmt):
    _, model = nmt
    for over in (
        {"sampling": True},
        {"temperature": 0.7},
        {"prefix_size": 1},
        {"no_repeat_ngram_size": 2},
        {"score_reference": True},
        {"lm_path": "lm.pt"},
        {"diverse_beam_groups": 2},
    ):
        assert decode_top(_cfg(**over), "auto") == 0, over
    assert decode_top(_cfg(path="a.pt:b.pt"), "auto") == 0  # an ensemble averages full distributions
    assert decode_top(_cfg(beam=4), "off") == 0
    assert decode_top(_cfg(beam=4), "auto") == 11
    with pytest.raises(ValueError, match="--mhe-decode-pruning"):
        decode_top(_cfg(), "on")
    model.args.mhe_decode_pruning = "off"  # --model-overrides "{'mhe_decode_pruning': 'off'}"
    model.prepare_for_inference_(_cfg(beam=4))
    assert model.decoder.decode_top == 0


def test_pruned_scores_are_never_renormalised(nmt):
    """A tempered copy of pruned scores cannot be made a distribution again: it raises, it is not
    log-softmaxed over the computed entries only."""
    task, model = nmt
    model.args.mhe_decode_pruning = "auto"
    model.prepare_for_inference_(_cfg(beam=2))
    d = task.target_dictionary
    net_input = _sample(d)["net_input"]
    prev = torch.full((6, 1), d.eos())
    with torch.no_grad():
        out = model(net_input["src_tokens"], net_input["src_lengths"], prev)
        lp = model.get_normalized_probs(out, log_probs=True)
        assert lp.data_ptr() == out[0].data_ptr()  # temperature 1: the layer's own log-probs
        with pytest.raises(RuntimeError, match="mhe_decode_pruning"):
            model.get_normalized_probs((out[0] / 0.7, None), log_probs=True)
