"""One greedy generation engine: every row carries its own intervention, finished rows give their slot
to the next (continuous batching).

A *job* is a list of rows ``(prompt, condition index)`` and a list of :class:`Condition` s. The
conditions are stacked into one table (:class:`cna_jax.models.llama.Intervention`, C padded to a power
of two with neutral rows, so a new set of conditions of the same bucket never recompiles) and each row
carries its condition index as a traced argument: any mix of conditions shares a batch.

The device holds ``S`` slots (:class:`SlotState`). The host loop alternates three jitted calls:

* ``prefill`` -- the next ``P = S // 4`` queued rows (at least 1; capped at ``PREFILL_TOKENS`` rows x
  padded length) in one forward pass, padded to the bucket of *their* longest suffix (the queue is
  sorted by length, so short rows are not padded to the job's longest), into a staging buffer
  (:class:`Staged`) of keys/values, first tokens and bookkeeping;
* ``place`` -- copies staged rows into free slots (a cheap copy: rows end a few at a time, so a
  prefilled row may wait a chunk or two in the buffer instead of the prefill computing filler rows; on
  a mesh a staged row goes only to a free slot of its own device group, so no row crosses devices);
* ``decode`` -- up to ``chunk`` greedy steps over all slots in one ``lax.while_loop`` (it stops early
  when every slot is done); a slot decodes at most one chunk past its row's end.

Between calls the host reads which rows ended (EOS, ``max_new_tokens``, or the caller's ``stop`` rule,
which ``retire`` marks on the device), hands their tokens to the caller (``on_finish``; the study
appends them to disk) and queues new rows into the freed slots.

Cache layout per slot, width ``W = Q + T + R``: ``[0, Q)`` the shared chat-template prefix (computed
once per condition per job, with that condition's intervention: it applies to the prefix too),
``[Q, Q + T)`` the row's left-padded suffix, ``[Q + T, W)`` a ring of ``R = max_new_tokens`` columns
for generated tokens. Every slot writes decode step g at ring column ``g mod R`` -- one column for all
slots, so the cache update stays a single ``dynamic_update_slice`` whatever step each row is at. Keys are
stored already rotated and attention is order-free over slots, so a row's columns need not be in time
order; a row lives at most ``max_new_tokens - 1`` decode steps, so it never overwrites its own columns.

Rows whose condition changes nothing below a layer s (:func:`lower_layer_start`: no intervention, and
neuron sets in the last layers, the study's nulls among them) share the unmodified model's lower layers
per prompt: a store pass (:func:`store_fn`) computes each distinct prompt's keys/values below s and its
residual entering s once, and those rows' prefill runs only layers s..L-1 from there.

Compiled shapes per job: one prefix pass, one decode chunk, one place, one retire (only with ``stop``),
one prefill per length bucket the job's suffixes fall in (with the study's 8-token buckets: 2 for
its 12-21-token suffixes, 16 and 24), and with a store one store pass and one more prefill per bucket; all are cached
across jobs with the same (S, T, Q, C bucket, max_new_tokens, s). With the CPU kernel's packed weights the
prefix, store and prefill passes run their layers as one ``lax.scan`` over stacked panels (:func:`_scanned`:
a SmolLM2 prefill compiles in 2.5 s instead of 11, the same bits); the decode chunk keeps them unrolled.
``run(..., min_table_rows=)`` gives jobs with different numbers of conditions one C bucket, so they share
them (the study's generation and sweeps jobs).

Memory of the condition table: ``C x L x I`` float32. Llama-3.1-70B (80 x 28,672) with 64 conditions is
587 MB, split over the tensor axis (73 MB per device at tensor=8); SmolLM2 with 64 is 11.8 MB.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cna_jax import cpu_kernels, precompile
from cna_jax.models.config import ModelConfig
from cna_jax.models.llama import (CACHE_AXES, Decoder, Intervention, KVCache, constrain_cache, padding_positions,
                                  rope_inv_freq, rope_tables, stack_trees)
from cna_jax.sharding import ShardedFunction, forward_compiler_options


@dataclasses.dataclass
class Condition:
    """One intervention, applied at every position (prompt and generated tokens).

    neuron_mult: [L, I] multiplier of the MLP neurons, or None (1 everywhere).
    direction: [E] residual direction r (normalised here), or None.
    ablate: project r out of the residual stream (every layer input, attention and MLP output).
    add: {layer: alpha} -- ``x + alpha * r`` at the input of that layer (activation addition).
    """

    neuron_mult: np.ndarray | None = None
    direction: np.ndarray | None = None
    ablate: bool = False
    add: dict[int, float] = dataclasses.field(default_factory=dict)

    def check(self, cfg: ModelConfig, name: str = "condition") -> None:
        L, I, E = cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size
        if self.neuron_mult is not None and np.shape(self.neuron_mult) != (L, I):
            raise ValueError(f"{name}: neuron_mult has shape {np.shape(self.neuron_mult)}, expected {(L, I)}")
        if (self.ablate or self.add) and self.direction is None:
            raise ValueError(f"{name}: ablate / add need a direction")
        if self.direction is not None:
            if np.shape(self.direction) != (E,):
                raise ValueError(f"{name}: direction has shape {np.shape(self.direction)}, expected {(E,)}")
            if not np.isfinite(self.direction).all() or not np.linalg.norm(self.direction) > 0:
                raise ValueError(f"{name}: direction must be finite and non-zero")
        for layer in self.add:
            if not 0 <= int(layer) < L:
                raise ValueError(f"{name}: add layer {layer} out of range [0, {L})")

    def first_layer(self, num_layers: int) -> int:
        """The first layer whose computation the condition changes (``num_layers`` when none): the residual
        stream entering it equals the unmodified model's, at every position."""
        if self.ablate:
            return 0
        layers = [int(layer) for layer, alpha in self.add.items() if alpha != 0]
        if self.neuron_mult is not None:
            layers += np.flatnonzero((np.asarray(self.neuron_mult) != 1).any(axis=1))[:1].tolist()
        return min(layers, default=num_layers)


def condition_bucket(c: int) -> int:
    """Conditions are padded to a power of two (neutral rows), so similar jobs share compiled code."""
    return 1 << max(c - 1, 0).bit_length()


