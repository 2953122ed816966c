"""G1 / G2 / G3: masked greedy decoding of SmolLM2-135M-Instruct (fp32, CPU, one thread) vs HF `generate`.

Correctness gate first: identical greedy tokens on both sides (ours with a neuron multiplier, HF with
the same down_proj columns zeroed). Then medians of --repeats timed runs after a warm-up.

    python launch/bench_generate.py --batches=32,1 --new_tokens=64 --out=/tmp/bench_generate.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import interleaved, pin_one_core, smollm2_both  # noqa: E402  (launch/benchlib.py)

pin_one_core()  # one core for both sides, before JAX / torch start (PERFORMANCE.md rules)

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

flags.DEFINE_string("batches", "32,1", "Batch sizes to measure (G1 = 32, G2 = 1).")
flags.DEFINE_integer("new_tokens", 64, "New tokens per prompt.")
flags.DEFINE_integer("repeats", 5, "Timed runs per side (median reported).")
flags.DEFINE_integer("neurons", 47, "Random neurons ablated (47 = SmolLM2's CNA k).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")

PROMPTS = [
    "Give me three tips for writing a clear email.", "What causes the seasons on Earth?",
    "Write a short story about a robot who learns to paint.", "Explain recursion to a ten year old.",
    "List five healthy breakfast ideas.", "How does a bicycle stay upright?", "Describe the taste of coffee.",
    "What is the difference between weather and climate?", "Write a polite note declining an invitation.",
    "Summarise the causes of the French Revolution.", "How do I start learning the guitar?",
    "Explain what a black hole is.", "Suggest a weekend itinerary for Rome.", "What is machine learning?",
    "Write a poem about the moon.", "How do plants drink water?",
]


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from cna_jax.generate import greedy_generate
    from cna_jax.lm import bucket, left_pad
    from cna_jax.neurons import multiplier

    F = flags.FLAGS
    lm, hf = smollm2_both()
    cfg = lm.cfg
    rng = np.random.default_rng(0)
    flat = rng.choice(np.arange(2 * cfg.intermediate_size, cfg.num_neurons), F.neurons, replace=False)
    pairs = np.stack(np.divmod(flat, cfg.intermediate_size), 1)
    mult = jnp.asarray(multiplier(cfg.num_hidden_layers, cfg.intermediate_size, pairs, 0.0))
    with torch.no_grad():  # HF's side of every timing is the masked model
        for layer, i in pairs:
            hf.model.layers[int(layer)].mlp.down_proj.weight[:, int(i)] = 0.0
    eos = lm.eos_ids()
    eos_arr = jnp.asarray(eos, jnp.int32)
    results = {"machine": os.uname().nodename, "jax": jax.__version__, "torch": torch.__version__,
               "transformers": transformers.__version__, "new_tokens": F.new_tokens, "rows": []}

    for b in [int(x) for x in F.batches.split(",")]:
        prompts = (PROMPTS * (b // len(PROMPTS) + 1))[:b]
        ids = lm.encode(prompts)
        tokens, valid = left_pad(ids, bucket(max(map(len, ids))), lm.pad_id())
        tt, tm = torch.tensor(tokens, dtype=torch.long), torch.tensor(valid.astype(np.int64))

        def ours(m):
            out, num = greedy_generate(lm.params, tokens, valid, m, eos_arr, cfg=cfg, max_new_tokens=F.new_tokens)
            return jax.block_until_ready((out, num))

        def theirs(model):
            with torch.no_grad():
                return model.generate(input_ids=tt, attention_mask=tm, max_new_tokens=F.new_tokens,
                                      do_sample=False, eos_token_id=list(eos), pad_token_id=lm.pad_id())

        t0 = time.perf_counter()
        out, num = ours(mult)
        compile_s = time.perf_counter() - t0
        ref = theirs(hf)[:, tokens.shape[1]:].numpy()
        out, num = np.asarray(out), np.asarray(num)
        for r in range(b):  # the gate: identical greedy tokens up to each row's EOS
            row = ref[r].tolist()
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            if out[r, :num[r]].tolist() != row[:cut]:
                raise SystemExit(f"correctness gate failed at batch {b}, row {r}")
        new_tokens = int(num.sum())
        ours(None)  # warm the unmasked program too
        t_masked, t_plain, t_hf = interleaved([lambda: ours(mult), lambda: ours(None), lambda: theirs(hf)],
                                               F.repeats)
        steps = int(num.max())
        weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lm.params))
        row = {"batch": b, "new_tokens_total": new_tokens, "steps": steps, "compile_s": compile_s,
               "ours_masked_s": t_masked, "ours_plain_s": t_plain, "hf_s": t_hf,
               "speedup": t_hf / t_masked, "mask_overhead": t_masked / t_plain - 1,
               "ours_tok_s": new_tokens / t_masked, "hf_tok_s": new_tokens / t_hf,
               "ours_weight_gb_s": weight_bytes * steps / t_masked / 1e9}
        results["rows"].append(row)
        print(json.dumps(row))
    if F.out:
        with open(F.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
