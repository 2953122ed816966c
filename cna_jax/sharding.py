"""Meshes, logical-axis rules and sharded jitted entry points (forward, generation, collection, LASSO).

The mesh always has the three axes ``(data, fsdp, tensor)``; sizes come from the config's ``mesh``
section, where ``-1`` means "all remaining devices". Every parameter of the Flax decoder carries
logical axis names (``vocab, embed, heads, kv_heads, head_dim, mlp, norm``); activations, the KV cache
and the LASSO node axis have their own names (``batch, length, act_vocab, layers, cache_batch,
cache_length, cache_kv_heads, neurons, nodes``). A *rule preset* maps logical names to mesh axes:

* ``generation`` -- tensor-parallel weights (``heads, kv_heads, mlp, vocab -> tensor``), replicated over
  ``data``; the batch is split over ``data``. Nothing is FSDP-sharded, so decode never all-gathers
  weights per token.
* ``collection`` -- data-parallel: the batch is split over ``data`` *and* ``fsdp``; weights are
  replicated across them (tensor-parallel over ``tensor`` when that axis is > 1).
* ``fsdp`` -- like ``collection`` but weights are also split on ``embed`` over ``fsdp`` (for models
  whose tensor-parallel slice alone does not fit).

Divisibility is checked up front (:func:`make_layout`): a dimension that does not divide its mesh
axes raises :class:`ShardingError` naming the dimension, its size and the axes. KV heads that don't
divide the tensor axis (Llama-70B's 8 on tensor=16) need an explicit choice, ``kv_heads="replicate"``
(KV projections and cache replicated across ``tensor``) or ``kv_heads="batch"`` (KV projections
replicated, cache split on batch over ``data x tensor``).

The sharded functions are ``jax.jit(fn, in_shardings=..., out_shardings=..., static_argnames=...)``
over the un-jitted functions; the logical rules and the mesh are entered *inside* the traced
function, so ``nn.with_logical_constraint`` calls in the model (the KV cache) bind to this layout.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cna_jax.models.config import ModelConfig
from cna_jax.models.llama import CACHE_AXES, CACHE_SHARDING, Decoder, KVCache

AXES = ("data", "fsdp", "tensor")
KV_FALLBACKS = (None, "replicate", "batch")


class ShardingError(ValueError):
    """A mesh or layout that cannot hold the model / inputs (sizes that don't divide)."""


# ---------------------------------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------------------------------
def _sizes_from(spec) -> tuple[int, int, int]:
    if spec is None:
        return (-1, 1, 1)
    if isinstance(spec, (tuple, list)):
        if len(spec) != 3:
            raise ShardingError(f"a mesh shape is (data, fsdp, tensor); got {tuple(spec)}")
        return tuple(int(s) for s in spec)
    get = spec.get if isinstance(spec, Mapping) or hasattr(spec, "get") else (lambda k, d: getattr(spec, k, d))
    return tuple(int(get(a, 1)) for a in AXES)


def resolve_mesh_shape(spec, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one ``-1`` replaced by the remaining devices.

    ``spec``: a (data, fsdp, tensor) tuple, a mapping / ConfigDict with those keys, or None (all data).
    Raises :class:`ShardingError` when the sizes don't multiply to the device count.
    """
    sizes = _sizes_from(spec)
    named = ", ".join(f"{a}={s}" for a, s in zip(AXES, sizes))
    if sum(s == -1 for s in sizes) > 1:
        raise ShardingError(f"mesh ({named}): at most one axis may be -1 (= the rest of the devices)")
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh ({named}): sizes must be positive or -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise ShardingError(
                f"mesh ({named}) cannot be laid out on {n_devices} devices: the fixed axes multiply to "
                f"{fixed}, which does not divide {n_devices}")
        sizes = tuple(n_devices // fixed if s == -1 else s for s in sizes)
    elif fixed != n_devices:
        raise ShardingError(
            f"mesh ({named}) needs {fixed} devices but {n_devices} are available; use -1 on one axis "
            f"for 'the rest', or sizes that multiply to {n_devices}")
    return sizes


def make_mesh(spec=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor) from a config ``mesh`` section or a tuple."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(spec, len(devices))
    if len(devices) == len(jax.devices()):
        try:  # topology-aware placement (ICI rings on TPU, NVLink islands on GPU)
            from jax.experimental import mesh_utils
            arr = mesh_utils.create_device_mesh(shape, devices=devices)
            return Mesh(arr, AXES)
        except Exception:  # unusual topologies: plain order
            pass
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


# ---------------------------------------------------------------------------------------------------
# Rule presets (data) and layouts
# ---------------------------------------------------------------------------------------------------
_WEIGHTS_TP = {"vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
               "head_dim": None, "norm": None, "layers": None, "length": None, "cache_length": None,
               "act_vocab": "tensor", "cache_kv_heads": "tensor", "neurons": "tensor",
               "cache_head_dim": None, "nodes": ("data", "fsdp", "tensor"), "candidates": None}

RULE_PRESETS: dict[str, dict[str, Any]] = {
    "generation": {**_WEIGHTS_TP, "embed": None, "batch": "data", "cache_batch": "data"},
    "collection": {**_WEIGHTS_TP, "embed": None, "batch": ("data", "fsdp"), "cache_batch": ("data", "fsdp")},
    "fsdp": {**_WEIGHTS_TP, "embed": "fsdp", "batch": ("data", "fsdp"), "cache_batch": ("data", "fsdp")},
}


def _axes_tuple(v) -> tuple[str, ...]:
    if v is None:
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


def _axes_size(mesh: Mesh, v) -> int:
    return math.prod(mesh.shape[a] for a in _axes_tuple(v))


def _fmt_axes(mesh: Mesh, v) -> str:
    axes = _axes_tuple(v)
    return " x ".join(f"{a}={mesh.shape[a]}" for a in axes)


def _dims(cfg: ModelConfig) -> dict[str, tuple[str, int]]:
    """Logical name -> (what it is, size) for the model-shaped dimensions."""
    return {
        "vocab": ("vocab_size", cfg.vocab_size), "act_vocab": ("vocab_size", cfg.vocab_size),
        "embed": ("hidden_size", cfg.hidden_size), "heads": ("num_attention_heads", cfg.num_attention_heads),
        "kv_heads": ("num_key_value_heads", cfg.num_key_value_heads),
        "cache_kv_heads": ("num_key_value_heads", cfg.num_key_value_heads),
        "mlp": ("intermediate_size", cfg.intermediate_size), "neurons": ("intermediate_size", cfg.intermediate_size),
        "head_dim": ("head_dim", cfg.head_dim), "layers": ("num_hidden_layers", cfg.num_hidden_layers),
    }


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh plus resolved logical-axis rules (hashable pieces only; build with :func:`make_layout`)."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]
    preset: str = "generation"
    kv_heads: str | None = None

    @property
    def rules_dict(self) -> dict[str, Any]:
        return dict(self.rules)

    def spec(self, logical: Sequence[str | None]) -> P:
        return nn.logical_to_mesh_axes(tuple(logical), self.rules)

    def sharding(self, logical: Sequence[str | None]) -> NamedSharding:
        """NamedSharding for an array whose axes have these logical names (None = unsharded)."""
        return NamedSharding(self.mesh, self.spec(logical))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def batch(self, ndim: int = 2) -> NamedSharding:
        """[batch, ...] inputs (tokens, masks)."""
        return self.sharding(("batch",) + (None,) * (ndim - 1))

    def batch_size_multiple(self) -> int:
        return _axes_size(self.mesh, self.rules_dict.get("batch"))

    def params(self, cfg: ModelConfig, dtype=jnp.float32) -> dict:
        """Tree of NamedSharding matching the parameter tree (from the logical boxes of ``init``)."""
        return param_shardings(cfg, self, dtype)

    def cache(self) -> KVCache:
        """KVCache of NamedShardings (axes ``CACHE_AXES`` of ``cna_jax.models.llama``)."""
        s = self.sharding(CACHE_AXES)
        return KVCache(s, s)

    def context(self):
        """Mesh + rules for tracing (entered inside the traced functions)."""
        return _LayoutContext(self)

    def describe(self) -> str:
        shape = ", ".join(f"{a}={self.mesh.shape[a]}" for a in AXES)
        used = {k: v for k, v in self.rules if v is not None}
        return f"mesh ({shape}), rules {self.preset!r}{'' if self.kv_heads is None else f' kv_heads={self.kv_heads}'}: {used}"


class _LayoutContext:
    """Sets the KV cache's sharding for ``cna_jax.models.llama.constrain_cache`` while tracing."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self._token = None

    def __enter__(self):
        self._token = CACHE_SHARDING.set(self.layout.sharding(CACHE_AXES))
        return self.layout

    def __exit__(self, *exc):
        CACHE_SHARDING.reset(self._token)
        return False


def make_layout(cfg: ModelConfig, mesh: Mesh, preset: str | Mapping[str, Any] = "generation", *,
                kv_heads: str | None = None, batch: int | None = None) -> Layout:
    """Checks every dimension against its mesh axes and returns the :class:`Layout`.

    ``preset``: a name in :data:`RULE_PRESETS` or a mapping logical name -> mesh axis / axes / None.
    ``kv_heads``: None (error when KV heads don't divide the tensor axis), ``"replicate"`` or ``"batch"``.
    ``batch``: when given, the batch size is checked against the batch axes too.
    """
    if kv_heads not in KV_FALLBACKS:
        raise ShardingError(f"kv_heads must be one of {KV_FALLBACKS}, got {kv_heads!r}")
    if isinstance(preset, str):
        if preset not in RULE_PRESETS:
            raise ShardingError(f"unknown rule preset {preset!r} (known: {sorted(RULE_PRESETS)})")
        name, rules = preset, dict(RULE_PRESETS[preset])
    else:
        name, rules = "custom", {**RULE_PRESETS["generation"], **dict(preset)}
    for logical, axes in rules.items():
        for a in _axes_tuple(axes):
            if a not in mesh.shape:
                raise ShardingError(f"rule {logical!r} -> {a!r}: the mesh has no axis {a!r} ({tuple(mesh.shape)})")

    dims = _dims(cfg)
    k_name, k = dims["kv_heads"]
    kv_axes = rules.get("kv_heads")
    kv_size = _axes_size(mesh, kv_axes)
    if k % kv_size:
        if kv_heads is None:
            raise ShardingError(
                f"{k_name}={k} is not divisible by the {_fmt_axes(mesh, kv_axes)} axis the KV heads are "
                f"sharded on. Choose one: kv_heads='replicate' replicates the k/v projections and the KV "
                f"cache across it (cache memory x{kv_size} per device), or kv_heads='batch' replicates the "
                f"k/v projections and shards the KV cache on batch over "
                f"{_fmt_axes(mesh, _axes_tuple(rules.get('cache_batch')) + _axes_tuple(kv_axes))} "
                f"(the batch must divide by that)")
        rules["kv_heads"] = None
        rules["cache_kv_heads"] = None
        if kv_heads == "batch":
            extra = tuple(a for a in _axes_tuple(kv_axes) if a not in _axes_tuple(rules.get("cache_batch")))
            rules["cache_batch"] = _axes_tuple(rules.get("cache_batch")) + extra
    elif kv_heads is not None:
        kv_heads = None  # KV heads divide: the fallback is not needed

    problems = []
    for logical, (what, size) in dims.items():
        n = _axes_size(mesh, rules.get(logical))
        if size % n:
            problems.append(f"{what}={size} (logical axis {logical!r}) is not divisible by "
                            f"{_fmt_axes(mesh, rules.get(logical))} = {n}")
    if batch is not None:
        for logical in ("batch", "cache_batch"):
            n = _axes_size(mesh, rules.get(logical))
            if batch % n:
                problems.append(f"batch={batch} (logical axis {logical!r}) is not divisible by "
                                f"{_fmt_axes(mesh, rules.get(logical))} = {n}")
    if problems:
        shape = ", ".join(f"{a}={mesh.shape[a]}" for a in AXES)
        raise ShardingError(f"mesh ({shape}) with rules {name!r} does not fit this model:\n  - "
                            + "\n  - ".join(dict.fromkeys(problems)))
    return Layout(mesh, tuple(sorted(rules.items())), name, kv_heads)


def layout_from_config(cfg: ModelConfig, mesh_config, devices=None, *, preset: str | None = None,
                       kv_heads: str | None = None, batch: int | None = None) -> Layout:
    """Layout from a config ``mesh`` section (data/fsdp/tensor, ``rules``, optional ``kv_heads``)."""
    mesh = make_mesh(mesh_config, devices)
    get = mesh_config.get if hasattr(mesh_config, "get") else (lambda k, d=None: d)
    preset = preset or get("rules", "generation")
    kv_heads = kv_heads if kv_heads is not None else get("kv_heads", None)
    return make_layout(cfg, mesh, preset, kv_heads=kv_heads, batch=batch)


# ---------------------------------------------------------------------------------------------------
# Parameter / cache / activation shardings
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _logical_param_specs(cfg: ModelConfig, dtype_name: str):
    model = Decoder(cfg, jnp.dtype(dtype_name))
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, tokens, jnp.ones((1, 1, 1), bool)))
    return nn.get_partition_spec(boxed)["params"]