def stack_conditions(cfg: ModelConfig, conditions: Sequence[Condition], min_rows: int = 0,
                     steering: bool | None = None) -> tuple[np.ndarray | None, ...]:
    """Host arrays (neuron_mult [C, L, I], direction [C, E], ablate [C], add [C, L]) with C the bucket of
    ``max(len(conditions), min_rows)`` (the rest neutral).

    steering: keep the residual-steering arrays (direction, ablate, add). None (default): only when a
    condition uses a direction; otherwise they are None and the model skips the steering arithmetic
    (exact no-ops for such a table, ~1 ms of a 187 ms SmolLM2 batch-32 decode step). That is another
    compiled program (its logits may differ in the last bits), so callers that want one program for every
    set of conditions, and bit-identical neutral rows, pass True (:func:`cna_jax.damage.kl_along`)."""
    if not conditions:
        raise ValueError("a job needs at least one condition")
    L, I, E = cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size
    c = condition_bucket(max(len(conditions), min_rows))
    mult = np.ones((c, L, I), np.float32)
    direction = np.zeros((c, E), np.float32)
    ablate = np.zeros((c,), np.float32)
    add = np.zeros((c, L), np.float32)
    for i, cond in enumerate(conditions):
        cond.check(cfg, f"condition {i}")
        if cond.neuron_mult is not None:
            mult[i] = cond.neuron_mult
        if cond.direction is not None:
            r = np.asarray(cond.direction, np.float64)
            direction[i] = r / np.linalg.norm(r)
        ablate[i] = float(cond.ablate)
        for layer, alpha in cond.add.items():
            add[i, int(layer)] = alpha
    if steering is None:
        steering = any(cond.direction is not None for cond in conditions)
    return (mult, direction, ablate, add) if steering else (mult, None, None, None)


def put_host_table(table) -> tuple:
    """Host condition arrays -> device arrays on the default device (None leaves stay None)."""
    return tuple(None if a is None else jnp.asarray(a) for a in table)


class SlotState(NamedTuple):
    """Everything the device keeps per slot (S slots, W cache columns, N = max_new_tokens).

    cache: KVCache of per-layer tuples of L arrays, keys and values [S, K, W, D] (:func:`split_layers`);
    kv_valid: [S, W] bool (columns a slot attends to); tok: [S] the token to feed next; pos: [S] its rotary
    position; step: [S] tokens generated so far; out: [S, N] generated tokens; done: [S] bool (ended, or
    empty); cond: [S] condition index; clock: [] int32 decode steps taken (selects the ring column)."""

    cache: KVCache
    kv_valid: jax.Array
    tok: jax.Array
    pos: jax.Array
    step: jax.Array
    out: jax.Array
    done: jax.Array
    cond: jax.Array
    clock: jax.Array


def _is_eos(tok, eos_ids):
    return jnp.any(tok[..., None] == eos_ids, axis=-1)


def split_layers(cache: KVCache) -> KVCache:
    """A stacked cache [L, B, K, S, D] as per-layer tuples of L arrays [B, K, S, D] (the engine's slot
    layout, see ``Attention``: each layer's attention reads its own buffer, where a slice of a stacked
    cache is a copy per decode step)."""
    n = cache.k.shape[0]
    return KVCache(tuple(cache.k[l] for l in range(n)), tuple(cache.v[l] for l in range(n)))


def greedy_tokens(logits, axis=-1):
    """``argmax`` (the first maximal index) as two plain reductions: XLA:CPU's variadic argmax reduce
    over a 49k vocabulary costs ~10x more."""
    top = jnp.max(logits, axis=axis, keepdims=True)
    idx = jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis % logits.ndim)
    return jnp.min(jnp.where(logits == top, idx, logits.shape[axis]), axis=axis)


def empty_state_fn(*, cfg: ModelConfig, dtype, slots: int, width: int, max_new_tokens: int) -> SlotState:
    s = slots
    return SlotState(split_layers(KVCache.zeros(cfg, s, width, dtype)), jnp.zeros((s, width), bool),
                     jnp.zeros((s,), jnp.int32),
                     jnp.zeros((s,), jnp.int32), jnp.zeros((s,), jnp.int32), jnp.zeros((s, max_new_tokens), jnp.int32),
                     jnp.ones((s,), bool), jnp.zeros((s,), jnp.int32), jnp.zeros((), jnp.int32))


def _variables(params, packed) -> dict:
    """The Decoder's variables: ``packed`` (:func:`packed_weights`, or None) runs its weight products
    through the CPU kernel."""
    return {"params": params} if packed is None else {"params": params, "packed": packed}


def _scanned(packed) -> bool:
    """Whether the prefix, store and prefill passes run their layers as a scan (Decoder's ``scan_layers``):
    over the stacked panels of :func:`packed_weights` (4-8x less compile, BENCHMARKS.md X1). Without them
    (accelerators, XLA's dots) the layers stay unrolled, as the decode step's always do: there a layer's
    panels copied out of the stack, ~1.4 ms a SmolLM2 layer, would cost ~20% of a 48-row step."""
    return packed is not None and "layers" in packed


def prefix_fn(params, prefix_tokens, table, packed=None, *, cfg: ModelConfig, dtype, cache_sharding=None
              ) -> KVCache:
    """Keys/values ``[L, C, K, Q, D]`` of the shared prefix [Q] under each of the C conditions.

    cache_sharding: the stacked cache's NamedSharding on a mesh (``Layout.sharding(CACHE_AXES)``), or None."""
    c, q = table[0].shape[0], prefix_tokens.shape[0]
    tokens = jnp.broadcast_to(prefix_tokens[None].astype(jnp.int32), (c, q))
    positions = jnp.broadcast_to(jnp.arange(q, dtype=jnp.int32)[None], (c, q))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((q, q), bool))[None], (c, q, q))
    out = Decoder(cfg, dtype, cache_sharding).apply(_variables(params, packed), tokens, positions, mask,
                                                    cache=KVCache.zeros(cfg, c, q, dtype, cache_sharding),
                                                    cache_slot=0, return_logits=False, scan_layers=_scanned(packed),
                                    intervention=Intervention(*table, jnp.arange(c, dtype=jnp.int32)))
    return out.cache


class Staged(NamedTuple):
    """P prefilled rows waiting for free slots (the output of ``prefill``, the input of ``place``).

    cache: per-layer tuples, keys and values [P, K, Q + T, D] (the slot layout's prompt
    columns); kv_valid: [P, Q + T]; tok: [P] first generated token; pos: [P] its rotary position;
    done: [P] ended at the first token; cond: [P]."""

    cache: KVCache
    kv_valid: jax.Array
    tok: jax.Array
    pos: jax.Array
    done: jax.Array
    cond: jax.Array


def _prompt_inputs(cfg: ModelConfig, dtype, prefix_kv, valid, cond, cache_sharding):
    """The stacked cache [L, P, K, Q + t, D] of P rows with their condition's prefix keys/values in the first Q
    columns, the valid columns [P, Q + t] and the attention mask [P, t, Q + t] of left-padded suffixes."""
    p, t = valid.shape
    q = 0 if prefix_kv is None else prefix_kv.k.shape[3]
    cache = KVCache.zeros(cfg, p, q + t, dtype, cache_sharding)
    if q:
        cache = KVCache(*(constrain_cache(jax.lax.dynamic_update_slice(c, jnp.take(pk, cond, axis=1).astype(c.dtype),
                                                                       (0, 0, 0, 0, 0)), cache_sharding)
                          for c, pk in zip(cache, prefix_kv)))
    kv_valid = jnp.concatenate([jnp.ones((p, q), bool), valid], axis=1)
    mask = (jnp.arange(q + t)[None, None, :] <= (q + jnp.arange(t))[None, :, None]) & kv_valid[:, None, :]
    return cache, kv_valid, mask, q


