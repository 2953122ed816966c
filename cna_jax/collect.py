"""MLP neuron activations (``silu(gate_proj(x)) * up_proj(x)``, the input of ``down_proj``) at chosen positions.

One jitted forward per batch returns, reduced on the device:
- running statistics over *all* neurons (sum and sum of squares ``[L, I]``), enough to rank every
  neuron without keeping every activation;
- for a chosen neuron set, the per-row matrix ``[rows, nodes]`` (a row is a prompt, or a token with
  ``position="all"`` / ``"last_k"``);
- on request, the residual stream entering every layer at the same rows ``[rows, L, E]`` (what the
  refusal direction is built from: the direction stage reads it from the cna stage's collection instead
  of running the same prompts through the same model again).
Results save with their metadata and are reused when the same inputs come again.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cna_jax import precompile
from cna_jax.batching import padded_batches, split_shared_prefix
from cna_jax.distributed import agree, barrier, is_writer
from cna_jax.lm import LM
from cna_jax.models.config import ModelConfig
from cna_jax.models.llama import Decoder, KVCache, causal_mask, padding_positions, prefix_cache
from cna_jax.sharding import Layout, ShardedFunction, forward_compiler_options

POSITIONS = ("last", "last_k", "all")


def collect_fn(params, tokens, valid, select, select_valid, neuron_mult, node_index, prefix_kv=None, *,
               cfg: ModelConfig, dtype=jnp.float32, residuals: bool = False):
    """Neuron statistics for one batch.

    tokens, valid: [B, T]; select: [B, P] int positions to read; select_valid: [B, P] bool (False for
    padding rows / positions, which then count nowhere); neuron_mult: [L, I] or None;
    node_index: [N] int into the flattened [L * I] neurons.
    prefix_kv: None, or the keys and values ``[L, 1, K, Q, D]`` of Q tokens that precede *every* row (a
      shared chat-template header; :func:`prefix_fn`, with the same multiplier): the rows ``tokens``
      (left-padded suffixes) continue from them at rotary positions Q, Q+1, ... . The prefix's own
      positions are never read: ``select`` indexes the suffix.
    residuals (static): also return the residual stream entering each layer at ``select`` (HF's
      ``hidden_states[l]``).
    Returns (sums [L, I] f32, sumsq [L, I] f32, node_acts [B, P, N] f32), and with ``residuals``
    a fourth, [B, P, L, E] f32.
    """
    model = Decoder(cfg, dtype)
    if prefix_kv is None:
        out = model.apply({"params": params}, tokens, padding_positions(valid), causal_mask(valid),
                          neuron_mult, select=select, return_logits=False, return_neurons=True,
                          return_residuals=residuals)
    else:
        out = _suffix_forward(model, params, tokens, valid, select, neuron_mult, prefix_kv, residuals)
    h = out.neurons.astype(jnp.float32)  # [L, B, P, I]
    w = select_valid.astype(jnp.float32)
    sums = jnp.einsum("lbpi,bp->li", h, w)
    sumsq = jnp.einsum("lbpi,bp->li", h * h, w)
    l, b, p, i = h.shape
    flat = jnp.moveaxis(h, 0, 2).reshape(b, p, l * i)  # [B, P, L*I]
    stats = (sums, sumsq, jnp.take(flat, node_index, axis=-1))
    return (stats + (jnp.moveaxis(out.residuals.astype(jnp.float32), 0, 2),)) if residuals else stats


def prefix_fn(params, prefix_tokens, neuron_mult, *, cfg: ModelConfig, dtype=jnp.float32) -> KVCache:
    """The ``prefix_kv`` of :func:`collect_fn`: keys and values ``[L, 1, K, Q, D]`` of the shared prefix
    ``prefix_tokens`` [Q] int, one batch-1 pass under ``neuron_mult`` [L, I] or None.

    A program of its own, run once per prompt set: inside every batch's program it was computed again per
    batch and compiled again with every batch shape (SmolLM2 at the study's shapes, one core: a batch's
    program compiled in 7.8 s with it, 4.2 s without; this one in 3.3 s, once)."""
    return prefix_cache(Decoder(cfg, dtype), params, prefix_tokens, neuron_mult)


def _suffix_forward(model, params, tokens, valid, select, neuron_mult, prefix_kv, residuals=False):
    """The suffix batch whose queries attend to the prefix's Q slots (``prefix_kv``) and causally to their own
    valid tokens."""
    q = prefix_kv.k.shape[3]
    b, t = tokens.shape
    mask = jnp.concatenate([jnp.ones((b, t, q), bool), causal_mask(valid)], axis=-1)  # [B, T, Q + T]
    return model.apply({"params": params}, tokens, q + padding_positions(valid), mask, neuron_mult,
                       select=select, return_logits=False, return_neurons=True, return_residuals=residuals,
                       prefix=prefix_kv)


@functools.cache
def _jits(platform: str) -> tuple[Callable, Callable]:
    """(collect_fn, prefix_fn) jitted for ``platform``'s default device."""
    options = forward_compiler_options(platform)
    return (jax.jit(collect_fn, static_argnames=("cfg", "dtype", "residuals"), compiler_options=options),
            jax.jit(prefix_fn, static_argnames=("cfg", "dtype"), compiler_options=options))