def logical_param_specs(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """Tree of logical PartitionSpecs (e.g. ``P('embed', 'mlp')``) for every parameter."""
    return _logical_param_specs(cfg, jnp.dtype(dtype).name)


def param_shardings(cfg: ModelConfig, layout: Layout, dtype=jnp.float32) -> dict:
    """Tree of NamedSharding for every parameter under ``layout``'s rules."""
    return nn.logical_to_mesh_sharding(logical_param_specs(cfg, dtype), layout.mesh, layout.rules)


def abstract_sharded_params(cfg: ModelConfig, layout: Layout, dtype=jnp.float32) -> dict:
    """``ShapeDtypeStruct`` leaves carrying their NamedSharding (AOT compilation, Orbax restore targets)."""
    from cna_jax.convert import abstract_params

    shapes = abstract_params(cfg, dtype)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        param_shardings(cfg, layout, dtype))


def shard_params(params, cfg: ModelConfig, layout: Layout, dtype=None) -> dict:
    """Moves an existing (e.g. single-device) parameter tree into the layout."""
    dtype = dtype or jax.tree.leaves(params)[0].dtype
    return jax.device_put(params, param_shardings(cfg, layout, dtype))


def per_device_bytes(tree) -> dict[int, int]:
    """Bytes of ``tree`` held by each device (from ``addressable_shards``): {device id: bytes}."""
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def cache_bytes_per_device(cfg: ModelConfig, layout: Layout, batch: int, slots: int, dtype) -> int:
    """Bytes of the KV cache (k and v) on one device under the layout."""
    shape = jax.eval_shape(lambda: KVCache.zeros(cfg, batch, slots, dtype)).k.shape  # in CACHE_AXES order
    local = layout.sharding(CACHE_AXES).shard_shape(shape)
    return 2 * math.prod(local) * jnp.dtype(dtype).itemsize