def store_fn(params, prefix_kv, tokens, valid, cond, table, packed=None, *, cfg: ModelConfig, dtype, stop: int,
             cache_sharding=None) -> tuple[KVCache, jax.Array]:
    """The unmodified model on N left-padded suffixes [N, T] up to layer ``stop``: keys/values of layers
    ``< stop`` at the suffix columns (a KVCache of [stop, N, K, T, D]) and the residual entering layer ``stop``
    [N, T, E]. ``cond`` [N] must name conditions that change nothing below ``stop``: their prefix keys/values
    there are the unmodified model's. The rows of a job whose condition starts at ``stop`` or later are then
    prefilled from this store (:func:`prefill_fn`'s ``start``)."""
    p, t = tokens.shape
    cache, _, mask, q = _prompt_inputs(cfg, dtype, prefix_kv, valid, cond, cache_sharding)
    out = Decoder(cfg, dtype, cache_sharding).apply(
        _variables(params, packed), tokens, q + padding_positions(valid), mask, None, cache, q, return_logits=False,
        return_residuals=True, residual_layers=(stop,), stop=stop, intervention=Intervention(*table, cond),
        scan_layers=_scanned(packed))
    return KVCache(*(x[:stop, :, :, q:] for x in out.cache)), out.residuals[0]


def prefill_fn(params, prefix_kv, tokens, valid, cond, table, eos_ids, store_kv=None, store_res=None, store_idx=None,
               packed=None, *, cfg: ModelConfig, dtype, width: int, max_new_tokens: int, cache_sharding=None,
               start: int = 0) -> Staged:
    """Prefills P rows (left-padded suffixes ``tokens``, ``valid`` [P, t], t <= T) under conditions ``cond`` [P].

    width: Q + T, the prompt columns of a slot; a row shorter than the slot's T is padded on the left
    (invalid columns), so one compiled prefill per length bucket serves every row of that bucket.
    prefix_kv: None or [L, C, K, Q, D] (:func:`prefix_fn`); cache_sharding: as for :func:`prefix_fn`.
    start (static) > 0: the rows' conditions change nothing below layer ``start``, so only the layers from
    ``start`` run, from the unmodified model's residual and lower keys/values in the store
    (:func:`store_fn`'s output, ``store_kv`` [start, N, K, T', D] and ``store_res`` [N, T', E], T' >= t) at
    rows ``store_idx`` [P]."""
    model = Decoder(cfg, dtype, cache_sharding)
    p, t = tokens.shape
    cache, kv_valid, mask, q = _prompt_inputs(cfg, dtype, prefix_kv, valid, cond, cache_sharding)
    gap = width - q - t  # unused columns between the prefix and a shorter suffix
    residual = None
    if start:
        # The store is left-padded to the job's longest bucket T', so a row of a shorter bucket is its last t columns.
        cut = store_res.shape[1] - t
        cache = KVCache(*(constrain_cache(jax.lax.dynamic_update_slice(
            c, jnp.take(x, store_idx, axis=1)[:, :, :, cut:].astype(c.dtype), (0, 0, 0, q, 0)), cache_sharding)
            for c, x in zip(cache, store_kv)))
        residual = jnp.take(store_res, store_idx, axis=0)[:, cut:]
    out = model.apply(_variables(params, packed), tokens, q + padding_positions(valid), mask, None, cache, q,
                      select=jnp.full((p, 1), t - 1, jnp.int32),
                      intervention=Intervention(*table, cond), start=start or None, residual=residual,
                      scan_layers=_scanned(packed))
    first = greedy_tokens(out.logits[:, 0]).astype(jnp.int32)

    def widen(x, axis):  # [.., Q + t, ..] -> [.., Q + T, ..]: the gap as invalid columns after the prefix
        if not gap:
            return x
        x = jnp.moveaxis(x, axis, -1)
        x = jnp.concatenate([x[..., :q], jnp.zeros(x.shape[:-1] + (gap,), x.dtype), x[..., q:]], axis=-1)
        return jnp.moveaxis(x, -1, axis)

    written = split_layers(out.cache)  # keys and values [P, K, Q + t, D] per layer
    return Staged(KVCache(*(tuple(widen(x, 2) for x in kv) for kv in written)),
                  widen(kv_valid, 1), first, q + valid.sum(axis=1).astype(jnp.int32),
                  _is_eos(first, eos_ids) | (max_new_tokens <= 1), cond)


def place_fn(state: SlotState, staged: Staged, src, slot_idx, *, slot_axes: SlotState | None = None,
             row_axes: Staged | None = None) -> SlotState:
    """Moves staged rows ``src`` [M] into slots ``slot_idx`` [M] (an index >= S drops that entry).

    One row at a time, each a ``dynamic_update_slice`` of the donated state (in place): XLA:CPU runs a
    scatter element by element (37 ms per call at 128 slots on one core, ~5% of the study's generation
    job), the row copies cost what their bytes do. slot_axes / row_axes: inside ``shard_map``
    (:func:`sharded_place_fn`), the mesh axes each state / staged array's leading axis is split over (tuples,
    () when not split); indices are global, and a device writes a row only where both the staged row and
    the slot are its own."""
    n, w = state.out.shape[1], state.kv_valid.shape[1]
    slot_axes = slot_axes if slot_axes is not None else jax.tree.map(lambda _: (), state)
    row_axes = row_axes if row_axes is not None else jax.tree.map(lambda _: (), staged)

    def local(i, ax, size):  # global index -> (index into this device's block, whether it is here)
        if ax:
            i = i - jax.lax.axis_index(ax) * size
        return jnp.clip(i, 0, size - 1), (i >= 0) & (i < size)

    def put(dst, x, i, ax, here):  # dst [S, ...] <- x [...] at slot i (its leading columns if x is narrower)
        i, ok = local(i, ax, dst.shape[0])
        start = (i,) + (0,) * x.ndim
        old = jax.lax.dynamic_slice(dst, start, (1,) + x.shape)
        return jax.lax.dynamic_update_slice(dst, jnp.where(ok & here, x[None].astype(dst.dtype), old), start)

    def body(j, st):
        i = slot_idx[j]
        # Trees of axis tuples follow the array trees (jax.tree.map takes the arrays' structure as a prefix).
        row = jax.tree.map(lambda x, ax: x[local(src[j], ax, x.shape[0])[0]], staged, row_axes)
        here = jax.tree.map(lambda x, ax: local(src[j], ax, x.shape[0])[1], staged, row_axes)
        valid = jnp.zeros((w,), bool).at[:row.kv_valid.shape[0]].set(row.kv_valid)
        new = SlotState(row.cache, valid, row.tok, row.pos, jnp.int32(1), jnp.zeros((n,), jnp.int32).at[0].set(row.tok),
                        row.done, row.cond, st.clock)
        ok = SlotState(here.cache, here.kv_valid, here.tok, here.pos, here.tok, here.tok, here.done, here.cond, None)
        return SlotState(*(jax.tree.map(lambda dst, x, ax, h: put(dst, x, i, ax, h), *field) for field in
                           zip(st[:-1], new[:-1], slot_axes[:-1], ok[:-1])), st.clock)

    return jax.lax.fori_loop(0, src.shape[0], body, state)


