"""One Flax decoder for the Llama family (Llama 3.x, SmolLM2) and Qwen2 / Qwen2.5.

Parameter names mirror HF (``layers_3/mlp/down_proj/kernel`` is ``model.layers.3.mlp.down_proj.weight``
transposed) so users can cross-reference. Every MLP takes an explicit neuron multiplier
``[layers, neurons]`` applied to ``silu(gate_proj(x)) * up_proj(x)`` before ``down_proj``, at every
position; it is a traced array, so a new mask never recompiles.

Axis names: B batch, T query positions, S key/cache slots, H heads, K kv_heads, G = H // K,
D head_dim, E embed, I neurons, V vocab, L layers.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cna_jax import cpu_kernels
from cna_jax.models.config import ModelConfig

# Logical axis names for every parameter; mapped to mesh axes by rules in cna_jax.sharding.
_dense_init = nn.initializers.normal(0.02)


def _param_init(init, names):
    return nn.with_logical_partitioning(init, names)


# Logical axes of each KV cache array [L, B, K, S, D]. A sharded caller passes the cache's sharding
# (``Layout.sharding(CACHE_AXES)``) to the Decoder as ``cache_sharding``, a static module field;
# None (one device) leaves the cache unconstrained.
CACHE_AXES = ("layers", "cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim")


def constrain_cache(x: jax.Array, sharding=None) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class KVCache(NamedTuple):
    """Keys (already rotated) and values of every layer: each ``[L, B, K, S, D]``.

    Slots are the second-to-last axis so that each (batch, kv head) reads one contiguous [S, D] slab:
    attention then is a plain batched matmul with no transposed copy of the cache per step."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype, sharding=None) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, slots, cfg.head_dim)
        return cls(constrain_cache(jnp.zeros(shape, dtype), sharding), constrain_cache(jnp.zeros(shape, dtype), sharding))


def at_layer(a: jax.Array, layer, axis: int = 0) -> jax.Array:
    """``a``'s slice at ``layer`` along ``axis``: a static index for an int (the unrolled layers), a dynamic
    one for a traced layer (``Decoder``'s ``scan_layers``)."""
    if isinstance(layer, int):
        return a[(slice(None),) * axis + (layer,)]
    return jax.lax.dynamic_index_in_dim(a, layer, axis, keepdims=False)


def stack_trees(trees):
    """Pytrees of one structure -> one pytree of their leaves stacked on a new leading axis."""
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


class Intervention(NamedTuple):
    """Per-row interventions: a table of C stacked conditions and each row's index into it.

    neuron_mult: [C, L, I] float32 -- multiplies ``silu(gate_proj(x)) * up_proj(x)`` (1 = unchanged);
    direction: [C, E] float32 -- a unit residual direction r per condition (zeros when unused);
      direction, ablate and add are None together when no condition steers the residual stream (the
      steering arithmetic, exact no-ops then, is left out of the program);
    ablate: [C] float32 -- 1: project r out of the residual stream at every layer input and of every
      attention and MLP output (directional ablation), 0: nothing;
    add: [C, L] float32 -- alpha: ``x + alpha * r`` at the input of layer l (activation addition);
    cond: [B] int32 -- each row's condition.
    Rows gather their condition's slice one layer at a time ([B, I] live per layer, never [B, L, I]).
    Neutral entries (mult 1, ablate 0, add 0) leave the computation bit-identical: ``x - 0*p*r == x``.
    """

    neuron_mult: jax.Array
    direction: jax.Array
    ablate: jax.Array
    add: jax.Array
    cond: jax.Array

    def layer_mult(self, layer) -> jax.Array:
        """[B, I]: every row's neuron multiplier at ``layer`` (an int, or traced in a layer scan)."""
        return jnp.take(at_layer(self.neuron_mult, layer, 1), self.cond, axis=0)

    def steer(self) -> tuple[jax.Array, jax.Array, jax.Array] | None:
        """Per-row (direction [B, E], ablate [B], add [B, L]), or None for a table without them."""
        if self.direction is None:
            return None
        return tuple(jnp.take(a, self.cond, axis=0) for a in (self.direction, self.ablate, self.add))


