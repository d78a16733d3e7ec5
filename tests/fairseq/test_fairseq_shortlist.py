"""MHC short list and label-order files in fairseq; the label-smoothed adaptive-softmax control."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fairseq")

from fairseq.data import Dictionary  # noqa: E402
from fairseq.models import ARCH_CONFIG_REGISTRY  # noqa: E402
from fairseq.modules import AdaptiveSoftmax  # noqa: E402
from fairseq.tasks.translation import TranslationConfig, TranslationTask  # noqa: E402

from fairseq_ext import register  # noqa: E402

register()
from fairseq_ext.adaptive_criterion import AdaptiveLabelSmoothedLoss  # noqa: E402
from fairseq_ext.criterion import MHECrossEntropyCriterion  # noqa: E402
from fairseq_ext.grouping import read_label_order, renumbered_dictionary  # noqa: E402
from fairseq_ext.model import SHORTLIST_DIVISOR  # noqa: E402


def _task(n_words: int = 40) -> TranslationTask:
    d = Dictionary()
    for i in range(n_words):
        d.add_symbol(f"w{i}")
    return TranslationTask(TranslationConfig(), d, d)


def _model(task, **over) -> torch.nn.Module:
    args = argparse.Namespace(
        arch="transformer_mhe",
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
        mhe_method="mhc",
        mhe_groups=4,
        **over,
    )
    ARCH_CONFIG_REGISTRY["transformer_mhe"](args)
    torch.manual_seed(0)
    return task.build_model(args)


def _sample(d: Dictionary, bsz=4, n=6) -> dict:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(d.nspecial, len(d), (bsz, n), generator=g)
    tgt = torch.randint(d.nspecial, len(d), (bsz, n), generator=g)
    tgt[:, 0] = d.nspecial  # a short-list token in every row
    tgt[:, -1] = d.eos()
    prev = torch.cat([torch.full((bsz, 1), d.eos()), tgt[:, :-1]], 1)
    return {
        "net_input": {"src_tokens": src, "src_lengths": torch.full((bsz,), n), "prev_output_tokens": prev},
        "target": tgt,
        "ntokens": int(tgt.numel()),
        "id": torch.arange(bsz),
    }


def test_shortlist_model_exact_log_probs_and_loss(tmp_path):
    task = _task()
    d = task.target_dictionary
    order = torch.randperm(len(d), generator=torch.Generator().manual_seed(3)).tolist()
    path = tmp_path / "order.txt"
    path.write_text("".join(d[i] + "\n" for i in order), encoding="utf-8")
    model = _model(task, mhe_shortlist=10, mhe_label_order=str(path))
    head = model.decoder.output_projection
    assert head.num_labels == len(d) == 44 and head.shortlist == 10 and head.codec.num_labels == 34
    assert head.label_order.order.tolist() == order
    sample = _sample(d)
    out = model(**sample["net_input"])
    lp = model.get_normalized_probs(out, log_probs=True)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[:-1]), atol=1e-5, rtol=0)
    crit = MHECrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.0)
    loss, _, log = crit(model, sample)
    want = -lp.gather(-1, sample["target"].unsqueeze(-1)).sum()
    assert float(log["nll_loss"]) == pytest.approx(float(want), rel=1e-5)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    # a checkpoint carries the order: rebuilt elsewhere without the file, the model waits for it
    state = model.state_dict()
    rebuilt = _model(task, mhe_shortlist=10, mhe_label_order=str(tmp_path / "gone.txt"))
    with pytest.raises(RuntimeError, match="label order is not set"):
        rebuilt(**sample["net_input"])
    rebuilt.load_state_dict(state)
    torch.testing.assert_close(rebuilt(**sample["net_input"])[0], out[0])
    # a checkpoint with another short list is refused with the fix
    with pytest.raises(ValueError, match="short list of 10 tokens, this model 0"):
        _model(task, mhe_shortlist=0).load_state_dict(state)
    assert _model(task).decoder.output_projection.shortlist == 44 // SHORTLIST_DIVISOR  # the default
    with pytest.raises(ValueError, match="--mhe-shortlist must be in"):
        _model(task, mhe_shortlist=44)


def test_label_order_file_errors_name_file_line_and_token(tmp_path):
    d = _task(3).target_dictionary  # 4 specials + 3 words
    bad = {
        "dup.txt": ("<s>\n<pad>\n</s>\n<unk>\nw0\nw0\nw2\n", "dup.txt:6: token 'w0' listed again"),
        "unk.txt": ("<s>\n<pad>\n</s>\n<unk>\nw0\nw9\nw2\n", "unk.txt:6: token 'w9' is not in"),
        "short.txt": ("<s>\n<pad>\n</s>\n<unk>\nw0\n", "lists 5 tokens, the target dictionary has 7"),
        "blank.txt": ("<s>\n\n", "blank.txt:2: empty line"),
    }
    for name, (text, match) in bad.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=match):
            read_label_order(tmp_path / name, d)


def test_renumbered_dictionary_keeps_the_specials_and_loads_in_tree_order(tmp_path):
    d = _task(3).target_dictionary  # 4 specials + w0 w1 w2 (ids 4, 5, 6)
    d.count[6] = 9
    text = renumbered_dictionary(d, [0, 1, 2, 3, 6, 4, 5])
    assert text.splitlines() == ["w2 9", "w0 1", "w1 1"]
    (tmp_path / "dict.txt").write_text(text, encoding="utf-8")
    loaded = Dictionary.load(str(tmp_path / "dict.txt"))
    assert [loaded[i] for i in range(len(loaded))] == ["<s>", "<pad>", "</s>", "<unk>", "w2", "w0", "w1"]
    with pytest.raises(ValueError, match=r"must start with the 4 specials in id order.*'w2'"):
        renumbered_dictionary(d, [0, 1, 6, 2, 3, 4, 5])


def _full_log_probs(asm, x):
    """Adaptive softmax's exact (B, |V|) log-probs, differentiable (fairseq's get_log_prob is in place)."""
    head = F.log_softmax(asm.head(x), -1)
    parts = [head[:, : asm.cutoff[0]]]
    for i, tail in enumerate(asm.tail):
        parts.append(F.log_softmax(tail(x), -1) + head[:, asm.cutoff[0] + i : asm.cutoff[0] + i + 1])
    return torch.cat(parts, -1)


def test_label_smoothed_adaptive_loss_is_the_tree_smoothed_cross_entropy():
    torch.manual_seed(0)
    vocab, eps = 30, 0.1
    asm = AdaptiveSoftmax(vocab, 32, [6, 18], dropout=0.0).double()
    crit = AdaptiveLabelSmoothedLoss.__new__(AdaptiveLabelSmoothedLoss)
    crit.eps = eps
    x = torch.randn(12, 32, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, 5, 6, 7, 17, 18, 29, 20, 2, 11, 25])
    logits, targets = asm(x, target)
    _, rows = asm.adapt_target(target)
    loss, nll = crit._tree_loss(asm, logits, targets, rows, target)
    full = _full_log_probs(asm, x)
    torch.testing.assert_close(full, asm.get_log_prob(x[None].detach(), None)[0])
    torch.testing.assert_close(nll, -full.gather(1, target[:, None])[:, 0])
    # implied target: short list and the true cluster per token; other clusters split like the model
    p = full.detach().exp()
    clusters = [range(0, 6), range(6, 18), range(18, 30)]
    q = torch.zeros(12, vocab, dtype=torch.float64)
    u = eps / (vocab - 1)
    for i, t in enumerate(target.tolist()):
        for c, members in enumerate(clusters):
            ids = list(members)
            if c == 0 or t in members:
                q[i, ids] = u
            else:
                q[i, ids] = u * len(ids) * p[i, ids] / p[i, ids].sum()
        q[i, t] = 1 - eps
    torch.testing.assert_close(q.sum(-1), torch.ones(12, dtype=torch.float64))
    (g,) = torch.autograd.grad(loss.sum(), x)
    (gref,) = torch.autograd.grad(-(q * _full_log_probs(asm, x)).sum(), x)
    torch.testing.assert_close(g, gref)
    crit.eps = 0.0
    loss0, nll0 = crit._tree_loss(asm, logits, targets, rows, target)
    torch.testing.assert_close(loss0, nll0)
    ref = sum(F.cross_entropy(z, t, reduction="none").sum() for z, t in zip(logits, targets) if t is not None)
    torch.testing.assert_close(loss0.sum(), ref)


def test_generation_skips_only_the_identity_renormalisation():
    task = _task()
    model = _model(task, mhe_shortlist=6).eval()
    sample = _sample(task.target_dictionary)
    with torch.no_grad():
        out = model(**sample["net_input"])
        x = out[0][:, -1:, :]
        ref = x.clone()
        lp = model.get_normalized_probs((x.div_(1.0), None), log_probs=True)
        assert lp.data_ptr() == x.data_ptr()  # temperature 1: the output layer's log-probs as they are
        torch.testing.assert_close(lp, torch.log_softmax(ref, -1))
        out = model(**sample["net_input"])
        x = out[0][:, -1:, :]
        want = torch.log_softmax(x / 2.0, -1)
        tempered = model.get_normalized_probs((x.div_(2.0), None), log_probs=True)
        torch.testing.assert_close(tempered, want)  # p^(1/T), renormalised
        other = torch.randn(4, 1, 44)  # not the output layer's tensor: normalised as before
        torch.testing.assert_close(
            model.get_normalized_probs((other, None), log_probs=True), other.log_softmax(-1)
        )