# ---------------------------------------------------------------------------------------------------
# Sharded jitted functions
# ---------------------------------------------------------------------------------------------------
class ShardedFunction:
    """``jax.jit`` of an un-jitted function with explicit in/out shardings, static kwargs bound.

    Call it like the function (without the static keywords); ``lower(*args)`` works on arrays or
    ``jax.ShapeDtypeStruct`` (AOT compilation, :mod:`launch.plan`). Trailing dynamic arguments left
    out are None (optional arguments such as collection's ``prefix_tokens``).
    """

    def __init__(self, fn: Callable, layout: Layout, in_shardings, out_shardings, static: dict):
        self.layout = layout
        self.static = dict(static)
        names = tuple(self.static)
        n_dyn = len(in_shardings)

        # jit with in_shardings takes no keyword arguments, so the static keywords travel as trailing
        # positional arguments marked static (the equivalent of static_argnames on the keywords).
        def traced(*args):
            dyn, stat = args[:n_dyn], args[n_dyn:]
            with layout.context():
                return fn(*dyn, **dict(zip(names, stat)))

        traced.__name__ = f"sharded_{getattr(fn, '__name__', 'fn')}"

        self.fn = fn
        self.n_dynamic = n_dyn
        self.jitted = jax.jit(traced, in_shardings=tuple(in_shardings), out_shardings=out_shardings,
                              static_argnums=tuple(range(n_dyn, n_dyn + len(names))))
        self.in_shardings = in_shardings
        self.out_shardings = out_shardings

    def _full(self, args):
        if len(args) > self.n_dynamic:
            raise TypeError(f"{self.fn.__name__} takes {self.n_dynamic} dynamic arguments, got {len(args)}")
        return args + (None,) * (self.n_dynamic - len(args))

    def __call__(self, *args):
        return self.jitted(*self._full(args), *self.static.values())

    def lower(self, *args):
        """AOT lowering on arrays or ``jax.ShapeDtypeStruct`` (no data needed)."""
        return self.jitted.lower(*self._full(args), *self.static.values())


