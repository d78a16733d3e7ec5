"""Label-order files for ``transformer_mhe --mhe-method mhc``: which target tokens form the cascade's short
list and how its tail is grouped, written from a binarised fairseq dataset.

``python -m fairseq_ext.grouping DATA_BIN -s en -t de --shortlist K --groups G --out order.txt``

The file lists every target-dictionary token once, by name, in tree order: the K most frequent target
tokens first (the root's short list), then the tail group by group. ``--method context`` (default) groups
the tail like a class-based language model: tokens that follow and precede the same tokens share a group
(their left/right neighbour distributions, Hellinger-embedded and reduced by a truncated SVD, clustered by
balanced k-means, :mod:`mhe_plugins.grouping`); ``--method frequency`` writes frequency bins. Pass the
file as ``--mhe-label-order``; the order is stored in the checkpoint, so decoding never needs the file.

``--dict-out DICT`` also writes the dictionary renumbered to that order (fairseq's 4 specials pinned at the
front of the short list, so they keep their ids). Binarised again with ``fairseq-preprocess --srcdict DICT``
(``--tgtdict`` without a joined dictionary), token id = tree position: the order file is then the identity
and decoding skips the per-step gather of |V| scores from tree order back to token ids (19 % of the
cascade's ``fairseq-generate`` time at 32k, profiled).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from mhe_plugins.grouping import cascade_order
from mhe_plugins.training import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "read_label_order",
    "set_label_order",
    "context_vectors",
    "target_stream",
    "renumbered_dictionary",
    "main",
]

CONTEXT_TOKENS = 512  # neighbours counted by identity (the most frequent ones); the rest share one column
SVD_DIM = 64


def read_label_order(path: str | Path, dictionary) -> list[int]:
    """Token ids in the order ``path`` lists them; every dictionary token exactly once, by name."""
    path = Path(path)
    ids, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            token = line.rstrip("\n").rstrip("\r")
            if token == "":
                raise ValueError(f"{path}:{line_no}: empty line (one target token per line)")
            idx = dictionary.indices.get(token)
            if idx is None:
                raise ValueError(f"{path}:{line_no}: token {token!r} is not in the target dictionary")
            if token in seen:
                raise ValueError(
                    f"{path}:{line_no}: token {token!r} listed again (first on line {seen[token]})"
                )
            seen[token] = line_no
            ids.append(idx)
    if len(ids) != len(dictionary):
        missing = [dictionary[i] for i in range(len(dictionary)) if dictionary[i] not in seen]
        raise ValueError(
            f"{path}: lists {len(ids)} tokens, the target dictionary has {len(dictionary)}; missing e.g. "
            f"{missing[:5]}"
        )
    return ids


def set_label_order(head, path: str | Path, dictionary) -> None:
    """Give an MHC head the order in ``path``; without the file (a model rebuilt for decoding elsewhere)
    the head waits for its checkpoint, which carries the order, and refuses to run until then."""
    if Path(path).is_file():
        head.set_label_order(read_label_order(path, dictionary))
        if not head.label_order.identity:
            logger.info(
                "--mhe-label-order %s is not the dictionary's order: every decoding step gathers |V| scores "
                "back to token ids; binarise with the dictionary from python -m fairseq_ext.grouping "
                "--dict-out to skip it",
                path,
            )
        return
    logger.warning("--mhe-label-order %s not found: the order must come from the checkpoint", path)
    head.label_order.expect_from_checkpoint()


def target_stream(data_bin: Path, src: str, tgt: str, dictionary, split: str = "train") -> list[np.ndarray]:
    """The binarised target sentences of ``split`` (token ids, each ending with eos)."""
    from fairseq.data import data_utils

    prefix = data_bin / f"{split}.{src}-{tgt}.{tgt}"
    data = data_utils.load_indexed_dataset(str(prefix), dictionary)
    if data is None:
        raise FileNotFoundError(f"{prefix}.bin/.idx missing: binarise with fairseq-preprocess first")
    return [data[i].numpy() for i in range(len(data))]


def context_vectors(sentences: list[np.ndarray], vocab: int, bos: int, seed: int = 0) -> np.ndarray:
    """(V, SVD_DIM) token vectors from the distributions of each token's left and right neighbours."""
    cols = CONTEXT_TOKENS + 1
    left = np.zeros((vocab, cols))
    right = np.zeros((vocab, cols))
    for sent in sentences:
        prev = np.concatenate([[bos], sent[:-1]])
        nxt = np.concatenate([sent[1:], [bos]])
        np.add.at(left, (sent, np.minimum(prev, CONTEXT_TOKENS)), 1.0)
        np.add.at(right, (sent, np.minimum(nxt, CONTEXT_TOKENS)), 1.0)
    feats = []
    for m in (left, right):
        total = m.sum(1, keepdims=True)
        feats.append(np.sqrt(m / np.maximum(total, 1.0)))  # Hellinger: sqrt of p(neighbour | token)
    x = torch.from_numpy(np.concatenate(feats, 1)).float()
    torch.manual_seed(seed)
    u, s, _ = torch.svd_lowrank(x - x.mean(0), q=min(SVD_DIM, x.shape[1] - 1), niter=4)
    return (u * s).numpy()