def ablate_direction(x: jax.Array, r: jax.Array, a: jax.Array) -> jax.Array:
    """``x - a (x . r) r`` per row, in float32. x: [B, T, E]; r: [B, E] unit; a: [B]."""
    proj = jnp.einsum("bte,be->bt", x.astype(jnp.float32), r)
    return (x.astype(jnp.float32) - (a[:, None] * proj)[..., None] * r[:, None, :]).astype(x.dtype)


class DecoderOutput(NamedTuple):
    logits: jax.Array | None  # [B, T or P, V] float32
    cache: KVCache | None
    neurons: jax.Array | None  # [L, B, T or P, I]: silu(gate) * up, after the multiplier
    residuals: jax.Array | None = None  # [L, B, T or P, E]: what each layer reads (after any input steering)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse rotary frequencies ``[D/2]`` (float32), with Llama-3 scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    sc = cfg.rope_scaling
    if sc is None:
        return inv.astype(np.float32)
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) ``[B, T, 1, D/2]`` float32 of rotary positions [B, T] int, shared by every layer."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, D/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates halves (HF layout). x: [B, T, N, D]; rope: :func:`rope_tables` of the rows' positions."""
    cos, sin = rope
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", _param_init(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before the weight multiply.
        return weight * x32.astype(x.dtype)


def _packed_dense(module: nn.Module, name: str, x: jax.Array, features: int, cache_sharding=None
                  ) -> jax.Array | None:
    """x [B, ..., In] times the weight ``name`` of ``module`` [In, features] through the CPU kernel, when the
    caller passed that weight pre-packed in the ``packed`` collection (the engine on CPU with replicated
    weights: :func:`cna_jax.engine.packed_weights`); None otherwise (the caller's Flax layer runs).

    On a mesh (``cache_sharding`` given) each device multiplies its own rows, split like the cache's batch
    axis when B divides it (else every device all rows), by its replicated copy of the weight: a custom call
    has no partitioning rule, so without ``shard_map`` XLA would gather every row onto every device."""
    if not module.has_variable("packed", name):
        return None
    w = module.get_variable("packed", name)
    call = functools.partial(cpu_kernels.packed_matmul, n=features)
    if cache_sharding is None:
        return call(x, w)
    from jax.sharding import PartitionSpec as P

    mesh, b_axes = cache_sharding.mesh, _cache_spec(cache_sharding)[1]
    names = () if b_axes is None else (b_axes,) if isinstance(b_axes, str) else tuple(b_axes)
    rows = P(b_axes) if x.shape[0] % int(np.prod([mesh.shape[a] for a in names])) == 0 else P()
    return jax.shard_map(call, mesh=mesh, in_specs=(rows, P()), out_specs=rows, check_vma=False)(x, w)


def _cache_spec(sharding) -> tuple:
    """The stacked cache's PartitionSpec [L, B, K, S, D] as a 5-tuple."""
    spec = tuple(sharding.spec)
    return spec + (None,) * (5 - len(spec))


def _kernel_ok(head_dim: int, cache_sharding) -> bool:
    """Whether the engine's decode attention runs as the CPU kernel (cna_jax.cpu_kernels): on CPU, with
    the kernel built, and each device holding whole cache rows (slots and KV heads may be split)."""
    if head_dim % 8:
        return False
    if cache_sharding is None:
        on_cpu = jax.default_backend() == "cpu"
    else:
        on_cpu = cache_sharding.mesh.devices.flat[0].platform == "cpu"
        if _cache_spec(cache_sharding)[3:] != (None, None):
            return False
    return on_cpu and cpu_kernels.enabled()


def _kernel_attention(q, k, v, mask, scale: float, cache_sharding):
    """q [B, K, G, D], one layer's cache k, v [B, K, S, D], mask [B, S] -> [B, K, G, D]: the CPU kernel,
    per device on a mesh (cna_jax.cpu_kernels; the same softmax attention as :func:`_xla_attention`)."""
    call = functools.partial(cpu_kernels.decode_attention, scale=scale)
    if cache_sharding is None:
        return call(q, k, v, mask)
    from jax.sharding import PartitionSpec as P

    _, b_axes, k_axes, _, _ = _cache_spec(cache_sharding)
    rows, slots = P(b_axes, k_axes), P(b_axes)
    return jax.shard_map(call, mesh=cache_sharding.mesh, in_specs=(rows, rows, rows, slots), out_specs=rows,
                         check_vma=False)(q, k, v, mask)