def sharded_forward(cfg: ModelConfig, layout: Layout, dtype=jnp.float32) -> ShardedFunction:
    """``(params, tokens [B,T], valid [B,T], neuron_mult [L,I] | None) -> logits [B,T,V]`` on the mesh."""
    from cna_jax.models import forward_fn

    in_sh = (layout.params(cfg, dtype), layout.batch(2), layout.batch(2), layout.sharding(("layers", "neurons")))
    out_sh = layout.sharding(("batch", "length", "act_vocab"))
    return ShardedFunction(forward_fn, layout, in_sh, out_sh, {"cfg": cfg, "dtype": dtype})


def sharded_generate(cfg: ModelConfig, layout: Layout, dtype=jnp.float32, max_new_tokens: int = 150
                     ) -> ShardedFunction:
    """Greedy generation: ``(params, tokens, valid, neuron_mult | None, eos_ids[, prefix_tokens [Q] | None])
    -> (new_tokens [B,N], num_generated [B])``; the KV cache lives in ``layout.cache()`` shardings."""
    from cna_jax.generate import greedy_generate_fn

    in_sh = (layout.params(cfg, dtype), layout.batch(2), layout.batch(2), layout.sharding(("layers", "neurons")),
             layout.replicated(), layout.replicated())
    out_sh = (layout.batch(2), layout.batch(1))
    return ShardedFunction(greedy_generate_fn, layout, in_sh, out_sh,
                           {"cfg": cfg, "dtype": dtype, "max_new_tokens": max_new_tokens})


