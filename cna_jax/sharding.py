"""Meshes, logical-axis rules, layouts and shardings, and the sharded-jit wrapper every entry point uses.

This module sits right above the model (``cna_jax.models``) and imports nothing else of the package but
:mod:`cna_jax.precompile` (programs compiled ahead over the processes of a run): the
sharded entry points live beside their pure functions (``collect.sharded_collect``, ``lasso.sharded_lasso``,
``graph.sharded_fit_graph``, the engine's ``sharded_functions``); only the model's own forward pass
(:func:`sharded_forward`) is here.

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
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cna_jax import precompile
from cna_jax.models.config import ModelConfig
from cna_jax.models import abstract_params, boxed_params, forward_fn
from cna_jax.models.llama import CACHE_AXES, KVCache

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

    @property
    def platform(self) -> str:
        """The mesh's device platform ("cpu", "gpu", "tpu")."""
        return self.mesh.devices.flat[0].platform

    def batch(self, ndim: int = 2) -> NamedSharding:
        """[batch, ...] inputs (tokens, masks)."""
        return self.sharding(("batch",) + (None,) * (ndim - 1))

    def axes(self, logical: str) -> tuple[str, ...]:
        """The mesh axes the logical axis ``logical`` is split over (``()``: replicated)."""
        return _axes_tuple(self.rules_dict.get(logical))

    def axes_size(self, logical: str) -> int:
        """Into how many blocks ``logical`` is split (the product of its mesh axes' sizes)."""
        return _axes_size(self.mesh, self.rules_dict.get(logical))

    def batch_size_multiple(self) -> int:
        return self.axes_size("batch")

    def params(self, cfg: ModelConfig, dtype=jnp.float32) -> dict:
        """Tree of NamedSharding matching the parameter tree (from the logical boxes of ``init``)."""
        return param_shardings(cfg, self, dtype)

    def cache(self) -> KVCache:
        """KVCache of NamedShardings (axes ``CACHE_AXES`` of ``cna_jax.models.llama``)."""
        s = self.sharding(CACHE_AXES)
        return KVCache(s, s)

    def describe(self) -> str:
        shape = ", ".join(f"{a}={self.mesh.shape[a]}" for a in AXES)
        used = {k: v for k, v in self.rules if v is not None}
        return f"mesh ({shape}), rules {self.preset!r}{'' if self.kv_heads is None else f' kv_heads={self.kv_heads}'}: {used}"


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
    return nn.get_partition_spec(boxed_params(cfg, jnp.dtype(dtype_name)))


