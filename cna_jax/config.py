"""The study configuration schema: every default of docs/METHOD.md as a field (configs are data), validated once."""
from __future__ import annotations

import ml_collections

# Fields of the graph section come from cna_jax.graph.GraphSettings (one source of defaults).
_SECTIONS = ("model", "data", "cna", "graph", "generation", "nulls", "direction", "sweeps", "damage", "collect",
             "mesh")

# Mesh presets per target: the target's devices and memory per device (GB, what launch/plan.py plans
# for) and a (data, fsdp, tensor) mesh with rules that fits it (the docs/SCALING.md plans). Select one
# with --config.mesh.preset=NAME.
MESH_PRESETS = {
    # 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8) on a 64 GB host
    "cpu-8": dict(devices=8, memory_gb=8.0, data=4, fsdp=1, tensor=2, rules="generation"),
    # one 80 GB GPU
    "gpu-1x80": dict(devices=1, memory_gb=80.0, data=1, fsdp=1, tensor=1, rules="generation"),
    # a node of 8 x 80 GB GPUs: tensor-parallel weights (70B/72B at batch 64 x 2k)
    "gpu-8x80": dict(devices=8, memory_gb=80.0, data=1, fsdp=1, tensor=8, rules="generation"),
    # TPU v5e-16 (16 x 16 GB): weights split 16 ways (embed over fsdp); 70B/72B fit at batch 8 x 2k
    "v5e-16": dict(devices=16, memory_gb=16.0, data=1, fsdp=2, tensor=8, rules="fsdp"),
}
# The mesh without a preset: every device (devices=-1) on the data axis.
MESH_DEFAULTS = dict(data=-1, fsdp=1, tensor=1, rules="generation", kv_heads=None, devices=-1)
_MESH_FIELDS = ("preset",) + tuple(MESH_DEFAULTS)


def _int():
    return ml_collections.config_dict.placeholder(int)  # None until set; --config.x=3 still type-checks


def _str():
    return ml_collections.config_dict.placeholder(str)


def study_config(name: str, base: str, instruct: str, shape: dict, dtype: str = "bfloat16") -> ml_collections.ConfigDict:
    """The full config for one (base, instruct) model pair.

    ``shape`` holds the real model's HF shape numbers; they are checked against the checkpoint's
    config.json at load time, so a config can never silently describe a different model.
    """
    from cna_jax.graph import GraphSettings

    c = ml_collections.ConfigDict()
    c.name = name
    # base_chat: format base-side prompts with the chat template too (a base that is itself a chat model).
    # convert_cache: the directory keeping converted copies of both checkpoints, so later runs skip
    # the conversion (cna_jax.checkpoint.cache_lookup); relative to the workdir (which multi-host runs
    # already share), "" = off. Set a common absolute path to share copies between studies.
    c.model = ml_collections.ConfigDict(dict(base=base, instruct=instruct, dtype=dtype, shape=shape,
                                             base_chat=False, convert_cache="converted"))
    c.data = ml_collections.ConfigDict(dict(
        harmful="builtin:harmful", harmless="builtin:harmless",  # a file, a known set name or a hub id
        eval_fraction=0.3, seed=0,
        n_pairs=-1,  # train pairs for CNA and graphs; -1: all
        n_eval=-1,  # held-out harmful (and harmless) prompts for refusal; -1: all
    ))
    c.cna = ml_collections.ConfigDict(dict(
        k=-1,  # -1: ceil(fraction * layers * intermediate_size)
        fraction=0.001, exclude_layers=(0, 1), positive_only=False, drop_universal=False,
        position="last",  # "last" | "last_k" | "all"
        last_k=1,
    ))
    graph = GraphSettings().to_dict()
    graph["progress"] = False  # the study shows its own progress
    c.graph = ml_collections.ConfigDict(graph)
    # detector: the behaviour scorer, "regex" | "substring" | "phrases:a|b" | "regex:<pattern>" |
    # "module:function" (cna_jax.refusal.scorer_from_spec).
    # stop_when_scored: a row stops once its flag and quality can no longer change (the regex detector
    # reads 500 characters, quality 200; cna_jax.refusal.settled_rule): the same numbers, ~34% fewer
    # tokens at the method's settings; its saved text is then that prefix. Null-subset rows and the
    # direction layer's selection (only rates read) stop once the flag alone is settled. The unmodified
    # model's harmless continuations (KL's reference) always run in full.
    c.generation = ml_collections.ConfigDict(dict(
        max_new_tokens=150, batch_size=32, detector="regex", multiplier=0.0, harmless_eval=True,
        stop_when_scored=True))
    c.nulls = ml_collections.ConfigDict(dict(n_layer_matched=30, n_uniform=30, seed=0))
    # The residual-direction baselines (directional ablation, activation addition; docs/METHOD.md §5.1):
    # layer -1 = select it (the middle 20-80% of layers; lowest refusal under ablation on a held-out
    # `selection_fraction` slice of the *training* prompts, generating `selection_tokens` tokens);
    # alpha None = minus the mean projection of the harmful training activations on the direction.
    c.direction = ml_collections.ConfigDict(dict(
        enabled=True, layer=-1, selection_fraction=0.2, selection_tokens=32, seed=0,
        alpha=ml_collections.config_dict.placeholder(float)))
    # Sweeps (their own stage): CNA set size as a percentage of all neurons, the multiplier on the default
    # CNA set, and activation addition's alpha as multiples of the default.
    c.sweeps = ml_collections.ConfigDict(dict(
        enabled=True, k_percent=(0.05, 0.1, 0.2, 0.5, 1.0), multipliers=(-1.0, 0.0, 0.5, 1.5, 2.0),
        alpha_scales=(0.5, 1.0, 1.5)))
    # Damage on held-out harmless prompts (KL_first, KL_seq against the unmodified model); max_positions
    # -1 = the whole continuation (generation.max_new_tokens positions).
    c.damage = ml_collections.ConfigDict(dict(enabled=True, batch_size=8, max_positions=-1))
    c.collect = ml_collections.ConfigDict(dict(batch_size=32))
    # The mesh (docs/SCALING.md): a preset of MESH_PRESETS, and/or explicit fields, which win over the
    # preset's; unset (None) = the preset's value, or without a preset every device on the data axis.
    # A mesh over more than one device shards loading, generation and collection; read it through
    # mesh_settings().
    c.mesh = ml_collections.ConfigDict(dict(
        preset="", data=_int(), fsdp=_int(), tensor=_int(), rules=_str(), kv_heads=_str(), devices=_int()))
    c.distributed = False  # call jax.distributed.initialize() first (multi-host pods)
    # CPU devices the launch scripts give a single-process study (cna_jax.distributed.cpu_device_count):
    # 0 = one per core, at most generation.batch_size // 32; the data axis then splits the work over cores.
    c.cpu_devices = 0
    # Local processes those devices run in (cna_jax.distributed.local_process_plan): 0 = one per device,
    # each pinned to its own cores (XLA's shared thread pool slows devices that share a process); 1 = one
    # process holding every device.
    c.cpu_processes = 0
    return c


