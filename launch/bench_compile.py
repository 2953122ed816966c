"""X1 (no bar; on S1's path): the study's forward programs compiled at XLA:CPU's default LLVM -O2 against
``sharding.FORWARD_CPU_COMPILER_OPTIONS`` (-O1), on SmolLM2-135M-Instruct's weights, one core.

Programs, at the study's shapes: the cna stage's collection (32 rows of 24-token suffixes after a 30-token
shared chat prefix, every layer's neurons at the last position and the residual stream; the prefix's own
batch-1 pass is a program of its own), and the engine's
prefix pass (the prefix under 64 conditions), prefill (24 rows of 40 tokens) and store pass (the same rows up to
layer 20), under a 64-condition table with a steered row (directional ablation, activation addition) as the
generation job has; and the damage stage's KL pass (4 rows of 192 tokens, KL at 150 positions from layer 23),
which the study compiles at XLA's defaults (measured here as a candidate).
Per program and option: the compile (``lower(...).compile()``, this process's compile cache off; each build
twice, alternated, the faster), then ``--repeats`` calls of each build alternated (median); gate: both builds'
outputs bit-identical.

    python launch/bench_compile.py      # about 8 min; --programs="KL pass" for one of them

``--compare=scan``: the engine's three passes with their layers unrolled (the packed panels without their
stacked copy) against one ``lax.scan`` over the stacked panels (``engine._scanned``, the study's path), both
at the study's options (-O1).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import interleaved, pin_one_core, sgemm_gflops  # noqa: E402  (launch/benchlib.py)

import time  # noqa: E402

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("repeats", 5, "Timed calls per build (alternated; median).")
flags.DEFINE_integer("core", 0, "The core this process is pinned to.")
flags.DEFINE_string("programs", "", "Comma-separated program names to measure (default: all).")
flags.DEFINE_enum("compare", "o1", ["o1", "scan"], "o1: XLA's -O2 against -O1; scan: the engine passes' layers "
                  "unrolled against scanned (both -O1).")

SCANNED = ("prefix pass", "prefill", "store pass")  # the programs --compare=scan measures


PROGRAMS = ("collection", "collection prefix", "prefix pass", "prefill", "store pass", "KL pass")


def main(argv):
    del argv
    F = flags.FLAGS
    unknown = [n for n in F.programs.split(",") if n not in PROGRAMS] if F.programs else []
    if unknown:  # before the model loads
        raise SystemExit(f"--programs: unknown {unknown}; the programs are {list(PROGRAMS)}")
    pin_one_core(F.core)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cna_jax import collect, damage, engine, sharding
    from cna_jax.lm import LM

    jax.config.update("jax_enable_compilation_cache", False)
    rate = sgemm_gflops()
    lm = LM.load("smollm2")
    cfg, params, f32 = lm.cfg, lm.params, jnp.float32
    packed = engine.packed_weights(lm)
    rng = np.random.default_rng(0)
    L, I, E, V = cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size, cfg.vocab_size
    c = 64
    mult = np.ones((c, L, I), np.float32)
    mult[1:, 20:] = rng.uniform(size=(c - 1, L - 20, I)) > 0.01
    conditions = [engine.Condition(m) for m in mult[:-1]]
    conditions.append(engine.Condition(direction=rng.standard_normal(E), ablate=True, add={12: -4.0}))
    table = engine.put_host_table(engine.stack_conditions(cfg, conditions))
    prefix = jnp.asarray(rng.integers(0, V, 30), jnp.int32)
    # The prefill's prefix keys and values, from another program than the two timed below (XLA's products)
    kv = jax.jit(engine.prefix_fn, static_argnames=("cfg", "dtype"))(params, prefix, table, cfg=cfg, dtype=f32)
    p, t = 24, 40
    tokens = jnp.asarray(rng.integers(0, V, (p, t)), jnp.int32)
    valid = jnp.asarray(np.arange(t)[None] >= rng.integers(0, 16, (p, 1)))
    cond = jnp.asarray(rng.integers(0, c, p), jnp.int32)
    rows = (params, kv, tokens, valid, cond, table)
    b, s = 32, 24
    ckv = jax.jit(collect.prefix_fn, static_argnames=("cfg",))(params, prefix, None, cfg=cfg)  # the batches' prefix
    ctoks = jnp.asarray(rng.integers(0, V, (b, s)), jnp.int32)
    cvalid = jnp.asarray(np.arange(s)[None] >= rng.integers(0, 12, (b, 1)))
    kb, kt, kn = 4, 192, 150
    kvalid = jnp.asarray(np.arange(kt)[None] >= rng.integers(0, 24, (kb, 1)))
    res = damage.residuals_fn(params, jnp.asarray(rng.integers(0, V, (kb, kt)), jnp.int32), kvalid, cfg=cfg,
                              dtype=f32, grid=1)
    kselect = jnp.asarray(np.broadcast_to(np.arange(kt - kn - 1, kt - 1), (kb, kn)), jnp.int32)
    ktable = engine.put_host_table(engine.stack_conditions(cfg, [conditions[1], engine.Condition()], steering=True))
    ref = jax.nn.log_softmax(jnp.asarray(rng.standard_normal((kb, kn, V)), jnp.float32), axis=-1)
    programs = {  # name: (function, dynamic arguments, static keywords)
        "collection": (collect.collect_fn, (params, ctoks, cvalid, jnp.full((b, 1), s - 1, jnp.int32),
                                            jnp.ones((b, 1), bool), None, jnp.arange(0, L * I, 7, dtype=jnp.int32),
                                            ckv), dict(cfg=cfg, residuals=True)),
        "collection prefix": (collect.prefix_fn, (params, prefix, None), dict(cfg=cfg)),
        "prefix pass": (engine.prefix_fn, (params, prefix, table, packed), dict(cfg=cfg, dtype=f32)),
        "prefill": (engine.prefill_fn, rows + (jnp.asarray([2], jnp.int32), None, None, None, packed),
                    dict(cfg=cfg, dtype=f32, width=30 + t, max_new_tokens=150)),
        "store pass": (engine.store_fn, rows + (packed,), dict(cfg=cfg, dtype=f32, stop=20)),
        # The damage stage's KL pass: 4 rows of 192 tokens, KL at 150 positions, the CNA set's first changed
        # layer as its start, the residual streams of every layer kept (one core's share of a batch of 8).
        "KL pass": (damage.kl_fn, (ref, params, res, jnp.int32(23), kvalid, kselect, ktable,
                                   jnp.zeros((kb,), jnp.int32)),
                    dict(cfg=cfg, dtype=f32, grid=1, kernel=damage.use_row_kernels(lm))),
    }
    assert tuple(programs) == PROGRAMS
    if F.programs or F.compare == "scan":
        keep = F.programs.split(",") if F.programs else SCANNED
        programs = {k: v for k, v in programs.items() if k in keep and (F.compare == "o1" or k in SCANNED)}
    unrolled = {k: v for k, v in packed.items() if k != "layers"}
    label = "-O2 -> -O1" if F.compare == "o1" else "unrolled -> scanned"
    o1 = sharding.forward_compiler_options("cpu")
    print(f"X1, one core, SGEMM {rate:.1f} GFLOP/s; compile s ({label}), run s median of {F.repeats} "
          f"({label}), outputs", flush=True)
    for name, (fn, args, static) in programs.items():
        if F.compare == "o1":
            variants = [(args, None), (args, o1)]
        else:
            assert engine._scanned(packed) and any(a is packed for a in args)
            variants = [(tuple(unrolled if a is packed else a for a in args), o1), (args, o1)]
        builds, compile_s = [None, None], [float("inf")] * 2
        # Each build compiled twice, alternated (a process's first compiles pay one-time costs); the faster counts.
        for k in (0, 1, 0, 1):
            jax.clear_caches()  # the in-memory executables too (the collection's prefix was compiled for its args)
            t0 = time.perf_counter()
            builds[k] = jax.jit(fn, static_argnames=tuple(static)).lower(*variants[k][0], **static).compile(
                variants[k][1])
            compile_s[k] = min(compile_s[k], time.perf_counter() - t0)
        outs = [jax.tree.leaves(jax.block_until_ready(x(*a))) for x, (a, _) in zip(builds, variants)]
        same = all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(*outs))
        run = interleaved([lambda x=x, a=a: jax.block_until_ready(x(*a)) for x, (a, _) in zip(builds, variants)],
                          F.repeats)
        print(f"| {name} | compile {compile_s[0]:.1f} -> {compile_s[1]:.1f} s ({compile_s[1] / compile_s[0]:.2f}) "
              f"| run {run[0]:.3f} -> {run[1]:.3f} s ({run[1] / run[0]:.3f}) | "
              f"{'bit-identical' if same else 'DIFFERENT'} |", flush=True)
        if not same:
            raise SystemExit(f"{name}: the two builds' outputs differ ({label})")


if __name__ == "__main__":
    app.run(main)