def logical_param_specs(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """Tree of logical PartitionSpecs (e.g. ``P('embed', 'mlp')``) for every parameter."""
    return _logical_param_specs(cfg, jnp.dtype(dtype).name)


def param_shardings(cfg: ModelConfig, layout: Layout, dtype=jnp.float32) -> dict:
    """Tree of NamedSharding for every parameter under ``layout``'s rules."""
    return nn.logical_to_mesh_sharding(logical_param_specs(cfg, dtype), layout.mesh, layout.rules)


def abstract_sharded_params(cfg: ModelConfig, layout: Layout, dtype=jnp.float32) -> dict:
    """``ShapeDtypeStruct`` leaves carrying their NamedSharding (AOT compilation, Orbax restore targets)."""
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
# XLA:CPU spends most of a forward program's compile in LLVM, optimising each of its hundreds of fusions (30
# unrolled layers of norms, rotary products, masks and steering). At LLVM's -O1 instead of the default -O2 the
# study's collection, prefix, prefill and store programs compiled in 0.33-0.68x the time and computed the same
# bits, their run times within 1.5% (one core, SmolLM2 at the study's shapes: BENCHMARKS.md, X1). Their run
# time is mostly the weight products (library or packed-kernel calls, compiled once), and such a program runs
# a few dozen times per job while each compile costs 10-30 s. The decode step, which runs thousands of times
# per job, keeps its own options (cna_jax.engine.DECODE_CPU_COMPILER_OPTIONS).
FORWARD_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def forward_compiler_options(platform: str) -> dict | None:
    """XLA options for a forward program's compile on ``platform`` (CPU only; other backends: none)."""
    return FORWARD_CPU_COMPILER_OPTIONS if platform == "cpu" else None


class ShardedFunction:
    """``jax.jit`` of an un-jitted function with explicit in/out shardings, static kwargs bound.

    Call it like the function (without the static keywords; dynamic arguments by position or by name);
    ``lower(*args)`` works on arrays or ``jax.ShapeDtypeStruct`` (AOT compilation, :mod:`launch.plan`).
    Dynamic arguments left out are None (optional arguments such as collection's ``prefix_kv``, the
    engine's ``packed``). ``donate``: positions of
    dynamic arguments whose buffers the outputs may reuse (``jax.jit``'s ``donate_argnums``);
    ``compiler_options``: XLA options for this function's compiles (``jax.jit``'s).
    """

    def __init__(self, fn: Callable, layout: Layout, in_shardings, out_shardings, static: dict,
                 donate: tuple[int, ...] = (), compiler_options: dict | None = None):
        self.layout = layout
        self.static = dict(static)
        names = tuple(self.static)
        n_dyn = len(in_shardings)

        # jit with in_shardings takes no keyword arguments, so the static keywords travel as trailing
        # positional arguments marked static (the equivalent of static_argnames on the keywords).
        def traced(*args):
            dyn, stat = args[:n_dyn], args[n_dyn:]
            return fn(*dyn, **dict(zip(names, stat)))

        traced.__name__ = f"sharded_{getattr(fn, '__name__', 'fn')}"

        self.fn = fn
        self.n_dynamic = n_dyn
        self.dynamic_names = tuple(inspect.signature(fn).parameters)[:n_dyn]  # for arguments given by name
        self.jitted = jax.jit(traced, in_shardings=tuple(in_shardings), out_shardings=out_shardings,
                              static_argnums=tuple(range(n_dyn, n_dyn + len(names))), donate_argnums=donate,
                              compiler_options=compiler_options)
        self.in_shardings = in_shardings
        self.out_shardings = out_shardings

    def _full(self, args, kwargs):
        if len(args) > self.n_dynamic:
            raise TypeError(f"{self.fn.__name__} takes {self.n_dynamic} dynamic arguments, got {len(args)}")
        full = list(args) + [None] * (self.n_dynamic - len(args))
        names = self.dynamic_names
        for name, value in kwargs.items():
            if name not in names or names.index(name) < len(args):
                raise TypeError(f"{self.fn.__name__}: no dynamic argument {name!r} left to give by name")
            full[names.index(name)] = value
        return tuple(full)

    def __call__(self, *args, **kwargs):
        full = self._full(args, kwargs)
        exe = precompile.lookup(self.jitted, full)  # compiled ahead by another process (multi-process runs)
        if exe is not None:
            return exe(*full)
        return self.jitted(*full, *self.static.values())

    def program(self, *args, **kwargs) -> tuple:
        """This call as an entry of :func:`cna_jax.precompile.spread` (arrays or ``jax.ShapeDtypeStruct``;
        one without a sharding gets this function's ``in_shardings``)."""
        full = self._full(args, kwargs)
        return self.jitted, full, lambda: self.lower(*args, **kwargs)

    def out_abstract(self, *args, **kwargs):
        """The outputs' ``jax.ShapeDtypeStruct`` tree for these arguments (traces, compiles nothing)."""
        return jax.eval_shape(self.jitted, *self._full(args, kwargs), *self.static.values())

    def lower(self, *args, **kwargs):
        """AOT lowering on arrays or ``jax.ShapeDtypeStruct`` (no data needed)."""
        return self.jitted.lower(*self._full(args, kwargs), *self.static.values())


def sharded_forward(cfg: ModelConfig, layout: Layout, dtype=jnp.float32) -> ShardedFunction:
    """``(params, tokens [B,T], valid [B,T], neuron_mult [L,I] | None) -> logits [B,T,V]`` on the mesh."""
    in_sh = (layout.params(cfg, dtype), layout.batch(2), layout.batch(2), layout.sharding(("layers", "neurons")))
    out_sh = layout.sharding(("batch", "length", "act_vocab"))
    return ShardedFunction(forward_fn, layout, in_sh, out_sh, {"cfg": cfg, "dtype": dtype})


# ---------------------------------------------------------------------------------------------------
# The node axis of the batched LASSO solvers (cna_jax.lasso.sharded_lasso) over every device
# ---------------------------------------------------------------------------------------------------
def node_layout(mesh: Mesh) -> Layout:
    """A layout whose ``nodes`` axis spans every device of the mesh (data x fsdp x tensor)."""
    return Layout(mesh, tuple(sorted(RULE_PRESETS["generation"].items())), "generation")
