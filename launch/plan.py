"""Plan a model on a mesh without weights: AOT-compile generation and collection on abstract shapes and
report per-device memory (parameters, KV cache, temporaries) from the compiled programs.

Generation is the engine's (``cna_jax.engine.sharded_functions``): its slot state (the KV cache of every
slot) stays resident and ``place`` and ``decode`` update it in place, so the program planned is whichever
call peaks higher with everything alive beside it: a ``prefill`` (``engine.prefill_rows`` rows at this
prompt length, into a staging buffer), ``place`` or a ``decode`` chunk. Not counted: the lower-layer store a
job may keep for its rows prefilled from their first changed layer (at most 2% of an accelerator's memory,
``cna_jax.engine.store_budget``), which the 10% headroom of the verdict holds.

    # the config's own mesh and target (Llama-3.1-70B: preset gpu-8x80, tensor=8 on 8 x 80 GB)
    python launch/plan.py --config=configs/pairs.py:llama_3_1_70b --batch=64
    # another preset: TPU v5e-16 (16 x 16 GB), trying batch sizes largest first
    python launch/plan.py --config=configs/pairs.py:qwen2_5_72b --config.mesh.preset=v5e-16 --batches=16,8
    # any mesh / memory by hand
    python launch/plan.py --config=configs/pairs.py:qwen2_5_72b --config.mesh.data=1 --config.mesh.tensor=8 \
        --config.mesh.devices=8 --batch=64 --context=2048 --device_memory_gb=80
    # faster: the engine's calls from 4- and 8-layer copies, extrapolated in depth
    python launch/plan.py --config=configs/pairs.py:llama_3_1_70b --probe

The target is the config's: its mesh preset's devices and memory per device (``cna_jax.config.MESH_PRESETS``);
without a preset, ``config.mesh.devices`` devices (-1: one) of ``--device_memory_gb``. The mesh is checked
against the target's device count and the model before anything is compiled.

Parameters are ``jax.ShapeDtypeStruct`` leaves carrying their ``NamedSharding``; nothing is
allocated. When the machine has fewer accelerators than the mesh needs, the programs are compiled for
simulated CPU devices (``--xla_force_host_platform_device_count``): the figures are then the *CPU*
compiler's memory analysis, which is the best available without the hardware (the GPU/TPU compilers
fuse more, so their temporaries are usually smaller). Parameter and KV-cache bytes are exact either way
(shard shapes).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config string, e.g. configs/pairs.py:llama_3_1_70b", lock_config=True)
flags.DEFINE_integer("batch", -1, "sequences per batch; -1 = config.generation.batch_size")
flags.DEFINE_list("batches", [], "batch sizes to try (instead of --batch), largest first, up to the first that fits")
flags.DEFINE_integer("context", 2048, "KV cache slots = prompt + new tokens (generation); tokens (collection)")
flags.DEFINE_integer("new_tokens", -1, "new tokens per generation; -1 = config.generation.max_new_tokens")
flags.DEFINE_integer("nodes", 1000, "neurons read per row by the collection program")
flags.DEFINE_float("device_memory_gb", -1.0, "memory per device (1e9 bytes); -1 = the preset's, or 80")
flags.DEFINE_float("headroom", 0.10, "fraction of device memory to keep free")
flags.DEFINE_list("programs", ["generation", "collection"], "programs to compile")
flags.DEFINE_string("compile_dtype", "auto", "dtype to compile in: auto (float32 for a bf16 model on CPU "
                    "devices: the CPU compiler keeps float32 copies of bf16 weights), model, or a dtype name")
flags.DEFINE_bool("probe", False, "generation: compile 4- and 8-layer copies and extrapolate in depth (seconds "
                  "instead of minutes for 80 layers; see plan_program)")
flags.DEFINE_string("json_out", "", "write the results as JSON here (process 0 only)")

GB = 1e9
# The planner reads only the memory analysis, which buffer assignment fixes before LLVM code generation:
# CPU compiles skip LLVM's optimisations (about 3x faster, identical figures; tests/test_plan.py checks).
CPU_PLAN_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass
class ProgramPlan:
    """Per-device memory of one compiled program (bytes)."""

    program: str
    mesh: tuple
    rules: str
    kv_heads: str | None
    batch: int
    context: int
    params: int
    kv_cache: int
    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    total: int
    device_memory: int
    headroom: float
    platform: str
    compile_s: float
    compile_dtype: str = ""
    call: str = ""  # generation: the engine call that peaks ("prefill", "place" or "decode")

    @property
    def budget(self) -> float:
        return self.device_memory * (1.0 - self.headroom)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def free_fraction(self) -> float:
        return 1.0 - self.total / self.device_memory

    def row(self) -> str:
        m = "x".join(map(str, self.mesh))
        return (f"| {self.program} | {m} {self.rules}{'' if not self.kv_heads else ' kv=' + self.kv_heads} | "
                f"{self.batch} x {self.context} | {self.params / GB:.2f} | {self.kv_cache / GB:.2f} | "
                f"{self.temporaries / GB:.2f} | {self.total / GB:.2f} | "
                f"{self.device_memory / GB:.0f} | {100 * self.free_fraction:.1f}% | "
                f"{'fits' if self.fits else 'does not fit'} |")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(fits=self.fits, free_fraction=self.free_fraction)
        return d


HEADER = ("| program | mesh (data x fsdp x tensor) rules | batch x context | params GB | KV cache GB | "
          "temporaries GB | total GB | device GB | free | verdict |\n|---|---|---|---|---|---|---|---|---|---|")


def model_config(study):
    from cna_jax.models.config import from_hf_dict

    return from_hf_dict(study.model.shape.to_dict())


def _devices(n: int):
    import jax

    devs = jax.devices()
    if len(devs) >= n:
        return devs[:n]
    cpu = jax.devices("cpu")
    if len(cpu) < n:
        raise RuntimeError(f"need {n} devices to compile for this mesh, have {len(devs)} "
                           f"{devs[0].platform} and {len(cpu)} CPU; set XLA_FLAGS="
                           f"--xla_force_host_platform_device_count={n} before JAX starts")
    return cpu[:n]


def _engine_calls(cfg, layout, dtype, slots: int, prompt: int, new_tokens: int, params, chunk: int | None = None):
    """The engine's calls on the layout, each as (name, ShardedFunction, abstract arguments, abstract
    buffers alive during the call but not its arguments): the largest ``prefill`` (the slot state and the
    previous staging buffer stay alive while it runs), ``place`` and a ``decode`` chunk (the staging
    buffer stays alive). No shared prefix: its cache is one row's."""
    import functools

    import jax
    import jax.numpy as jnp

    from cna_jax import engine

    sd = jax.ShapeDtypeStruct
    width = prompt + new_tokens
    fns = engine.sharded_functions(cfg, layout, dtype, slots, width, new_tokens, chunk or engine.DECODE_CHUNK)
    p = engine.prefill_rows(slots, prompt)
    prefill, place = fns.prefill.at(p), fns.place.at(p)
    state_sh, table_sh = fns.decode.in_shardings[1], fns.decode.in_shardings[2]

    def abstract(fn, shardings, **kw):
        shapes = jax.eval_shape(functools.partial(fn, **kw))
        return jax.tree.map(lambda s, sh: sd(s.shape, s.dtype, sharding=sh), shapes, shardings)

    state = abstract(engine.empty_state_fn, state_sh, cfg=cfg, dtype=dtype, slots=slots, width=width,
                     max_new_tokens=new_tokens)
    table = tuple(sd(a.shape, a.dtype, sharding=sh)
                  for a, sh in zip(engine.stack_conditions(cfg, [engine.Condition()], steering=True), table_sh))
    eos = sd((1,), jnp.int32, sharding=layout.replicated())
    rows = tuple(sd(shape, dt, sharding=sh) for (shape, dt), sh in zip(
        [((p, prompt), jnp.int32), ((p, prompt), jnp.bool_), ((p,), jnp.int32)], prefill.in_shardings[2:5]))
    staged = jax.tree.map(lambda s, sh: sd(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(functools.partial(engine.prefill_fn, cfg=cfg, dtype=dtype, width=prompt,
                                                           max_new_tokens=new_tokens),
                                         params, None, *rows, table, eos), prefill.out_shardings)
    idx = tuple(sd((p,), jnp.int32, sharding=sh) for sh in place.in_shardings[2:4])
    return [("prefill", prefill, (params, None, *rows, table, eos), (state, staged)),
            ("place", place, (state, staged, *idx), (params, table)),
            ("decode", fns.decode, (params, state, table, eos), (staged,))]


# Depths compiled when probing (``probe``): two shallow copies of the model; compiled sizes are
# extrapolated linearly in depth from them. Below 4 layers XLA's buffer assignment is not yet linear.
PROBE_DEPTHS = (4, 8)


def _program_calls(cfg, layout, program: str, *, batch: int, context: int, new_tokens: int, cdtype, nodes: int):
    """(params, [(call name, ShardedFunction, abstract args, abstract buffers alive beside it)]) of a program."""
    import jax
    import jax.numpy as jnp

    from cna_jax import sharding as S
    from cna_jax.collect import sharded_collect

    sd = jax.ShapeDtypeStruct
    params = S.abstract_sharded_params(cfg, layout, cdtype)
    if program == "generation":
        prompt = context - new_tokens
        if prompt < 1:
            raise ValueError(f"context={context} leaves no room for a prompt with new_tokens={new_tokens}")
        return params, _engine_calls(cfg, layout, cdtype, batch, prompt, new_tokens, params)
    if program == "collection":
        b2 = layout.batch(2)
        mult = sd((cfg.num_hidden_layers, cfg.intermediate_size), jnp.float32,
                  sharding=layout.sharding(("layers", "neurons")))
        args = (params, sd((batch, context), jnp.int32, sharding=b2), sd((batch, context), jnp.bool_, sharding=b2),
                sd((batch, 1), jnp.int32, sharding=b2), sd((batch, 1), jnp.bool_, sharding=b2), mult,
                sd((nodes,), jnp.int32, sharding=layout.replicated()))
        return params, [("", sharded_collect(cfg, layout, cdtype), args, ())]
    raise ValueError(f"unknown program {program!r} (generation, collection)")


def _nbytes(tree, dtype=None) -> int:
    """Per-device bytes of abstract sharded arrays (in ``dtype`` if given, else each array's own)."""
    import jax
    import jax.numpy as jnp

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(dtype or x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _compiled_sizes(params, calls, on_cpu: bool) -> list[dict]:
    """Per call: the compiled program's argument, output, temporary and aliased bytes, the bytes of its
    other inputs (its arguments but the parameters, and the buffers alive beside it) and compile seconds."""
    import time

    out = []
    for _, fn, args, alive in calls:
        t = time.perf_counter()
        ma = fn.lower(*args).compile(compiler_options=CPU_PLAN_COMPILER_OPTIONS if on_cpu else None).memory_analysis()
        out.append(dict(arguments=int(ma.argument_size_in_bytes), outputs=int(ma.output_size_in_bytes),
                        temporaries=int(ma.temp_size_in_bytes), aliased=int(ma.alias_size_in_bytes),
                        other_inputs=_nbytes([a for a in (*args, *alive) if a is not params]),
                        compile_s=time.perf_counter() - t))
    return out


def plan_program(cfg, layout, program: str, *, batch: int, context: int, new_tokens: int, dtype,
                 device_memory: float, headroom: float, nodes: int = 1000, compile_dtype=None,
                 probe: bool = False) -> ProgramPlan:
    """AOT-compiles one program (``generation``: the engine's calls, or ``collection``) for the layout;
    no weights needed.

    Parameter and KV-cache bytes are exact (shard shapes in ``dtype``). Temporaries come from the
    compiled program's memory analysis. ``compile_dtype`` (e.g. float32 on a CPU planning a bf16 model)
    compiles in that dtype instead: the CPU compiler upcasts bf16 matrix products and keeps float32
    copies of the weights, which hardware with native bf16 dots never makes, so temporaries of a float32
    compile are an upper bound for the bf16 program's.

    ``probe`` (generation only): compile copies of the model at :data:`PROBE_DEPTHS` layers instead of all
    of them (the layers are unrolled, so the engine's 80-layer calls take minutes to compile on a CPU) and
    extrapolate the compiled sizes linearly in depth (every layer is the same program on the same shapes).
    Parameters and cache stay exact, and so do the other inputs (state, staging buffer and condition table
    hold one block per layer: extrapolated from the probes, they are the full-depth bytes, so the full-depth
    calls are never traced). tests/test_plan.py checks it against full compiles at 12 and 16 layers (within
    2%). Collection is always compiled in full: its temporaries are not linear in depth (they grow up to ~8
    layers, then XLA reuses the buffers across layers and they drop).
    """
    import jax.numpy as jnp

    from cna_jax import sharding as S

    dtype = jnp.dtype(dtype)
    cdtype = jnp.dtype(compile_dtype or dtype)
    kw = dict(batch=batch, context=context, new_tokens=new_tokens, cdtype=cdtype, nodes=nodes)
    if program == "generation":
        cache = S.cache_bytes_per_device(cfg, layout, batch, context, dtype)
        compiled_cache = S.cache_bytes_per_device(cfg, layout, batch, context, cdtype)
    else:
        cache = compiled_cache = 0

    on_cpu = layout.platform == "cpu"
    depth = cfg.num_hidden_layers
    if probe and program == "generation" and depth > PROBE_DEPTHS[-1]:
        (d1, d2) = PROBE_DEPTHS
        probes = [_program_calls(dataclasses.replace(cfg, num_hidden_layers=d), layout, program, **kw)
                  for d in PROBE_DEPTHS]
        calls = probes[0][1]
        low, high = (_compiled_sizes(*p, on_cpu) for p in probes)
        sizes = [{k: (a[k] + (b[k] - a[k]) * (depth - d1) / (d2 - d1) if k != "compile_s" else a[k] + b[k])
                  for k in a} for a, b in zip(low, high)]
        params = S.abstract_sharded_params(cfg, layout, cdtype)
    else:
        params, calls = _program_calls(cfg, layout, program, **kw)
        sizes = _compiled_sizes(params, calls, on_cpu)
    param_bytes = _nbytes(params, dtype)
    plans = []
    for (call, *_), m in zip(calls, sizes):
        # All parameters stay resident even where a program reads only some (collection skips lm_head, and
        # XLA drops unused arguments), so the total counts them all plus the other inputs and the buffers
        # alive during the call; the engine's state (the KV cache) at the model's dtype, whatever the compile's.
        inputs = param_bytes + m["other_inputs"] - compiled_cache + cache
        arguments, outputs, temps, aliased = (int(round(m[k])) for k in ("arguments", "outputs", "temporaries",
                                                                          "aliased"))
        plans.append(ProgramPlan(
            program=program, mesh=tuple(layout.mesh.shape[a] for a in S.AXES), rules=layout.preset,
            kv_heads=layout.kv_heads, batch=batch, context=context, params=int(param_bytes), kv_cache=int(cache),
            arguments=arguments, outputs=outputs, temporaries=temps, aliased=aliased,
            total=int(round(inputs + outputs + temps - aliased)), device_memory=int(device_memory),
            headroom=headroom, platform=layout.platform, compile_s=m["compile_s"],
            compile_dtype=cdtype.name, call=call))
    peak = max(plans, key=lambda r: r.total)
    return dataclasses.replace(peak, compile_s=sum(r.compile_s for r in plans))


def plan(cfg, mesh_shape: Sequence[int], rules: str = "generation", *, kv_heads=None, batch: int = 64,
         context: int = 2048, new_tokens: int = 150, dtype=None, device_memory_gb: float = 80.0,
         headroom: float = 0.10, programs=("generation", "collection"), nodes: int = 1000,
         devices=None, compile_dtype="auto", probe: bool = False) -> list[ProgramPlan]:
    """Plans each program on one mesh. Generation uses ``rules``; collection uses the ``collection``
    preset unless ``rules`` is ``fsdp`` (then fsdp). Raises ``ShardingError`` for layouts that don't divide.
    ``compile_dtype="auto"``: float32 when compiling a bf16/fp16 model for CPU devices (see
    :func:`plan_program`), else the model dtype; None: always the model dtype."""
    import jax.numpy as jnp

    from cna_jax import sharding as S

    dtype = jnp.dtype(dtype or jnp.bfloat16)
    n = math.prod(mesh_shape)
    mesh = S.make_mesh(tuple(mesh_shape), devices if devices is not None else _devices(n))
    if compile_dtype == "auto":
        on_cpu = mesh.devices.flat[0].platform == "cpu"
        compile_dtype = jnp.float32 if on_cpu and dtype.itemsize < 4 else None
    out = []
    for program in programs:
        preset = rules if program == "generation" or rules == "fsdp" else "collection"
        layout = S.make_layout(cfg, mesh, preset, kv_heads=kv_heads, batch=batch)
        out.append(plan_program(cfg, layout, program, batch=batch, context=context, new_tokens=new_tokens,
                                dtype=dtype, device_memory=device_memory_gb * GB, headroom=headroom, nodes=nodes,
                                compile_dtype=compile_dtype, probe=probe))
    return out


def target(study) -> tuple[dict, int, float]:
    """The config's mesh (``cna_jax.config.mesh_settings``), the device count and the memory per device
    (GB, None without a preset) it is planned for."""
    from cna_jax.config import MESH_PRESETS, mesh_settings

    mesh = mesh_settings(study)
    preset = MESH_PRESETS.get(mesh["preset"])
    devices = mesh["devices"] if mesh["devices"] != -1 else preset["devices"] if preset else 1
    return mesh, devices, preset["memory_gb"] if preset else None


def plan_config(study, *, batches: Sequence[int] = (), context: int = 2048, new_tokens: int = -1,
                device_memory_gb: float = -1.0, headroom: float = 0.10, programs=("generation", "collection"),
                nodes: int = 1000, compile_dtype="auto", probe: bool = False, log=print) -> list[ProgramPlan]:
    """Plans a study config on its own target (:func:`target`): validates it against the target's device
    count (mesh sizes, divisibility, with the numbers in the error), then plans each batch of ``batches``
    (default: config.generation.batch_size), largest first, stopping at the first where every program fits."""
    import jax.numpy as jnp

    from cna_jax.config import check_mesh, validate

    mesh, devices, preset_gb = target(study)
    validate(study)
    cfg = model_config(study)
    sizes = check_mesh(cfg, mesh, devices)
    memory = device_memory_gb if device_memory_gb > 0 else preset_gb or 80.0
    new_tokens = new_tokens if new_tokens >= 0 else int(study.generation.max_new_tokens)
    results = []
    for b in sorted(batches or [int(study.generation.batch_size)], reverse=True):
        res = plan(cfg, sizes, mesh["rules"], kv_heads=mesh["kv_heads"], batch=b, context=context,
                   new_tokens=new_tokens, dtype=jnp.dtype(study.model.dtype), device_memory_gb=memory,
                   headroom=headroom, programs=programs, nodes=nodes, compile_dtype=compile_dtype, probe=probe)
        for r in res:
            log(r.row())
        results.extend(res)
        if all(r.fits for r in res):
            break
    return results


def plan_config_file(path: str, **kwargs) -> list[dict]:
    """:func:`plan_config` of a config string (``configs/pairs.py:qwen2_5_7b``), quietly; plain dicts, so
    it can run in a worker process."""
    from cna_jax.config import load_config_file

    return [r.to_json() for r in plan_config(load_config_file(path), log=lambda row: None, **kwargs)]


def main(argv):
    del argv
    study = FLAGS.config
    if study is None:
        raise app.UsageError("--config=configs/pairs.py:<pair> (or another config file) is required")
    _, need, _ = target(study)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Simulated CPU devices for planning on a machine without the hardware (before JAX starts).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={need}").strip()

    from cna_jax.distributed import initialize_from_config, is_writer

    initialize_from_config(study)
    import jax.numpy as jnp

    cfg = model_config(study)
    dtype = jnp.dtype(study.model.dtype)
    compile_dtype = ("auto" if FLAGS.compile_dtype == "auto" else None if FLAGS.compile_dtype == "model"
                     else jnp.dtype(FLAGS.compile_dtype))
    batches = [int(b) for b in FLAGS.batches] or [FLAGS.batch if FLAGS.batch > 0 else study.generation.batch_size]
    new_tokens = FLAGS.new_tokens if FLAGS.new_tokens >= 0 else int(study.generation.max_new_tokens)
    mesh, _, _ = target(study)
    print(f"{study.name}: {cfg.num_params() / 1e9:.1f}B parameters, {dtype.name}, "
          f"{cfg.num_params() * dtype.itemsize / GB:.1f} GB of weights; {need} devices"
          f"{' (preset ' + mesh['preset'] + ')' if mesh['preset'] else ''}; batch {','.join(map(str, batches))}, "
          f"context {FLAGS.context} (generation: prompt {FLAGS.context - new_tokens} + {new_tokens} new)")
    print(HEADER)
    results = plan_config(study, batches=batches, context=FLAGS.context, new_tokens=new_tokens,
                          device_memory_gb=FLAGS.device_memory_gb, headroom=FLAGS.headroom,
                          programs=FLAGS.programs, nodes=FLAGS.nodes, compile_dtype=compile_dtype,
                          probe=FLAGS.probe)
    platform = results[0].platform if results else "?"
    note = ""
    if platform == "cpu":
        cd = results[0].compile_dtype
        note = (" (CPU compiler's memory analysis on simulated devices"
                + (f"; temporaries from a {cd} compile, an upper bound for {dtype.name} on GPU/TPU)" if cd != dtype.name else ")"))
    by_batch = {}
    for r in results:
        by_batch.setdefault(r.batch, []).append(r)
    good = [b for b, rs in by_batch.items() if all(r.fits for r in rs)]
    if good:
        r = by_batch[good[0]][0]
        print(f"VERDICT: fits — mesh {r.mesh} rules {r.rules}{'' if not r.kv_heads else ' kv_heads=' + r.kv_heads}, "
              f"batch {good[0]}, >= {100 * FLAGS.headroom:.0f}% headroom{note}")
    else:
        print(f"VERDICT: does not fit with {100 * FLAGS.headroom:.0f}% headroom{note}")
    if FLAGS.json_out and is_writer():
        with open(FLAGS.json_out, "w") as f:
            json.dump(dict(model=study.name, preset=mesh["preset"] or None, devices=need,
                           results=[r.to_json() for r in results], fits=bool(good)), f, indent=1)
    return 0 if good else 1


if __name__ == "__main__":
    app.run(main)
