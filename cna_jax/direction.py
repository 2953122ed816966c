"""Residual-stream directions (the refusal-direction baseline, docs/METHOD.md §5.1).

* :func:`residual_means` -- the mean residual stream entering every decoder layer at the last prompt
  token, ``[L, E]``;
* :func:`refusal_directions` -- harmful minus harmless means per layer (unnormalised) and their norms;
* :func:`select_direction_layer` -- among the middle 20-80% of layers, the one whose directional
  ablation gives the lowest refusal rate on held-out *training* prompts: every candidate layer x every
  prompt is one row of a single engine job.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cna_jax.models.config import ModelConfig
from cna_jax.models.llama import Decoder, causal_mask, padding_positions


# Length buckets of the residual means' batches (every padded position runs through every layer): the testbed's
# chat prompts of 34-49 tokens pad to 40-56 in 8-token steps, to 64 in padded_batches' default 32-token steps.
RESIDUAL_LENGTH_MULTIPLE = 8


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def last_token_residuals(params, tokens, valid, *, cfg: ModelConfig, dtype=jnp.float32):
    """The residual entering each layer at the last position of left-padded rows.

    tokens, valid: [B, T] (left padding, so every row's last token is at T - 1).
    Returns [L, B, E] float32."""
    b, t = tokens.shape
    out = Decoder(cfg, dtype).apply({"params": params}, tokens, padding_positions(valid), causal_mask(valid),
                                    select=jnp.full((b, 1), t - 1, jnp.int32), return_logits=False,
                                    return_residuals=True)
    return out.residuals[:, :, 0].astype(jnp.float32)


def residual_means(lm, prompts: Sequence[str], batch_size: int = 32, ids: Sequence[Sequence[int]] | None = None,
                   progress: bool = False, desc: str = "residual means") -> np.ndarray:
    """Mean over prompts of the residual stream entering each decoder layer (HF ``hidden_states[l]``) at
    the last prompt token, the prompts formatted by ``lm.encode`` (chat template for instruct models).

    ids: token lists to use instead of encoding ``prompts`` (a model without a tokenizer); progress: a bar
    over the batches.
    Returns [L, E] float64 (summed in float64 on the host, so the batch order does not matter)."""
    from cna_jax.batching import padded_batches

    if ids is None:
        ids = lm.encode(list(prompts))
    if not len(ids):
        raise ValueError("residual_means needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = lm.pad_id() if lm.tokenizer is not None else 0
    total = np.zeros((lm.cfg.num_hidden_layers, lm.cfg.hidden_size), np.float64)
    for rows, tokens, valid in padded_batches(ids, batch_size, pad, multiple=lm.batch_multiple(),
                                               length_multiple=RESIDUAL_LENGTH_MULTIPLE, progress=progress, desc=desc):
        if lm.layout is not None:  # rows split over the batch axes (plain arrays would run whole on every device)
            tokens, valid = lm.global_batch(tokens, valid)
        res = lm.to_host(last_token_residuals(lm.params, tokens, valid, cfg=lm.cfg, dtype=lm.dtype))
        total += res[:, :len(rows)].astype(np.float64).sum(axis=1)  # filler rows (beyond len(rows)) dropped
    return total / len(ids)


def refusal_directions(lm, harmful: Sequence[str], harmless: Sequence[str], batch_size: int = 32
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer difference of mean residuals, harmful minus harmless, at the last prompt token.

    Returns (directions [L, E] float64, unnormalised; norms [L]). The engine normalises a direction
    when it is used in a :class:`cna_jax.engine.Condition`."""
    if not harmful or not harmless:
        raise ValueError("refusal_directions needs harmful and harmless prompts (one set is empty)")
    diff = residual_means(lm, harmful, batch_size) - residual_means(lm, harmless, batch_size)
    return diff, np.linalg.norm(diff, axis=1)


def candidate_layers(num_layers: int) -> list[int]:
    """Layers l with 0.2 <= l / L <= 0.8 (integer arithmetic, so 0.8 * L is exact)."""
    return [l for l in range(num_layers) if 5 * l >= num_layers and 5 * l <= 4 * num_layers]


def select_direction_layer(lm, directions: np.ndarray, harmful_heldout: Sequence[str], *,
                           layers: Sequence[int] | None = None, detector: str = "regex",
                           max_new_tokens: int = 64, slots: int = 32, ids: Sequence[Sequence[int]] | None = None,
                           decode=None, eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
                           stop_when_scored: bool = True, progress: bool = False) -> tuple[int, dict[int, float]]:
    """The layer whose direction's ablation gives the lowest refusal rate on held-out harmful prompts.

    directions: [L, E] (from :func:`refusal_directions`); harmful_heldout: the held-out slice of the
    *training* harmful prompts (never the evaluation prompts); layers: candidates (default
    :func:`candidate_layers`, the middle 20-80% of depth); detector: a scorer spec
    (``cna_jax.refusal.scorer_from_spec``). ids / decode: token lists and an ids -> text function for a
    model without a tokenizer (default ``lm.encode`` / ``lm.decode``); eos_ids / pad_id: as in
    :func:`cna_jax.engine.run` (default: the tokenizer's); stop_when_scored: a row ends once its refusal
    flag can no longer change (``refusal.settled_rule(detector, quality=False)``; the rates are the same);
    progress: a bar over the job's rows.
    Every candidate x prompt is a row of ONE engine job (one condition per candidate).
    Returns (best layer, {layer: refusal rate}); ties go to the lower layer.
    """
    from cna_jax import engine
    from cna_jax.batching import split_shared_prefix
    from cna_jax.refusal import refusal_report, scorer_from_spec, settled_stop

    L, E = lm.cfg.num_hidden_layers, lm.cfg.hidden_size
    directions = np.asarray(directions)
    if directions.shape != (L, E):
        raise ValueError(f"directions has shape {directions.shape}, expected {(L, E)}")
    layers = candidate_layers(L) if layers is None else [int(l) for l in layers]
    if not layers:
        raise ValueError("no candidate layers")
    bad = [l for l in layers if not 0 <= l < L]
    if bad:
        raise ValueError(f"direction layer(s) {bad} out of range [0, {L})")
    norms = np.linalg.norm(directions[layers], axis=1)
    if not np.all(np.isfinite(norms) & (norms > 0)):
        raise ValueError(f"directions at layers {[l for l, n in zip(layers, norms) if not n > 0]} are zero or "
                         "not finite")
    scorer_from_spec(detector)  # fail before generating
    if ids is None:
        if not harmful_heldout:
            raise ValueError("select_direction_layer needs held-out harmful prompts (got none)")
        ids = lm.encode(list(harmful_heldout))
    byte_level = decode is None and lm.byte_level_decode  # a caller's own decode: the generic settled text
    decode = lm.decode if decode is None else decode
    prefix, suffixes, _ = split_shared_prefix(ids)
    conditions = [engine.Condition(direction=directions[l], ablate=True) for l in layers]
    rows = [(list(s), c) for c in range(len(layers)) for s in suffixes]
    settled = settled_stop(detector, decode, quality=False, byte_level=byte_level) if stop_when_scored else None
    out = engine.run(lm, rows, conditions, max_new_tokens=max_new_tokens, slots=slots, eos_ids=eos_ids,
                     pad_id=pad_id, prefix=None if prefix is None else np.asarray(prefix).tolist(),
                     stop=None if settled is None else lambda r, tokens: settled(tokens),
                     progress=progress, desc="direction layers")
    n = len(suffixes)
    rates = {}
    for c, layer in enumerate(layers):
        texts = [decode(t) for t in out[c * n:(c + 1) * n]]
        rates[layer] = refusal_report(texts, detector=detector).rate
    best = min(layers, key=lambda l: (rates[l], l))
    return best, rates
