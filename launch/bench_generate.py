"""G1 / G2 / G3 / G5: masked greedy decoding of SmolLM2-135M-Instruct (fp32, CPU, one core).

G1 / G2 / G3: the public path ``cna_jax.generate.generate(lm, prompts, neuron_mult, batch_size=b)`` (the
continuous-batching engine, one condition, chat header shared) vs HF `generate` on the same prompts
(left-padded, the same down_proj columns zeroed). Correctness gate first: identical greedy tokens up to
each row's EOS. Then medians of --repeats interleaved timed runs after a warm-up. Beside each time: the
fraction of the SGEMM-bound limit, ``2 x params x tokens / SGEMM rate`` over the measured time, where
tokens = the shared chat header once + every prompt's other tokens + the generated tokens (what a side
must at least compute; HF computes the header per row, so its fraction is lower; params = every
parameter, the tied embedding counted once as the lm_head) and the SGEMM rate is this process's
one-core NumPy 2048^2 float32 matmul.

G5: the engine's batch-32 masked decode step alone (``engine.decode_fn``, --g5_chunk steps per call):
32 slots filled with real chat prompts (half under a 47-neuron mask, half plain: the per-row table),
cache width W = shared header + suffix bucket + --g5_new_tokens (the study's 150), an EOS that never
occurs so no slot ends; steady-state seconds per step (median of --repeats calls), achieved GFLOP/s =
2 x params x 32 / step and its fraction of the SGEMM rate (measured between the timed calls).

    python launch/bench_generate.py --batches=32,1 --new_tokens=64 --out=/tmp/bench_generate.json
    python launch/bench_generate.py --batches= --g5        # G5 only
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import interleaved, pin_one_core, sgemm_gflops, smollm2_both  # noqa: E402  (launch/benchlib.py)

pin_one_core()  # one core for both sides, before JAX / torch start (PERFORMANCE.md rules)

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

flags.DEFINE_string("batches", "32,1", "Batch sizes to measure (G1 = 32, G2 = 1).")
flags.DEFINE_integer("new_tokens", 64, "New tokens per prompt.")
flags.DEFINE_integer("repeats", 5, "Timed runs per side (median reported).")
flags.DEFINE_integer("neurons", 47, "Random neurons ablated (47 = SmolLM2's CNA k).")
flags.DEFINE_bool("g5", True, "Also measure G5 (the engine's batch-32 decode step).")
flags.DEFINE_integer("g5_slots", 32, "G5: engine slots (the batch).")
flags.DEFINE_integer("g5_new_tokens", 150, "G5: ring columns of the cache (max_new_tokens).")
flags.DEFINE_integer("g5_chunk", 4, "G5: decode steps per timed call (engine.run's default chunk).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")

PROMPTS = [
    "Give me three tips for writing a clear email.", "What causes the seasons on Earth?",
    "Write a short story about a robot who learns to paint.", "Explain recursion to a ten year old.",
    "List five healthy breakfast ideas.", "How does a bicycle stay upright?", "Describe the taste of coffee.",
    "What is the difference between weather and climate?", "Write a polite note declining an invitation.",
    "Summarise the causes of the French Revolution.", "How do I start learning the guitar?",
    "Explain what a black hole is.", "Suggest a weekend itinerary for Rome.", "What is machine learning?",
    "Write a poem about the moon.", "How do plants drink water?",
    "Why is the sky blue?", "Give me a recipe for a simple tomato soup.", "How do vaccines train the immune system?",
    "Translate 'good morning' into French, Spanish and German.", "What are the rules of chess for the knight?",
    "Write a haiku about autumn leaves.", "How can I improve my sleep?", "Explain how a rainbow forms.",
    "Name three famous paintings and their painters.", "What does a software engineer do all day?",
    "Describe a sunset over the ocean in two sentences.", "How do I make a budget for the month?",
    "What is photosynthesis?", "Give me tips for a job interview.", "Why do cats purr?",
    "Explain the difference between a virus and a bacterium.",
]


def g5(lm, mult, params, repeats):
    """The engine's decode step at batch --g5_slots, steady state (see the module docstring)."""
    import statistics
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cna_jax import engine
    from cna_jax.batching import bucket, left_pad, split_shared_prefix

    F = flags.FLAGS
    s, n, chunk = F.g5_slots, F.g5_new_tokens, F.g5_chunk
    cfg = lm.cfg
    ids = lm.encode((PROMPTS * (s // len(PROMPTS) + 1))[:s])
    prefix, suffixes, q = split_shared_prefix(ids)
    t = bucket(max(map(len, suffixes)), engine.JOB_LENGTH_MULTIPLE)
    width = q + t + n
    fns = engine.single_device_functions(cfg, lm.dtype, s, width, n, chunk)
    table = fns.put_table(engine.stack_conditions(cfg, [engine.Condition(), engine.Condition(neuron_mult=mult)]))
    never = jnp.asarray([-1], jnp.int32)  # no slot ends: every step is a full batch
    prefix_kv = fns.prefix(lm.params, jnp.asarray(prefix, jnp.int32), table)
    tokens, valid = left_pad(suffixes, t, lm.pad_id())
    rows = (tokens, valid, (np.arange(s) % 2).astype(np.int32), np.arange(s, dtype=np.int32))  # host arrays
    packed = engine.packed_weights(lm)  # passed as engine.run passes them (None: XLA's dots)
    extra = () if packed is None or s > engine.PACKED_MAX_SLOTS else (packed,)
    state = fns.insert(lm.params, fns.empty(), prefix_kv, *rows, table, never, packed=packed)
    t0 = time.perf_counter()
    state = jax.block_until_ready(fns.decode(lm.params, state, table, never, *extra))
    compile_s = time.perf_counter() - t0
    times, rates = [], []
    for _ in range(max(repeats, 5)):
        rates.append(sgemm_gflops(repeats=1))  # interleaved with the steps: the same load on both
        if int(np.asarray(state.step).max()) + chunk >= n:  # refill before any slot reaches max_new_tokens
            state = fns.insert(lm.params, state, prefix_kv, *rows, table, never, packed=packed)
        t0 = time.perf_counter()
        state = jax.block_until_ready(fns.decode(lm.params, state, table, never, *extra))
        times.append((time.perf_counter() - t0) / chunk)
    step = statistics.median(times)
    sgemm = statistics.median(rates)
    gflops = 2 * params * s / step / 1e9
    row = {"bar": "G5", "slots": s, "packed_weights": bool(extra), "cache_width": width, "chunk": chunk,
           "step_ms": step * 1e3,
           "step_ms_all": [round(x * 1e3, 2) for x in times], "first_call_s": compile_s, "gflop_s": gflops,
           "sgemm_gflop_s": sgemm, "fraction_of_sgemm_limit": gflops / sgemm}
    print(f"G5: batch-{s} masked decode step {step * 1e3:.1f} ms (cache width {width}), {gflops:.1f} GFLOP/s "
          f"= {gflops / sgemm:.0%} of the SGEMM-bound limit ({sgemm:.1f} GFLOP/s)", flush=True)
    return row


def main(argv):
    del argv
    import jax
    import numpy as np
    import torch
    import transformers

    from cna_jax.batching import bucket, left_pad, shared_prefix_length
    from cna_jax.generate import generate
    from cna_jax.neurons import multiplier

    F = flags.FLAGS
    lm, hf = smollm2_both()
    cfg = lm.cfg
    rng = np.random.default_rng(0)
    flat = rng.choice(np.arange(2 * cfg.intermediate_size, cfg.num_neurons), F.neurons, replace=False)
    pairs = np.stack(np.divmod(flat, cfg.intermediate_size), 1)
    mult = multiplier(cfg.num_hidden_layers, cfg.intermediate_size, pairs, 0.0)
    with torch.no_grad():  # HF's side of every timing is the masked model
        for layer, i in pairs:
            hf.model.layers[int(layer)].mlp.down_proj.weight[:, int(i)] = 0.0
    eos = lm.eos_ids()
    params = sum(x.size for x in jax.tree.leaves(lm.params))
    sgemm = sgemm_gflops()
    print(f"one-core SGEMM (NumPy 2048^2 float32): {sgemm:.1f} GFLOP/s; params {params / 1e6:.1f} M", flush=True)
    results = {"machine": os.uname().nodename, "jax": jax.__version__, "torch": torch.__version__,
               "transformers": transformers.__version__, "new_tokens": F.new_tokens, "sgemm_gflop_s": sgemm,
               "params": params, "load_avg_start": os.getloadavg(), "rows": []}

    for b in [int(x) for x in F.batches.split(",") if x]:
        prompts = (PROMPTS * (b // len(PROMPTS) + 1))[:b]
        ids = lm.encode(prompts)
        tokens, valid = left_pad(ids, bucket(max(map(len, ids))), lm.pad_id())
        tt, tm = torch.tensor(tokens, dtype=torch.long), torch.tensor(valid.astype(np.int64))

        def ours(m):
            return generate(lm, prompts, neuron_mult=m, max_new_tokens=F.new_tokens, batch_size=b, progress=False)

        def theirs(model):
            with torch.no_grad():
                return model.generate(input_ids=tt, attention_mask=tm, max_new_tokens=F.new_tokens,
                                      do_sample=False, eos_token_id=list(eos), pad_token_id=lm.pad_id())

        t0 = time.perf_counter()
        gen = ours(mult)
        compile_s = time.perf_counter() - t0
        ref = theirs(hf)[:, tokens.shape[1]:].numpy()
        for r in range(b):  # the gate: identical greedy tokens up to each row's EOS
            row = ref[r].tolist()
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            if gen.tokens[r] != row[:cut]:
                raise SystemExit(f"correctness gate failed at batch {b}, row {r}")
        new_tokens = sum(map(len, gen.tokens))
        ours(None)  # warm the unmasked program too
        t_masked, t_plain, t_hf = interleaved([lambda: ours(mult), lambda: ours(None), lambda: theirs(hf)],
                                               F.repeats)
        steps = max(map(len, gen.tokens))
        weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lm.params))
        # Tokens any implementation must compute: the shared chat header once, every row's rest, the new ones.
        must = shared_prefix_length(ids) + sum(map(len, ids)) - len(ids) * shared_prefix_length(ids) + new_tokens
        limit_s = 2 * params * must / (sgemm * 1e9)
        row = {"bar": "G1" if b > 1 else "G2", "batch": b, "new_tokens_total": new_tokens, "steps": steps,
               "first_call_s": compile_s, "ours_masked_s": t_masked, "ours_plain_s": t_plain, "hf_s": t_hf,
               "speedup": t_hf / t_masked, "mask_overhead": t_masked / t_plain - 1,
               "ours_tok_s": new_tokens / t_masked, "hf_tok_s": new_tokens / t_hf,
               "sgemm_limit_s": limit_s, "ours_fraction_of_sgemm_limit": limit_s / t_masked,
               "hf_fraction_of_sgemm_limit": limit_s / t_hf,
               "ours_weight_gb_s": weight_bytes * steps / t_masked / 1e9}
        results["rows"].append(row)
        print(f"{row['bar']} batch {b}: ours {t_masked:.2f} s ({row['ours_tok_s']:.1f} tok/s, "
              f"{row['ours_fraction_of_sgemm_limit']:.0%} of the SGEMM limit) vs HF {t_hf:.2f} s "
              f"({row['hf_tok_s']:.1f} tok/s, {row['hf_fraction_of_sgemm_limit']:.0%}): {row['speedup']:.2f}x; "
              f"unmasked {t_plain:.2f} s (G3 {row['mask_overhead']:+.1%})", flush=True)
        print(json.dumps(row), flush=True)
    if F.g5:
        results["rows"].append(g5(lm, mult, params, F.repeats))
        print(json.dumps(results["rows"][-1]), flush=True)
    results["load_avg_end"] = os.getloadavg()
    if F.out:
        with open(F.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
