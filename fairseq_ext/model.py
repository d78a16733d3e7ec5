"""``transformer_mhe``: fairseq's transformer with an MHE output layer over the target dictionary.

The output layer is a core head built by ``mhe_plugins.heads.build_head``: ``--mhe-method mhp`` (product,
:class:`MHPHead`) or ``mhc`` (cascade, :class:`MHCHead`; class-based softmax over frequency bins, since
fairseq's dictionary is frequency-sorted: log p(v) = log p(group(v)) + log p(v | group(v)), exact).
Training never calls ``output_layer``: the criterion asks the model for features (``features_only=True``)
and calls the head (``head(features, target)``), which for MHC scores only the C_0 groups and the C_1
siblings of each target. ``output_layer`` returns the head's exact full-vocabulary log-probs, and
``get_normalized_probs`` log-softmaxes them again: the identity at temperature 1, exact tempering
p^(1/T) after the generator's ``decoder_out / temperature``.

Everything that consumes log-probs - ``SequenceGenerator`` beam search, ``--sampling``,
``--score-reference``, ``fairseq-interactive`` - works unchanged for both methods.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoderBase, TransformerModel
from fairseq.models.transformer.transformer_legacy import base_architecture, transformer_iwslt_de_en

from mhe_plugins import LabelCodec, MHEHead, build_head

from .grouping import set_label_order
from .pruned_decoding import CHOICES as PRUNING_CHOICES
from .pruned_decoding import decode_top

logger = logging.getLogger(__name__)

METHODS = ("mhp", "mhc")
DEFAULT_METHOD = "mhc"  # the en-de benchmark's recommendation (benchmarks/results/nmt_ende.md)
# MHC defaults, measured on en-de (docs/fairseq.md): a few large frequency bins, and group scores through an
# MLP as wide as the decoder FFN. Balanced sqrt(|V|) bins with a linear group layer trailed the dense layer
# by ~0.38 bits of validation nll at 1,800 updates.
MHC_GROUPS = 10
SHORTLIST_DIVISOR = 16  # default --mhe-shortlist = |V| // 16 (chosen on en-de validation, docs/fairseq.md)

__all__ = [
    "METHODS",
    "MHC_GROUPS",
    "SHORTLIST_DIVISOR",
    "default_shortlist",
    "TransformerMHEModel",
    "TransformerMHEDecoder",
    "codec_from_args",
    "output_layer_params",
]


def default_shortlist(vocab_size: int) -> int:
    """The MHC short list when ``--mhe-shortlist`` is not given: the |V| // SHORTLIST_DIVISOR most frequent
    tokens (chosen on en-de validation at 8k and 32k, docs/fairseq.md)."""
    return int(vocab_size) // SHORTLIST_DIVISOR


def shortlist_from_args(args, vocab_size: int) -> int:
    """``--mhe-shortlist K`` (MHC only): the K most frequent tokens are leaves of the root softmax."""
    k = getattr(args, "mhe_shortlist", None)
    if (getattr(args, "mhe_method", None) or DEFAULT_METHOD) != "mhc":
        if k:
            raise ValueError(
                f"--mhe-shortlist {k} is an MHC option (the cascade's root): use --mhe-method mhc"
            )
        return 0
    k = default_shortlist(vocab_size) if k is None else int(k)
    if not 0 <= k < vocab_size - 1:
        raise ValueError(f"--mhe-shortlist must be in [0, {vocab_size - 1}) for |V| = {vocab_size}, got {k}")
    return k


def codec_from_args(args, vocab_size: int) -> LabelCodec:
    """``--mhe-head-sizes C1,C2,..`` if given; else for MHC with ``--mhe-groups G`` > 0 two levels
    ``[G, ceil(T/G)]`` (G groups of the T = |V| - shortlist tail tokens); else the balanced split into
    ``--mhe-heads`` (the core's ``LabelCodec.from_spec``). For MHC the codec covers the tail."""
    vocab_size = vocab_size - shortlist_from_args(args, vocab_size)
    sizes = getattr(args, "mhe_head_sizes", None)
    heads = getattr(args, "mhe_heads", None)
    groups = getattr(args, "mhe_groups", None)
    if groups is not None and int(groups) < 0:
        raise ValueError(f"--mhe-groups must be >= 0 (0 = balanced --mhe-heads levels), got {groups}")
    parsed = None
    if sizes:
        try:
            parsed = [int(s) for s in str(sizes).split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--mhe-head-sizes must be comma-separated ints, got {sizes!r}") from None
    mhc_groups = (
        int(groups) if (getattr(args, "mhe_method", None) or DEFAULT_METHOD) == "mhc" and groups else None
    )
    try:
        return LabelCodec.from_spec(
            vocab_size, parsed, int(heads) if heads else None, None if parsed else mhc_groups
        )
    except ValueError as e:
        flag = (
            f"--mhe-head-sizes {sizes}"
            if parsed
            else (f"--mhe-groups {groups}" if mhc_groups else f"--mhe-heads {heads}")
        )
        raise ValueError(
            f"{flag}: {e} (target dictionary has {vocab_size} types; --mhe-groups 0 gives balanced "
            f"--mhe-heads levels)"
        ) from None


class TransformerMHEDecoder(TransformerDecoderBase):
    """Transformer decoder whose ``output_projection`` is a core head (:class:`MHPHead` or :class:`MHCHead`)."""

    def __init__(
        self,
        cfg,
        dictionary,
        embed_tokens,
        codec: LabelCodec,
        no_encoder_attn: bool = False,
        method: str = "mhc",
        hidden_dim: int | None = None,
        group_mlp_dim: int = 0,
        shortlist: int = 0,
        label_order: str | None = None,
    ):
        if codec.num_labels + shortlist != len(dictionary):
            raise ValueError(
                f"codec covers {codec.num_labels} ids (+ a short list of {shortlist}) but the target "
                f"dictionary has {len(dictionary)}"
            )
        if method not in METHODS:
            raise ValueError(f"--mhe-method must be one of {METHODS}, got {method!r}")
        if method == "mhc" and codec.num_heads < 2:
            raise ValueError(
                f"--mhe-method mhc needs at least 2 heads, got head sizes {list(codec.head_sizes)}"
            )
        if method != "mhc" and group_mlp_dim:
            raise ValueError(
                f"--mhe-group-mlp-dim ({group_mlp_dim}) is an MHC option (the cascade's group scores); "
                f"--mhe-method {method} has no group level: drop the flag or use --mhe-method mhc"
            )
        # read by build_output_projection, which the base __init__ calls
        self.codec, self.method, self.mhc_hidden_dim = codec, method, hidden_dim
        self.group_mlp_dim = int(group_mlp_dim or 0)
        self.shortlist, self.label_order_path = int(shortlist), label_order
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        # never tie the (nonexistent) |V| x d projection to the input embedding, nor upgrade old keys to it
        self.share_input_output_embed = False
        # > 0 once a beam search asked for it (TransformerMHEModel.prepare_for_inference_): MHC then computes
        # each hypothesis's top ``decode_top`` tokens (and EOS, UNK) exactly and skips the tail groups below
        self.decode_top = 0

    def build_output_projection(self, cfg, dictionary, embed_tokens) -> None:
        if getattr(cfg, "adaptive_softmax_cutoff", None) is not None:
            raise ValueError(
                "transformer_mhe: --adaptive-softmax-cutoff cannot be combined with an MHE output layer"
            )
        if getattr(cfg, "base_layers", 0):
            raise ValueError("transformer_mhe: --base-layers is not supported")
        width = embed_tokens.weight.shape[1]
        tie = self.method == "mhc" and bool(getattr(cfg, "share_decoder_input_output_embed", False))
        options = {"bias": False}  # MHP: same init as fairseq's untied output projection (no bias)
        if self.method == "mhc":
            hidden = int(self.mhc_hidden_dim or width)
            if tie and hidden != width:
                raise ValueError(
                    f"--share-decoder-input-output-embed (or --share-all-embeddings) with --mhe-method mhc ties "
                    f"the cascade's token embeddings to the decoder input embeddings, which needs "
                    f"--mhe-hidden-dim ({hidden}) == --decoder-embed-dim ({width}); drop --mhe-hidden-dim or "
                    f"the sharing flag"
                )
            options = {"hidden_dim": hidden, "group_mlp_dim": self.group_mlp_dim, "shortlist": self.shortlist}
        head = build_head(
            self.method,
            self.output_embed_dim,
            len(dictionary),
            head_sizes=self.codec.head_sizes,
            **options,
        )
        head.init_as_output_embedding()
        if tie:  # the cascade's leaf (token) embeddings are the decoder input embeddings
            head.tie_leaf_embedding(embed_tokens.weight)
        if self.label_order_path:
            set_label_order(head, self.label_order_path, dictionary)
        self.output_projection: MHEHead = head

    def upgrade_state_dict_named(self, state_dict, name):
        """Refuse, with the fix, an MHC checkpoint whose output layer has another shape than this model's
        (e.g. trained before --mhe-groups / --mhe-group-mlp-dim had their defaults) instead of a bare
        size-mismatch error deep in ``load_state_dict``."""
        state_dict = super().upgrade_state_dict_named(state_dict, name)
        if self.method != "mhc":
            return state_dict
        prefix = f"{name}.output_projection." if name else "output_projection."
        short = state_dict.get(prefix + "short_bias.weight")
        stored_short = 0 if short is None else short.shape[0]
        if stored_short != self.shortlist:
            raise ValueError(
                f"checkpoint's MHC output layer has a short list of {stored_short} tokens, this model "
                f"{self.shortlist}: pass --model-overrides \"{{'mhe_shortlist': {stored_short}}}\""
            )
        group = state_dict.get(prefix + "group.weight")
        mlp = state_dict.get(prefix + "group_mlps.0.0.weight")
        stored_groups = None if group is None else group.shape[0]
        stored_mlp = 0 if mlp is None else mlp.shape[0]
        if group is not None and (
            stored_groups != self.codec.head_sizes[0] or stored_mlp != self.group_mlp_dim
        ):
            raise ValueError(
                f"checkpoint's MHC output layer has {stored_groups} top-level groups and group MLP width "
                f"{stored_mlp}, this model {self.codec.head_sizes[0]} and {self.group_mlp_dim} "
                f"(head sizes {list(self.codec.head_sizes)}): pass the checkpoint's shape, e.g. "
                f"--model-overrides \"{{'mhe_groups': 0, 'mhe_group_mlp_dim': {stored_mlp}}}\" for one trained "
                f"with balanced levels"
            )
        return state_dict

    def output_layer(self, features: torch.Tensor) -> torch.Tensor:
        """Features (..., d) -> the head's exact full-vocabulary log-probs (..., |V|) (inference only)."""
        if self.decode_top and not torch.is_grad_enabled():
            keep = torch.tensor([self.dictionary.eos(), self.dictionary.unk()], device=features.device)
            out = self.output_projection.pruned_log_prob(features, self.decode_top, keep=keep)
        else:
            out = self.output_projection.log_prob(features)
        if not torch.is_grad_enabled():  # remembered (weakly: the head reuses a buffer nobody holds) so
            col = self._probe_column()  # get_normalized_probs can skip work
            self._last_output = (weakref.ref(out), out[..., col].clone())
        return out

    def _probe_column(self) -> int:
        """A column that is always finite: EOS under pruning (computed exactly), else the first."""
        return self.dictionary.eos() if self.decode_top else 0

    def _already_normalized(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is (a slice of) the last ``output_layer`` result divided by a temperature of 1.

        fairseq's generator always divides the step's output in place by ``--temperature`` before asking
        for normalised log-probs. The same storage with the first column (a finite, non-zero log-prob)
        unchanged means it divided by 1: the log-probs are already normalised, and the log-softmax, a full
        pass of exp/log over |V| per beam step, is skipped. Anything else is normalised as before.
        """
        last = getattr(self, "_last_output", None)
        out = None if last is None else last[0]()
        if out is None or x.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            return False
        probe = last[1]
        if x.dim() != out.dim() or x.shape[:-2] != out.shape[:-2] or x.shape[-1] != out.shape[-1]:
            return False
        now = x[..., self._probe_column()]
        before = probe[..., -x.shape[-2] :]
        usable = torch.isfinite(before) & before.ne(0)
        return bool(usable.any()) and bool(torch.equal(now[usable], before[usable]))

    def get_normalized_probs_scriptable(self, net_output, log_probs: bool, sample=None) -> torch.Tensor:
        """Full-vocabulary (log-)probs: log-softmax of the output layer's log-probs (the identity at
        temperature 1, skipped then; exact tempering p^(1/T) after the generator's ``decoder_out / T``)."""
        x = net_output[0]
        normalized = x.dtype == torch.float32 and self._already_normalized(x)
        if self.decode_top and not normalized:  # renormalising a pruned distribution would change it
            raise RuntimeError(
                "MHC pruned decoding got scores that are not the output layer's own log-probs (tempered or "
                "copied); decode with --model-overrides \"{'mhe_decode_pruning': 'off'}\""
            )
        out = x if normalized else F.log_softmax(x.float(), dim=-1)
        return out if log_probs else out.exp()


@register_model("transformer_mhe")
class TransformerMHEModel(TransformerModel):
    """Transformer NMT model with a Multi-Head-Encoding (MHP) output layer over the target vocabulary."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument("--mhe-heads", type=int, metavar="H", help="number of MHE heads (default 2)")
        parser.add_argument(
            "--mhe-method",
            choices=METHODS,
            help="mhp = product of heads (rank-1 over the digit grid; fewest params); mhc = cascade / "
            "class-based softmax, exact factorisation p(group) p(token | group) (default mhc, the benchmark's recommendation)",
        )
        parser.add_argument(
            "--mhe-hidden-dim",
            type=int,
            metavar="D",
            help="mhc only: width of the query and token embeddings (default --decoder-embed-dim, tieable)",
        )
        parser.add_argument(
            "--mhe-group-mlp-dim",
            type=int,
            metavar="W",
            help="mhc only: width of a GELU MLP added to the group scores (0 = linear group layer, the "
            "paper's); a group's log-mass is a log-sum-exp of its tokens' scores, which a linear layer "
            "only approximates (default: --decoder-ffn-embed-dim)",
        )
        parser.add_argument(
            "--mhe-groups",
            type=int,
            metavar="G",
            help=f"mhc only: G frequency bins of ceil(|V|/G) tokens (two levels; 0 = balanced --mhe-heads "
            f"levels; --mhe-head-sizes overrides; default {MHC_GROUPS})",
        )
        parser.add_argument(
            "--mhe-shortlist",
            type=int,
            metavar="K",
            help="mhc only: the K most frequent tokens (or the first K of --mhe-label-order) are leaves "
            "of the root softmax beside the tail's groups, as adaptive softmax's head cluster; only the "
            "tail is factorised p(group) p(token | group) (default: by |V|, see docs/fairseq.md)",
        )
        parser.add_argument(
            "--mhe-label-order",
            type=str,
            metavar="FILE",
            help="mhc only: the target tokens in tree order, one per line (short list first, then the "
            "tail group by group), e.g. from python -m fairseq_ext.grouping; stored in the checkpoint, "
            "so decoding does not need the file (default: dictionary order = frequency bins)",
        )
        parser.add_argument(
            "--mhe-decode-pruning",
            choices=PRUNING_CHOICES,
            help="mhc only: auto = beam search computes each hypothesis's 2 x beam + 3 best tokens exactly "
            "and skips the tail groups that cannot hold one (the same search; it saves work only when most "
            "groups fall below the bound, e.g. many small groups: on the en-de cascades, 10 groups, nearly "
            "all stay live, so it is off by default); off = the full distribution every step. Sampling, "
            "tempering, prefixes, constraints, LM fusion, ensembles and --score-reference always get the "
            "full one (default off)",
        )
        parser.add_argument(
            "--mhe-head-sizes",
            type=str,
            metavar="C1,C2,..",
            help="explicit head sizes, product >= |target dict| (default: balanced for --mhe-heads)",
        )

    @classmethod
    def build_model(cls, args, task):
        method = getattr(args, "mhe_method", None) or DEFAULT_METHOD
        if method not in METHODS:
            raise ValueError(f"--mhe-method must be one of {METHODS}, got {method!r}")
        if (
            method == "mhp"
            and getattr(args, "share_decoder_input_output_embed", False)
            and not getattr(args, "share_all_embeddings", False)
        ):
            raise ValueError(
                "--share-decoder-input-output-embed is not meaningful for transformer_mhe --mhe-method mhp: the "
                "product layer has sum(C_h) digit outputs, not one per target word, so it cannot be tied to the "
                "embedding. Drop the flag (--share-all-embeddings still shares the encoder/decoder input "
                "embeddings) or use --mhe-method mhc, whose token embeddings are tied."
            )
        if getattr(args, "adaptive_softmax_cutoff", None):
            raise ValueError(
                "transformer_mhe: --adaptive-softmax-cutoff cannot be combined with an MHE output layer"
            )
        model = super().build_model(args, task)
        codec = model.decoder.codec
        logger.info(
            "MHE output layer (%s): |V|=%d -> heads %s (%d outputs, %d params not shared with the embeddings)",
            method,
            codec.num_labels,
            list(codec.head_sizes),
            sum(codec.head_sizes),
            output_layer_params(model.decoder),
        )
        return model

    def prepare_for_inference_(self, cfg) -> None:
        """fairseq-generate / -interactive: turn on pruned decoding for a plain beam search of a translation
        task (:mod:`fairseq_ext.pruned_decoding`)."""
        super().prepare_for_inference_(cfg)
        task = str(getattr(getattr(cfg, "task", None), "_name", "") or "")
        mode = getattr(getattr(self, "args", None), "mhe_decode_pruning", None) or "off"
        if self.decoder.method == "mhc" and task.startswith("translation"):
            self.decoder.decode_top = decode_top(cfg, mode)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        codec = codec_from_args(args, len(tgt_dict))
        method = getattr(args, "mhe_method", None) or DEFAULT_METHOD
        group_mlp_dim = getattr(args, "mhe_group_mlp_dim", None)
        if group_mlp_dim is None:  # MHC default: as wide as the decoder FFN; nothing for MHP
            group_mlp_dim = cfg.decoder.ffn_embed_dim if method == "mhc" else 0
        return TransformerMHEDecoder(
            cfg,
            tgt_dict,
            embed_tokens,
            codec,
            no_encoder_attn=cfg.no_cross_attention,
            method=method,
            hidden_dim=getattr(args, "mhe_hidden_dim", None),
            group_mlp_dim=int(group_mlp_dim),
            shortlist=shortlist_from_args(args, len(tgt_dict)),
            label_order=getattr(args, "mhe_label_order", None) if method == "mhc" else None,
        )


def output_layer_params(decoder) -> int:
    """Parameters of the output layer that are not the decoder's input embeddings (tied leaves count 0)."""
    shared = {p.data_ptr() for p in decoder.embed_tokens.parameters()}
    return sum(p.numel() for p in decoder.output_projection.parameters() if p.data_ptr() not in shared)


def _mhe_defaults(args) -> None:
    args.mhe_heads = getattr(args, "mhe_heads", None) or 2
    args.mhe_head_sizes = getattr(args, "mhe_head_sizes", None)
    args.mhe_method = getattr(args, "mhe_method", None) or DEFAULT_METHOD
    args.mhe_hidden_dim = getattr(args, "mhe_hidden_dim", None)
    args.mhe_group_mlp_dim = getattr(args, "mhe_group_mlp_dim", None)  # None: method's default
    if getattr(args, "mhe_groups", None) is None:
        args.mhe_groups = MHC_GROUPS
    args.mhe_label_order = getattr(args, "mhe_label_order", None)
    args.mhe_decode_pruning = getattr(args, "mhe_decode_pruning", None) or "off"
    if getattr(args, "mhe_shortlist", None) is None:
        args.mhe_shortlist = None  # resolved per |V| by shortlist_from_args


@register_model_architecture("transformer_mhe", "transformer_mhe")
def transformer_mhe(args) -> None:
    _mhe_defaults(args)
    base_architecture(args)


@register_model_architecture("transformer_mhe", "transformer_mhe_iwslt_de_en")
def transformer_mhe_iwslt_de_en(args) -> None:
    _mhe_defaults(args)
    transformer_iwslt_de_en(args)