def sharded_place_fn(layout, state_sh: SlotState, staged_sh: Staged) -> Callable:
    """:func:`place_fn` on a mesh, in ``shard_map``: each device copies its own staged rows into its own
    slots, with no data crossing devices (``run`` pairs a staged row only with a free slot of the same
    device group, :attr:`Functions.groups`). Under plain SPMD partitioning the rows were gathered to
    every device (one collective per layer array) and a write at a traced slot index touched every
    device's whole cache shard: 80 ms per call on two CPU devices."""
    from jax import shard_map
    from jax.sharding import PartitionSpec

    state_specs = jax.tree.map(lambda sh: sh.spec, state_sh)
    staged_specs = jax.tree.map(lambda sh: sh.spec, staged_sh)
    local = functools.partial(place_fn, slot_axes=jax.tree.map(lambda sh: _spec_axes(sh.spec), state_sh),
                              row_axes=jax.tree.map(lambda sh: _spec_axes(sh.spec), staged_sh))
    rep = PartitionSpec()
    return shard_map(local, mesh=layout.mesh, in_specs=(state_specs, staged_specs, rep, rep), out_specs=state_specs)


def decode_fn(params, state: SlotState, table, eos_ids, packed=None, *, cfg: ModelConfig, dtype, steps: int,
              cache_sharding=None) -> SlotState:
    """Up to ``steps`` greedy steps over every slot; stops early once all slots are done.
    ``cache_sharding``: on a mesh, ``Layout.sharding(CACHE_AXES)`` (each layer's cache is that less the
    layer axis); the attention kernel (cna_jax.cpu_kernels) then runs per device in ``shard_map``.
    packed: :func:`packed_weights` (the weight products through the CPU kernel), or None."""
    model = Decoder(cfg, dtype, cache_sharding)
    variables = _variables(params, packed)
    vocab_major = packed is None  # the packed head returns [S, 1, V] as it is
    s, w = state.kv_valid.shape
    n = state.out.shape[1]
    ring = n  # generated-token columns at the end of each slot
    cols = jnp.arange(n)[None, :]
    # Rotary tables of the whole chunk, computed before the loop (see Decoder's ``rope``): a slot's
    # position advances by one per step while it is active (a done slot's values are never read).
    chunk_rope = rope_tables(state.pos[:, None] + jnp.arange(steps, dtype=jnp.int32)[None], rope_inv_freq(cfg))

    def cond_fn(carry):
        i, st = carry
        return (i < steps) & ~jnp.all(st.done)

    def body(carry):
        i, st = carry
        col = (w - ring) + st.clock % ring
        kv_valid = jax.lax.dynamic_update_slice(st.kv_valid, jnp.ones((s, 1), bool), (0, col))
        res = model.apply(variables, st.tok[:, None], st.pos[:, None], kv_valid[:, None, :], None,
                          st.cache, col, intervention=Intervention(*table, st.cond), vocab_major_logits=vocab_major,
                          rope=tuple(jax.lax.dynamic_slice_in_dim(r, i, 1, axis=1) for r in chunk_rope))
        # logits [V, S, 1] (vocab-major) or [S, 1, V]
        nxt = greedy_tokens(res.logits[:, :, 0], axis=0) if vocab_major else greedy_tokens(res.logits[:, 0], axis=-1)
        active = ~st.done
        out = jnp.where(active[:, None] & (cols == st.step[:, None]), nxt[:, None], st.out)
        step = st.step + active
        done = st.done | (active & (_is_eos(nxt, eos_ids) | (step >= n)))
        return i + 1, SlotState(res.cache, kv_valid, jnp.where(active, nxt, st.tok), st.pos + active, step, out,
                                done, st.cond, st.clock + 1)

    return jax.lax.while_loop(cond_fn, body, (jnp.int32(0), state))[1]


def retire_fn(done, mask):
    """Ends the slots in ``mask`` [S] (rows the host stopped: ``run``'s ``stop``)."""
    return done | mask


# XLA:CPU compiles the decode step's skinny matrix products (one row per slot: [S, E] x [E, F]) faster as
# plain dots than inside its YNNPACK / XNNPACK library fusions: a batch-32 SmolLM2 step took 228 ms with
# them and 183 ms without (launch/bench_generate.py --g5, one core). Prefill keeps them: its [P x T, E]
# products are larger, and were slower without (G4's prefill calls: 38.5 s against 29.4 s). The matrix
# products then accumulate in another order, so logits differ from the fused build in their last bits.
DECODE_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_experimental_xnn_fusion_type": ""}


def decode_compiler_options(platform: str) -> dict | None:
    """XLA options for the decode step's compile on ``platform`` (CPU only; other backends: none)."""
    return DECODE_CPU_COMPILER_OPTIONS if platform == "cpu" else None


# On CPU, where no weight is split over devices, the engine's weight products run as
# cpu_kernels.packed_matmul over weights packed once per model. One core, SmolLM2 shapes ([R, 576] x
# [576, 1536] and the like, weights from memory; the AVX-512 machine of BENCHMARKS.md, 2026-12-05),
# GFLOP/s packed against XLA:CPU's: R = 16 rows 87-90 / 52-54, 32 rows 95-104 / 71-82, 48 rows 101-106 /
# 98, 64 rows 100-108 / 105-108 (XLA's per-call packing is paid back there), 256-512 rows (prefill)
# 91-112 / 81-105. So prefill always takes the packed weights and a decode step only up to this many
# slots per device.
PACKED_MAX_SLOTS = 48
_packed_cache: dict = {}  # "params": the params last packed (held, so the identity check stays sound), "packed"


