"""Damage of an intervention, measured against the unmodified model (docs/METHOD.md §5.2).

For each condition and prompt, the KL divergence ``KL(p_none || p_cond)`` (natural log) of the
next-token distributions at the positions that predict the unmodified model's own greedy continuation
(teacher-forced: both models read the same tokens):

* ``KL_first`` -- at the first generated position only (heretic's measure);
* ``KL_seq`` -- the mean over the continuation's positions (up to ``max_new_tokens``), which also
  catches damage that appears only later in a generation.

Each is computed per prompt, then averaged over prompts. Every condition applies its intervention to
the whole sequence (prompt and continuation), as in generation.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cna_jax import cpu_kernels, precompile
from cna_jax.batching import bucket, padded_batches
from cna_jax.engine import Condition, put_host_table, sharded_table, stack_conditions, table_shardings
from cna_jax.models.config import ModelConfig
from cna_jax.models.llama import Decoder, Intervention, causal_mask, padding_positions
from cna_jax.sharding import Layout, ShardedFunction


# Every layer's residual stream is kept per batch when all L of them fit in RESIDUAL_BUDGET bytes per device
# (SmolLM2, the study's batches: 62 MB), so each condition starts at its own first changed layer; else at most
# RESIDUAL_GRID layers' (every g-th, g = ceil(L / 16)): memory [16, B, T, E] instead of [L, B, T, E] (a 70B
# model, batch 8 x 2k tokens in bf16: 4.3 GB, not 21), a condition starting up to g - 1 layers early.
RESIDUAL_GRID = 16
RESIDUAL_BUDGET = 1 << 30


def residual_grid(num_layers: int, layer_bytes: int, budget: int = RESIDUAL_BUDGET) -> int:
    """g: the residual stream is kept at the inputs of layers 0, g, 2g, ...: 1 when ``num_layers`` streams of
    ``layer_bytes`` each (one layer's [B, T, E] on a device) fit in ``budget``, else ceil(L / RESIDUAL_GRID)."""
    return 1 if num_layers * layer_bytes <= budget else -(-num_layers // RESIDUAL_GRID)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "grid"))
def residuals_fn(params, tokens, valid, *, cfg: ModelConfig, dtype, grid: int):
    """The unmodified model's residual stream entering layers 0, g, 2g, ... ``[K, B, T, E]`` (g = ``grid``).
    tokens, valid: [B, T] left-padded."""
    out = Decoder(cfg, dtype).apply({"params": params}, tokens, padding_positions(valid), causal_mask(valid),
                                    return_logits=False, return_residuals=True,
                                    residual_layers=tuple(range(0, cfg.num_hidden_layers, grid)))
    return out.residuals


def _logits(params, residuals, start, valid, select, table, cond, cfg, dtype, g):
    """logits ``[B, N, V]`` float32 at ``select`` [B, N], running layers ``g * start ..`` from
    ``residuals[start]``."""
    x = jax.lax.dynamic_index_in_dim(residuals, start, keepdims=False)
    out = Decoder(cfg, dtype).apply({"params": params}, None, padding_positions(valid), causal_mask(valid),
                                    select=select, intervention=Intervention(*table, cond), start=start * g,
                                    residual=x)
    return out.logits.astype(jnp.float32)


def _per_device(fn, layout: Layout | None, *xs):
    """fn on each device's rows of xs [B, ...] (split like the batch): a custom call has no partitioning
    rule, so without ``shard_map`` XLA would gather every row onto every device."""
    if layout is None:
        return fn(*xs)
    spec = layout.spec(("batch",))
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=(spec,) * len(xs), out_specs=spec, check_vma=False)(*xs)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "grid", "kernel", "layout"))
def kl_fn(ref, params, residuals, start, valid, select, table, cond, *, cfg: ModelConfig, dtype, grid: int,
          kernel: bool = False, layout: Layout | None = None):
    """``(KL(ref || this) [B, N], this [B, N, V])``: the next-token distribution at positions ``select`` [B, N],
    row b under condition cond[b], every layer from ``g * start`` run on :func:`residuals_fn`'s
    ``residuals[start]`` (start: an int32 scalar, traced: one program serves every start); valid: [B, T]
    left-padded. A distribution is float32 logits with ``kernel`` (the KL through
    :func:`cna_jax.cpu_kernels.row_kl`, per device of ``layout``'s mesh when given), else log-probabilities
    (XLA's log-softmax, once per call). ref: the unmodified model's distribution from this program; its own
    call (the reference pass) takes any array of that shape and ignores the KL. One program serves both
    passes: each costs ~7 s of compile per batch shape."""
    logits = _logits(params, residuals, start, valid, select, table, cond, cfg, dtype, grid)
    if kernel:
        return _per_device(cpu_kernels.row_kl, layout, logits, ref), logits
    logq = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.exp(ref) * (ref - logq), axis=-1), logq