def sharded_collect(cfg: ModelConfig, layout: Layout, dtype=jnp.float32) -> ShardedFunction:
    """Activation collection (``cna_jax.collect.collect_fn``) with the batch split over the batch axes:
    ``(params, tokens, valid, select, select_valid [B,P], neuron_mult | None, node_index [N],
    prefix_tokens [Q] | None) -> (sums [L,I], sumsq [L,I], node_acts [B,P,N])``; use the ``collection``
    preset. A shared prefix is replicated and run once at batch 1 (unconstrained); the batch-split rows
    read its keys and values."""
    from cna_jax.collect import collect_fn

    in_sh = (layout.params(cfg, dtype), layout.batch(2), layout.batch(2), layout.batch(2), layout.batch(2),
             layout.sharding(("layers", "neurons")), layout.replicated(), layout.replicated())
    out_sh = (layout.sharding(("layers", "neurons")), layout.sharding(("layers", "neurons")), layout.batch(3))
    return ShardedFunction(collect_fn, layout, in_sh, out_sh, {"cfg": cfg, "dtype": dtype})


# ---------------------------------------------------------------------------------------------------
# LASSO: the node axis of the batched solvers split over every device
# ---------------------------------------------------------------------------------------------------
def node_layout(mesh: Mesh) -> Layout:
    """A layout whose ``nodes`` axis spans every device of the mesh (data x fsdp x tensor)."""
    return Layout(mesh, tuple(sorted(RULE_PRESETS["generation"].items())), "generation")


