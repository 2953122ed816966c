"""D1 / D2 of PERFORMANCE.md on one GPU: an 8B-shaped Llama (configs/pairs.py:llama_3_1_8b) with random bf16
weights, greedy decoding through the jitted ``greedy_generate_fn`` (one jit, ``lax.while_loop``).

D1: batch 1, 128-token prompt. The decode time per token is (time for 128 in / N+1 out - time for
    128 in / 1 out) / N, so the prefill is not counted. Bytes a decode step must read: every weight
    except the embedding table (one row is gathered) plus the KV cache; the roofline is those bytes
    over the HBM bandwidth, both the spec figure and the one measured here (a device-to-device copy,
    bytes read + written).
D2: batch 256, 128 in / 256 out; throughput = 256 * 256 generated tokens / wall time (prefill
    included), against vLLM's published ~11k tok/s for Llama-3.1-8B on one H100.
Parity: a tiny random Llama (tests/hf_models.py) in bf16 vs fp32 on the same GPU: relative logit
    error and greedy-token agreement.

Timings: medians of >= 5 runs after a warm-up, ``block_until_ready``; compile time reported apart.
An EOS id that never occurs (-1) keeps every run at the full length.

    python launch/bench_gpu.py --out=/tmp/bench.json
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/pairs.py:llama_3_1_8b", "model config string (its shape is used)")
flags.DEFINE_integer("repeats", 5, "timed runs per measurement (median)")
flags.DEFINE_integer("prompt_len", 128, "prompt tokens")
flags.DEFINE_integer("d1_new", 256, "new tokens for D1")
flags.DEFINE_integer("d2_batch", 256, "batch for D2")
flags.DEFINE_integer("d2_new", 256, "new tokens for D2")
flags.DEFINE_float("spec_bandwidth", 0.0, "HBM bandwidth (bytes/s) to state; 0 = from the device name")
flags.DEFINE_string("out", "", "write the results as JSON here")
flags.DEFINE_bool("parity", True, "run the tiny-model bf16 vs fp32 parity check")
flags.DEFINE_bool("d2", True, "run D2")

SPEC_BW = {"H100 80GB HBM3": 3.35e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
           "H200": 4.8e12}
VLLM_D2 = 11_000.0


def _spec_bandwidth(kind: str) -> tuple[float, str]:
    if FLAGS.spec_bandwidth:
        return FLAGS.spec_bandwidth, "given"
    for key, bw in SPEC_BW.items():
        if key.lower() in kind.lower():
            return bw, f"spec for {key}"
    if "h100" in kind.lower():
        return 3.35e12, "spec for H100 SXM (assumed)"
    return float("nan"), "unknown"


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def measure_bandwidth(jax, jnp, repeats):
    """Device-to-device copy of 4 GiB (bytes read + written) / time."""
    n = 1 << 30  # float32 elements: 4 GiB
    x = jnp.arange(n, dtype=jnp.float32)
    copy = jax.jit(lambda a: a * 1.0000001)
    copy(x).block_until_ready()
    med, _ = _median_time(lambda: copy(x).block_until_ready(), max(repeats, 10))
    del x
    return 2 * n * 4 / med


def random_params(jax, jnp, cfg, dtype):
    from cna_jax.convert import abstract_params

    shapes = jax.tree_util.tree_flatten_with_path(abstract_params(cfg, dtype))
    leaves = []
    key = jax.random.PRNGKey(0)
    for i, (path, s) in enumerate(shapes[0]):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            leaves.append(jnp.ones(s.shape, s.dtype))
        else:
            fill = jax.jit(lambda k, shape=s.shape, dt=s.dtype: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dt))
            leaves.append(fill(jax.random.fold_in(key, i)))
    return jax.tree_util.tree_unflatten(shapes[1], leaves)


def bench_decode(jax, jnp, np, cfg, params, dtype, batch, prompt_len, new, repeats):
    from cna_jax.generate import greedy_generate_fn

    gen = jax.jit(greedy_generate_fn, static_argnames=("cfg", "dtype", "max_new_tokens"))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    valid = jnp.ones((batch, prompt_len), bool)
    eos = jnp.asarray([-1], jnp.int32)
    out = {}
    for n in (1, new):
        t = time.perf_counter()
        res = gen(params, tokens, valid, None, eos, cfg=cfg, dtype=dtype, max_new_tokens=n)
        jax.block_until_ready(res)
        first = time.perf_counter() - t

        def run(n=n):
            jax.block_until_ready(gen(params, tokens, valid, None, eos, cfg=cfg, dtype=dtype, max_new_tokens=n))

        med, times = _median_time(run, repeats)
        assert int(np.asarray(res[1]).min()) == n, "a row stopped early"
        out[n] = dict(first_call_s=first, median_s=med, times_s=times)
    return out


def parity(jax, jnp, np):
    """Tiny random Llama: bf16 vs fp32 logits and greedy tokens on this device."""
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from hf_models import left_padded_batch, save_tiny

    from cna_jax import convert
    from cna_jax.generate import greedy_generate
    from cna_jax.models import forward

    d = tempfile.mkdtemp()
    path, _ = save_tiny(d, "llama", num_hidden_layers=4, hidden_size=128, intermediate_size=256,
                        num_attention_heads=8, num_key_value_heads=4)
    cfg, p32 = convert.load(path, dtype=jnp.float32)
    _, p16 = convert.load(path, dtype=jnp.bfloat16)
    tokens, valid = left_padded_batch(np.random.default_rng(0), cfg.vocab_size, [7, 30, 64, 12, 50, 64, 3, 41], 64)
    with jax.default_matmul_precision("highest"):
        l32 = np.asarray(forward(p32, tokens, valid, None, cfg=cfg, dtype=jnp.float32))
    l16 = np.asarray(forward(p16, tokens, valid, None, cfg=cfg, dtype=jnp.bfloat16))
    m = valid[..., None]
    rel = float(np.linalg.norm((l16 - l32) * m) / np.linalg.norm(l32 * m))
    eos = jnp.asarray([-1], jnp.int32)
    with jax.default_matmul_precision("highest"):
        g32 = np.asarray(greedy_generate(p32, tokens, valid, None, eos, cfg=cfg, dtype=jnp.float32, max_new_tokens=32)[0])
    g16 = np.asarray(greedy_generate(p16, tokens, valid, None, eos, cfg=cfg, dtype=jnp.bfloat16, max_new_tokens=32)[0])
    top1 = float(np.mean((l16.argmax(-1) == l32.argmax(-1))[valid]))
    return dict(logits_rel_err=rel, top1_agreement=top1, greedy_token_agreement=float(np.mean(g16 == g32)),
                greedy_first_token_agreement=float(np.mean(g16[:, 0] == g32[:, 0])))


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    from cna_jax.config import load_config_file
    from cna_jax.models.config import from_hf_dict

    dev = jax.devices()[0]
    kind = dev.device_kind
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.memory,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # no nvidia-smi
        smi = f"n/a ({e})"
    res = dict(device=kind, nvidia_smi=smi, jax=jax.__version__, platform=dev.platform,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(json.dumps(res), flush=True)

    if FLAGS.parity:
        res["parity"] = parity(jax, jnp, np)
        print("parity", json.dumps(res["parity"]), flush=True)

    spec_bw, spec_src = _spec_bandwidth(kind + " " + smi)
    meas_bw = measure_bandwidth(jax, jnp, FLAGS.repeats)
    res.update(spec_bandwidth=spec_bw, spec_bandwidth_source=spec_src, measured_bandwidth=meas_bw)
    print(f"HBM bandwidth: measured {meas_bw / 1e12:.2f} TB/s (copy, read+write); {spec_src} {spec_bw / 1e12:.2f} TB/s",
          flush=True)

    study = load_config_file(FLAGS.config)
    cfg = from_hf_dict(study.model.shape.to_dict())
    dtype = jnp.bfloat16
    params = random_params(jax, jnp, cfg, dtype)
    jax.block_until_ready(params)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    embed_bytes = cfg.vocab_size * cfg.hidden_size * 2
    res.update(model=study.name, params=cfg.num_params(), weight_bytes=weight_bytes)

    # D1
    p, n = FLAGS.prompt_len, FLAGS.d1_new
    d1 = bench_decode(jax, jnp, np, cfg, params, dtype, 1, p, n, FLAGS.repeats)
    per_tok = (d1[n]["median_s"] - d1[1]["median_s"]) / (n - 1)
    avg_slots = p + n  # the cache is read over its full (masked) length each step
    kv_read = 2 * cfg.num_hidden_layers * avg_slots * cfg.num_key_value_heads * cfg.head_dim * 2
    step_bytes = weight_bytes - embed_bytes + cfg.hidden_size * 2 + kv_read
    res["D1"] = dict(
        batch=1, prompt=p, new_tokens=n, per_token_s=per_tok, tokens_per_s=1.0 / per_tok,
        step_bytes=step_bytes, achieved_GBps=step_bytes / per_tok / 1e9,
        roofline_s_measured_bw=step_bytes / meas_bw, roofline_s_spec_bw=step_bytes / spec_bw,
        fraction_of_roofline_measured_bw=(step_bytes / meas_bw) / per_tok,
        fraction_of_roofline_spec_bw=(step_bytes / spec_bw) / per_tok,
        weights_only_roofline_fraction_spec=(weight_bytes / spec_bw) / per_tok,
        compile_plus_first_s={k: v["first_call_s"] for k, v in d1.items()},
        runs_s={k: v["times_s"] for k, v in d1.items()})
    print("D1", json.dumps({k: v for k, v in res["D1"].items() if k != "runs_s"}), flush=True)

    if FLAGS.d2:
        b, n2 = FLAGS.d2_batch, FLAGS.d2_new
        d2 = bench_decode(jax, jnp, np, cfg, params, dtype, b, p, n2, FLAGS.repeats)
        tps = b * n2 / d2[n2]["median_s"]
        decode_tps = b * (n2 - 1) / (d2[n2]["median_s"] - d2[1]["median_s"])
        res["D2"] = dict(batch=b, prompt=p, new_tokens=n2, wall_s=d2[n2]["median_s"], tokens_per_s=tps,
                         decode_only_tokens_per_s=decode_tps, prefill_s=d2[1]["median_s"],
                         vllm_tokens_per_s=VLLM_D2, ratio_vs_vllm=tps / VLLM_D2,
                         compile_plus_first_s={k: v["first_call_s"] for k, v in d2.items()},
                         runs_s={k: v["times_s"] for k, v in d2.items()})
        print("D2", json.dumps({k: v for k, v in res["D2"].items() if k != "runs_s"}), flush=True)

    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