@functools.lru_cache(maxsize=16)
def sharded_kl_functions(cfg: ModelConfig, layout: Layout, dtype, kernel: bool, grid: int
                         ) -> tuple[ShardedFunction, ShardedFunction]:
    """:func:`residuals_fn` and :func:`kl_fn` on a mesh with explicit shardings: rows split over the batch
    axes, everything else replicated (the condition table as the engine places it). Explicit shardings let a
    multi-process run compile them ahead from shapes alone (:mod:`cna_jax.precompile`)."""
    rows = lambda ndim: layout.batch(ndim)
    rep, params = layout.replicated(), layout.params(cfg, dtype)
    residuals = layout.sharding((None, "batch", None, None))  # [K, B, T, E]
    stat = dict(cfg=cfg, dtype=dtype, grid=grid)
    tail = (rep, rows(2), rows(2), table_shardings(layout), rows(1))  # start, valid, select, table, cond
    return (ShardedFunction(residuals_fn.__wrapped__, layout, (params, rows(2), rows(2)), residuals, stat),
            ShardedFunction(kl_fn.__wrapped__, layout, (rows(3), params, residuals, *tail), (rows(2), rows(3)),
                            dict(stat, kernel=kernel, layout=layout if kernel else None)))


def use_row_kernels(lm) -> bool:
    """Whether :func:`kl_along` runs its KL through the CPU kernel (on CPU, when built;
    XLA's ops elsewhere): the KL of 600 positions (4 rows x 150) over a 49k vocabulary takes ~40 ms instead
    of ~380 ms on one core."""
    platform = jax.default_backend() if lm.layout is None else lm.layout.platform
    return platform == "cpu" and cpu_kernels.row_kl_enabled()