def _xla_attention(q, k, v, mask, dtype, decode: bool):
    """q [B, K, T * G, D] (G query rows per KV head), k, v [B, K, S, D], mask [B, T, S] -> [B, K, T * G, D]."""
    b, k_heads, n, d = q.shape
    t = mask.shape[1]
    if decode:
        # Decode: a few query rows against many cached keys. As keys [S, D] x queries [D, N] with N
        # padded to a multiple of 4, XLA:CPU's matmul kernel runs at full speed; N = G = 3 rows (SmolLM2)
        # as the left operand take its slow remainder path (the scores of a SmolLM2 batch-32 step at
        # 206 columns, all 30 layers: 31.5 -> 20.9 ms on one core; BENCHMARKS.md, G5).
        q_pad = jnp.pad(q, ((0, 0), (0, 0), (0, -n % 4), (0, 0)))
        scores = jnp.einsum("bksd,bkqd->bksq", k.astype(q.dtype), q_pad,
                            preferred_element_type=jnp.float32)[..., :n].swapaxes(2, 3)
    else:
        scores = jnp.einsum("bkqd,bksd->bkqs", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores.reshape(b, k_heads, t, n // t, -1) * (d ** -0.5)
    # A finite minimum keeps fully masked (padding) query rows from producing NaN.
    scores = jnp.where(mask[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(b, k_heads, n, -1)
    return jnp.einsum("bkqs,bksd->bkqd", probs, v.astype(dtype))


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype
    cache_sharding: Any = None  # NamedSharding of the stacked cache, or None

    @nn.compact
    def __call__(self, x, rope, mask, cache, layer, cache_slot, prefix=None):
        """x: [B, T, E]; rope: :func:`rope_tables` of the rows' positions; mask: [B, T, S] bool (True = attend);
        cache: None or the stacked KVCache, written for this ``layer`` at slot ``cache_slot`` (or the
          engine's per-layer form: tuples of L arrays [B, K, S, D]);
        prefix: None or a stacked KVCache ``[L, 1 or B, K, Q, D]`` of keys/values that precede every
        row (not written): its Q slots come first, S = Q + T."""
        cfg = self.cfg
        h, k_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def proj(name, heads, axes):
            y = _packed_dense(self, name, x, heads * d, self.cache_sharding)
            if y is not None:
                y = y.reshape(x.shape[:2] + (heads, d))
                return y + self.get_variable("params", name)["bias"] if cfg.attention_bias else y
            return nn.DenseGeneral(
                (heads, d), use_bias=cfg.attention_bias, dtype=self.dtype, param_dtype=self.dtype, name=name,
                kernel_init=_param_init(_dense_init, ("embed",) + axes),
                bias_init=_param_init(nn.initializers.zeros, axes))(x)

        q = proj("q_proj", h, ("heads", "head_dim"))
        k = proj("k_proj", k_heads, ("kv_heads", "head_dim"))
        v = proj("v_proj", k_heads, ("kv_heads", "head_dim"))
        q = apply_rope(q, rope)
        k = apply_rope(k, rope)

        b, t = x.shape[:2]
        k = k.transpose(0, 2, 1, 3)  # [B, K, T, D]
        v = v.transpose(0, 2, 1, 3)
        per_layer = cache is not None and isinstance(cache.k, tuple)
        if per_layer:
            # Per-layer cache (the engine's decode layout): tuples of L arrays [B, K, S, D]. The write is in
            # place and attention reads the layer's own buffer (a slice of a stacked cache is a copy of the
            # layer's cache per step). No reshape between the write and the read: XLA:CPU would fuse a
            # second copy of the update into it, and two updates of one buffer cannot both be in place.
            k = jax.lax.dynamic_update_slice(cache.k[layer], k.astype(cache.k[layer].dtype), (0, 0, cache_slot, 0))
            v = jax.lax.dynamic_update_slice(cache.v[layer], v.astype(cache.v[layer].dtype), (0, 0, cache_slot, 0))
            cache = KVCache(cache.k[:layer] + (k,) + cache.k[layer + 1:], cache.v[:layer] + (v,) + cache.v[layer + 1:])
        elif cache is not None:
            # Update the stacked [L, B, K, S, D] arrays in place (no per-step copy of the whole cache).
            start = (layer, 0, 0, cache_slot, 0)
            cache = KVCache(
                constrain_cache(jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), start),
                                self.cache_sharding),
                constrain_cache(jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), start),
                                self.cache_sharding))
            k, v = cache.k[layer], cache.v[layer]
        elif prefix is not None:
            def lead(p):
                return jnp.broadcast_to(p[layer], (b,) + p.shape[2:]).astype(k.dtype)
            k = jnp.concatenate([lead(prefix.k), k], axis=2)
            v = jnp.concatenate([lead(prefix.v), v], axis=2)

        # Queries of one kv head are grouped as rows [T * G] of one matmul: a canonical batched
        # matmul over (B, K) for prefill and decode alike (a size-1 T axis makes XLA:CPU slow).
        g = h // k_heads
        q = q.reshape(b, t, k_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, k_heads, t * g, d)
        if per_layer and t == 1 and self.dtype == jnp.float32 and _kernel_ok(d, self.cache_sharding):
            out = _kernel_attention(q, k, v, mask[:, 0, :], d ** -0.5, self.cache_sharding)
        else:
            out = _xla_attention(q, k, v, mask, self.dtype, decode=per_layer)
        out = out.reshape(b, k_heads, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
        packed = _packed_dense(self, "o_proj", out.reshape(b, t, h * d), cfg.hidden_size, self.cache_sharding)
        if packed is not None:
            return packed, cache
        out = nn.DenseGeneral(
            cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=self.dtype, param_dtype=self.dtype,
            name="o_proj", kernel_init=_param_init(_dense_init, ("heads", "head_dim", "embed")))(out)
        return out, cache


class MLP(nn.Module):
    """SwiGLU MLP; the neuron multiplier scales ``silu(gate_proj(x)) * up_proj(x)``."""

    cfg: ModelConfig
    dtype: jnp.dtype
    cache_sharding: Any = None  # on a mesh: how packed products split their rows (:func:`_packed_dense`)

    @nn.compact
    def __call__(self, x, neuron_mult):
        """x: [B, T, E]; neuron_mult: [I] (every row), [B, I] (per row) or None.
        Returns (out [B, T, E], neurons [B, T, I])."""
        def dense(name, features, axes):
            if self.has_variable("packed", name):
                return functools.partial(_packed_dense, self, name, features=features,
                                         cache_sharding=self.cache_sharding)
            return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name=name,
                            kernel_init=_param_init(_dense_init, axes))

        i = self.cfg.intermediate_size
        hidden = nn.silu(dense("gate_proj", i, ("embed", "mlp"))(x)) * dense("up_proj", i, ("embed", "mlp"))(x)
        if neuron_mult is not None:
            mult = neuron_mult if neuron_mult.ndim == 1 else neuron_mult[:, None, :]
            hidden = hidden * mult.astype(hidden.dtype)
        return dense("down_proj", self.cfg.hidden_size, ("mlp", "embed"))(hidden), hidden


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype
    cache_sharding: Any = None

    @nn.compact
    def __call__(self, x, rope, mask, neuron_mult, cache, layer, cache_slot, prefix=None, ablate=None):
        """ablate: None or (direction [B, E], weight [B]): project the direction out of both block outputs."""
        eps = self.cfg.rms_norm_eps
        attn, cache = Attention(self.cfg, self.dtype, self.cache_sharding, name="self_attn")(
            RMSNorm(eps, self.dtype, name="input_layernorm")(x), rope, mask, cache, layer, cache_slot, prefix)
        if ablate is not None:
            attn = ablate_direction(attn, *ablate)
        x = x + attn
        mlp, neurons = MLP(self.cfg, self.dtype, self.cache_sharding, name="mlp")(
            RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x), neuron_mult)
        if ablate is not None:
            mlp = ablate_direction(mlp, *ablate)
        return x + mlp, cache, neurons


