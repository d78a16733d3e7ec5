"""When fairseq's beam search may use the cascade's pruned distribution (``MHCHead.pruned_log_prob``).

fairseq's ``BeamSearch`` keeps the best 2 x beam continuations of each sentence over all its hypotheses, so
each hypothesis contributes at most its own best 2 x beam tokens: with those exact, the search is the same
search. The generator then bans pad (always) and EOS (before ``--min-len``) and may lower UNK (``--unkpen``),
hence 3 more per row; it forces EOS at the length limit, so EOS is always computed exactly.

Everything that reads other entries of the distribution - sampling, a temperature, prefixes, constraints,
n-gram blocking, diverse beams, LM fusion, scoring a reference, an ensemble's averaged log-probs - gets the
full distribution, and the log names why.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BANNED_PER_STEP = 3  # pad, EOS before --min-len, UNK under --unkpen
CHOICES = ("auto", "off")


def _reasons(generation, common_eval) -> list[str]:
    g = generation
    checks = {
        "--sampling": getattr(g, "sampling", False),
        "--temperature != 1": getattr(g, "temperature", 1.0) != 1.0,
        "--prefix-size": getattr(g, "prefix_size", 0) > 0,
        "--constraints": getattr(g, "constraints", None) is not None,
        "--no-repeat-ngram-size": getattr(g, "no_repeat_ngram_size", 0) > 0,
        "--diverse-beam-groups": getattr(g, "diverse_beam_groups", -1) > 0,
        "--diversity-rate": getattr(g, "diversity_rate", -1.0) > 0,
        "--lm-path": getattr(g, "lm_path", None) is not None,
        "--score-reference": getattr(g, "score_reference", False),
        "--retain-iter-history/--iter-decode": getattr(g, "retain_iter_history", False),
        "an ensemble (several --path)": ":" in str(getattr(common_eval, "path", None) or ""),
    }
    return [name for name, on in checks.items() if on]


def decode_top(cfg, mode: str) -> int:
    """How many top labels per hypothesis the output layer must keep exact (0: the full distribution)."""
    if mode not in CHOICES:
        raise ValueError(f"--mhe-decode-pruning must be one of {CHOICES}, got {mode!r}")
    generation = getattr(cfg, "generation", None)
    if mode == "off" or generation is None:
        return 0
    reasons = _reasons(generation, getattr(cfg, "common_eval", None))
    if reasons:
        logger.info("MHC pruned decoding off (full distribution): %s", ", ".join(reasons))
        return 0
    beam = int(getattr(generation, "beam", 5))
    top = 2 * beam + BANNED_PER_STEP
    logger.info("MHC pruned decoding: each hypothesis's top %d tokens exact (beam %d)", top, beam)
    return top