def _pack_params(params, *, cfg: ModelConfig) -> dict:
    """The ``packed`` collection of the Decoder: every layer's q/k/v/o and gate/up/down kernels and the
    LM head as :func:`cna_jax.cpu_kernels.pack` panels (a second copy of the weights in memory), and the
    layers' panels once more stacked ``[L, ...]`` under ``layers`` for the scanned forward passes
    (:func:`_scanned`; a third copy of the layers' weights: +430 MB for SmolLM2, fine for the models a CPU
    runs)."""
    def flat(kernel, inputs):  # a Dense(General) kernel as [In, Out]
        return cpu_kernels.pack(kernel.reshape(inputs, -1))

    e = cfg.hidden_size
    packed = {}
    for layer in range(cfg.num_hidden_layers):
        p = params[f"layers_{layer}"]
        attn = {n: flat(p["self_attn"][n]["kernel"], e) for n in ("q_proj", "k_proj", "v_proj")}
        attn["o_proj"] = flat(p["self_attn"]["o_proj"]["kernel"], cfg.num_attention_heads * cfg.head_dim)
        mlp = {n: flat(p["mlp"][n]["kernel"], e) for n in ("gate_proj", "up_proj")}
        mlp["down_proj"] = flat(p["mlp"]["down_proj"]["kernel"], cfg.intermediate_size)
        packed[f"layers_{layer}"] = {"self_attn": attn, "mlp": mlp}
    head = params["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
    packed["head"] = flat(head, e)
    packed["layers"] = stack_trees([packed[f"layers_{l}"] for l in range(cfg.num_hidden_layers)])
    return packed


def packed_weights(lm) -> dict | None:
    """``lm``'s weights packed for the CPU kernel (the ``packed`` argument of the engine's functions), or
    None where XLA's dots run: off CPU, not float32, the kernel off / not built (``CNA_JAX_CPU_KERNELS``), or
    on a mesh that splits any weight (tensor or FSDP axes > 1). On a data-parallel mesh the packed copy is
    replicated like the weights and each device multiplies its own rows (``_packed_dense`` in the model).
    Packed once per params object; the last model's copy is kept for the next job (about the size of its
    float32 weights, on every device, and the layers' weights once more, stacked for the scanned passes)."""
    on_cpu = (jax.default_backend() if lm.layout is None else lm.layout.platform) == "cpu"
    if not on_cpu or jnp.dtype(lm.dtype) != jnp.float32 or not cpu_kernels.matmul_enabled():
        return None
    if lm.layout is not None and not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(lm.params)):
        return None
    if _packed_cache.get("params") is not lm.params:
        _packed_cache.clear()  # free the previous model's copy before making this one
        pack = _pack_jit if lm.layout is None else jax.jit(_pack_params, static_argnames=("cfg",),
                                                           out_shardings=lm.layout.replicated())
        _packed_cache.update(params=lm.params, packed=pack(lm.params, cfg=lm.cfg))
    return _packed_cache["packed"]


# Jitted single-device entry points (static shapes come from the arguments).
_empty_state = jax.jit(empty_state_fn, static_argnames=("cfg", "dtype", "slots", "width", "max_new_tokens"))
_place = jax.jit(place_fn, donate_argnums=(0,))
_retire = jax.jit(retire_fn, donate_argnums=(0,))
_pack_jit = jax.jit(_pack_params, static_argnames=("cfg",))


@functools.cache
def _decode(platform: str):
    return jax.jit(decode_fn, static_argnames=("cfg", "dtype", "steps", "cache_sharding"), donate_argnums=(1,),
                   compiler_options=decode_compiler_options(platform))


@functools.cache
def _forwards(platform: str) -> tuple[Callable, Callable, Callable]:
    """The jitted prefix, prefill and store passes, compiled with ``platform``'s forward options."""
    opts = dict(compiler_options=forward_compiler_options(platform))
    return (jax.jit(prefix_fn, static_argnames=("cfg", "dtype", "cache_sharding"), **opts),
            jax.jit(prefill_fn, static_argnames=("cfg", "dtype", "width", "max_new_tokens", "cache_sharding", "start"),
                    **opts),
            jax.jit(store_fn, static_argnames=("cfg", "dtype", "stop", "cache_sharding"), **opts))


@dataclasses.dataclass
class Functions:
    """The jitted calls of a job (single device, or sharded on a layout)."""

    empty: Callable  # () -> SlotState
    prefix: Callable  # (params, prefix tokens [Q], table) -> prefix_kv
    # (params, prefix_kv, tokens, valid, cond, table, eos_ids[, store_kv, store_res, store_idx], start=0) -> Staged
    prefill: Callable
    place: Callable  # (state, staged, src, slot_idx) -> SlotState
    decode: Callable  # (params, state, table, eos_ids) -> SlotState
    # prefix, prefill, store and decode take packed= (:func:`packed_weights`) on a single device
    retire: Callable  # (done [S], mask [S]) -> done
    put_rows: Callable  # host [P, ...] arrays -> device arrays (prefill's rows, place's indices)
    put_table: Callable  # host condition arrays -> device arrays
    store: Callable  # (params, prefix_kv, tokens, valid, cond, table, stop=) -> (KVCache, residual), :func:`store_fn`
    # Device groups of a P-row prefill: staged row j may only go to a slot of its own group (row group
    # j // (P // g), slot group s // (S // g)), so placing moves no data across devices.
    groups: Callable[[int], int] = lambda p: 1

    def insert(self, params, state, prefix_kv, tokens, valid, cond, slot_idx, table, eos_ids, **packed) -> SlotState:
        """Prefill P rows and place row i in slot ``slot_idx[i]`` (>= S drops it): the two calls at once."""
        staged = self.prefill(params, prefix_kv, *self.put_rows(tokens, valid, cond), table, eos_ids, **packed)
        p = np.shape(tokens)[0]
        return self.place(state, staged, *self.put_rows(np.arange(p, dtype=np.int32), np.asarray(slot_idx, np.int32)))


def single_device_functions(cfg: ModelConfig, dtype, slots: int, width: int, max_new_tokens: int, chunk: int
                            ) -> Functions:
    stat, platform = dict(cfg=cfg, dtype=dtype), jax.default_backend()
    prefix, prefill, store = _forwards(platform)
    return Functions(
        empty=functools.partial(_empty_state, slots=slots, width=width, max_new_tokens=max_new_tokens, **stat),
        prefix=functools.partial(prefix, **stat),
        prefill=functools.partial(prefill, width=width - max_new_tokens, max_new_tokens=max_new_tokens, **stat),
        place=_place, decode=functools.partial(_decode(platform), steps=chunk, **stat), retire=_retire,
        put_rows=lambda *a: tuple(jnp.asarray(x) for x in a),
        put_table=put_host_table, store=functools.partial(store, **stat))


