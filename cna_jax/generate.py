"""Greedy generations for a prompt set under one neuron multiplier: one condition through the engine
(:mod:`cna_jax.engine`, continuous batching with a KV cache, on one device or sharded on the model's
layout), with the prompts' shared chat-template prefix computed once.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from cna_jax import engine
from cna_jax.batching import split_shared_prefix
from cna_jax.lm import LM


@dataclasses.dataclass
class Generations:
    """Generated texts and tokens, one per prompt."""

    prompts: list[str]
    texts: list[str]
    tokens: list[list[int]]  # up to and including the EOS


# Prefill length buckets of one generate() call: suffixes up to 32 tokens (most chat prompts after the
# shared header) share one compiled prefill. A call is short, so each extra bucket's compile (~10 s for
# SmolLM2's 30 layers on a CPU core) costs more than padding; the study's long jobs use the finer
# engine.JOB_LENGTH_MULTIPLE.
GENERATE_LENGTH_MULTIPLE = 32


def generate(lm: LM, prompts: Sequence[str], neuron_mult: np.ndarray | None = None, max_new_tokens: int = 150,
             batch_size: int = 32, progress: bool = True, desc: str = "generating",
             share_prefix: bool = True) -> Generations:
    """Greedy generations for any number of prompts under one neuron multiplier ``[L, I]`` (or none).

    Runs the continuous-batching engine (:func:`cna_jax.engine.run`) with one condition and
    ``batch_size`` slots. share_prefix: with >= 2 prompts, the longest token prefix all encoded prompts
    share (the chat template's header, typically) runs once and every row continues from its keys and
    values: the same computation under causal attention, so the same greedy tokens up to float rounding.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to generate from")
    ids = lm.encode(prompts)
    prefix, rows_ids, _ = split_shared_prefix(ids, share=share_prefix)
    toks = engine.run(lm, [(r, 0) for r in rows_ids], [engine.Condition(neuron_mult=neuron_mult)],
                      max_new_tokens=max_new_tokens, slots=batch_size,
                      prefix=None if prefix is None else np.asarray(prefix).tolist(), progress=progress, desc=desc,
                      length_multiple=GENERATE_LENGTH_MULTIPLE)
    return Generations(prompts, [lm.decode(t) for t in toks], toks)
