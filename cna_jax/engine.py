"""One greedy generation engine: every row carries its own intervention, finished rows give their slot
to the next (continuous batching).

A *job* is a list of rows ``(prompt, condition index)`` and a list of :class:`Condition` s. The
conditions are stacked into one table (:class:`cna_jax.models.llama.Intervention`, C padded to a power
of two with neutral rows, so a new set of conditions of the same bucket never recompiles) and each row
carries its condition index as a traced argument: any mix of conditions shares a batch.

The device holds ``S`` slots (:class:`SlotState`). The host loop alternates two jitted calls:

* ``insert`` -- prefill up to ``P`` queued rows (P is ``max(1, S // 4)`` or ``S``: two compiled sizes; a
  smaller P than the free slots would leave slots idle, a larger one prefills filler rows; both capped at
  ``PREFILL_TOKENS`` rows x padded length, so long prompts fill the free slots in several calls) and write
  their keys/values, first token and bookkeeping into free slots;
* ``decode`` -- up to ``chunk`` greedy steps over all slots in one ``lax.while_loop`` (it stops early
  when every slot is done); a slot decodes at most one chunk past its row's end.

Between calls the host reads which rows ended (EOS or ``max_new_tokens``), hands their tokens to the
caller (``on_finish``; the study appends them to disk) and queues new rows into the freed slots.

Cache layout per slot, width ``W = Q + T + R``: ``[0, Q)`` the shared chat-template prefix (computed
once per condition per job, with that condition's intervention: it applies to the prefix too),
``[Q, Q + T)`` the row's left-padded suffix, ``[Q + T, W)`` a ring of ``R = max_new_tokens`` columns
for generated tokens. Every slot writes decode step g at ring column ``g mod R`` -- one column for all
slots, so the cache update stays a single ``dynamic_update_slice`` whatever step each row is at. Keys are
stored already rotated and attention is order-free over slots, so a row's columns need not be in time
order; a row lives at most ``max_new_tokens - 1`` decode steps, so it never overwrites its own columns.

Compiled shapes per job: one prefix pass, one decode chunk and two insert sizes; all are cached across
jobs with the same (S, T, Q, C bucket, max_new_tokens).

Memory of the condition table: ``C x L x I`` float32. Llama-3.1-70B (80 x 28,672) with 64 conditions is
587 MB, split over the tensor axis (73 MB per device at tensor=8); SmolLM2 with 64 is 11.8 MB.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cna_jax.models.config import ModelConfig
from cna_jax.models.llama import CACHE_AXES, Decoder, Intervention, KVCache, constrain_cache, padding_positions


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


def condition_bucket(c: int) -> int:
    """Conditions are padded to a power of two (neutral rows), so similar jobs share compiled code."""
    return 1 << max(c - 1, 0).bit_length()


def stack_conditions(cfg: ModelConfig, conditions: Sequence[Condition]) -> tuple[np.ndarray, ...]:
    """Host arrays (neuron_mult [C, L, I], direction [C, E], ablate [C], add [C, L]) with C bucketed."""
    if not conditions:
        raise ValueError("a job needs at least one condition")
    L, I, E = cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size
    c = condition_bucket(len(conditions))
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
    return mult, direction, ablate, add


class SlotState(NamedTuple):
    """Everything the device keeps per slot (S slots, W cache columns, N = max_new_tokens).

    cache: KVCache of per-layer tuples of L arrays, keys [S, K, D, W], values [S, K, W, D]
    (:func:`split_layers`); kv_valid: [S, W] bool (columns a slot attends to);
    tok: [S] the token to feed next; pos: [S] its rotary position; step: [S] tokens generated so far;
    out: [S, N] generated tokens; done: [S] bool (ended, or empty); cond: [S] condition index;
    clock: [] int32 decode steps taken (selects the ring column)."""

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
    """A stacked cache [L, B, K, S, D] as per-layer tuples of L arrays, keys [B, K, D, S] and values
    [B, K, S, D] (the engine's slot layout, see ``Attention``: each layer's attention reads its own
    buffer, where a slice of a stacked cache is a copy per decode step, and the scores need no
    transposed keys)."""
    n = cache.k.shape[0]
    return KVCache(tuple(cache.k[l].swapaxes(2, 3) for l in range(n)), tuple(cache.v[l] for l in range(n)))


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


def prefix_fn(params, prefix_tokens, table, *, cfg: ModelConfig, dtype) -> KVCache:
    """Keys/values ``[L, C, K, Q, D]`` of the shared prefix [Q] under each of the C conditions."""
    c, q = table[0].shape[0], prefix_tokens.shape[0]
    tokens = jnp.broadcast_to(prefix_tokens[None].astype(jnp.int32), (c, q))
    positions = jnp.broadcast_to(jnp.arange(q, dtype=jnp.int32)[None], (c, q))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((q, q), bool))[None], (c, q, q))
    out = Decoder(cfg, dtype).apply({"params": params}, tokens, positions, mask, cache=KVCache.zeros(cfg, c, q, dtype),
                                    cache_slot=0, return_logits=False,
                                    intervention=Intervention(*table, jnp.arange(c, dtype=jnp.int32)))
    return out.cache


def insert_fn(params, state: SlotState, prefix_kv, tokens, valid, cond, slot_idx, table, eos_ids, *,
              cfg: ModelConfig, dtype) -> SlotState:
    """Prefills P rows and writes them into slots ``slot_idx`` [P] (an index >= S drops a filler row).

    tokens, valid: [P, T] left-padded suffixes; cond: [P]; prefix_kv: None or [L, C, K, Q, D]."""
    model = Decoder(cfg, dtype)
    p, t = tokens.shape
    s, w = state.kv_valid.shape
    n = state.out.shape[1]
    q = 0 if prefix_kv is None else prefix_kv.k.shape[3]
    cache = KVCache.zeros(cfg, p, q + t, dtype)
    if q:
        cache = KVCache(*(constrain_cache(jax.lax.dynamic_update_slice(c, jnp.take(pk, cond, axis=1).astype(c.dtype),
                                                                       (0, 0, 0, 0, 0)))
                          for c, pk in zip(cache, prefix_kv)))
    kv_valid = jnp.concatenate([jnp.ones((p, q), bool), valid], axis=1)  # [P, Q + T]
    mask = (jnp.arange(q + t)[None, None, :] <= (q + jnp.arange(t))[None, :, None]) & kv_valid[:, None, :]
    out = model.apply({"params": params}, tokens, q + padding_positions(valid), mask, None, cache, q,
                      select=jnp.full((p, 1), t - 1, jnp.int32),
                      intervention=Intervention(*table, cond))
    first = jnp.argmax(out.logits[:, 0], axis=-1).astype(jnp.int32)

    def put(dst, src):
        return dst.at[slot_idx].set(src.astype(dst.dtype), mode="drop")

    written = split_layers(out.cache)  # [P, K, D, Q + T] keys, [P, K, Q + T, D] values per layer
    new_cache = KVCache(tuple(c.at[slot_idx, :, :, :q + t].set(x.astype(c.dtype), mode="drop")
                              for c, x in zip(state.cache.k, written.k)),
                        tuple(c.at[slot_idx, :, :q + t].set(x.astype(c.dtype), mode="drop")
                              for c, x in zip(state.cache.v, written.v)))
    row_valid = jnp.concatenate([kv_valid, jnp.zeros((p, w - q - t), bool)], axis=1)
    return SlotState(
        cache=new_cache, kv_valid=put(state.kv_valid, row_valid), tok=put(state.tok, first),
        pos=put(state.pos, q + valid.sum(axis=1)), step=put(state.step, jnp.ones((p,), jnp.int32)),
        out=put(state.out, jnp.zeros((p, n), jnp.int32).at[:, 0].set(first)),
        done=put(state.done, _is_eos(first, eos_ids) | (n <= 1)), cond=put(state.cond, cond), clock=state.clock)


def decode_fn(params, state: SlotState, table, eos_ids, *, cfg: ModelConfig, dtype, steps: int) -> SlotState:
    """Up to ``steps`` greedy steps over every slot; stops early once all slots are done."""
    model = Decoder(cfg, dtype)
    s, w = state.kv_valid.shape
    n = state.out.shape[1]
    ring = n  # generated-token columns at the end of each slot
    cols = jnp.arange(n)[None, :]

    def cond_fn(carry):
        i, st = carry
        return (i < steps) & ~jnp.all(st.done)

    def body(carry):
        i, st = carry
        col = (w - ring) + st.clock % ring
        kv_valid = jax.lax.dynamic_update_slice(st.kv_valid, jnp.ones((s, 1), bool), (0, col))
        res = model.apply({"params": params}, st.tok[:, None], st.pos[:, None], kv_valid[:, None, :], None,
                          st.cache, col, intervention=Intervention(*table, st.cond), vocab_major_logits=True)
        nxt = greedy_tokens(res.logits[:, :, 0], axis=0)  # logits [V, S, 1]
        active = ~st.done
        out = jnp.where(active[:, None] & (cols == st.step[:, None]), nxt[:, None], st.out)
        step = st.step + active
        done = st.done | (active & (_is_eos(nxt, eos_ids) | (step >= n)))
        return i + 1, SlotState(res.cache, kv_valid, jnp.where(active, nxt, st.tok), st.pos + active, step, out,
                                done, st.cond, st.clock + 1)

    return jax.lax.while_loop(cond_fn, body, (jnp.int32(0), state))[1]


# Jitted single-device entry points (static shapes come from the arguments).
_empty_state = jax.jit(empty_state_fn, static_argnames=("cfg", "dtype", "slots", "width", "max_new_tokens"))
_prefix = jax.jit(prefix_fn, static_argnames=("cfg", "dtype"))
_insert = jax.jit(insert_fn, static_argnames=("cfg", "dtype"), donate_argnums=(1,))
_decode = jax.jit(decode_fn, static_argnames=("cfg", "dtype", "steps"), donate_argnums=(1,))


@dataclasses.dataclass
class Functions:
    """The four jitted calls of a job (single device, or sharded on a layout)."""

    empty: Callable
    prefix: Callable
    insert: Callable
    decode: Callable
    put_rows: Callable  # host [P, ...] arrays -> device arrays for ``insert``
    put_table: Callable  # host condition arrays -> device arrays


def single_device_functions(cfg: ModelConfig, dtype, slots: int, width: int, max_new_tokens: int, chunk: int
                            ) -> Functions:
    stat = dict(cfg=cfg, dtype=dtype)
    return Functions(
        empty=functools.partial(_empty_state, slots=slots, width=width, max_new_tokens=max_new_tokens, **stat),
        prefix=functools.partial(_prefix, **stat), insert=functools.partial(_insert, **stat),
        decode=functools.partial(_decode, steps=chunk, **stat),
        put_rows=lambda *a: tuple(jnp.asarray(x) for x in a),
        put_table=lambda t: tuple(jnp.asarray(x) for x in t))


@functools.lru_cache(maxsize=16)
def sharded_functions(cfg: ModelConfig, layout, dtype, slots: int, width: int, max_new_tokens: int, chunk: int
                      ) -> Functions:
    """The same calls on a mesh: slots split over the batch (data) axes, the condition table's neuron axis
    over ``tensor`` (like the MLP weights), each layer's KV cache in the ``CACHE_AXES`` shardings (less the layer axis;
    keys with their last two axes swapped, see :func:`split_layers`)."""
    from cna_jax.sharding import ShardedFunction

    b_, kv_, len_, d_ = CACHE_AXES[1:]  # one layer's keys [S, K, D, W] and values [S, K, W, D]
    b1, b2, rep = layout.batch(1), layout.batch(2), layout.replicated()
    n = cfg.num_hidden_layers
    cache_sh = KVCache((layout.sharding((b_, kv_, d_, len_)),) * n, (layout.sharding((b_, kv_, len_, d_)),) * n)
    state_sh = SlotState(cache_sh, b2, b1, b1, b1, b2, b1, b1, rep)
    table_sh = table_shardings(layout)
    params_sh = layout.params(cfg, dtype)
    stat = dict(cfg=cfg, dtype=dtype)
    empty = ShardedFunction(lambda **kw: empty_state_fn(**kw), layout, (), state_sh,
                            dict(slots=slots, width=width, max_new_tokens=max_new_tokens, **stat))
    prefix = ShardedFunction(prefix_fn, layout, (params_sh, rep, table_sh), rep, stat)
    mult = layout.batch_size_multiple()

    def row_sh(p):  # prefill rows split over the batch axes when they divide, else replicated
        return (b2, b2, b1, b1) if p % mult == 0 else (rep,) * 4

    inserts: dict[int, ShardedFunction] = {}

    def insert_at(p):  # the ShardedFunction for P prefill rows (also what launch/plan.py lowers)
        if p not in inserts:
            inserts[p] = ShardedFunction(insert_fn, layout, (params_sh, state_sh, rep, *row_sh(p), table_sh, rep),
                                         state_sh, stat, donate=(1,))
        return inserts[p]

    def insert(params, state, prefix_kv, tokens, valid, cond, slot_idx, table, eos_ids):
        return insert_at(tokens.shape[0])(params, state, prefix_kv, tokens, valid, cond, slot_idx, table, eos_ids)

    insert.at = insert_at
    decode = ShardedFunction(decode_fn, layout, (params_sh, state_sh, table_sh, rep), state_sh,
                             dict(steps=chunk, **stat), donate=(1,))

    def put_rows(*arrays):
        sh = row_sh(arrays[0].shape[0])
        return tuple(jax.make_array_from_callback(a.shape, s, lambda idx, a=a: a[idx]) for a, s in zip(arrays, sh))

    return Functions(empty, prefix, insert, decode, put_rows, functools.partial(sharded_table, layout))


def table_shardings(layout) -> tuple:
    """Shardings of the condition table: the neuron axis over ``tensor`` (like the MLP weights), the rest
    replicated."""
    rep = layout.replicated()
    return (layout.sharding((None, "layers", "neurons")), rep, rep, rep)


def sharded_table(layout, table) -> tuple:
    """Host condition arrays (:func:`stack_conditions`) -> global arrays in :func:`table_shardings`."""
    return tuple(jax.make_array_from_callback(a.shape, s, lambda idx, a=a: a[idx])
                 for a, s in zip(table, table_shardings(layout)))


# Rows x padded length of one insert call at most: prefill memory grows with it (attention scores with
# rows x length^2), so long prompts are prefilled a few rows at a time (8B at 32 slots x 2k tokens would
# need ~90 GB in one call).
PREFILL_TOKENS = 8192


def insert_sizes(slots: int, length: int = 1) -> list[int]:
    """Prefill batch sizes for prompts padded to ``length``: a quarter of the slots (at least 1) and all of
    them (the first fill), both capped at ``PREFILL_TOKENS // length`` rows."""
    cap = max(1, min(slots, PREFILL_TOKENS // max(length, 1)))
    return sorted({max(1, min(cap, slots // 4)), cap})


def run(lm, rows: Sequence[tuple[Sequence[int], int]], conditions: Sequence[Condition], *,
        max_new_tokens: int = 150, slots: int = 32, chunk: int = 8, prefix: Sequence[int] | None = None,
        on_finish: Callable[[int, list[int]], None] | None = None, progress: bool = False, desc: str = "generating",
        length_multiple: int = 16, eos_ids: Sequence[int] | None = None, pad_id: int | None = None
        ) -> list[list[int]]:
    """Greedy generations for every row of a job; returns each row's new tokens (up to and including EOS).

    rows: (token ids of the prompt *after* ``prefix``, condition index) per row; prefix: token ids every
    row starts with (run once per condition), or None. on_finish(row, tokens) is called as rows end,
    in any order. ``lm`` provides cfg, params, dtype, the optional mesh layout and, unless given here,
    the EOS ids and pad id (from its tokenizer).
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
    table_host = stack_conditions(cfg, conditions)
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
    prefix_kv = fns.prefix(lm.params, jnp.asarray(prefix, jnp.int32), table) if q else None
    state = fns.empty()
    sizes = insert_sizes(slots, q + t)

    queue = list(range(len(rows)))[::-1]  # pop() takes the next row
    occupant = [-1] * slots  # row in each slot, -1 = free
    results: list[list[int] | None] = [None] * len(rows)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(rows), desc=desc, unit="row")
    while queue or any(o >= 0 for o in occupant):
        free = [s for s, o in enumerate(occupant) if o < 0]
        while queue and free:  # several inserts when the prefill cap is below the free slots
            take = min(len(free), len(queue), sizes[-1])
            p = next(x for x in sizes if x >= take)
            new = [queue.pop() for _ in range(take)]
            tokens, valid = left_pad([rows[r][0] for r in new], t, pad, batch=p)
            cond = np.array([rows[r][1] for r in new] + [0] * (p - take), np.int32)
            slot_idx = np.array(free[:take] + [slots] * (p - take), np.int32)  # slots = dropped filler
            for s, r in zip(free, new):
                occupant[s] = r
            free = free[take:]
            state = fns.insert(lm.params, state, prefix_kv, *fns.put_rows(tokens, valid, cond, slot_idx), table, eos)
        state = fns.decode(lm.params, state, table, eos)
        done, step = lm.to_host(state.done), lm.to_host(state.step)
        ended = [s for s, o in enumerate(occupant) if o >= 0 and done[s]]
        if ended:
            out = lm.to_host(state.out)
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
