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
from mhe_plugins import LabelCodec  # noqa: E402


def _task(n_words: int = 33) -> TranslationTask:
    d = Dictionary()
    for i in range(n_words):
        d.add_symbol(f"w{i}")
    return TranslationTask(TranslationConfig(), d, d)


def _model(task, arch="transformer_mhe", **over) -> torch.nn.Module:
    over.setdefault("mhe_method", "mhp")  # this file's first half tests the product layer
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


def _digit_logits(model, net_input) -> torch.Tensor:
    """Concatenated per-head logits (..., sum C_h) of the MHP output layer, from decoder features."""
    feats = model(**net_input, features_only=True)[0]
    return torch.cat(model.decoder.output_projection.logits(feats), -1)


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
    net_input = _sample(task.target_dictionary)["net_input"]
    out = model(**net_input)
    assert out[0].shape[-1] == 37  # the output layer gives full-vocabulary log-probs
    lp = model.get_normalized_probs(out, log_probs=True)
    assert lp.shape[-1] == 37
    brute = _brute_log_probs(model, _digit_logits(model, net_input))
    torch.testing.assert_close(lp.double(), brute, atol=1e-5, rtol=1e-5)
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
    model.eval()  # accuracy is reported at validation
    loss, sample_size, log = crit(model, sample)
    digit_logits = _digit_logits(model, sample["net_input"])
    tgt, mask = sample["target"], sample["target"].ne(d.pad())
    lp = _brute_log_probs(model, digit_logits)
    nll = -(lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[mask]).sum()
    codec = model.decoder.codec
    digits = codec.encode(tgt.masked_fill(~mask, 0))
    # token-level smoothing: head h keeps 1 - eps_h on its digit, eps_h / (C_h - 1) on each other digit
    eps_h = 1 - 0.9 ** (1 / codec.num_heads)
    ref = 0.0
    for h, z in enumerate(digit_logits.split(list(codec.head_sizes), -1)):
        c = codec.head_sizes[h]
        q = torch.full((int(mask.sum()), c), eps_h / (c - 1), dtype=torch.float64)
        q.scatter_(1, digits[..., h][mask][:, None], 1 - eps_h)
        ref = ref - (q * F.log_softmax(z[mask].double(), -1)).sum()
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
    with pytest.raises(ValueError, match=r"--mhe-group-mlp-dim \(8\) is an MHC option"):
        _model(task, mhe_group_mlp_dim=8)
    # --share-all-embeddings still shares input embeddings; the MHE layer stays untied
    shared = _model(task, share_all_embeddings=True, mhe_head_sizes="5,8")
    assert shared.encoder.embed_tokens is shared.decoder.embed_tokens
    assert shared.decoder.codec.head_sizes == (5, 8)
    assert isinstance(shared, TransformerMHEModel)
    plain = _model(task, arch="transformer")
    crit = MHECrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.0)
    with pytest.raises(TypeError, match="--arch transformer_mhe"):
        crit(plain, _sample(task.target_dictionary))


# ---------------------------------------------------------------- MHC (cascade) output layer
def _mhc(task, **over):
    over.setdefault("mhe_head_sizes", "5,8")  # 40 >= 37 types: ids 37..39 must get no mass
    over.setdefault("mhe_shortlist", 0)  # the plain cascade (the short list: test_fairseq_shortlist.py)
    return _model(task, mhe_method="mhc", **over)


def _brute_cascade(model, features):
    """log p(v) = log_softmax(groups)[g(v)] + log_softmax(children of g(v))[c(v)], token by token."""
    head = model.decoder.output_projection
    codec = head.codec
    c0, c1 = codec.head_sizes
    n = codec.num_labels
    x = features.double()
    groups = head.group(features).double()
    if head.group_mlps:  # --mhe-group-mlp-dim: an MLP adds to the group scores
        groups = groups + head.group_mlps[0](features).double()
    groups[..., codec.prefix_limit(0) + 1 :] = float("-inf")
    lg = F.log_softmax(groups, -1)
    q = head.queries[0](features).double()
    out = torch.empty(*features.shape[:-1], n, dtype=torch.float64)
    for g in range(c0):
        ids = [v for v in range(g * c1, (g + 1) * c1) if v < n]
        if not ids:
            continue
        emb = head.node_embed[0](torch.tensor(ids)).double()
        z = q @ emb.t() + head.node_bias[0](torch.tensor(ids)).double()[:, 0]
        out[..., ids] = lg[..., g : g + 1] + F.log_softmax(z, -1)
    del x
    return out


