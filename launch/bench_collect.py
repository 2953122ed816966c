"""C1 / C2: activation collection on SmolLM2-135M-Instruct (fp32, CPU, one core each side).

C1: ``collect_batch`` (last-token neuron stats over all neurons + a 47-node matrix) vs a plain jitted
forward of the same padded batches (full prompts) returning last-token logits: the cost of reading the
neurons out.

C2, end to end: the public ``collect(lm, prompts, nodes=<47 nodes>, batch_size=32)`` (prompts encoded,
the shared chat-template prefix run once (its own program), suffixes sorted by length and bucketed to
multiples of 8) vs HF the usual way: the same prompts in their given order, batches of 32 left-padded
to each batch's longest prompt (what a tokenizer with ``padding=True`` gives), ``hf.model`` under
no_grad with a ``down_proj`` forward pre-hook on every layer keeping the last-token input, reduced to
the same outputs (per-layer sums and sums of squares, the 47-node matrix). Tokenization is inside our
timing (``collect`` encodes) and outside HF's (pre-tokenized). Gate first: our node matrix and means
equal the hook's within 1e-4 for every prompt.

    python launch/bench_collect.py --batch=32 --batches=4 --out=/tmp/bench_collect.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import interleaved, pin_one_core, smollm2_both  # noqa: E402  (launch/benchlib.py)

pin_one_core()  # one core for both sides, before JAX / torch start (PERFORMANCE.md rules)

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("batch", 32, "Prompts per batch.")
flags.DEFINE_integer("batches", 4, "Batches per timed run (batch x batches built-in harmful prompts).")
flags.DEFINE_integer("repeats", 5, "Timed runs per side (median reported).")
flags.DEFINE_bool("c1", True, "Also measure C1.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from cna_jax import data
    from cna_jax.collect import COLLECT_LENGTH_MULTIPLE, collect, collect_batch
    from cna_jax.batching import bucket, left_pad, padded_batches, shared_prefix_length
    from cna_jax.models.llama import Decoder, causal_mask, padding_positions

    F = flags.FLAGS
    lm, hf = smollm2_both()
    cfg = lm.cfg
    prompts = list(data.builtin("harmful"))[:F.batch * F.batches]
    n = len(prompts)
    ids = lm.encode(prompts)
    rng = np.random.default_rng(0)
    node_np = rng.choice(cfg.num_neurons, 47, replace=False)
    node_pairs = np.stack(np.divmod(node_np, cfg.intermediate_size), 1)
    node_index = jnp.asarray(node_np, jnp.int32)
    # FLOPs of the matrix products per token (no embedding lookup, no lm_head: neither side computes it).
    matmul_params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    res = {"machine": os.uname().nodename, "jax": jax.__version__, "torch": torch.__version__,
           "transformers": transformers.__version__, "prompts": n, "batch": F.batch,
           "real_tokens": int(sum(map(len, ids))), "matmul_params": int(matmul_params),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    # ---- C2 anchor: HF the usual way (given order, batches of F.batch padded to their longest) ----
    hf_batches = []
    for i in range(0, n, F.batch):
        chunk = ids[i:i + F.batch]
        t, v = left_pad(chunk, max(map(len, chunk)), lm.pad_id())
        mask = torch.tensor(v.astype(np.int64))
        hf_batches.append((torch.tensor(t, dtype=torch.long), mask, (mask.cumsum(-1) - 1).clamp(min=0)))
    node_layer = torch.tensor(node_pairs[:, 0])
    node_col = torch.tensor(node_pairs[:, 1])

    def hooked():
        sums = torch.zeros(cfg.num_hidden_layers, cfg.intermediate_size, dtype=torch.float64)
        sumsq = torch.zeros_like(sums)
        rows = []
        captured = []
        hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0][:, -1]))
                 for layer in hf.model.layers]
        try:
            with torch.no_grad():
                for tokens, mask, pos in hf_batches:
                    captured.clear()
                    hf.model(input_ids=tokens, attention_mask=mask, position_ids=pos)
                    acts = torch.stack(captured)  # [L, B, I] at the last prompt token
                    sums += acts.sum(1).double()
                    sumsq += (acts * acts).sum(1).double()
                    rows.append(acts[node_layer, :, node_col].T)  # [B, 47]
        finally:
            for h in hooks:
                h.remove()
        return sums.numpy(), sumsq.numpy(), torch.cat(rows).numpy()

    # ---- C2 ours: the public collect ----
    def ours():
        return collect(lm, prompts, nodes=node_pairs, batch_size=F.batch, progress=False)

    t0 = time.perf_counter()
    first = ours()
    res["c2_first_call_s"] = time.perf_counter() - t0  # compiles every suffix shape once
    ref_sums, ref_sumsq, ref_rows = hooked()
    np.testing.assert_allclose(first.node_acts, ref_rows, atol=1e-4)  # the gate, every prompt
    np.testing.assert_allclose(first.mean, ref_sums / n, atol=1e-4)
    np.testing.assert_allclose(first.sumsq / n, ref_sumsq / n, atol=1e-4, rtol=1e-4)
    assert first.count == n and first.row_prompt.tolist() == list(range(n))
    print(f"C2 gate passed: node matrix, means and mean squares within 1e-4 of the hook for all {n} prompts")

    # Tokens each side computes (ours: the prefix once + the bucketed suffix batches).
    shared = first.meta["shared_prefix_tokens"]
    suffix_shapes = [tok.shape for _, tok, _ in padded_batches([x[shared:] for x in ids], F.batch, lm.pad_id(),
                                                               multiple=lm.batch_multiple(),
                                                               length_multiple=COLLECT_LENGTH_MULTIPLE)]
    assert shared == shared_prefix_length(ids)
    ours_tokens = shared + sum(b * t for b, t in suffix_shapes)
    hf_tokens = sum(int(tok.numel()) for tok, _, _ in hf_batches)
    res.update(shared_prefix_tokens=shared, suffix_shapes=[list(s) for s in suffix_shapes],
               c2_ours_computed_tokens=ours_tokens, c2_hf_computed_tokens=hf_tokens,
               hf_shapes=[list(tok.shape) for tok, _, _ in hf_batches])

    fns = [ours, hooked]
    if F.c1:
        # ---- C1: collect_batch vs a plain jitted forward, same padded full-prompt batches ----
        length = bucket(max(map(len, ids)))
        c1_batches = [left_pad(ids[i:i + F.batch], length, lm.pad_id(), batch=F.batch) for i in range(0, n, F.batch)]
        last = np.full((F.batch, 1), length - 1, np.int32)
        sel_valid = np.ones((F.batch, 1), bool)

        @jax.jit
        def plain_forward(params, tokens, valid):
            return Decoder(cfg).apply({"params": params}, tokens, padding_positions(valid), causal_mask(valid),
                                      select=last).logits

        def c1_collect():
            return [jax.block_until_ready(collect_batch(lm.params, t, v, last, sel_valid, None, node_index, cfg=cfg))
                    for t, v in c1_batches]

        def c1_plain():
            return [jax.block_until_ready(plain_forward(lm.params, t, v)) for t, v in c1_batches]

        t0 = time.perf_counter()
        c1_out = c1_collect()
        res["c1_first_call_s"] = time.perf_counter() - t0
        c1_plain()
        got = np.concatenate([np.asarray(a)[:, 0] for _, _, a in c1_out])[:n]
        np.testing.assert_allclose(got, ref_rows, atol=1e-4)  # C1's collection is the hook's too
        res.update(c1_padded_length=length, c1_computed_tokens=F.batch * length * len(c1_batches))
        fns += [c1_collect, c1_plain]

    times = interleaved(fns, F.repeats)
    t_ours, t_hf = times[:2]
    res.update(c2_ours_s=t_ours, c2_hf_s=t_hf, c2_speedup=t_hf / t_ours,
               c2_ours_real_tok_s=res["real_tokens"] / t_ours, c2_hf_real_tok_s=res["real_tokens"] / t_hf,
               c2_ours_gflops=2 * matmul_params * ours_tokens / t_ours / 1e9,
               c2_hf_gflops=2 * matmul_params * hf_tokens / t_hf / 1e9)
    if F.c1:
        t_col, t_plain = times[2:]
        res.update(c1_collect_s=t_col, c1_plain_s=t_plain, c1_overhead=t_col / t_plain - 1,
                   c1_collect_gflops=2 * matmul_params * res["c1_computed_tokens"] / t_col / 1e9,
                   c1_plain_gflops=2 * matmul_params * res["c1_computed_tokens"] / t_plain / 1e9)
    print(json.dumps(res))
    if F.out:
        with open(F.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    app.run(main)