def collect_batch(*args, **kwargs):
    """:func:`collect_fn` jitted on the default device (XLA options: ``cna_jax.sharding.forward_compiler_options``)."""
    return _jits(jax.default_backend())[0](*args, **kwargs)


def collect_prefix(*args, **kwargs) -> KVCache:
    """:func:`prefix_fn` jitted on the default device (the same XLA options)."""
    return _jits(jax.default_backend())[1](*args, **kwargs)


@functools.lru_cache(maxsize=16)
def sharded_collect(cfg: ModelConfig, layout: Layout, dtype=jnp.float32, residuals: bool = False
                    ) -> ShardedFunction:
    """:func:`collect_fn` with the batch split over the layout's batch axes (use the ``collection``
    preset): ``(params, tokens, valid, select, select_valid [B,P], neuron_mult | None, node_index [N],
    prefix_kv | None) -> (sums [L,I], sumsq [L,I], node_acts [B,P,N][, residuals [B,P,L,E]])``. A
    shared prefix's keys and values (:func:`sharded_prefix`) are replicated; the batch-split rows read them."""
    in_sh = (layout.params(cfg, dtype), layout.batch(2), layout.batch(2), layout.batch(2), layout.batch(2),
             layout.sharding(("layers", "neurons")), layout.replicated(), layout.replicated())
    out_sh = (layout.sharding(("layers", "neurons")), layout.sharding(("layers", "neurons")), layout.batch(3))
    out_sh += (layout.batch(4),) if residuals else ()
    return ShardedFunction(collect_fn, layout, in_sh, out_sh, {"cfg": cfg, "dtype": dtype, "residuals": residuals},
                           compiler_options=forward_compiler_options(layout.platform))


@functools.lru_cache(maxsize=16)
def sharded_prefix(cfg: ModelConfig, layout: Layout, dtype=jnp.float32) -> ShardedFunction:
    """:func:`prefix_fn` on the mesh: ``(params, prefix_tokens [Q], neuron_mult | None) -> KVCache
    [L, 1, K, Q, D]``, replicated (a batch-1 pass cannot take the batch split)."""
    in_sh = (layout.params(cfg, dtype), layout.replicated(), layout.sharding(("layers", "neurons")))
    return ShardedFunction(prefix_fn, layout, in_sh, layout.replicated(), {"cfg": cfg, "dtype": dtype},
                           compiler_options=forward_compiler_options(layout.platform))