@functools.lru_cache(maxsize=16)
def sharded_functions(cfg: ModelConfig, layout, dtype, slots: int, width: int, max_new_tokens: int, chunk: int
                      ) -> Functions:
    """The same calls on a mesh: slots split over the batch (data) axes, the condition table's neuron axis
    over ``tensor`` (like the MLP weights), each layer's KV cache in the ``CACHE_AXES`` shardings less the layer
    axis (:func:`split_layers`). Prefilled rows are split over the batch axes when their count divides, else
    replicated."""
    b_, kv_, len_, d_ = CACHE_AXES[1:]  # one layer's keys and values [S, K, W, D]
    b1, b2, rep = layout.batch(1), layout.batch(2), layout.replicated()
    n = cfg.num_hidden_layers

    def cache_sh(batch_axis):
        return KVCache(*((layout.sharding((batch_axis, kv_, len_, d_)),) * n,) * 2)

    state_sh = SlotState(cache_sh(b_), b2, b1, b1, b1, b2, b1, b1, rep)
    table_sh = table_shardings(layout)
    params_sh = layout.params(cfg, dtype)
    stat = dict(cfg=cfg, dtype=dtype)
    cached = dict(stat, cache_sharding=layout.sharding(CACHE_AXES))  # the stacked cache of prefix / prefill
    fwd = dict(compiler_options=forward_compiler_options(layout.platform))
    # Prefilled rows are split over the batch axes when their count divides both the inputs' batch axes and
    # the cache's (a "batch" KV-head fallback also splits the cache batch over tensor).
    mult = math.lcm(layout.batch_size_multiple(), _ways(layout.sharding((b_,)), 0))
    split = lambda p: p % mult == 0

    def staged_sh(p):
        if not split(p):
            return Staged(cache_sh(None), rep, rep, rep, rep, rep)
        return Staged(cache_sh(b_), b2, b1, b1, b1, b1)

    empty = ShardedFunction(lambda **kw: empty_state_fn(**kw), layout, (), state_sh,
                            dict(slots=slots, width=width, max_new_tokens=max_new_tokens, **stat))
    # prefix, store, prefill and decode take ``packed`` last (:func:`packed_weights`, replicated) or None.
    prefix = ShardedFunction(prefix_fn, layout, (params_sh, rep, table_sh, rep), rep, cached, **fwd)
    prefills: dict[tuple[int, int], ShardedFunction] = {}  # by (P, start)
    stores: dict[tuple[int, int], ShardedFunction] = {}  # by (N, stop)
    places: dict[int, ShardedFunction] = {}  # by P: place always takes P (src, slot) pairs

    def rows_sh(p):  # tokens, valid, cond (and store_idx) of P rows
        return (b2, b2, b1) if split(p) else (rep,) * 3

    def prefill_at(p, start=0):  # the ShardedFunction for P prefill rows (also what launch/plan.py lowers)
        if (p, start) not in prefills:
            store = (rep, rep, rows_sh(p)[2])  # the store replicated, its row indices like cond (None at start 0)
            prefills[p, start] = ShardedFunction(
                prefill_fn, layout, (params_sh, rep, *rows_sh(p), table_sh, rep, *store, rep), staged_sh(p),
                dict(width=width - max_new_tokens, max_new_tokens=max_new_tokens, start=start, **cached), **fwd)
        return prefills[p, start]

    def store_at(n, stop):  # the ShardedFunction for a store pass over N rows up to layer ``stop``
        if (n, stop) not in stores:
            stores[n, stop] = ShardedFunction(store_fn, layout, (params_sh, rep, *rows_sh(n), table_sh, rep),
                                              (rep, rep), dict(stop=stop, **cached), **fwd)
        return stores[n, stop]

    def store(params, prefix_kv, tokens, valid, cond, table, stop, packed=None):
        return store_at(tokens.shape[0], stop)(params, prefix_kv, tokens, valid, cond, table, packed)

    def place_at(p):  # P staged rows, P (src, slot) pairs (unused pairs drop)
        if p not in places:
            idx = b1 if split(p) else rep
            places[p] = ShardedFunction(sharded_place_fn(layout, state_sh, staged_sh(p)), layout,
                                        (state_sh, staged_sh(p), idx, idx), state_sh, {}, donate=(0,))
        return places[p]

    def prefill(params, prefix_kv, tokens, valid, cond, table, eos_ids, *store, start=0, packed=None):
        return prefill_at(tokens.shape[0], start)(params, prefix_kv, tokens, valid, cond, table, eos_ids, *store,
                                                  packed=packed)

    def place(state, staged, src, slot_idx):
        return place_at(src.shape[0])(state, staged, src, slot_idx)

    prefill.at, place.at, store.at = prefill_at, place_at, store_at
    decode = ShardedFunction(decode_fn, layout, (params_sh, state_sh, table_sh, rep, rep), state_sh,
                             dict(steps=chunk, cache_sharding=cached["cache_sharding"], **stat), donate=(1,),
                             compiler_options=decode_compiler_options(layout.platform))

    def put_rows(*arrays):
        sh = (lambda a: b2 if a.ndim == 2 else b1) if split(arrays[0].shape[0]) else (lambda a: rep)
        return tuple(jax.make_array_from_callback(a.shape, sh(a), lambda idx, a=a: a[idx]) for a in arrays)

    retire = ShardedFunction(retire_fn, layout, (b1, b1 if split(slots) else rep), b1, {}, donate=(0,))
    return Functions(empty, prefix, prefill, place, decode, retire, put_rows, functools.partial(sharded_table, layout),
                     store, groups=lambda p: mult if split(p) else 1)


def _spec_axes(spec, dim: int = 0) -> tuple:
    """The mesh axes a PartitionSpec splits array dimension ``dim`` over (() when not split)."""
    axes = spec[dim] if dim < len(spec) else None
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _ways(sharding, dim: int) -> int:
    """How many ways a NamedSharding splits array dimension ``dim``."""
    return math.prod(sharding.mesh.shape[a] for a in _spec_axes(sharding.spec, dim))


def table_shardings(layout) -> tuple:
    """Shardings of the condition table: the neuron axis over ``tensor`` (like the MLP weights), the rest
    replicated."""
    rep = layout.replicated()
    return (layout.sharding((None, "layers", "neurons")), rep, rep, rep)


def sharded_table(layout, table) -> tuple:
    """Host condition arrays (:func:`stack_conditions`) -> global arrays in :func:`table_shardings`."""
    return tuple(None if a is None else jax.make_array_from_callback(a.shape, s, lambda idx, a=a: a[idx])
                 for a, s in zip(table, table_shardings(layout)))


# Rows x padded length of one prefill call at most: prefill memory grows with it (attention scores with
# rows x length^2), so long prompts are prefilled a few rows at a time (8B at 32 slots x 2k tokens would
# need ~90 GB in one call).
PREFILL_TOKENS = 8192