def pad_nodes(n_nodes: int, mesh: Mesh) -> int:
    """Node count rounded up to a multiple of the device count."""
    return -(-n_nodes // mesh.size) * mesh.size


def _pad_candidate_problems(sub_gram, xty, yty, mask, lambdas, to: int):
    """Pads the node axis with inert problems: no candidates (unit diagonal), y'y = 1, λ = 1. Their
    coefficients stay 0 and their duality gap is exactly 0, so no solver loop runs for them and every
    real node's result is unchanged."""
    n = xty.shape[0]
    if to == n:
        return sub_gram, xty, yty, mask, lambdas
    pad = to - n
    k = xty.shape[1]
    eye = jnp.broadcast_to(jnp.eye(k, dtype=sub_gram.dtype), (pad, k, k))
    return (jnp.concatenate([sub_gram, eye]), jnp.concatenate([xty, jnp.zeros((pad, k), xty.dtype)]),
            jnp.concatenate([yty, jnp.ones((pad,), yty.dtype)]), jnp.concatenate([mask, jnp.zeros((pad, k), bool)]),
            jnp.concatenate([lambdas, jnp.ones((pad, lambdas.shape[1]), lambdas.dtype)]))


# How each per-λ summary of lasso.PathResult combines over the devices' node blocks.
_PATH_REDUCTIONS = {"n_iter": "max", "node_sweeps": "sum"}


def sharded_lasso(layout: Layout, max_iter: int = 1000, chunk: int = 64) -> Callable:
    """The candidate-set LASSO path solver (``cna_jax.lasso.lasso_path_candidates``) with its node axis
    split over every device of the mesh (``shard_map``: each device solves its own block of nodes):
    ``(sub_gram [N,K,K], xty [N,K], yty [N], mask [N,K], lambdas [N,T], tol) -> PathResult``.

    The solver works in chunks of ``chunk`` nodes, each stopping a λ when all of its nodes converge.
    N is padded with inert problems to a multiple of devices x chunk, so every device's chunks are
    exactly the single-device solver's chunks: the result equals one device's, bit for bit.
    """
    from cna_jax import lasso

    try:
        shard_map = jax.shard_map
    except AttributeError:  # older JAX
        from jax.experimental.shard_map import shard_map
    mesh = layout.mesh
    axes = _axes_tuple(layout.rules_dict.get("nodes"))
    n_dev = _axes_size(mesh, axes)
    fields = lasso.PathResult._fields
    unknown = [f for f in fields if f not in ("coef", "gap", "rss", "df") and f not in _PATH_REDUCTIONS]
    if unknown:
        raise ShardingError(f"sharded_lasso does not know how to combine PathResult field(s) {unknown} over "
                            "devices; add them to cna_jax.sharding._PATH_REDUCTIONS")
    node_specs = {"coef": P(None, axes, None), "gap": P(None, axes), "rss": P(None, axes), "df": P(None, axes)}
    out_specs = lasso.PathResult(**{f: node_specs.get(f, P()) for f in fields})
    in_specs = (P(axes, None, None), P(axes, None), P(axes), P(axes, None), P(axes, None), P())

    def local(sub_gram, xty, yty, mask, lambdas, tol):
        res = lasso.lasso_path_candidates(sub_gram, xty, yty, mask, lambdas, tol, max_iter=max_iter, chunk=chunk)
        red = {f: (jax.lax.pmax if how == "max" else jax.lax.psum)(getattr(res, f), axes)
               for f, how in _PATH_REDUCTIONS.items()}
        return res._replace(**red)

    try:  # the solver's loop carries start as constants: no varying-axis type checks
        mapped = shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    except TypeError:  # older JAX spells it check_rep
        mapped = shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
    jitted = jax.jit(mapped, in_shardings=tuple(NamedSharding(mesh, s) for s in in_specs),
                     out_shardings=jax.tree.map(lambda s: NamedSharding(mesh, s), out_specs,
                                                is_leaf=lambda x: isinstance(x, P)))

    def solve(sub_gram, xty, yty, mask, lambdas, tol=1e-4):
        sub_gram = jnp.asarray(sub_gram)
        n = xty.shape[0]
        c = max(1, min(chunk, n))
        block = n_dev * c
        padded = _pad_candidate_problems(sub_gram, jnp.asarray(xty), jnp.asarray(yty), jnp.asarray(mask, bool),
                                         jnp.asarray(lambdas), -(-n // block) * block)
        res = jitted(*padded, jnp.asarray(tol, sub_gram.dtype))
        return res._replace(**{f: getattr(res, f)[:, :n] for f in node_specs})

    solve.jitted = jitted
    return solve


def sharded_fit_graph(layout: Layout, settings=None) -> Callable:
    """One nodewise-LASSO graph with ``cna_jax.graph.fit_graph`` semantics whose LASSO paths run with
    the node axis split over every device: ``x [rows, nodes] -> dict`` of NumPy arrays (adjacency,
    directed, lam, n_candidates, max_gap, constant, k_solved).

    The screen, the CV folds' problems and λ selection / merging are ``graph``'s own functions
    (``screen_arrays``, ``fold_problems``, ``choose``), as in ``graph.select_arrays``; the path solves
    (the cost) go through :func:`sharded_lasso`.
    """
    from cna_jax import graph, lasso

    st = settings or graph.GraphSettings()
    if not st.prescreen:
        raise ShardingError("sharded_fit_graph splits the candidate-set solver over nodes: use prescreen=True "
                            "(the dense all-node solver runs on one device through cna_jax.graph.fit_graph)")
    solver = sharded_lasso(layout, st.max_iter)
    screen_j = jax.jit(lambda x: graph.screen_arrays(x, st))
    fold_problems = jax.jit(graph.fold_problems, static_argnames=("fold",))
    choose = jax.jit(functools.partial(graph.choose, st=st), static_argnames=("n_rows",))

    @jax.jit
    def problems(gram, cand, cmask):
        sub, xty, yty = lasso.gather_candidates(gram, cand, cmask, jnp.arange(gram.shape[0]))
        return sub, xty, yty, graph._grid(jnp.max(jnp.abs(xty), axis=1), st)

    def fit(x, check: bool = True):
        if check:
            x = graph.check_matrix(x, on_constant=st.on_constant)
        with graph._precision(st):
            xj = jnp.asarray(x, st.dtype)
            n = xj.shape[0]
            s = screen_j(xj)
            k = graph.solved_width(s["cand_mask"])
            cand, cmask = s["cand"][:, :k], s["cand_mask"][:, :k]
            sub, xty, yty, grid = problems(s["gram"], cand, cmask)
            path = solver(sub, xty, yty, cmask, grid, st.tol)
            loss = None
            if st.criterion == "cv":
                loss = jnp.zeros_like(path.rss)
                folds = jnp.asarray(graph._fold_ids(n, st.cv_folds, np.random.default_rng(st.seed)))
                for f in range(st.cv_folds):
                    (s_tr, c_tr, y_tr), (s_va, c_va, y_va) = fold_problems(s["z"], cand, cmask, folds, fold=f)
                    pf = solver(s_tr, c_tr, y_tr, cmask, grid, st.tol)
                    loss = loss + lasso.validation_loss(pf.coef, s_va, c_va, y_va)
            out = choose(path, loss, grid, cand, cmask, s["constant"], n_rows=n)
            return dict({name: np.asarray(v) for name, v in out.items()}, k_solved=k)

    fit.solver = solver
    return fit