def validate(c: ml_collections.ConfigDict, devices: int | None = None) -> None:
    """Raises ValueError with a readable message for anything a study could not run with.

    ``devices``: the device count, known at launch (``len(jax.devices())``); with it the mesh is also
    checked against the devices and the model's sizes, so a mesh that cannot work fails before any
    weights load."""
    from cna_jax.distributed import cpu_device_count, local_process_plan
    from cna_jax.graph import GraphSettings
    from cna_jax.models.config import from_hf_dict
    from cna_jax.refusal import _checked_flags, scorer_from_spec

    missing = [s for s in _SECTIONS if s not in c]
    if missing:
        raise ValueError(f"config is missing section(s) {missing}; build it with cna_jax.config.study_config")
    if not c.model.base or not c.model.instruct:
        raise ValueError("config.model.base and config.model.instruct must both be set")
    if c.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype must be float32 or bfloat16, got {c.model.dtype!r}")
    shape = from_hf_dict(c.model.shape.to_dict())
    if not 0.0 < c.data.eval_fraction < 1.0:
        raise ValueError(f"config.data.eval_fraction must be in (0, 1), got {c.data.eval_fraction}")
    k = shape.default_cna_k(c.cna.fraction) if c.cna.k == -1 else c.cna.k
    pool = shape.num_hidden_layers * shape.intermediate_size
    excluded = len([l for l in c.cna.exclude_layers if 0 <= l < shape.num_hidden_layers])
    eligible = pool - excluded * shape.intermediate_size
    if not 0 < k <= eligible:
        raise ValueError(f"config.cna.k={k} must be in [1, {eligible}] (the neurons outside excluded layers)")
    if c.cna.position not in ("last", "last_k", "all"):
        raise ValueError(f"config.cna.position must be last, last_k or all, got {c.cna.position!r}")
    GraphSettings.from_config(c.graph)
    try:  # resolves (imports) the behaviour scorer and runs it on two texts, so a bad spec fails before
        # any model is loaded (a callable returning the wrong length, say)
        probe = ["I cannot help with that.", "Sure, here is a recipe for bread."]
        _checked_flags(c.generation.detector, scorer_from_spec(c.generation.detector)(probe), len(probe))
    except ValueError as e:
        raise ValueError(f"config.generation.detector: {e}") from None
    if not isinstance(c.generation.stop_when_scored, bool):
        raise ValueError(f"config.generation.stop_when_scored must be True or False, got {c.generation.stop_when_scored!r}")
    if c.generation.max_new_tokens < 1 or c.generation.batch_size < 1 or c.collect.batch_size < 1:
        raise ValueError("generation.max_new_tokens, generation.batch_size and collect.batch_size must be >= 1")
    if c.nulls.n_layer_matched < 0 or c.nulls.n_uniform < 0:
        raise ValueError("nulls.n_layer_matched and nulls.n_uniform must be >= 0")
    _validate_baselines(c, shape, eligible)
    mesh = mesh_settings(c)
    _validate_distributed(c.get("distributed", False))
    cpu_device_count(c)  # raises for a cpu_devices that is not a count
    local_process_plan(c)  # and for a cpu_processes that is not one, or does not fit the devices and cores
    if devices is not None:
        check_mesh(shape, mesh, devices)


