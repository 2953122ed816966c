"""Bar W1 of BENCHMARKS.md: warm ``LM.load`` (restoring the converted copy) vs cold (converting the source).

  python launch/bench_load.py              # SmolLM2 GGUF (one device) + a tiny safetensors model on a mesh
  python launch/bench_load.py --runs=7

Three loads per model, timed in turn each round (after one warm-up round), medians reported:
  cold   ``LM.load(src)``: today's load, reading and converting the source (no cache)
  first  ``LM.load(src, cache_dir=<empty dir>)``: the cold load plus writing the converted copy
  warm   ``LM.load(src, cache_dir=<that copy>)``: restoring it, without opening the source
Both sides read files the OS has cached (every file is read in the warm-up round), so the figures
compare conversion against restore, not disk speeds. Gate before any time: warm params equal cold
params exactly. One core (launch/benchlib.py); the tiny model is loaded into a (data 2, tensor 4) mesh
of 8 simulated CPU devices, as in the tests. Prints the machine's one-core SGEMM rate for scale.
"""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import pin_one_core, sgemm_gflops  # noqa: E402  (launch/benchlib.py)

pin_one_core()  # also sets OPENBLAS_NUM_THREADS=1 before NumPy loads

import datetime  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from cna_jax.lm import LM, load_tokenizer  # noqa: E402

_RUNS = flags.DEFINE_integer("runs", 5, "Timed rounds (median) after one warm-up round.")


def tiny_source(root: str) -> str:
    """A random Llama (4 layers, hidden 256, 8 heads / 4 KV heads, SmolLM2's 49,152-token vocabulary and
    tokenizer), exported as a HF safetensors directory."""
    from flax import linen as nn

    from cna_jax.export import export
    from cna_jax.models.config import ModelConfig
    from cna_jax.models.llama import Decoder

    cfg = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=256, intermediate_size=768,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_ids=(2,))
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = Decoder(cfg).init(jax.random.PRNGKey(0), tokens, tokens, jnp.ones((1, 1, 1), bool))["params"]
    params = nn.meta.unbox(params)
    return export(cfg, params, os.path.join(root, "tiny"), tokenizer=load_tokenizer("smollm2"))


def bench(name: str, src: str, mesh, runs: int, root: str) -> dict:
    def load(cache_dir=None):
        lm = LM.load(src, mesh_config=mesh, cache_dir=cache_dir)
        jax.block_until_ready(lm.params)
        return lm

    warm_dir = os.path.join(root, f"warm-{name}")
    reference = load(warm_dir)  # writes the converted copy (and reads every source file once)
    warm = load(warm_dir)
    for a, b in zip(jax.tree.leaves(reference.params), jax.tree.leaves(warm.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # gate: the copy is the conversion
    if mesh is not None:
        pairs = zip(jax.tree.leaves(reference.params), jax.tree.leaves(warm.params))
        assert all(a.sharding == b.sharding for a, b in pairs)
    del reference, warm

    times = {"cold": [], "first": [], "warm": []}
    for round_ in range(runs + 1):  # round 0: warm-up, not counted
        for kind in times:
            first_dir = tempfile.mkdtemp(dir=root) if kind == "first" else None
            t = time.perf_counter()
            lm = load({"cold": None, "first": first_dir, "warm": warm_dir}[kind])
            dt = time.perf_counter() - t
            del lm
            if first_dir:
                shutil.rmtree(first_dir)
            if round_:
                times[kind].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: " + ", ".join(f"{k} {med[k]:.2f} s ({' '.join(f'{x:.2f}' for x in times[k])})" for k in times)
          + f"; cold/warm {med['cold'] / med['warm']:.1f}x, first/warm {med['first'] / med['warm']:.1f}x", flush=True)
    return med


def main(_):
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}")
    print(f"one-core SGEMM (NumPy 2048^2 float32, OPENBLAS_NUM_THREADS=1): {sgemm_gflops():.1f} GFLOP/s", flush=True)
    root = tempfile.mkdtemp(prefix="bench_load-")
    try:
        bench("smollm2 gguf fp32, 1 device", "smollm2", None, _RUNS.value, root)
        mesh = ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=4, rules="generation"))
        bench("tiny safetensors fp32, mesh 2x1x4", tiny_source(root), mesh, _RUNS.value, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
