"""Contrastive Neuron Attribution: rank neurons by mean(harmful) - mean(harmless), keep a global top-k."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from cna_jax.collect import collect
from cna_jax.lm import LM
from cna_jax.models.config import ModelConfig
from cna_jax.neurons import NeuronSet

MIN_ABS_DELTA = 1e-6  # docs/METHOD.md §1.4: neurons with |delta| <= 1e-6 are never selected


def default_k(cfg: ModelConfig, fraction: float = 0.001) -> int:
    """ceil(fraction * layers * intermediate_size), all layers counted (reproduces the seed's counts)."""
    return cfg.default_cna_k(fraction)


def select_neurons(delta: np.ndarray, k: int, exclude_layers: Iterable[int] = (0, 1), positive_only: bool = False,
                   exclude_mask: np.ndarray | None = None, meta: dict | None = None) -> NeuronSet:
    """One global top-k by |delta| over all (layer, neuron) pairs.

    delta: [L, I] signed mean difference; exclude_mask: [L, I] bool of neurons never to select
    (e.g. universal neurons). Ties are broken by flat index so the result is deterministic.
    """
    delta = np.asarray(delta, np.float64)
    if delta.ndim != 2:
        raise ValueError(f"delta must be [layers, neurons], got shape {delta.shape}")
    num_layers, size = delta.shape
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    score = np.abs(delta)
    eligible = score > MIN_ABS_DELTA
    excluded = [l for l in exclude_layers if 0 <= l < num_layers]
    eligible[excluded] = False
    if positive_only:
        eligible &= delta > 0
    if exclude_mask is not None:
        eligible &= ~np.asarray(exclude_mask, bool)
    if not np.isfinite(delta[eligible]).all():
        raise ValueError("delta has non-finite values among eligible neurons")
    n_eligible = int(eligible.sum())
    if k > n_eligible:
        raise ValueError(f"k={k} exceeds the {n_eligible} eligible neurons")
    flat = np.where(eligible.ravel(), score.ravel(), -np.inf)
    top = np.lexsort((np.arange(flat.size), -flat))[:k]  # by score desc, then index
    layers, idx = np.divmod(top, size)
    return NeuronSet(layers.astype(np.int64), idx.astype(np.int64), delta.ravel()[top].astype(np.float32),
                     num_layers, size, dict(meta or {}, k=k, exclude_layers=sorted(excluded),
                                           positive_only=positive_only))


def universal_neurons(lm: LM, neutral_prompts: Sequence[str], top: int = 20, frac: float = 0.8,
                      batch_size: int = 16) -> np.ndarray:
    """[L, I] bool: neurons in their layer's top-``top`` |activation| at the last token for >= ``frac``
    of the neutral prompts (raw text, no chat template)."""
    cfg = lm.cfg
    raw = dataclasses.replace(lm, chat=False)
    acts = collect(raw, neutral_prompts, nodes="all", batch_size=batch_size, progress=False)
    a = np.abs(acts.node_acts).reshape(-1, cfg.num_hidden_layers, cfg.intermediate_size)  # [P, L, I]
    top = min(top, cfg.intermediate_size)
    kth = np.partition(a, -top, axis=-1)[..., -top:].min(-1, keepdims=True)
    hits = (a >= kth).mean(0)
    return hits >= frac


NEUTRAL_PROMPTS = (
    "The weather today is", "Once upon a time", "The capital of France is", "In mathematics, a prime number",
    "My favourite recipe for bread", "The history of the printing press", "Water boils at", "A good book to read",
    "The train leaves the station at", "Photosynthesis is the process",
)


def keeps_dense(lm: LM, n_prompts: int, cache_dir: str | None, position: str = "last",
                dense_bytes: int = 1 << 30) -> bool:
    """Whether :func:`discover` keeps every neuron's activation for a set of ``n_prompts`` prompts: with a
    cache, last-token rows, and at most ``dense_bytes`` (rows x all neurons x 4 bytes)."""
    return cache_dir is not None and position == "last" and n_prompts * lm.cfg.num_neurons * 4 <= dense_bytes


def discover(lm: LM, harmful: Sequence[str], harmless: Sequence[str], k: int = -1, fraction: float = 0.001,
             exclude_layers: Iterable[int] = (0, 1), positive_only: bool = False, drop_universal: bool = False,
             position: str = "last", last_k: int = 1, batch_size: int = 32, cache_dir: str | None = None,
             progress: bool = True, dense_bytes: int = 1 << 30, residuals: bool = False
             ) -> tuple[NeuronSet, np.ndarray]:
    """Collects both prompt sets and returns (the CNA neuron set, delta [L, I]).

    With a cache_dir and small enough sets (rows x all neurons x 4 bytes <= dense_bytes per set), every
    neuron's per-prompt activation is kept in the cache, so a later ``collect`` of any neuron subset of
    the same prompts is a column slice instead of another pass through the model. residuals: the
    collections also keep the residual stream at each row (``collect``'s ``residuals``; with a cache_dir,
    a later request for them is served from the cache)."""
    if not harmful or not harmless:
        raise ValueError("CNA needs non-empty harmful and harmless prompt sets")
    dense = keeps_dense(lm, max(len(harmful), len(harmless)), cache_dir, position, dense_bytes)
    kw = dict(position=position, last_k=last_k, batch_size=batch_size, cache_dir=cache_dir, progress=progress,
              nodes="all" if dense else None, residuals=residuals)
    mean_h = collect(lm, harmful, desc="collecting harmful", also=[harmless], **kw).mean
    mean_b = collect(lm, harmless, desc="collecting harmless", **kw).mean
    delta = mean_h - mean_b
    k = default_k(lm.cfg, fraction) if k in (-1, None) else int(k)
    exclude = universal_neurons(lm, NEUTRAL_PROMPTS) if drop_universal else None
    meta = {"model": lm.name, "n_harmful": len(harmful), "n_harmless": len(harmless), "position": position,
            "drop_universal": drop_universal}
    return select_neurons(delta, k, exclude_layers, positive_only, exclude, meta), delta