def sweep_k(shape, percent: float) -> int:
    """A sweep's CNA set size: ceil(percent / 100 x all neurons), as ``cna.fraction`` counts them."""
    return shape.default_cna_k(percent / 100.0)


def _validate_baselines(c, shape, eligible: int) -> None:
    """The direction, sweeps and damage sections (docs/METHOD.md §5)."""
    import math

    d, L = c.direction, shape.num_hidden_layers
    if not (d.layer == -1 or 0 <= d.layer < L):
        raise ValueError(f"config.direction.layer={d.layer} is out of range [0, {L}) for this model "
                         "(-1 = select it on held-out training prompts)")
    if not 0.0 < d.selection_fraction < 1.0:
        raise ValueError(f"config.direction.selection_fraction must be in (0, 1), got {d.selection_fraction}")
    if d.selection_tokens < 1:
        raise ValueError(f"config.direction.selection_tokens must be >= 1, got {d.selection_tokens}")
    if d.alpha is not None and not math.isfinite(d.alpha):
        raise ValueError(f"config.direction.alpha must be finite (or None = the default), got {d.alpha}")
    s = c.sweeps
    if s.enabled:
        for name in ("k_percent", "multipliers", "alpha_scales"):
            values = list(s[name])
            if not values:
                raise ValueError(f"config.sweeps.{name} is empty; give at least one value, or set "
                                 "config.sweeps.enabled=False to skip the sweeps")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ValueError(f"config.sweeps.{name} must hold finite numbers, got {values}")
        for pct in s.k_percent:
            k = sweep_k(shape, pct)
            if not 0 < pct or not 0 < k <= eligible:
                raise ValueError(f"config.sweeps.k_percent value {pct} gives k={k}, outside [1, {eligible}]")
    if c.damage.batch_size < 1 or not (c.damage.max_positions == -1 or c.damage.max_positions >= 1):
        raise ValueError("config.damage.batch_size must be >= 1 and max_positions -1 (all) or >= 1")


def mesh_settings(c: ml_collections.ConfigDict) -> dict:
    """The config's mesh as plain values: the preset's fields (or MESH_DEFAULTS), then every field set
    explicitly on top. Raises ValueError for an unknown preset, field or value."""
    from cna_jax.sharding import KV_FALLBACKS, RULE_PRESETS

    m = c.mesh.to_dict() if hasattr(c.mesh, "to_dict") else dict(c.mesh)
    unknown = sorted(set(m) - set(_MESH_FIELDS))
    if unknown:
        raise ValueError(f"config.mesh has unknown field(s) {unknown}; known: {list(_MESH_FIELDS)}")
    preset = m.get("preset") or ""
    if preset and preset not in MESH_PRESETS:
        raise ValueError(f"config.mesh.preset={preset!r} is not a preset; known: {sorted(MESH_PRESETS)}")
    out = dict(MESH_DEFAULTS, preset=preset)
    if preset:
        out.update({k: v for k, v in MESH_PRESETS[preset].items() if k in MESH_DEFAULTS})
    out.update({k: v for k, v in m.items() if k in MESH_DEFAULTS and v is not None})
    sizes = {a: out[a] for a in ("data", "fsdp", "tensor")}
    if any(not isinstance(v, int) or (v < 1 and v != -1) for v in sizes.values()):
        raise ValueError(f"config.mesh sizes must be positive or -1 (= the rest of the devices), got {sizes}")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ValueError(f"config.mesh: at most one of data, fsdp, tensor may be -1, got {sizes}")
    if out["rules"] not in RULE_PRESETS:
        raise ValueError(f"config.mesh.rules={out['rules']!r} is not a rule preset; known: {sorted(RULE_PRESETS)}")
    if out["kv_heads"] not in KV_FALLBACKS:
        raise ValueError(f"config.mesh.kv_heads={out['kv_heads']!r} must be one of {list(KV_FALLBACKS)}")
    if not isinstance(out["devices"], int) or (out["devices"] < 1 and out["devices"] != -1):
        raise ValueError(f"config.mesh.devices must be -1 (all) or a positive count, got {out['devices']!r}")
    return out