def _take_positions(x: jax.Array, select: jax.Array) -> jax.Array:
    """x: [B, T, ...]; select: [B, P] int -> [B, P, ...]."""
    return jnp.take_along_axis(x, select.reshape(select.shape + (1,) * (x.ndim - 2)), axis=1)


class Decoder(nn.Module):
    """Llama / Qwen2 causal LM.

    ``__call__(tokens [B, T], positions [B, T], attn_mask, neuron_mult [L, I] | None, cache, cache_slot,
    select [B, P] | None)``; see ``forward``-style wrappers in ``cna_jax.models`` for the common uses.
    ``cache_sharding``: the NamedSharding every write of a stacked cache is constrained to (a sharded
    caller's ``Layout.sharding(CACHE_AXES)``), or None; in the engine's decode (per-layer caches) it tells
    the CPU attention kernel how the slots and KV heads are split.
    """

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    cache_sharding: Any = None

    @nn.compact
    def __call__(self, tokens, positions, attn_mask, neuron_mult=None, cache: KVCache | None = None,
                 cache_slot=0, select=None, return_logits: bool = True, return_neurons: bool = False,
                 prefix: KVCache | None = None, intervention: Intervention | None = None,
                 return_residuals: bool = False, vocab_major_logits: bool = False, rope=None,
                 residual_layers: tuple[int, ...] | None = None, start=None, residual=None, stop: int | None = None,
                 scan_layers: bool = False):
        """
        tokens: [B, T] int; positions: [B, T] int rotary positions (``cumsum(valid) - 1`` for left padding).
        attn_mask: [B, T, S] bool, True where query t may attend key slot s (S = T without a cache,
          the cache length with one).
        neuron_mult: [L, I] or None; cache: KVCache or None, written at slot ``cache_slot`` (scalar).
        select: [B, P] int or None; when given, logits and neurons are returned at those positions only.
        prefix: KVCache ``[L, 1 or B, K, Q, D]`` or None (not with ``cache``): keys and values of a prefix
          every row continues (e.g. the cache a batch-1 run of shared tokens wrote); read, never written.
          attn_mask then covers S = Q + T slots (prefix first) and positions continue from the prefix's.
        intervention: per-row conditions (:class:`Intervention`), instead of ``neuron_mult``.
        return_residuals: also return the residual stream each layer reads ``[L, B, T or P, E]`` (at
          ``select`` when given): HF's ``hidden_states[l]``, after this layer's input steering if any.
        vocab_major_logits: logits as ``[V, B, T or P]``; with tied embeddings computed as ``E @ x^T``, a
          plain matrix product over the embedding rows (``x @ E^T`` makes XLA:CPU repack all of E per call).
        rope: :func:`rope_tables` of ``positions``, precomputed (the engine's decode loop computes a chunk's
          before the loop: inside it XLA fuses the sines and cosines into every layer's q and k and
          evaluates them per element, 3-4 ms of a SmolLM2 batch-32 step on one core), or None.
        residual_layers: with ``return_residuals``, the layers (a static ascending tuple) whose inputs are
          returned ``[len, B, T or P, E]``; None: every layer.
        start, residual: run only the layers ``>= start`` (a traced int32 scalar) from ``residual`` [B, T, E],
          the residual stream entering layer ``start`` (an earlier pass's ``return_residuals``, before that
          layer's input steering). The layers below are skipped at run time (``nn.cond``), so one compiled
          program serves every start; ``tokens`` is not read. Only for a forward without cache or prefix
          (:mod:`cna_jax.damage` runs each condition from the first layer it changes). A Python int
          ``start`` is static instead: the layers below are not traced at all and a ``cache`` is allowed
          (their cache entries stay as given: the engine's prefill fills them from the unmodified model).
        stop: a static layer: run only the layers below it (with ``return_residuals``, ``residual_layers``
          may name ``stop`` itself: the residual entering it); no logits.
        scan_layers: run the layers as one ``lax.scan`` over stacked weights instead of unrolled: the program
          holds one layer, so it compiles 4-8x faster (SmolLM2's engine passes at -O1: 1.4-2.5 s against
          7.4-11.4 s, BENCHMARKS.md X1), with the same bits and no slower (0.91-0.94x). It reads the weight
          products' stacked panels (the ``packed`` collection's ``layers``, :func:`cna_jax.engine.packed_weights`:
          the CPU engine) and of ``params`` only the norms and biases, stacked per call (a few KB a layer).
          For the engine's forward passes: a cache, static ``start`` and ``stop``, the residual at ``stop``,
          per-row interventions; not with ``prefix``, ``return_neurons``, other residual layers or a traced
          ``start``.
        """
        cfg = self.cfg
        if prefix is not None and cache is not None:
            raise ValueError("give either a cache or a prefix, not both")
        if intervention is not None and neuron_mult is not None:
            raise ValueError("give either neuron_mult (every row) or intervention (per row), not both")
        if residual_layers is not None and list(residual_layers) != sorted(set(residual_layers)):
            raise ValueError(f"residual_layers must be ascending and distinct, got {residual_layers}")
        if (start is None) != (residual is None):
            raise ValueError("start and residual go together")
        static_start = isinstance(start, int)
        if start is not None and (prefix is not None or return_neurons or return_residuals
                                  or (cache is not None and not static_start)):
            raise ValueError("a forward from a start layer takes no prefix (nor a cache, unless start is a "
                             "Python int) and returns logits only")
        if stop is not None and (return_logits or start is not None):
            raise ValueError("a forward up to a stop layer returns no logits and starts at layer 0")
        if scan_layers and (prefix is not None or return_neurons or (start is not None and not static_start)
                            or (return_residuals and (stop is None or tuple(residual_layers or ()) != (stop,)))):
            raise ValueError("scan_layers takes a cache, a static start or stop and returns the residual at stop "
                             "only; no prefix, neurons or traced start")
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                         embedding_init=_param_init(_dense_init, ("vocab", "embed")), name="embed_tokens")
        x = embed(tokens) if residual is None else residual
        all_neurons, all_residuals = [], []
        if rope is None:
            rope = rope_tables(positions, rope_inv_freq(cfg))
        steer = None if intervention is None else intervention.steer()
        ablate = None if steer is None else steer[:2]

        def steer_in(x, layer):
            """The residual entering ``layer`` (an int, or traced in a scan): r projected out (ablation), then
            alpha * r added."""
            if steer is None:
                return x
            direction, weight, add = steer
            x = ablate_direction(x, direction, weight)
            return x + (at_layer(add, layer, 1)[:, None, None] * direction[:, None, :]).astype(x.dtype)

        if scan_layers:
            first = start or 0
            last = cfg.num_hidden_layers if stop is None else min(stop, cfg.num_hidden_layers)
            x, cache = self._scan(x, rope, attn_mask, neuron_mult, intervention, steer_in, ablate, cache, cache_slot,
                                  first, last)
            if return_residuals and stop < cfg.num_hidden_layers:
                x = steer_in(x, stop)
                all_residuals.append(x if select is None else _take_positions(x, select))
        for layer in range(0 if scan_layers else cfg.num_hidden_layers):
            if intervention is None:
                mult = None if neuron_mult is None else neuron_mult[layer]
            else:
                mult = intervention.layer_mult(layer)

            def block(x, cache, layer=layer, mult=mult):
                return DecoderLayer(cfg, self.dtype, self.cache_sharding, name=f"layers_{layer}")(
                    x, rope, attn_mask, mult, cache, layer, cache_slot, prefix, ablate)

            if static_start and layer < start:
                continue  # x is still ``residual``, the stream entering layer ``start``
            if start is not None and not static_start:
                x = nn.cond(layer >= start, lambda _, x: block(steer_in(x, layer), None)[0], lambda _, x: x, self, x)
                continue
            x = steer_in(x, layer)
            if return_residuals and (residual_layers is None or layer in residual_layers):
                # Gathered here, as for the neurons below, so full [B, T, E] copies need not stay alive.
                all_residuals.append(x if select is None else _take_positions(x, select))
            if stop is not None and layer >= stop:
                break
            x, cache, neurons = block(x, cache)
            if return_neurons:
                if select is None:
                    all_neurons.append(neurons)
                else:
                    # Read the selected positions inside the layer: otherwise XLA may schedule every
                    # layer's gather at the end and keep each layer's full [B, T, I] activations alive
                    # (seen on GPU: 240 GB of temporaries for an 8B model at batch 64 x 2k).
                    x, picked = jax.lax.optimization_barrier((x, _take_positions(neurons, select)))
                    all_neurons.append(picked)
        neurons_out = jnp.stack(all_neurons) if return_neurons else None
        residuals_out = jnp.stack(all_residuals) if return_residuals else None
        if not return_logits:
            return DecoderOutput(None, cache, neurons_out, residuals_out)
        if select is not None:
            x = _take_positions(x, select)
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x)
        logits = _packed_dense(self, "head", x, cfg.vocab_size, self.cache_sharding)
        if logits is not None:
            logits = jnp.moveaxis(logits, -1, 0) if vocab_major_logits else logits
            return DecoderOutput(logits, cache, neurons_out, residuals_out)
        if cfg.tie_word_embeddings and vocab_major_logits:
            table = embed.embedding.astype(self.dtype)
            return DecoderOutput(jnp.einsum("ve,bte->vbt", table, x.astype(self.dtype)).astype(jnp.float32), cache,
                                 neurons_out, residuals_out)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.dtype,
                              kernel_init=_param_init(_dense_init, ("embed", "vocab")), name="lm_head")(x)
        if vocab_major_logits:
            logits = jnp.moveaxis(logits, -1, 0)
        return DecoderOutput(logits.astype(jnp.float32), cache, neurons_out, residuals_out)

    def _scan(self, x, rope, mask, neuron_mult, intervention, steer_in, ablate, cache, cache_slot, first: int,
              last: int):
        """Layers ``first <= l < last`` as one ``lax.scan`` (``scan_layers``); returns (x, cache). Each step
        slices its layer's panels, norms, multipliers and cache from the stacked arrays (a SmolLM2 layer's
        panels, 14 MB, are copied in ~1% of a prefill) and emits the layer's keys and values, which replace
        layers ``first:last`` of the stacked cache."""
        cfg, n = self.cfg, self.cfg.num_hidden_layers
        if not self.has_variable("packed", "layers"):
            raise ValueError("scan_layers reads the stacked packed weights (cna_jax.engine.packed_weights)")
        panels = self.get_variable("packed", "layers")
        norms = stack_trees([_without_kernels(self.variables["params"][f"layers_{l}"]) for l in range(n)])
        layer_module = DecoderLayer(cfg, self.dtype, self.cache_sharding, parent=None)

        def body(x, layer):
            at = functools.partial(at_layer, layer=layer)
            if intervention is not None:
                mult = intervention.layer_mult(layer)
            else:
                mult = None if neuron_mult is None else at(neuron_mult)
            own = None if cache is None else KVCache(at(cache.k)[None], at(cache.v)[None])
            x, own, _ = layer_module.apply({"params": jax.tree.map(at, norms), "packed": jax.tree.map(at, panels)},
                                           steer_in(x, layer), rope, mask, mult, own, 0, cache_slot, None, ablate)
            return x, None if own is None else (own.k[0], own.v[0])

        x, written = jax.lax.scan(body, x, jnp.arange(first, last, dtype=jnp.int32))
        if cache is None:
            return x, None

        def put(full, new):  # the stacked cache with layers first:last replaced
            parts = ([full[:first]] if first else []) + [new] + ([full[last:]] if last < n else [])
            return constrain_cache(jnp.concatenate(parts) if len(parts) > 1 else new, self.cache_sharding)

        return x, KVCache(put(cache.k, written[0]), put(cache.v, written[1]))


