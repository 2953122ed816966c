"""K1: the damage stage's KL passes (``cna_jax.damage.kl_along``) on SmolLM2-135M-Instruct (fp32, one core).

Ours: the public ``kl_along`` -- one unmodified pass per batch keeps the residual stream at every layer
input, then each condition runs only from the kept layer at or below the first layer it changes; on CPU the
log-softmax and KL over the vocabulary run in ``cna_jax.cpu_kernels``' row kernels.
Anchor (measured in the same run, through the same jitted functions): every condition and the reference
through the whole model (each started from the embeddings), with XLA's log-softmax and KL, which is what
``kl_along`` did before c6315b9. Gate: the two give the same KL at every position to float32 rounding
(1e-4 relative, 1e-6 absolute: the kernels sum 49k terms in another order than XLA).

Workload: ``--prompts`` built-in harmless prompts (chat template) teacher-forced along ``--tokens`` random
continuation tokens each (the speed does not depend on the token values), batches of 8, and the kinds of
condition the study scores (docs/METHOD.md §5.2-5.3): a 47-neuron set in layers 23-29 (where the testbed's
CNA set lies) at multipliers 0, -1, 0.5, 1.5 and 2; activation addition at layer 22 at three alphas; and
directional ablation (every layer: no saving).

    python launch/bench_damage.py --prompts=8 --tokens=150 --repeats=3 --out=/tmp/bench_damage.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import interleaved, pin_one_core, sgemm_gflops  # noqa: E402  (launch/benchlib.py)

pin_one_core()  # one core, before JAX starts (PERFORMANCE.md rules)

import json  # noqa: E402

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("prompts", 8, "Harmless prompts (one batch of 8 by default).")
flags.DEFINE_integer("tokens", 150, "Continuation tokens per prompt (the method's max_new_tokens).")
flags.DEFINE_integer("repeats", 3, "Timed runs per side (median reported).")
flags.DEFINE_string("out", "", "Write the results as JSON here.")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cna_jax import damage, data, engine
    from cna_jax.batching import padded_batches
    from cna_jax.lm import LM

    F = flags.FLAGS
    lm = LM.load("smollm2")
    cfg = lm.cfg
    L, I, E = cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size
    ids = lm.encode(list(data.builtin("harmless"))[:F.prompts])
    rng = np.random.default_rng(0)
    conts = [rng.integers(100, cfg.vocab_size, F.tokens).tolist() for _ in ids]
    layers = np.array([29] * 40 + [28, 28, 24, 24, 23, 23, 23])
    cols = rng.choice(I, len(layers), replace=False)
    r = rng.normal(size=E)

    def neurons(m):
        mult = np.ones((L, I), np.float32)
        mult[layers, cols] = m
        return engine.Condition(mult)

    conds = ([neurons(m) for m in (0.0, -1.0, 0.5, 1.5, 2.0)]
             + [engine.Condition(direction=r, add={22: a}) for a in (-40.0, -80.0, -120.0)]
             + [engine.Condition(direction=r, ablate=True)])
    firsts = [c.first_layer(L) for c in conds]

    def ours():
        return damage.kl_along(lm, ids, conts, conds, batch_size=8)

    # The whole-model path through the same jitted functions: start 0 from the embeddings for every call.
    tables = [engine.put_host_table(engine.stack_conditions(cfg, [c, engine.Condition()], steering=True))
              for c in conds]
    stat = dict(cfg=cfg, dtype=lm.dtype, grid=1, kernel=False)  # XLA's log-softmax and KL; from layer 0
    # The reference's log-probabilities alone (XLA drops the unused KL): a program of its own, as a whole-model
    # path would have.
    ref_fn = jax.jit(lambda *a: damage.kl_fn.__wrapped__(jnp.zeros((*a[4].shape, cfg.vocab_size)), *a, **stat)[1])

    def anchor():
        seqs = [list(p) + c for p, c in zip(ids, conts)]
        out = np.full((len(conds), len(seqs), F.tokens), np.nan)
        for rows, tokens, valid in padded_batches(seqs, 8, lm.pad_id()):
            b, t = tokens.shape
            select = (t - 1 - F.tokens + np.arange(F.tokens))[None].repeat(b, 0).astype(np.int32)
            emb = jnp.take(lm.params["embed_tokens"]["embedding"], jnp.asarray(tokens), axis=0)[None]
            zero = jnp.int32(0)
            ref = ref_fn(lm.params, emb, zero, valid, select, tables[0], jnp.ones((b,), jnp.int32))
            for c in range(len(conds)):
                kl, _ = damage.kl_fn(ref, lm.params, emb, zero, valid, select, tables[c], jnp.zeros((b,), jnp.int32),
                                     **stat)
                kl = np.asarray(kl)
                out[c, rows] = kl[:len(rows)]
        return out

    a, b = ours(), anchor()  # compile both, then the gate
    err = float(np.nanmax(np.abs(a - b)))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg="kl_along differs from the whole-model path")
    gflops = sgemm_gflops(repeats=3)
    t_ours, t_anchor = interleaved([ours, anchor], F.repeats)
    res = dict(sgemm_gflops=gflops, prompts=len(ids), tokens=F.tokens, conditions=len(conds),
               first_layers=firsts, max_abs_diff=err, row_kernels=damage.use_row_kernels(lm), ours_s=t_ours, anchor_s=t_anchor,
               ratio=t_anchor / t_ours, devices=len(jax.devices()))
    print(json.dumps(res, indent=1))
    if F.out:
        with open(F.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    app.run(main)