@pytest.mark.parametrize("group_mlp_dim", [0, 12])
def test_mhc_normalized_probs_match_brute_force_and_temperature(group_mlp_dim):
    task = _task()
    model = _mhc(task, mhe_group_mlp_dim=group_mlp_dim)
    assert model.decoder.method == "mhc" and model.decoder.codec.head_sizes == (5, 8)
    assert len(model.decoder.output_projection.group_mlps) == (1 if group_mlp_dim else 0)
    for mlp in model.decoder.output_projection.group_mlps:  # as if trained: it changes the group scores
        torch.nn.init.normal_(mlp[2].weight)
    net_input = _sample(task.target_dictionary)["net_input"]
    feats, _ = model(**net_input, features_only=True)
    ref = _brute_cascade(model, feats)
    out = model(**net_input)
    lp = model.get_normalized_probs(out, log_probs=True)
    assert lp.shape == (*feats.shape[:-1], 37)
    torch.testing.assert_close(lp.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.get_normalized_probs(out, log_probs=False), lp.exp())
    # SequenceGenerator divides decoder_out[0] by the temperature: exact tempering p^(1/T) / Z
    tempered = model.get_normalized_probs((out[0] / 0.7, None), log_probs=True)
    torch.testing.assert_close(tempered.double(), F.log_softmax(ref / 0.7, -1), atol=1e-5, rtol=1e-5)


def _full_ce_reference(model, feats, tgt, mask, eps):
    """Loss of the cascade criterion from the brute-force full distribution: -sum_g Q(g) log p(g) -
    sum_{v in g*} q(v) log p(v | g*), q = fairseq's uniform smoothing (1 - eps on the target)."""
    lp = _brute_cascade(model, feats)[mask]  # (n, V)
    t = tgt[mask]
    n_tok, n = lp.shape
    c1 = model.decoder.codec.head_sizes[1]
    q = torch.full((n_tok, n), eps / (n - 1), dtype=torch.float64)
    q[torch.arange(n_tok), t] = 1 - eps
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n_tok):
        g_true = int(t[i]) // c1
        for g in range(-(-n // c1)):
            ids = list(range(g * c1, min((g + 1) * c1, n)))
            log_pg = torch.logsumexp(lp[i, ids], 0)
            total -= q[i, ids].sum() * log_pg
            if g == g_true:
                total -= (q[i, ids] * (lp[i, ids] - log_pg)).sum()
    return total, -lp[torch.arange(n_tok), t].sum()


def test_mhc_criterion_loss_nll_accuracy_exact():
    task = _task()
    model = _mhc(task)
    d = task.target_dictionary
    sample = _sample(d)
    tgt, mask = sample["target"], sample["target"].ne(d.pad())
    crit = MHECrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1, report_accuracy=True)
    model.train()
    loss, sample_size, log = crit(model, sample)
    assert "n_correct" not in log  # exact accuracy would need |V| scores: validation only
    feats, _ = model(**sample["net_input"], features_only=True)
    ref_loss, ref_nll = _full_ce_reference(model, feats.detach(), tgt, mask, 0.1)
    assert sample_size == int(mask.sum())
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert float(log["nll_loss"]) == pytest.approx(float(ref_nll), rel=1e-5)
    loss.backward()
    head = model.decoder.output_projection
    assert head.group.weight.grad.abs().sum() > 0 and head.node_embed[0].weight.grad.abs().sum() > 0
    # unreduced: per position, zero on padding
    per, per_nll = crit.compute_loss(model, (feats, None), sample, reduce=False)
    assert per.shape == tgt.shape and float(per[~mask].abs().sum()) == 0
    assert float(per.sum()) == pytest.approx(float(loss), rel=1e-5)
    # validation: exact accuracy = full-vocabulary argmax
    model.eval()
    with torch.no_grad():
        _, _, vlog = crit(model, sample)
        lp = _brute_cascade(model, model(**sample["net_input"], features_only=True)[0])
    assert vlog["n_correct"] == int(((lp.argmax(-1) == tgt) & mask).sum()) and vlog["total"] == int(
        mask.sum()
    )
    # eps = 0: the loss is the exact nll
    c0 = MHECrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.0)
    l0, _, log0 = c0(model, sample)
    assert float(l0) == pytest.approx(float(log0["nll_loss"]), rel=1e-6)
    with pytest.raises(ValueError, match=r"--mhe-loss bce is not a loss of this output layer \(MHCHead\)"):
        MHECrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.0, mhe_loss="bce")(model, sample)