def _without_kernels(tree):
    """A layer's params less its weight matrices (what a layer reads besides the packed panels)."""
    return {k: _without_kernels(v) for k, v in tree.items() if k != "kernel"} if hasattr(tree, "items") else tree


def prefix_cache(model: "Decoder", params, prefix_tokens: jax.Array, neuron_mult=None) -> KVCache:
    """Keys and values ``[L, 1, K, Q, D]`` of tokens that every row of a batch starts with (a shared
    chat-template header), from one batch-1 pass with the same neuron multiplier.

    prefix_tokens: [Q] int. Under a sharded layout the batch-1 cache cannot take the layout's
    batch-split constraint, so it is traced unconstrained; the rows that continue from it carry the
    batch split of their own inputs."""
    q = prefix_tokens.shape[0]
    out = Decoder(model.cfg, model.dtype).apply(  # unconstrained, whatever model.cache_sharding says
        {"params": params}, prefix_tokens[None].astype(jnp.int32), jnp.arange(q, dtype=jnp.int32)[None],
        jnp.tril(jnp.ones((q, q), bool))[None], neuron_mult, cache=KVCache.zeros(model.cfg, 1, q, model.dtype),
        cache_slot=0, return_logits=False)
    return out.cache


def padding_positions(valid: jax.Array) -> jax.Array:
    """Rotary positions for left-padded rows: ``cumsum(valid) - 1``, 0 at padding. valid: [B, T] bool."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(valid: jax.Array) -> jax.Array:
    """[B, T, T] bool: causal, with padding keys masked. valid: [B, T] bool."""
    t = valid.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & valid[:, None, :]
