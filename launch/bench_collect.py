"""C1 / C2: activation collection on SmolLM2-135M-Instruct (fp32, CPU, one thread).

C1: ``collect_batch`` (last-token neuron stats over all neurons + a 47-node matrix) vs a plain jitted
forward of the same batch returning last-token logits. C2: the same collection vs HF's forward with a
``down_proj`` forward pre-hook per layer (the usual PyTorch way), same batches. Gate first: the
collected activations equal the hook's within 1e-4.

    python launch/bench_collect.py --batch=32 --out=/tmp/bench_collect.json
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
flags.DEFINE_integer("batches", 4, "Batches per timed run.")
flags.DEFINE_integer("repeats", 5, "Timed runs per side (median reported).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from cna_jax import data
    from cna_jax.collect import collect_batch
    from cna_jax.lm import bucket, left_pad
    from cna_jax.models.llama import Decoder, causal_mask, padding_positions

    F = flags.FLAGS
    lm, hf = smollm2_both()
    cfg = lm.cfg
    prompts = list(data.builtin("harmful"))[:F.batch * F.batches]
    ids = lm.encode(prompts)
    length = bucket(max(map(len, ids)))
    batches = [left_pad(ids[i:i + F.batch], length, lm.pad_id()) for i in range(0, len(ids), F.batch)]
    rng = np.random.default_rng(0)
    node_np = rng.choice(cfg.num_neurons, 47, replace=False)
    node_index = jnp.asarray(node_np, jnp.int32)
    last = np.full((F.batch, 1), length - 1, np.int32)
    sel_valid = np.ones((F.batch, 1), bool)

    @jax.jit
    def plain_forward(params, tokens, valid):
        return Decoder(cfg).apply({"params": params}, tokens, padding_positions(valid), causal_mask(valid),
                                  select=last).logits

    def ours():
        return [jax.block_until_ready(collect_batch(lm.params, t, v, last, sel_valid, None, node_index, cfg=cfg))
                for t, v in batches]

    def plain():
        return [jax.block_until_ready(plain_forward(lm.params, t, v)) for t, v in batches]

    def hooked():
        out = []
        for t, v in batches:
            captured = []
            hooks = [layer.mlp.down_proj.register_forward_pre_hook(
                lambda m, a: captured.append(a[0][:, -1].detach())) for layer in hf.model.layers]
            mask = torch.tensor(v.astype(np.int64))
            with torch.no_grad():
                hf.model(input_ids=torch.tensor(t, dtype=torch.long), attention_mask=mask,
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
            for h in hooks:
                h.remove()
            acts = torch.stack(captured)  # [L, B, I]
            out.append((acts.sum(1), (acts * acts).sum(1), acts.permute(1, 0, 2).reshape(len(t), -1)[:, node_np]))
        return out

    t0 = time.perf_counter()
    mine = ours()
    compile_s = time.perf_counter() - t0
    plain()
    ref = hooked()
    for (s, _, a), (rs, _, ra) in zip(mine, ref):  # the gate
        np.testing.assert_allclose(np.asarray(s), rs.numpy(), atol=1e-3, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(a)[:, 0], ra.numpy(), atol=1e-4)
    t_ours, t_plain, t_hf = interleaved([ours, plain, hooked], F.repeats)
    tokens = sum(int(v.sum()) for _, v in batches)
    flops = 2 * cfg.num_params() * F.batch * length * len(batches)  # padded tokens are computed too
    res = {"batch": F.batch, "batches": len(batches), "padded_length": length, "real_tokens": tokens,
           "compile_s": compile_s, "collect_s": t_ours, "plain_forward_s": t_plain, "hf_hook_s": t_hf,
           "c1_overhead": t_ours / t_plain - 1, "c2_speedup": t_hf / t_ours,
           "collect_gflops": flops / t_ours / 1e9, "hf_gflops": flops / t_hf / 1e9,
           "jax": jax.__version__, "torch": torch.__version__}
    print(json.dumps(res))
    if F.out:
        with open(F.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    app.run(main)