@dataclasses.dataclass
class Activations:
    """Collected statistics for one prompt set.

    sums, sumsq: [L, I] float64; count: number of rows (prompts or tokens) in the statistics;
    nodes: [N, 2] (layer, index) of the per-row matrix; node_acts: [rows, N] float32;
    row_prompt: [rows] the prompt each row came from; residuals: None, or [rows, L, E] float32, the
    residual stream entering each layer at each row (``collect(..., residuals=True)``).
    """

    sums: np.ndarray
    sumsq: np.ndarray
    count: int
    nodes: np.ndarray
    node_acts: np.ndarray
    row_prompt: np.ndarray
    meta: dict
    residuals: np.ndarray | None = None

    @property
    def mean(self) -> np.ndarray:
        return self.sums / max(self.count, 1)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.sumsq / max(self.count, 1) - self.mean ** 2, 0.0)

    def save(self, path: str) -> None:
        """Writes ``path`` (.npz) atomically, with the metadata as JSON inside."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        extra = {} if self.residuals is None else {"residuals": self.residuals}
        np.savez(tmp, sums=self.sums, sumsq=self.sumsq, count=self.count, nodes=self.nodes,
                 node_acts=self.node_acts, row_prompt=self.row_prompt, meta=json.dumps(self.meta), **extra)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Activations":
        with np.load(path) as z:
            return cls(z["sums"], z["sumsq"], int(z["count"]), z["nodes"], z["node_acts"], z["row_prompt"],
                       json.loads(str(z["meta"])), z["residuals"] if "residuals" in z.files else None)


def _select_positions(valid: np.ndarray, position: str, last_k: int):
    """Positions to read per row: [B, P] indices and [B, P] validity (left padding: the prompt ends at T-1)."""
    b, t = valid.shape
    if position == "last":
        return np.full((b, 1), t - 1, np.int32), valid[:, -1:].copy()
    if position == "last_k":
        sel = np.broadcast_to(np.arange(t - last_k, t, dtype=np.int32), (b, last_k)).copy()
        return sel, valid[:, t - last_k:].copy()
    if position == "all":
        return np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(), valid.copy()
    raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")


def all_nodes(cfg: ModelConfig) -> np.ndarray:
    """[L * I, 2] every (layer, index) pair, in flat order."""
    flat = np.arange(cfg.num_neurons)
    return np.stack(np.divmod(flat, cfg.intermediate_size), 1).astype(np.int64)


def _nodes_array(nodes, cfg: ModelConfig) -> np.ndarray:
    if nodes is None:
        return np.zeros((0, 2), np.int64)
    if isinstance(nodes, str):
        if nodes != "all":
            raise ValueError(f"nodes must be None, 'all', a NeuronSet or [N, 2] pairs, got {nodes!r}")
        return all_nodes(cfg)
    arr = np.asarray(nodes.pairs() if hasattr(nodes, "pairs") else nodes, np.int64).reshape(-1, 2)
    if len(arr) and (arr[:, 0].max() >= cfg.num_hidden_layers or arr[:, 1].max() >= cfg.intermediate_size
                     or arr.min() < 0):
        raise ValueError(f"node (layer, index) out of range for [{cfg.num_hidden_layers}, {cfg.intermediate_size}]")
    return arr


def cache_key(lm: LM, prompts: Sequence[str], position: str, last_k: int, nodes: np.ndarray,
              neuron_mult: np.ndarray | None) -> str:
    """Hash of everything the result depends on."""
    h = hashlib.sha256()
    h.update(json.dumps(lm.describe(), sort_keys=True, default=str).encode())
    h.update(json.dumps(list(prompts)).encode())
    h.update(f"{position}:{last_k}".encode())
    h.update(np.ascontiguousarray(nodes, np.int64).tobytes())
    if neuron_mult is not None:
        h.update(np.ascontiguousarray(neuron_mult, np.float32).tobytes())
    return h.hexdigest()[:16]


def _has_residuals(path: str) -> bool:
    with np.load(path) as z:  # reads the archive's index, not its arrays
        return "residuals" in z.files


# Suffix batches are bucketed to multiples of this (finer than the default 32: suffixes are short).
COLLECT_LENGTH_MULTIPLE = 8


def collect(lm: LM, prompts: Sequence[str], nodes=None, position: str = "last", last_k: int = 1,
            neuron_mult: np.ndarray | None = None, batch_size: int = 32, cache_dir: str | None = None,
            progress: bool = True, desc: str = "collecting", share_prefix: bool = True,
            also: Sequence[Sequence[str]] = (), residuals: bool = False) -> Activations:
    """Collects neuron statistics over ``prompts`` (formatted as ``lm`` formats them).

    nodes: None, "all", a NeuronSet or [N, 2] (layer, index) pairs for the per-row matrix.
    cache_dir: when given, a result for the same inputs is reused (and new results are saved there).
    share_prefix: with ``position`` "last" / "last_k" and >= 2 prompts, the longest token prefix all
      encoded prompts share (the chat template's system header, typically) is computed once, at batch 1
      (:func:`prefix_fn`), and the rows run only their own suffixes against its KV cache (``collect_fn``'s
      ``prefix_kv``). Causal attention makes this the same computation (equal up to float
      rounding), so it does not enter the cache key; ``meta["shared_prefix_tokens"]`` records the
      length (0 when unused). With ``position="all"`` the full prompts run as they are, since every
      prompt's prefix positions are rows of the result.
    also: prompt sets the caller collects next with the same settings: in a multi-process run their batch
      shapes' programs are compiled now, with this call's, spread over the processes
      (:func:`cna_jax.precompile.spread`); elsewhere ignored.
    residuals: also keep the residual stream entering each layer at every row (``Activations.residuals``,
      rows x L x E x 4 bytes: 69 KB a row for SmolLM2, 2.6 MB for a 70B model). The cache key does not
      include it: a cached result without residuals is collected again when they are asked for, and one
      with them serves every later request of the same inputs.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to collect activations from")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    cfg = lm.cfg
    node_arr = _nodes_array(nodes, cfg)
    flat_cols = node_arr[:, 0] * cfg.intermediate_size + node_arr[:, 1]  # into the flattened [L * I]
    key = cache_key(lm, prompts, position, last_k, node_arr, neuron_mult)
    path = None if cache_dir is None else os.path.join(cache_dir, f"activations-{key}.npz")
    # Cache decisions are process 0's (distributed.agree): every process must run the same collectives.
    usable = lambda p: agree(os.path.exists(p) and (not residuals or _has_residuals(p)))
    if path is not None and usable(path):
        return Activations.load(path)
    if cache_dir is not None:  # a cached all-neuron collection of the same inputs holds every column
        dense = os.path.join(cache_dir, f"activations-{cache_key(lm, prompts, position, last_k, all_nodes(cfg), neuron_mult)}.npz")
        if usable(dense):
            full = Activations.load(dense)
            return dataclasses.replace(full, nodes=node_arr, node_acts=full.node_acts[:, flat_cols],
                                       meta={**full.meta, "key": key, "sliced_from": full.meta["key"]})

    ids = lm.encode(prompts)
    if position == "last_k" and min(map(len, ids)) < last_k:
        raise ValueError(f"last_k={last_k} exceeds the shortest prompt ({min(map(len, ids))} tokens)")
    split = lambda ids: split_shared_prefix(ids, keep=last_k if position == "last_k" else 1,
                                            share=share_prefix and position != "all")
    prefix, rows_ids, shared = split(ids)
    node_index = jnp.asarray(flat_cols, jnp.int32)
    mult = lm.multiplier_array(neuron_mult)
    sums = np.zeros((cfg.num_hidden_layers, cfg.intermediate_size), np.float64)
    sumsq = np.zeros_like(sums)
    count = 0
    rows, row_prompt, row_res = [], [], []
    run = collect_batch if lm.layout is None else sharded_collect(cfg, lm.layout, lm.dtype, residuals)
    run_prefix = collect_prefix if lm.layout is None else sharded_prefix(cfg, lm.layout, lm.dtype)
    static = {"cfg": cfg, "dtype": lm.dtype, "residuals": residuals} if lm.layout is None else {}
    static_prefix = {"cfg": cfg, "dtype": lm.dtype} if lm.layout is None else {}

    def arrays(batch_rows, tokens, valid):  # -> (the rows' selected positions that count, the call's arrays)
        select, sel_valid = _select_positions(valid, position, last_k)
        sel_valid[len(batch_rows):] = False  # filler rows repeat a real prompt; they must not count
        batch = (tokens, valid, select, sel_valid)
        return sel_valid, batch if lm.layout is None else lm.global_batch(*batch)

    batches = lambda ids, progress: padded_batches(ids, batch_size, lm.pad_id(), progress, desc, lm.batch_multiple(),
                                                   COLLECT_LENGTH_MULTIPLE)
    if lm.layout is not None and jax.process_count() > 1:  # each process compiles a share of the batch shapes
        progs = []
        for other in [None, *also]:
            pre, ids_ = (prefix, rows_ids) if other is None else split(lm.encode(list(other)))[:2]
            kv = None
            if pre is not None:
                progs.append(run_prefix.program(lm.params, pre, mult))
                kv = run_prefix.out_abstract(lm.params, pre, mult)
            shapes = {}
            for batch in batches(ids_, False):
                shapes.setdefault(batch[1].shape, batch)
            progs += [run.program(lm.params, *arrays(*b)[1], mult, node_index, kv) for b in shapes.values()]
        precompile.spread(progs)
    # The shared prefix runs once for the whole set (its own program), each batch continues from its keys/values.
    prefix_kv = None if prefix is None else run_prefix(lm.params, prefix, mult, **static_prefix)
    for batch_rows, tokens, valid in batches(rows_ids, progress):
        sel_valid, batch = arrays(batch_rows, tokens, valid)
        s, sq, acts, *extra = run(lm.params, *batch, mult, node_index, prefix_kv, **static)  # extra: [residuals]
        sums += lm.to_host(s).astype(np.float64)
        sumsq += lm.to_host(sq).astype(np.float64)
        count += int(sel_valid.sum())
        acts = lm.to_host(acts)
        res = lm.to_host(extra[0]) if residuals else None
        for j, r in enumerate(batch_rows):
            keep = sel_valid[j]
            rows.append(acts[j][keep])
            if residuals:
                row_res.append(res[j][keep])
            row_prompt.extend([r] * int(keep.sum()))
    # Rows back in prompt order (batches were sorted by length).
    row_prompt = np.asarray(row_prompt, np.int64)
    node_acts = np.concatenate(rows, 0) if rows else np.zeros((0, len(node_arr)), np.float32)
    order_rows = np.argsort(row_prompt, kind="stable")
    all_res = np.concatenate(row_res, 0)[order_rows].astype(np.float32) if residuals else None
    result = Activations(sums, sumsq, count, node_arr, node_acts[order_rows].astype(np.float32),
                         row_prompt[order_rows],
                         {"model": lm.describe(), "position": position, "last_k": last_k, "n_prompts": len(prompts),
                          "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
                          "masked": neuron_mult is not None, "shared_prefix_tokens": shared, "key": key},
                         all_res)
    if path is not None:
        if is_writer():  # one writer; the others wait until the file is complete
            result.save(path)
        barrier(f"activations-{key}")
    return result
