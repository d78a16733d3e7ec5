"""``transformer_mhe``: fairseq's transformer with an MHP output layer over the target dictionary.

The decoder's ``output_layer`` returns the concatenated digit logits (..., sum C_h) instead of (..., |V|)
vocabulary logits; ``get_normalized_probs`` turns them into full-vocabulary log-probabilities by an
outer sum of per-head log-softmaxes (no d x |V| matmul), renormalised over ids < |V|. Everything that
consumes log-probs - ``SequenceGenerator`` beam search, ``--sampling``, ``--score-reference`` - works
unchanged; the generator's ``decoder_out[:, -1:] / temperature`` slicing also works on digit logits.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoderBase, TransformerModel
from fairseq.models.transformer.transformer_legacy import base_architecture, transformer_iwslt_de_en
from torch import nn

from mhe_plugins import LabelCodec, MHPHead

logger = logging.getLogger(__name__)

__all__ = [
    "TransformerMHEModel",
    "TransformerMHEDecoder",
    "codec_from_args",
    "digit_log_probs",
]


def codec_from_args(args, vocab_size: int) -> LabelCodec:
    """``--mhe-head-sizes C1,C2,..`` if given, else ``LabelCodec.balanced(|V|, --mhe-heads)``."""
    sizes = getattr(args, "mhe_head_sizes", None)
    heads = getattr(args, "mhe_heads", None)
    if sizes:
        try:
            parsed = [int(s) for s in str(sizes).split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--mhe-head-sizes must be comma-separated ints, got {sizes!r}") from None
        if heads and int(heads) != len(parsed):
            raise ValueError(
                f"--mhe-heads {heads} disagrees with --mhe-head-sizes {sizes} ({len(parsed)} sizes)"
            )
        try:
            return LabelCodec(parsed, num_labels=vocab_size)
        except ValueError as e:
            raise ValueError(
                f"--mhe-head-sizes {sizes}: {e} (target dictionary has {vocab_size} types)"
            ) from None
    return LabelCodec.balanced(vocab_size, int(heads or 2))


def digit_log_probs(codec: LabelCodec, digit_logits: torch.Tensor) -> list[torch.Tensor]:
    """Per-head log-softmax (float32) of concatenated digit logits (..., sum C_h)."""
    return [F.log_softmax(z.float(), dim=-1) for z in digit_logits.split(list(codec.head_sizes), dim=-1)]


class TransformerMHEDecoder(TransformerDecoderBase):
    """Transformer decoder whose ``output_projection`` is an :class:`MHPHead` (digit logits out)."""

    def __init__(self, cfg, dictionary, embed_tokens, codec: LabelCodec, no_encoder_attn: bool = False):
        if codec.num_labels != len(dictionary):
            raise ValueError(
                f"codec covers {codec.num_labels} ids but the target dictionary has {len(dictionary)}"
            )
        self.codec = codec  # read by build_output_projection, which the base __init__ calls
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        # never tie the (nonexistent) |V| x d projection to the input embedding, nor upgrade old keys to it
        self.share_input_output_embed = False

    def build_output_projection(self, cfg, dictionary, embed_tokens) -> None:
        if getattr(cfg, "adaptive_softmax_cutoff", None) is not None:
            raise ValueError(
                "transformer_mhe: --adaptive-softmax-cutoff cannot be combined with an MHE output layer"
            )
        if getattr(cfg, "base_layers", 0):
            raise ValueError("transformer_mhe: --base-layers is not supported")
        head = MHPHead(self.output_embed_dim, self.codec, bias=False)
        # same init as fairseq's untied output projection
        nn.init.normal_(head.proj.weight, mean=0.0, std=self.output_embed_dim**-0.5)
        self.output_projection = head

    def output_layer(self, features: torch.Tensor) -> torch.Tensor:
        """Features (..., d) -> concatenated digit logits (..., sum C_h)."""
        return torch.cat(self.output_projection(features), dim=-1)

    def get_normalized_probs_scriptable(self, net_output, log_probs: bool, sample=None) -> torch.Tensor:
        """Full-vocabulary (log-)probs: sum_h log_softmax_h[digit_h(v)] - log P(id < |V|)."""
        head = self.output_projection
        out = head.log_prob_from_logits(net_output[0].split(list(self.codec.head_sizes), dim=-1))
        return out if log_probs else out.exp()


@register_model("transformer_mhe")
class TransformerMHEModel(TransformerModel):
    """Transformer NMT model with a Multi-Head-Encoding (MHP) output layer over the target vocabulary."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument("--mhe-heads", type=int, metavar="H", help="number of MHE heads (default 2)")
        parser.add_argument(
            "--mhe-head-sizes",
            type=str,
            metavar="C1,C2,..",
            help="explicit head sizes, product >= |target dict| (default: balanced for --mhe-heads)",
        )

    @classmethod
    def build_model(cls, args, task):
        if getattr(args, "share_decoder_input_output_embed", False) and not getattr(
            args, "share_all_embeddings", False
        ):
            raise ValueError(
                "--share-decoder-input-output-embed is not meaningful for transformer_mhe: the MHE output layer "
                "has sum(C_h) digit outputs, not one per target word, so it cannot be tied to the embedding. "
                "Drop the flag (--share-all-embeddings still shares the encoder/decoder input embeddings)."
            )
        if getattr(args, "adaptive_softmax_cutoff", None):
            raise ValueError(
                "transformer_mhe: --adaptive-softmax-cutoff cannot be combined with an MHE output layer"
            )
        model = super().build_model(args, task)
        codec = model.decoder.codec
        logger.info(
            "MHE output layer: |V|=%d -> heads %s (%d outputs, %d params)",
            codec.num_labels,
            list(codec.head_sizes),
            sum(codec.head_sizes),
            sum(p.numel() for p in model.decoder.output_projection.parameters()),
        )
        return model

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        codec = codec_from_args(cfg, len(tgt_dict))
        return TransformerMHEDecoder(
            cfg, tgt_dict, embed_tokens, codec, no_encoder_attn=cfg.no_cross_attention
        )


def _mhe_defaults(args) -> None:
    args.mhe_heads = getattr(args, "mhe_heads", None) or 2
    args.mhe_head_sizes = getattr(args, "mhe_head_sizes", None)


@register_model_architecture("transformer_mhe", "transformer_mhe")
def transformer_mhe(args) -> None:
    _mhe_defaults(args)
    base_architecture(args)


@register_model_architecture("transformer_mhe", "transformer_mhe_iwslt_de_en")
def transformer_mhe_iwslt_de_en(args) -> None:
    _mhe_defaults(args)
    transformer_iwslt_de_en(args)
