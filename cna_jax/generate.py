"""Batched greedy decoding with a KV cache and a neuron multiplier at every position, in one jit.

Prompts are left-padded; rotary positions come from the padding mask. A prefill writes the prompt into
the cache, then a ``lax.while_loop`` decodes until every row has produced an EOS or ``max_new_tokens``.
The multiplier, tokens and cache are traced arguments: a new mask or new prompts of the same bucketed
shape never recompile.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cna_jax import engine
from cna_jax.lm import LM, split_shared_prefix
from cna_jax.models.config import ModelConfig
from cna_jax.models.llama import Decoder, KVCache, constrain_cache, padding_positions, prefix_cache


def greedy_generate_fn(params, tokens, valid, neuron_mult, eos_ids, prefix_tokens=None, *, cfg: ModelConfig,
                       dtype=jnp.float32, max_new_tokens: int = 150):
    """Greedy continuation of left-padded prompts.

    tokens, valid: [B, T]; neuron_mult: [L, I] or None; eos_ids: [E] int (at least one).
    prefix_tokens: None, or [Q] int tokens that precede *every* row (a shared chat-template header):
      run once at batch 1 (same multiplier) and copied into the first Q cache slots of every row; the
      rows ``tokens`` (left-padded suffixes) continue at rotary positions Q, Q+1, ... .
    Returns (new_tokens [B, N] int32 — after a row's EOS the EOS id repeats —, num_generated [B] int32,
    counting the EOS).
    """
    model = Decoder(cfg, dtype)
    b, t = tokens.shape
    n = max_new_tokens
    q = 0 if prefix_tokens is None else prefix_tokens.shape[0]
    slots = q + t + n
    cache = KVCache.zeros(cfg, b, slots, dtype)
    if q:
        pre = prefix_cache(model, params, prefix_tokens, neuron_mult)  # [L, 1, K, Q, D]
        cache = KVCache(*(constrain_cache(jax.lax.dynamic_update_slice(
            c, jnp.broadcast_to(p, p.shape[:1] + (b,) + p.shape[2:]).astype(c.dtype), (0, 0, 0, 0, 0)))
            for c, p in zip(cache, pre)))
    kv_valid = jnp.concatenate([jnp.ones((b, q), bool), valid, jnp.ones((b, n), bool)], axis=1)  # [B, S]
    slot_ids = jnp.arange(slots)

    prefill_mask = (slot_ids[None, None, :] <= (q + jnp.arange(t))[None, :, None]) & kv_valid[:, None, :]
    last = jnp.full((b, 1), t - 1, jnp.int32)
    out = model.apply({"params": params}, tokens, q + padding_positions(valid), prefill_mask, neuron_mult,
                      cache, q, select=last)
    first = jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32)
    prompt_len = q + valid.sum(axis=1).astype(jnp.int32)  # [B]: rotary position of the first new token

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    def cond(state):
        i, _, _, _, done = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, cache, tok, generated, done = state
        generated = generated.at[:, i].set(tok)
        done = done | is_eos(tok)
        mask = (kv_valid & (slot_ids <= q + t + i))[:, None, :]  # [B, 1, S]
        step = model.apply({"params": params}, tok[:, None], (prompt_len + i)[:, None], mask, neuron_mult,
                           cache, q + t + i)
        nxt = jnp.argmax(step.logits[:, 0], axis=-1).astype(jnp.int32)
        # Finished rows keep emitting their EOS so outputs are well defined.
        nxt = jnp.where(done, tok, nxt)
        return i + 1, step.cache, nxt, generated, done

    generated = jnp.zeros((b, n), jnp.int32)
    state = (jnp.int32(0), out.cache, first, generated, jnp.zeros((b,), bool))
    i, _, _, generated, done = jax.lax.while_loop(cond, body, state)
    # Rows end at their first EOS (counted); steps after it, or never taken, repeat the row's last token.
    steps = jnp.arange(n)[None, :]
    stop = jnp.any(generated[..., None] == eos_ids, axis=-1) & (steps < i)
    num = jnp.where(jnp.any(stop, axis=1), jnp.argmax(stop, axis=1) + 1, i).astype(jnp.int32)
    last_tok = jnp.take_along_axis(generated, jnp.maximum(num - 1, 0)[:, None], axis=1)
    generated = jnp.where(steps < num[:, None], generated, last_tok)
    return generated, num


# The jitted entry point; ``greedy_generate_fn`` stays available for jit with explicit shardings.
greedy_generate = jax.jit(greedy_generate_fn, static_argnames=("cfg", "dtype", "max_new_tokens"))


@dataclasses.dataclass
class Generations:
    """Generated texts and tokens, one per prompt."""

    prompts: list[str]
    texts: list[str]
    tokens: list[list[int]]  # up to and including the EOS


# Suffix batches are bucketed to multiples of this (finer than the default 32: suffixes are short;
# coarser than collection's 8 because each generation shape costs a longer compile).
GENERATE_LENGTH_MULTIPLE = 16


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