def renumbered_dictionary(dictionary, order) -> str:
    """The text of a fairseq dictionary file whose token ids follow ``order`` (``order[position] = id``,
    the specials first and in place: ``Dictionary.load`` adds them itself, so the file lists the rest)."""
    specials = list(range(dictionary.nspecial))
    if [int(i) for i in order[: len(specials)]] != specials:
        raise ValueError(
            f"the order must start with the {len(specials)} specials in id order to renumber the dictionary, "
            f"got {[dictionary[int(i)] for i in order[: len(specials)]]}"
        )
    return "".join(f"{dictionary[int(i)]} {dictionary.count[int(i)]}\n" for i in order[len(specials) :])


def main(argv: list[str] | None = None) -> None:
    from fairseq.data import Dictionary

    ap = argparse.ArgumentParser(prog="python -m fairseq_ext.grouping", description=__doc__.split("\n\n")[0])
    ap.add_argument("data_bin", type=Path, help="fairseq-preprocess output dir")
    ap.add_argument("-s", "--source-lang", required=True)
    ap.add_argument("-t", "--target-lang", required=True)
    ap.add_argument(
        "--shortlist", type=int, required=True, help="root short-list size K (as --mhe-shortlist)"
    )
    ap.add_argument("--groups", type=int, required=True, help="tail groups G (as --mhe-groups)")
    ap.add_argument("--method", choices=("context", "frequency"), default="context")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--dict-out",
        type=Path,
        help="also write the dictionary renumbered to the order (binarise with it: decoding needs no gather)",
    )
    a = ap.parse_args(argv)
    dict_path = a.data_bin / f"dict.{a.target_lang}.txt"
    if not dict_path.is_file():
        ap.error(f"{dict_path} missing: is {a.data_bin} a fairseq-preprocess output dir?")
    dictionary = Dictionary.load(str(dict_path))
    sentences = target_stream(a.data_bin, a.source_lang, a.target_lang, dictionary)
    counts = np.bincount(np.concatenate(sentences), minlength=len(dictionary)).astype(np.float64)
    vectors = None
    if a.method == "context":
        vectors = context_vectors(sentences, len(dictionary), dictionary.eos(), a.seed)
    try:
        first = range(dictionary.nspecial) if a.dict_out else ()
        order = cascade_order(counts, a.shortlist, a.groups, vectors, seed=a.seed, first=first)
    except ValueError as e:
        ap.error(str(e))
    atomic_write_text("".join(dictionary[int(i)] + "\n" for i in order), a.out)
    print(f"wrote {a.out}: {len(order)} tokens, short list {a.shortlist}, {a.method} groups")
    if a.dict_out:
        atomic_write_text(renumbered_dictionary(dictionary, order), a.dict_out)
        print(f"wrote {a.dict_out}: the dictionary in that order (binarise with it as --srcdict/--tgtdict)")


if __name__ == "__main__":
    main()