@pytest.mark.parametrize("shortlist", [0, None])
def test_mhc_training_step_has_no_vocab_wide_tensor(shortlist):
    """Every matrix created in forward + backward of the criterion is narrower than |V| in its last dim
    (with the default short list of |V| / 4 too: the root is K + C_0 wide)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    d = Dictionary()
    for i in range(400):
        d.add_symbol(f"w{i}")
    task = TranslationTask(TranslationConfig(), d, d)
    from fairseq_ext.model import SHORTLIST_DIVISOR

    model = _mhc(task, mhe_head_sizes=None, mhe_shortlist=shortlist)
    v = len(d)
    sizes = model.decoder.codec.head_sizes
    k = model.decoder.output_projection.shortlist
    assert v == 404 and max(sizes) < 64 and k == (0 if shortlist == 0 else 404 // SHORTLIST_DIVISOR)

    class Widest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.widest = (0, None)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] > self.widest[0]:
                    self.widest = (t.shape[-1], str(func), tuple(t.shape))
            return out

    crit = MHECrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1, report_accuracy=True)
    sample = _sample(d, bsz=4, src_len=7, tgt_len=6)
    model.train()
    with Widest() as mode:
        loss, _, _ = crit(model, sample)
        loss.backward()
    # widest: max(C_0, C_1, d, ffn) -- never |V| (a dense output layer would give 404 here)
    assert mode.widest[0] <= max(k + sizes[0], *sizes, 32) < v, mode.widest
    # the same model through get_normalized_probs does produce |V| (the probe can see it)
    with Widest() as probe:
        model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
    assert probe.widest[0] >= v


def test_mhc_share_decoder_input_output_embed_ties_leaves():
    task = _task()
    tied = _mhc(task, share_decoder_input_output_embed=True)
    head = tied.decoder.output_projection
    assert head.node_embed[-1].weight is tied.decoder.embed_tokens.weight
    untied = _mhc(task)
    from fairseq_ext.model import output_layer_params

    assert output_layer_params(untied.decoder) - output_layer_params(tied.decoder) == 40 * 16
    # tied log-probs are still exact and normalised, and the state dict reloads
    net_input = _sample(task.target_dictionary)["net_input"]
    feats, _ = tied(**net_input, features_only=True)
    lp = tied.get_normalized_probs(tied(**net_input), log_probs=True)
    torch.testing.assert_close(lp.double(), _brute_cascade(tied, feats), atol=1e-5, rtol=1e-5)
    fresh = _mhc(task, share_decoder_input_output_embed=True)
    fresh.load_state_dict(tied.state_dict())
    assert fresh.decoder.output_projection.node_embed[-1].weight is fresh.decoder.embed_tokens.weight
    # --share-all-embeddings ties too
    shared = _mhc(task, share_all_embeddings=True)
    assert shared.decoder.output_projection.node_embed[-1].weight is shared.encoder.embed_tokens.weight
    with pytest.raises(ValueError, match=r"--mhe-hidden-dim \(8\) == --decoder-embed-dim \(16\)"):
        _mhc(task, share_decoder_input_output_embed=True, mhe_hidden_dim=8)
    assert _mhc(task, mhe_hidden_dim=8).decoder.output_projection.hidden_dim == 8


def test_mhc_beam_search_and_sampling_scores_are_full_vocab_log_probs():
    task = _task()
    model = _mhc(task).eval()
    d = task.target_dictionary
    sample = _sample(d)
    for kw in ({"beam_size": 3}, {"beam_size": 2, "search_strategy": None}):
        gen = SequenceGenerator([model], d, max_len_b=6, **kw)
        for i, beams in enumerate(gen.forward(sample)):
            for h in beams:
                toks = h["tokens"]
                prev = torch.cat([torch.tensor([d.eos()]), toks[:-1]]).unsqueeze(0)
                src = sample["net_input"]["src_tokens"][i : i + 1]
                with torch.no_grad():
                    lp = model.get_normalized_probs(
                        model(src, torch.tensor([src.shape[1]]), prev), log_probs=True
                    )
                teacher = lp[0].gather(-1, toks.unsqueeze(-1)).squeeze(-1)
                torch.testing.assert_close(h["positional_scores"], teacher, atol=1e-4, rtol=1e-4)
    from fairseq.search import Sampling

    torch.manual_seed(0)
    gen = SequenceGenerator([model], d, beam_size=2, max_len_b=6, search_strategy=Sampling(d))
    hyps = gen.forward(sample)
    assert all(len(b) == 2 and all(torch.isfinite(h["positional_scores"]).all() for h in b) for b in hyps)


def test_mhc_score_reference_and_iwslt_arch():
    from fairseq.sequence_scorer import SequenceScorer

    task = _task()
    d = task.target_dictionary
    sample = _sample(d)
    model = _mhc(task).eval()
    hyps = SequenceScorer(d).generate([model], sample)  # what fairseq-generate --score-reference runs
    with torch.no_grad():
        lp = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
    teacher = lp.gather(-1, sample["target"].unsqueeze(-1)).squeeze(-1)
    for i, h in enumerate(hyps):
        n = int(sample["target"][i].ne(d.pad()).sum())
        torch.testing.assert_close(h[0]["positional_scores"], teacher[i, :n], atol=1e-5, rtol=1e-5)
    # the iwslt arch keeps working with either method (its own sizes: 4 heads, 1024 FFN, 6 layers)
    for method in ("mhp", "mhc"):
        args = argparse.Namespace(arch="transformer_mhe_iwslt_de_en", mhe_method=method, max_source_positions=64,
                                  max_target_positions=64, encoder_layers=1, decoder_layers=1)  # fmt: skip
        ARCH_CONFIG_REGISTRY["transformer_mhe_iwslt_de_en"](args)
        assert args.decoder_ffn_embed_dim == 1024 and args.decoder_attention_heads == 4
        m = task.build_model(args)
        assert m.decoder.method == method and args.mhe_heads == 2
        out = m.get_normalized_probs(m(**sample["net_input"]), log_probs=True)
        torch.testing.assert_close(out.exp().sum(-1), torch.ones(out.shape[:-1]), atol=1e-5, rtol=0)


def test_mhc_default_shape_groups_and_old_checkpoint_error():
    """MHC defaults to --mhe-groups frequency bins with a group MLP as wide as the decoder FFN; a state
    dict of another shape (e.g. a balanced, linear MHC) is refused with the override that loads it."""
    from fairseq_ext.model import MHC_GROUPS

    task = _task()  # 37 target types
    default = _mhc(task, mhe_head_sizes=None)
    head = default.decoder.output_projection
    assert head.codec.head_sizes == LabelCodec.for_groups(37, MHC_GROUPS).head_sizes
    assert head.group_mlp_dim == 32 and len(head.group_mlps) == 1  # --decoder-ffn-embed-dim in _model
    assert _mhc(task, mhe_head_sizes=None, mhe_groups=4).decoder.codec.head_sizes == (4, 10)
    balanced = _mhc(task, mhe_head_sizes=None, mhe_groups=0, mhe_group_mlp_dim=0)
    assert balanced.decoder.codec.head_sizes == LabelCodec.balanced(37, 2).head_sizes
    assert balanced.decoder.output_projection.group_mlps is not None
    assert len(balanced.decoder.output_projection.group_mlps) == 0
    with pytest.raises(ValueError, match=r"num_heads=3 .*--mhe-groups 0 gives balanced --mhe-heads levels"):
        _mhc(task, mhe_head_sizes=None, mhe_heads=3)
    with pytest.raises(ValueError, match="--mhe-groups must be >= 0"):
        _mhc(task, mhe_head_sizes=None, mhe_groups=-1)
    with pytest.raises(ValueError, match="'mhe_groups': 0, 'mhe_group_mlp_dim': 0"):
        default.load_state_dict(balanced.state_dict())
    same = _mhc(task, mhe_head_sizes=None)
    same.load_state_dict(default.state_dict())  # same shape loads
