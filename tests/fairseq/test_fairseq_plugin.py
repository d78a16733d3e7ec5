"""transformer_mhe / mhe_cross_entropy in-process: exact log-probs, loss, nll, accuracy, beam search."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fairseq")

from fairseq.data import Dictionary  # noqa: E402
from fairseq.models import ARCH_CONFIG_REGISTRY  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402
from fairseq.tasks.translation import TranslationConfig, TranslationTask  # noqa: E402

from fairseq_ext import register  # noqa: E402

register()
from fairseq_ext.criterion import MHECrossEntropyCriterion  # noqa: E402
from fairseq_ext.model import TransformerMHEModel  # noqa: E402


def _task(n_words: int = 33) -> TranslationTask:
    d = Dictionary()
    for i in range(n_words):
        d.add_symbol(f"w{i}")
    return TranslationTask(TranslationConfig(), d, d)


def _model(task, arch="transformer_mhe", **over) -> torch.nn.Module:
    args = argparse.Namespace(
        arch=arch,
        encoder_layers=1,
        decoder_layers=1,
        encoder_embed_dim=16,
        decoder_embed_dim=16,
        encoder_ffn_embed_dim=32,
        decoder_ffn_embed_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        dropout=0.0,
        max_source_positions=64,
        max_target_positions=64,
        **over,
    )
    ARCH_CONFIG_REGISTRY[arch](args)
    torch.manual_seed(0)
    return task.build_model(args)


def _sample(d: Dictionary, bsz=3, src_len=6, tgt_len=5) -> dict:
    g = torch.Generator().manual_seed(1)
    lo, hi = d.nspecial, len(d)
    src = torch.randint(lo, hi, (bsz, src_len), generator=g)
    tgt = torch.randint(lo, hi, (bsz, tgt_len), generator=g)
    tgt[:, -1] = d.eos()
    tgt[0, -2:] = d.pad()  # a padded row
    tgt[0, -3] = d.eos()
    # teacher forcing input as fairseq's collater builds it: eos moved to the front, pads kept
    prev = torch.cat([torch.full((bsz, 1), d.eos()), tgt[:, :-1]], 1).masked_fill(tgt.eq(d.pad()), d.pad())
    ntok = int(tgt.ne(d.pad()).sum())
    return {
        "net_input": {
            "src_tokens": src,
            "src_lengths": torch.full((bsz,), src_len),
            "prev_output_tokens": prev,
        },
        "target": tgt,
        "ntokens": ntok,
        "id": torch.arange(bsz),
    }


def _brute_log_probs(model, digit_logits):
    codec = model.decoder.codec
    ids = torch.arange(codec.num_labels)
    digits = codec.encode(ids)  # (V, H)
    score = 0
    for h, z in enumerate(digit_logits.split(list(codec.head_sizes), -1)):
        score = score + F.log_softmax(z.double(), -1)[..., digits[:, h]]
    return score - torch.logsumexp(score, -1, keepdim=True)


def test_normalized_probs_match_brute_force_with_masked_ids():
    task = _task()
    model = _model(task)
    codec = model.decoder.codec
    assert codec.num_labels == len(task.target_dictionary) == 37
    assert codec.capacity > codec.num_labels  # ids >= |V| exist and must get no mass
    out = model(**_sample(task.target_dictionary)["net_input"])
    assert out[0].shape[-1] == sum(codec.head_sizes)
    lp = model.get_normalized_probs(out, log_probs=True)
    assert lp.shape[-1] == 37
    torch.testing.assert_close(lp.double(), _brute_log_probs(model, out[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.get_normalized_probs(out, log_probs=False), lp.exp())
    # output layer: d * sum(C) weights, no d x |V| matrix anywhere in the decoder
    assert model.decoder.output_projection.proj.weight.shape == (sum(codec.head_sizes), 16)


def test_criterion_loss_nll_accuracy_exact():
    task = _task()
    model = _model(task)
    d = task.target_dictionary
    sample = _sample(d)
    crit = MHECrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1, report_accuracy=True)
    loss, sample_size, log = crit(model, sample)
    net_out = model(**sample["net_input"])
    tgt, mask = sample["target"], sample["target"].ne(d.pad())
    lp = _brute_log_probs(model, net_out[0])
    nll = -(lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[mask]).sum()
    codec = model.decoder.codec
    digits = codec.encode(tgt.masked_fill(~mask, 0))
    ref = sum(
        F.cross_entropy(z[mask].double(), digits[..., h][mask], label_smoothing=0.1, reduction="sum")
        for h, z in enumerate(net_out[0].split(list(codec.head_sizes), -1))
    )
    assert sample_size == sample["ntokens"] == int(mask.sum())
    assert float(log["nll_loss"]) == pytest.approx(float(nll), rel=1e-5)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert log["n_correct"] == int(((lp.argmax(-1) == tgt) & mask).sum()) and log["total"] == int(mask.sum())
    loss.backward()
    assert model.decoder.output_projection.proj.weight.grad.abs().sum() > 0
    # without smoothing and with prod == |V| the MHE loss *is* the exact nll
    exact = _task(32)  # 36 = 6 x 6
    m2 = _model(exact)
    assert m2.decoder.codec.capacity == 36
    c2 = MHECrossEntropyCriterion(exact, sentence_avg=False, label_smoothing=0.0)
    loss2, _, log2 = c2(m2, _sample(exact.target_dictionary))
    assert float(loss2) == pytest.approx(float(log2["nll_loss"]), rel=1e-5)


def test_beam_search_scores_are_full_vocab_log_probs():
    task = _task()
    model = _model(task).eval()
    d = task.target_dictionary
    sample = _sample(d)
    gen = SequenceGenerator([model], d, beam_size=3, max_len_b=6)
    hypos = gen.forward(sample)
    for i, beams in enumerate(hypos):
        assert len(beams) == 3
        for h in beams:
            toks = h["tokens"]
            prev = torch.cat([torch.tensor([d.eos()]), toks[:-1]]).unsqueeze(0)
            src = sample["net_input"]["src_tokens"][i : i + 1]
            with torch.no_grad():
                out = model(src, torch.tensor([src.shape[1]]), prev)
                lp = model.get_normalized_probs(out, log_probs=True)[0]
            teacher = lp.gather(-1, toks.unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(h["positional_scores"], teacher, atol=1e-4, rtol=1e-4)


def test_config_errors():
    task = _task()
    with pytest.raises(ValueError, match="--share-decoder-input-output-embed is not meaningful"):
        _model(task, share_decoder_input_output_embed=True)
    with pytest.raises(ValueError, match="--mhe-head-sizes 4,4"):
        _model(task, mhe_head_sizes="4,4")
    with pytest.raises(ValueError, match="disagrees"):
        _model(task, mhe_heads=3, mhe_head_sizes="7,6")
    # --share-all-embeddings still shares input embeddings; the MHE layer stays untied
    shared = _model(task, share_all_embeddings=True, mhe_head_sizes="5,8")
    assert shared.encoder.embed_tokens is shared.decoder.embed_tokens
    assert shared.decoder.codec.head_sizes == (5, 8)
    assert isinstance(shared, TransformerMHEModel)
    plain = _model(task, arch="transformer")
    crit = MHECrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.0)
    with pytest.raises(TypeError, match="--arch transformer_mhe"):
        crit(plain, _sample(task.target_dictionary))