def kl_along(lm, prompt_ids: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
             conditions: Sequence[Condition], *, max_positions: int | None = None, batch_size: int = 8,
             progress: bool = False, desc: str = "KL", residual_budget: int = RESIDUAL_BUDGET) -> np.ndarray:
    """Per-position KL of every condition against the unmodified model along given continuations.

    prompt_ids: the prompts' token ids (as generation saw them, chat template included);
    continuations: the unmodified model's greedy tokens for each prompt (at least one each);
    max_positions: score at most this many positions per prompt (default: all);
    residual_budget: bytes per device for the kept residual streams of a batch (:func:`residual_grid`).
    Returns ``[C, P, N]`` float64 (N = the longest scored continuation), NaN beyond each prompt's
    scored length. A neutral condition gives exactly 0 (same logits, same reduction order).

    Per batch, one pass of the unmodified model keeps its residual stream at every layer input, or every
    g-th where that would not fit (:func:`residual_grid`); each condition then runs only from the kept layer
    at or below the first layer it changes (``Condition.first_layer``; below it the stream is the unmodified
    model's, exactly). The testbed's CNA set (SmolLM2, from layer 23) then runs 7 of 30 layers plus the head
    (BENCHMARKS.md, K1). The reference logits come from the same program run from the last kept layer.
    """

    if len(prompt_ids) != len(continuations):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(continuations)} continuations")
    if not len(prompt_ids) or not conditions:
        raise ValueError("kl_along needs at least one prompt and one condition")
    cont = [list(c)[:max_positions] for c in continuations]
    if min(map(len, cont)) < 1:
        raise ValueError("every continuation needs at least one token")
    n = max(map(len, cont))
    for i, cond in enumerate(conditions):  # every condition is checked before any work
        cond.check(lm.cfg, f"condition {i}")
    # One two-row table per condition (that condition, then the unmodified model): the compiled
    # programs then depend on the batch shape only, so every kl_along call of a study (damage, sweeps)
    # shares them whatever its number of conditions.
    put = (lambda t: sharded_table(lm.layout, t)) if lm.layout is not None else put_host_table
    tables = [put(stack_conditions(lm.cfg, [cond, Condition()], steering=True)) for cond in conditions]
    n_layers = lm.cfg.num_hidden_layers
    seqs = [list(p) + c for p, c in zip(prompt_ids, cont)]
    multiple = lm.batch_multiple()
    batch_rows = -(-min(batch_size, len(seqs)) // multiple) * multiple  # padded_batches' rows
    layer_bytes = (batch_rows // multiple * bucket(max(map(len, seqs))) * lm.cfg.hidden_size
                   * jnp.dtype(lm.dtype).itemsize)  # one layer's stream of the longest batch on a device
    g = residual_grid(n_layers, layer_bytes, residual_budget)
    last = (n_layers - 1) // g  # the reference's start: the last kept layer
    starts = [min(cond.first_layer(n_layers) // g, last) for cond in conditions]
    out = np.full((len(conditions), len(seqs), n), np.nan)
    pad = lm.pad_id() if lm.tokenizer is not None else 0
    kernel = use_row_kernels(lm)
    stat = dict(cfg=lm.cfg, dtype=lm.dtype, grid=g)
    rows_stat = dict(stat, kernel=kernel, layout=lm.layout if kernel else None)
    if lm.layout is not None:
        rep = lambda c, b: lm.global_batch(np.full((b,), c, np.int32))[0]
        scalar = lambda v: jax.make_array_from_callback((), lm.layout.replicated(), lambda idx: np.int32(v))
        sharded = sharded_kl_functions(lm.cfg, lm.layout, lm.dtype, kernel, g)
        run_residuals, run_kl = sharded
        zeros = lambda shape: jax.make_array_from_callback(  # each process makes its own rows
            shape, lm.layout.batch(len(shape)), lambda idx: np.zeros(
                [len(range(*i.indices(d))) for i, d in zip(idx, shape)], np.float32))
    else:
        rep = lambda c, b: jnp.full((b,), c, jnp.int32)
        scalar = jnp.int32
        run_residuals = functools.partial(residuals_fn, **stat)
        run_kl = functools.partial(kl_fn, **rows_stat)
        zeros = lambda shape: jnp.zeros(shape, jnp.float32)
    placeholder = {}  # the reference pass's ref (its KL is not used), one batch shape at a time

    def arrays(rows, tokens, valid):  # -> (rows' scored lengths, tokens, valid, select) of one batch
        b, t = tokens.shape
        # Scored positions per row: a continuation is shorter than its sequence, so min(t, n) columns
        # hold every row's (short batches skip the head and softmax at positions none of them has).
        m = min(t, n)
        lens = np.array([len(cont[r]) for r in rows] + [len(cont[rows[0]])] * (b - len(rows)))  # fillers repeat
        # Position t-1-len+j reads the prompt's last token (j = 0) or continuation token j-1, predicting token j.
        select = np.minimum(t - 1 - lens[:, None] + np.arange(m)[None, :], t - 1).astype(np.int32)
        out = (tokens, valid, select)
        return (lens, *(out if lm.layout is None else lm.global_batch(*out)))

    batches = lambda progress: padded_batches(seqs, batch_size, pad, progress=progress, desc=desc,
                                              multiple=multiple)
    if lm.layout is not None and jax.process_count() > 1:  # each process compiles a share of the batch shapes
        slow, fast, seen = [], [], set()  # per batch shape: logits and KL (~7 s), residuals (~2 s)
        for batch in batches(False):
            if batch[1].shape not in seen:
                seen.add(batch[1].shape)
                _, tokens_, valid_, select_ = arrays(*batch)
                b, m = select_.shape
                res = sharded[0].out_abstract(lm.params, tokens_, valid_)
                ref = jax.ShapeDtypeStruct((b, m, lm.cfg.vocab_size), jnp.float32)
                slow.append(sharded[1].program(ref, lm.params, res, scalar(last), valid_, select_, tables[0],
                                               rep(0, b)))
                fast.append(sharded[0].program(lm.params, tokens_, valid_))
        precompile.spread(slow + fast)
    for rows, tokens, valid in batches(progress):
        lens, tokens_, valid_, select_ = arrays(rows, tokens, valid)
        b = tokens.shape[0]
        residuals = run_residuals(lm.params, tokens_, valid_)
        shape = (b, select_.shape[1], lm.cfg.vocab_size)
        if shape not in placeholder:
            placeholder = {shape: zeros(shape)}
        _, ref = run_kl(placeholder[shape], lm.params, residuals, scalar(last), valid_, select_, tables[0], rep(1, b))
        for c in range(len(conditions)):
            kl, _ = run_kl(ref, lm.params, residuals, scalar(starts[c]), valid_, select_, tables[c], rep(0, b))
            kl = lm.to_host(kl)
            for i, r in enumerate(rows):
                out[c, r, :lens[i]] = kl[i, :lens[i]]
    return out


def summarize_kl(kl: np.ndarray) -> dict[str, np.ndarray]:
    """``{"kl_first": [C], "kl_seq": [C]}`` from :func:`kl_along`'s ``[C, P, N]``: per prompt (the first
    position; the mean over its scored positions), then the mean over prompts."""
    return {"kl_first": kl[:, :, 0].mean(axis=1), "kl_seq": np.nanmean(kl, axis=2).mean(axis=1)}
