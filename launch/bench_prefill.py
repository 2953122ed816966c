"""P1 / P2 / P3 / P4 (no bars; on S1's path): the study's generation job, in one process on the study's devices.

* ``--compare=first_layer`` (P1): rows prefilled from the first layer their condition changes, against every
  row through every layer;
* ``--compare=length_multiple`` (P2): prefill length buckets of ``engine.JOB_LENGTH_MULTIPLE`` tokens against
  ``--old_length_multiple`` (both from the first changed layer);
* ``--compare=settle`` (P3): rows stopping on a byte-level tokenizer's settled text (the whole decode less
  an incomplete last character, ``LM.byte_level_decode``) against any tokenizer's (less 2 tokens and 8
  characters);
* ``--compare=chunk`` (P4): decode chunks of ``--chunk`` steps against ``engine.DECODE_CHUNK`` (a row's stop
  rule is asked between chunks, so a settled row decodes up to chunk - 1 steps more).

Workload: a slice of a finished study's generation job (``--workdir``, the README main command's): the
held-out harmful prompts under none, the CNA set, the two graph subsets and the first ``--nulls`` layer-matched
and uniform null subsets (half each), the rows stopping once their refusal flag (nulls) or flag and quality
(the others) are settled, as ``Study.stage_generation`` runs them. The engine runs on the study's CPU
devices (``config.cpu_devices``: one per core) with its slots.

Gate: identical tokens per row on both paths (P2: a row's prefill keys and values differ in their last bits
at another padding); P3, P4: each row's tokens a prefix of the other path's, every refusal flag the same.
Timing: one warm-up job per path (compiles apart), then ``--repeats`` timed jobs per path, alternated, median.

    python launch/bench_prefill.py --workdir=workdir/study     # about 7 min on 2 cores

Not pinned to one core (the study's devices use every core): the SGEMM rate printed is this process's, all
cores.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import sgemm_gflops  # noqa: E402  (launch/benchlib.py)

import statistics  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/smollm2_testbed.py", "The study's config.")
flags.DEFINE_string("workdir", "workdir/study", "A finished study's workdir (its cna, graph and activation stages).")
flags.DEFINE_integer("nulls", 10, "Null subsets in the slice (half layer-matched, half uniform).")
flags.DEFINE_integer("repeats", 1, "Timed jobs per path (median).")
flags.DEFINE_enum("compare", "first_layer", ["first_layer", "length_multiple", "settle", "chunk"],
                  "first_layer (P1): from the first changed layer vs every layer; length_multiple (P2): "
                  "engine.JOB_LENGTH_MULTIPLE vs --old_length_multiple; settle (P3): the byte-level settled "
                  "text vs any tokenizer's; chunk (P4): --chunk decode steps per call vs engine.DECODE_CHUNK")
flags.DEFINE_integer("old_length_multiple", 16, "P2: the length buckets compared against (16 before 1fb037d).")
flags.DEFINE_integer("chunk", 2, "P4: decode steps per call compared against engine.DECODE_CHUNK.")


def main(argv):
    del argv
    F = flags.FLAGS
    c = F.config
    from cna_jax import distributed
    distributed.configure_cpu_devices(c)
    import numpy as np

    from cna_jax import engine, graph as graph_lib
    from cna_jax.batching import bucket, split_shared_prefix
    from cna_jax.refusal import refusal_report, settled_stop
    from cna_jax.study import GRAPHS, Study, null_subsets

    if F.compare == "length_multiple" and F.old_length_multiple == engine.JOB_LENGTH_MULTIPLE:
        raise app.UsageError(f"--old_length_multiple={F.old_length_multiple} is engine.JOB_LENGTH_MULTIPLE already")
    if F.compare == "chunk" and F.chunk == engine.DECODE_CHUNK:
        raise app.UsageError(f"--chunk={F.chunk} is engine.DECODE_CHUNK already")
    gflops = sgemm_gflops()
    s = Study(c, F.workdir, progress=False)
    pool = s.stage_cna()
    acts = {side: s.stage_acts(side, pool) for side in ("instruct", "base")}
    graphs = {k: s.stage_graph(k, acts[side], pool, s._key_acts(side)) for k, (side, _) in GRAPHS.items()}
    subsets = {k: graph_lib.connected_subset(graphs[k].adjacency, bool(c.graph.largest_component))
               for k in ("contrast_instruct", "harmful_instruct")}
    m = c.generation.multiplier
    conds = [engine.Condition(), engine.Condition(pool.multiplier(m)),
             engine.Condition(pool.subset(subsets["contrast_instruct"]).multiplier(m)),
             engine.Condition(pool.subset(subsets["harmful_instruct"]).multiplier(m))]
    for family, n in (("layer_matched", F.nulls // 2), ("uniform", F.nulls - F.nulls // 2)):
        for idx, _ in null_subsets(pool, subsets["contrast_instruct"], n, family, c.nulls.seed):
            conds.append(engine.Condition(pool.subset(idx).multiplier(m)))
    lm = s.lm("instruct")
    ids = lm.encode(s.prompts.eval_harmful)
    prefix, suffixes, _ = split_shared_prefix(ids)
    rows = [(list(x), k) for k in range(len(conds)) for x in suffixes]
    if F.compare == "settle" and not lm.byte_level_decode:
        raise app.UsageError("--compare=settle needs a byte-level tokenizer (LM.byte_level_decode)")
    stops = {byte_level: (settled_stop(c.generation.detector, lm.decode, byte_level=byte_level),
                          settled_stop(c.generation.detector, lm.decode, False, byte_level))
             for byte_level in (False, lm.byte_level_decode)}

    # A path: (from the first changed layer?, length buckets, byte-level settled text?, decode chunk); the new
    # path first.
    byte_level, mult, chunk = lm.byte_level_decode, engine.JOB_LENGTH_MULTIPLE, engine.DECODE_CHUNK
    if F.compare == "first_layer":
        paths = {"from first changed layer": (True, mult, byte_level, chunk),
                 "every layer": (False, mult, byte_level, chunk)}
    elif F.compare == "length_multiple":
        paths = {f"{mult}-token buckets": (True, mult, byte_level, chunk),
                 f"{F.old_length_multiple}-token buckets": (True, F.old_length_multiple, byte_level, chunk)}
    elif F.compare == "chunk":
        paths = {f"chunks of {F.chunk}": (True, mult, byte_level, F.chunk),
                 f"chunks of {chunk}": (True, mult, byte_level, chunk)}
    else:
        paths = {"byte-level settled text": (True, mult, True, chunk),
                 "any tokenizer's settled text": (True, mult, False, chunk)}

    def job(path, rows=rows):
        from_first_changed_layer, length_multiple, byte_level, chunk = paths[path]
        scored, flagged = stops[byte_level]
        t = time.perf_counter()
        out = engine.run(lm, rows, conds, max_new_tokens=c.generation.max_new_tokens, slots=c.generation.batch_size,
                         prefix=np.asarray(prefix).tolist(), min_table_rows=len(conds),
                         stop=lambda r, tok: (flagged if rows[r][1] >= 4 else scored)(tok),
                         from_first_changed_layer=from_first_changed_layer, length_multiple=length_multiple,
                         chunk=chunk)
        return time.perf_counter() - t, out

    # The store's columns: the job's longest suffix in engine.run's length buckets (its default length_multiple).
    start = engine.lower_layer_start(lm.cfg, conds, rows, bucket(max(map(len, suffixes)), engine.JOB_LENGTH_MULTIPLE))
    firsts = [x.first_layer(lm.cfg.num_hidden_layers) for x in conds]
    print(f"P1 slice: {len(rows)} rows ({len(suffixes)} harmful prompts x {len(conds)} conditions), "
          f"{len(lm.layout.mesh.devices.flat) if lm.layout is not None else 1} devices, "
          f"{c.generation.batch_size} slots; first changed layers {sorted(set(firsts))}, prefill from layer {start} "
          f"for {sum(firsts[k] >= start > 0 for _, k in rows)} rows; SGEMM (this process, all cores) {gflops:.1f} "
          "GFLOP/s")
    # Warm-up rows: at least as many as the slots (engine.run shrinks a smaller job's slots, and its programs would
    # then not be the timed job's), spread over the prompts so that each length bucket compiles before the timing.
    warm = rows[:: max(1, len(rows) // (2 * c.generation.batch_size))]
    for path in paths:
        job(path, warm)
    times = {path: [] for path in paths}
    outs = {}
    for _ in range(F.repeats):
        for path in paths:
            dt, outs[path] = job(path)
            times[path].append(dt)
            print(f"  {path:>24}: {dt:.1f} s")
    a, b = paths
    new, old = statistics.median(times[a]), statistics.median(times[b])
    if F.compare in ("settle", "chunk"):
        flagged_rows = [refusal_report([lm.decode(t) for t in outs[p]], detector=c.generation.detector).flags
                        for p in paths]
        prefix_rows = sum(y[:len(x)] == x for x, y in zip(outs[a], outs[b]))
        print(f"gate: {prefix_rows}/{len(rows)} rows a prefix of the other path's, "
              f"{sum(x == y for x, y in zip(*flagged_rows))}/{len(rows)} refusal flags equal; tokens "
              f"{sum(map(len, outs[a]))} vs {sum(map(len, outs[b]))}")
    else:
        same = sum(x == y for x, y in zip(outs[a], outs[b]))
        print(f"gate: {same}/{len(rows)} rows identical; tokens {sum(map(len, outs[a]))}")
    bar = {"first_layer": "P1", "length_multiple": "P2", "settle": "P3", "chunk": "P4"}[F.compare]
    print(f"{bar}: {new:.1f} s vs {old:.1f} s {b}: {old / new:.2f}x (SGEMM {sgemm_gflops():.1f} GFLOP/s after)")


if __name__ == "__main__":
    app.run(main)
