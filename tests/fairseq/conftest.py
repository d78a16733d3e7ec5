"""Tiny translation tasks and transformer_mhe models built in-process (no data, no CLI)."""

from __future__ import annotations

import argparse

import pytest
import torch

TINY_TRANSFORMER = {
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_embed_dim": 16,
    "decoder_embed_dim": 16,
    "encoder_ffn_embed_dim": 32,
    "decoder_ffn_embed_dim": 32,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "dropout": 0.0,
    "max_source_positions": 64,
    "max_target_positions": 64,
}


@pytest.fixture
def tiny_nmt():
    """``(task(n_words), model(task, **args))``: a translation task over ``n_words`` tokens (+ fairseq's 4
    specials) and a seeded one-layer ``transformer_mhe`` with ``args`` over the tiny transformer's."""
    pytest.importorskip("fairseq")
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    from fairseq_ext import register

    register()

    def task(n_words: int) -> TranslationTask:
        d = Dictionary()
        for i in range(n_words):
            d.add_symbol(f"w{i}")
        return TranslationTask(TranslationConfig(), d, d)

    def model(t: TranslationTask, **over) -> torch.nn.Module:
        args = argparse.Namespace(arch="transformer_mhe", **{**TINY_TRANSFORMER, **over})
        ARCH_CONFIG_REGISTRY["transformer_mhe"](args)
        torch.manual_seed(0)
        return t.build_model(args)

    return task, model