def prefill_rows(slots: int, length: int = 1) -> int:
    """Rows of one prefill call for prompts padded to ``length``: a quarter of the slots (at least 1; rows
    end a few at a time, so a bigger call would mostly wait in the staging buffer), capped at
    ``PREFILL_TOKENS // length``."""
    return max(1, min(slots // 4, PREFILL_TOKENS // max(length, 1)))


# Decode steps per call: a slot idles at most chunk - 1 steps past its row's end before the host refills it.
# On the G4 workload (rows of ~31 tokens on average) 4 steps decoded in 91 s what 8 steps did in 98 s.
DECODE_CHUNK = 4

# Prefill length buckets of a job (the study's): a long job pays each bucket's compile once, and its padding
# on every row. The study's prompt suffixes of 12-21 tokens fall in buckets 16 and 32 with 16-token steps (23.7
# padded tokens per harmful row) and 16 and 24 with 8-token steps (19.8): as many compiled prefills, and less
# work in every prefill and store pass. The study's harmful generation slice (1,400 rows, all prefilled from
# layer 23; launch/bench_prefill.py --compare=length_multiple) took 113.5 s against 119.7 s; a one-core job with
# 4 rows in 10 through all 30 layers 123.4 / 119.9 s against 129.7 / 130.4 s; the same tokens (BENCHMARKS.md).
JOB_LENGTH_MULTIPLE = 8


# Bytes of the unmodified model's lower-layer keys/values and residuals kept per job (replicated on every
# device of a mesh) for the rows prefilled from their first changed layer (:func:`lower_layer_start`); a job
# whose store would be larger prefills every row through the whole model. The study's SmolLM2 generation job
# keeps 242 MB (201 prompts x 32 columns, s = 23); Llama-3.1-70B in bf16 with s = 60 keeps 16.8 MB per 64-token
# prompt, so 128 such prompts fit. On an accelerator the store takes at most STORE_FRACTION of a device's
# memory (1.6 GB of an 80 GB GPU, 0.3 GB of a 16 GB TPU v5e), inside the 10% headroom launch/plan.py asks of a
# plan, whose figures do not count it.
STORE_BYTES = 2 << 30
STORE_FRACTION = 0.02


def store_budget(devices) -> int:
    """Bytes the lower-layer store may take: :data:`STORE_BYTES`, and at most :data:`STORE_FRACTION` of the
    smallest memory among ``devices`` that report one (accelerators; a CPU reports none)."""
    limits = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # a backend without memory statistics
            stats = None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    return min([STORE_BYTES] + [int(STORE_FRACTION * b) for b in limits])


def lower_layer_start(cfg: ModelConfig, conditions: Sequence[Condition], rows: Sequence[tuple[Sequence[int], int]],
                      length: int, dtype=jnp.float32, budget: int | None = None) -> int:
    """The layer s the job's rows whose conditions change nothing below it are prefilled from (0: none are).

    Such rows share the unmodified model's layers below s per prompt, so the job computes those once per
    distinct prompt (:func:`store_fn`) and each row's prefill runs only layers s..L-1. s maximises the
    layer-rows saved: s x (rows starting at s or later - their distinct prompts); 0 when nothing is saved or
    the store (keys/values of layers < s and one residual, ``length`` columns per prompt) exceeds ``budget``
    bytes (:func:`store_budget`; None: :data:`STORE_BYTES`)."""
    num_layers = cfg.num_hidden_layers
    firsts = [min(c.first_layer(num_layers), num_layers - 1) for c in conditions]
    best, gain = 0, 0
    for s in sorted(set(firsts) - {0}):
        mine = [(tuple(ids), c) for ids, c in rows if firsts[c] >= s]
        g = s * (len(mine) - len({ids for ids, _ in mine}))
        if g > gain:
            best, gain = s, g
    if best:
        prompts = len({tuple(ids) for ids, c in rows if firsts[c] >= best})
        itemsize = jnp.dtype(dtype).itemsize
        size = prompts * length * (2 * best * cfg.num_key_value_heads * cfg.head_dim + cfg.hidden_size) * itemsize
        if size > (STORE_BYTES if budget is None else budget):
            return 0
    return best


def prefill_calls(rows: Sequence[tuple[Sequence[int], int]], from_start: Sequence[bool], p: int) -> list[list[int]]:
    """The rows of each prefill call of a job, in the order :func:`run` makes them: shortest rows first
    (consecutive calls then share a length bucket: less padding, few shapes), P rows a call, the rows
    prefilled from the store (``from_start``) in calls of their own, after the others."""
    # (rows of equal keys latest first: the order of popping a reverse-sorted queue, as run() always did)
    order = sorted(range(len(rows)), key=lambda r: (from_start[r], len(rows[r][0])), reverse=True)[::-1]
    calls = []
    for r in order:
        if calls and len(calls[-1]) < p and from_start[calls[-1][0]] == from_start[r]:
            calls[-1].append(r)
        else:
            calls.append([r])
    return calls


def _job_programs(fns: Functions, lm, prefix_ids, table, eos, packed: dict, decode_packed: dict, state: SlotState,
                  rows, calls, from_start, p: int, t: int, start: int, n_store: int, pad: int,
                  length_multiple: int) -> list:
    """Every program of a sharded job as :func:`cna_jax.precompile.spread` entries, the slowest to compile
    first (as measured for SmolLM2 on a CPU core: the store pass 16 s, the prefix 13 s, a prefill through all
    layers 11 s, decode 6 s, a prefill from the store 4-5 s, place 1 s; with the layers scanned, the packed
    weights' path, decode comes first: the three passes then take 1.4-2.5 s): one prefill per (from the store
    or not, length bucket) of the job's prefill ``calls`` (:func:`prefill_calls`). The arguments are those the
    calls will pass, or ``jax.ShapeDtypeStruct`` for outputs of earlier programs."""
    from cna_jax.batching import bucket, left_pad

    weights = packed.get("packed")
    rows_of = lambda length: fns.put_rows(*left_pad([[pad]], length, pad, batch=p), np.zeros((p,), np.int32))
    first, full, rest = [], [], []  # the store and the prefix; prefills through every layer; the others
    prefix_kv, store = None, (None, None, None)
    if prefix_ids is not None:
        first.append(fns.prefix.program(lm.params, prefix_ids, table, weights))
        prefix_kv = fns.prefix.out_abstract(lm.params, prefix_ids, table, weights)
    if start:
        args = (lm.params, prefix_kv, *rows_of(t), table, weights)
        first.insert(0, fns.store.at(p, start).program(*args))
        kv, res = fns.store.at(p, start).out_abstract(*args)
        passes = -(-n_store // p)  # run() concatenates the store passes' rows
        grow = lambda a, axis: jax.ShapeDtypeStruct(a.shape[:axis] + (a.shape[axis] * passes,) + a.shape[axis + 1:],
                                                    a.dtype)
        store = (KVCache(*(grow(x, 1) for x in kv)), grow(res, 0), fns.put_rows(np.zeros((p,), np.int32))[0])
    staged = None
    kinds = []
    for call in calls:
        kind = (from_start[call[0]], bucket(max(len(rows[r][0]) for r in call), length_multiple))
        if kind not in kinds:
            kinds.append(kind)
    for from_store, length in kinds:
        fn = fns.prefill.at(p, start if from_store else 0)
        args = (lm.params, prefix_kv, *rows_of(length), table, eos, *(store if from_store else (None,) * 3), weights)
        (rest if from_store else full).append(fn.program(*args))
        staged = staged or fn.out_abstract(*args)  # every prefill stages the same shapes
    index = fns.put_rows(np.zeros((p,), np.int32), np.zeros((p,), np.int32))
    decode = [fns.decode.program(lm.params, state, table, eos, decode_packed.get("packed"))]
    order = decode + full + first if _scanned(weights) else first + full + decode
    return order + rest + [fns.place.at(p).program(state, staged, *index)]


def run(lm, rows: Sequence[tuple[Sequence[int], int]], conditions: Sequence[Condition], *,
        max_new_tokens: int = 150, slots: int = 32, chunk: int = DECODE_CHUNK, prefix: Sequence[int] | None = None,
        on_finish: Callable[[int, list[int]], None] | None = None, progress: bool = False, desc: str = "generating",
        length_multiple: int = JOB_LENGTH_MULTIPLE, eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
        stop: Callable[[int, list[int]], bool] | None = None, min_table_rows: int = 0,
        from_first_changed_layer: bool = True) -> list[list[int]]:
    """Greedy generations for every row of a job; returns each row's new tokens (up to and including EOS).

    rows: (token ids of the prompt *after* ``prefix``, condition index) per row; prefix: token ids every
    row starts with (run once per condition), or None. on_finish(row, tokens) is called as rows end,
    in any order. ``lm`` provides cfg, params, dtype, the optional mesh layout and, unless given here,
    the EOS ids and pad id (from its tokenizer). stop(row, tokens so far) is asked after every decode
    chunk for each running row; True ends the row there, as EOS would (the study stops a row once its
    scores can no longer change, :func:`cna_jax.refusal.settled_rule`). min_table_rows: pad the condition
    table to the bucket of at least this many conditions; jobs of the same shapes that pass the same
    value share every compiled program (the study's generation and sweeps jobs: ~50 s of compiles on a
    2-core CPU). from_first_changed_layer: prefill the rows whose conditions leave the layers below
    :func:`lower_layer_start` unchanged from the unmodified model's lower layers, computed once per prompt
    (one more compiled prefill per length bucket and one store pass; False: every row through every layer).
    """
    from cna_jax.batching import bucket, left_pad

    cfg = lm.cfg
    if not rows:
        return []
    if max_new_tokens < 1 or slots < 1 or chunk < 1:
        raise ValueError("max_new_tokens, slots and chunk must be >= 1")
    for r, (ids, c) in enumerate(rows):
        if not 0 <= c < len(conditions):
            raise ValueError(f"row {r} names condition {c}, but the job has {len(conditions)}")
        if not len(ids):
            raise ValueError(f"row {r} has no tokens after the shared prefix")
    table_host = stack_conditions(cfg, conditions, min_table_rows)
    mult = lm.batch_multiple()
    slots = -(-min(slots, len(rows)) // mult) * mult
    q = 0 if not prefix else len(prefix)
    t = bucket(max(len(ids) for ids, _ in rows), length_multiple)
    width = q + t + max_new_tokens
    if lm.layout is None:
        fns = single_device_functions(cfg, lm.dtype, slots, width, max_new_tokens, chunk)
    else:
        fns = sharded_functions(cfg, lm.layout, lm.dtype, slots, width, max_new_tokens, chunk)
    table = fns.put_table(table_host)
    pad = lm.pad_id() if pad_id is None else pad_id
    eos = jnp.asarray(list(lm.eos_ids() if eos_ids is None else eos_ids) or [pad], jnp.int32)
    weights = packed_weights(lm)
    packed = {} if weights is None else {"packed": weights}
    decode_packed = packed if slots // mult <= PACKED_MAX_SLOTS else {}  # slots per device group
    state = fns.empty()
    p = prefill_rows(slots, q + t)

    devices = jax.devices()[:1] if lm.layout is None else list(lm.layout.mesh.devices.flat)
    start = 0
    if from_first_changed_layer:
        start = lower_layer_start(cfg, conditions, rows, t, lm.dtype, store_budget(devices))
    firsts = [c.first_layer(cfg.num_hidden_layers) for c in conditions]
    from_start = [start > 0 and firsts[c] >= start for _, c in rows]
    where = {}  # prompt tokens -> row of the store
    for r, (ids, _) in enumerate(rows):
        if from_start[r]:
            where.setdefault(tuple(ids), len(where))
    pending = collections.deque(prefill_calls(rows, from_start, p))
    prefix_ids = jnp.asarray(prefix, jnp.int32) if q else None
    if lm.layout is not None and jax.process_count() > 1:  # each process compiles a share of the job's programs
        precompile.spread(_job_programs(fns, lm, prefix_ids, table, eos, packed, decode_packed, state, rows, pending,
                                        from_start, p, t, start, len(where), pad, length_multiple))
    prefix_kv = fns.prefix(lm.params, prefix_ids, table, **packed) if q else None
    store_kv = store_res = None
    if start:
        seqs = list(where)
        c0 = np.int32(rows[from_start.index(True)][1])  # unmodified below start, like every such row's condition
        parts = []
        for i in range(0, len(seqs), p):
            tokens, valid = left_pad(seqs[i:i + p], t, pad, batch=p)
            parts.append(fns.store(lm.params, prefix_kv, *fns.put_rows(tokens, valid, np.full((p,), c0)), table,
                                   stop=start, **packed))
        store_kv = KVCache(*(jnp.concatenate([x[0][j] for x in parts], axis=1) for j in range(2)))
        store_res = jnp.concatenate([x[1] for x in parts], axis=0)

    occupant = [-1] * slots  # row in each slot, -1 = free
    staged, ready = None, []  # the last prefill call's rows, and (staged index, row) not yet placed
    results: list[list[int] | None] = [None] * len(rows)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(rows), desc=desc, unit="row")
    g = fns.groups(p)
    while pending or ready or any(o >= 0 for o in occupant):
        free = [s for s, o in enumerate(occupant) if o < 0]
        while free and (ready or pending):
            if not ready:  # prefill the next call's rows (fillers repeat the first; never placed)
                new = pending.popleft()
                seqs = [rows[r][0] for r in new]
                tokens, valid = left_pad(seqs, bucket(max(map(len, seqs)), length_multiple), pad, batch=p)
                cond = np.array([rows[r][1] for r in new] + [rows[new[0]][1]] * (p - len(new)), np.int32)
                if from_start[new[0]]:
                    idx = np.array([where[tuple(x)] for x in seqs] + [where[tuple(seqs[0])]] * (p - len(new)), np.int32)
                    staged = fns.prefill(lm.params, prefix_kv, *fns.put_rows(tokens, valid, cond), table, eos,
                                         store_kv, store_res, *fns.put_rows(idx), start=start, **packed)
                else:
                    staged = fns.prefill(lm.params, prefix_kv, *fns.put_rows(tokens, valid, cond), table, eos,
                                         **packed)
                ready = list(enumerate(new))
            # Pair ready rows with free slots of their own device group.
            pairs, left = [], []
            for j, r in ready:
                k = next((k for k, s in enumerate(free) if s // (slots // g) == j // (p // g)), None)
                if k is None:
                    left.append((j, r))
                else:
                    pairs.append((j, free.pop(k), r))
            if not pairs:
                break  # the free slots' groups have no ready rows: they wait for the next decode chunk
            ready = left
            for _, s, r in pairs:
                occupant[s] = r
            src = np.array([j for j, _, _ in pairs] + [0] * (p - len(pairs)), np.int32)
            dst = np.array([s for _, s, _ in pairs] + [slots] * (p - len(pairs)), np.int32)  # slots = dropped
            state = fns.place(state, staged, *fns.put_rows(src, dst))
        state = fns.decode(lm.params, state, table, eos, **decode_packed)
        done, step = lm.to_host(state.done), lm.to_host(state.step)
        ended = [s for s, o in enumerate(occupant) if o >= 0 and done[s]]
        out = lm.to_host(state.out) if ended or stop is not None else None
        if stop is not None:
            cut = [s for s, o in enumerate(occupant) if o >= 0 and not done[s] and stop(o, out[s, :step[s]].tolist())]
            if cut:
                mask = np.zeros((slots,), bool)
                mask[cut] = True
                state = state._replace(done=fns.retire(state.done, *fns.put_rows(mask)))
                ended += cut
        if ended:
            for s in ended:
                r = occupant[s]
                results[r] = out[s, :step[s]].tolist()
                occupant[s] = -1
                if on_finish is not None:
                    on_finish(r, results[r])
            if bar is not None:
                bar.update(len(ended))
    if bar is not None:
        bar.close()
    return results