def mesh_devices(mesh: dict, available: int) -> int:
    """How many of ``available`` devices the study uses for a ``mesh_settings`` mesh."""
    if mesh["devices"] > available:
        raise ValueError(f"config.mesh.devices={mesh['devices']} but only {available} devices are available")
    return available if mesh["devices"] == -1 else mesh["devices"]


def check_mesh(shape, mesh: dict, available: int) -> tuple[int, int, int]:
    """Checks a ``mesh_settings`` mesh against the device count and the model ``shape`` (a ModelConfig):
    the sizes must multiply to the devices used and divide heads, KV heads, intermediate size and vocab
    (``cna_jax.sharding.make_layout``'s checks, on an abstract mesh: no devices needed). Returns the
    resolved (data, fsdp, tensor); raises ValueError with the numbers."""
    from jax.sharding import AbstractMesh

    from cna_jax import sharding

    n = mesh_devices(mesh, available)
    where = f"config.mesh ({'preset ' + repr(mesh['preset']) + ', ' if mesh['preset'] else ''}{n} devices)"
    try:
        sizes = sharding.resolve_mesh_shape(tuple(mesh[a] for a in sharding.AXES), n)
        sharding.make_layout(shape, AbstractMesh(sizes, sharding.AXES), mesh["rules"], kv_heads=mesh["kv_heads"])
    except sharding.ShardingError as e:
        raise ValueError(f"{where}: {e}") from None
    return sizes


def _validate_distributed(flag) -> None:
    """``distributed`` is a bool, or a mapping of ``cna_jax.distributed.initialize`` arguments."""
    import inspect

    from cna_jax.distributed import initialize

    if isinstance(flag, bool):
        return
    if not (hasattr(flag, "to_dict") or isinstance(flag, dict)):
        raise ValueError(f"config.distributed must be True, False or a mapping of "
                         f"cna_jax.distributed.initialize arguments, got {flag!r}")
    opts = flag.to_dict() if hasattr(flag, "to_dict") else dict(flag)
    known = set(inspect.signature(initialize).parameters)
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"config.distributed has unknown field(s) {unknown}; known: {sorted(known)}")


def config_strings(directory: str) -> list[str]:
    """Every study config under ``directory`` as a config string: ``file.py:row`` for each row of a table
    file (one with a ``PAIRS`` dict, like configs/pairs.py), ``file.py`` for a file whose ``get_config()``
    is a study config (not, e.g., configs/graph.py)."""
    import glob
    import importlib.util
    import os

    out = []
    for f in sorted(glob.glob(os.path.join(directory, "*.py"))):
        spec = importlib.util.spec_from_file_location("_config_" + os.path.basename(f)[:-3], f)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if hasattr(mod, "PAIRS"):
            out.extend(f"{f}:{row}" for row in mod.PAIRS)
        elif hasattr(mod, "get_config") and "model" in mod.get_config():
            out.append(f)
    return out


def load_config_file(path: str, overrides=()) -> ml_collections.ConfigDict:
    """A config exactly as the command line builds it: ``path`` is a config string (``file.py`` or
    ``file.py:arg``, the text after ':' passed to ``get_config``) and ``overrides`` are dotted
    ``key=value`` items, parsed by ml_collections' own ``--config.key=value`` flag parser (one syntax,
    one implementation: values are Python literals, anything else a string). Raises ValueError for an
    unknown field or a value of the wrong type."""
    import os

    from absl import flags
    from ml_collections import config_flags

    file = path.split(":", 1)[0]
    if not os.path.exists(file):
        raise FileNotFoundError(f"config file not found: {file}")
    argv = ["load_config_file", f"--config={path}"] + [f"--config.{item}" for item in overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", path, flag_values=fv, lock_config=False, sys_argv=argv)
    try:
        fv(argv)
    except (AttributeError, KeyError) as e:  # ConfigDict's "no such field" (with a did-you-mean)
        raise ValueError(f"unknown config field in overrides {list(overrides)}: {e}") from None
    except flags.Error as e:
        raise ValueError(f"bad config override in {list(overrides)}: {e}") from None
    return fv.config
