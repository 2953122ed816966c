"""X2 (no bar): the decode step's weight products alone through the packed-weight CPU kernel, one core.

SmolLM2-135M's seven per-layer products (q, k, v, o, gate, up, down: [576, 576], [576, 192] x 2, [576, 576],
[576, 1536] x 2, [1536, 576]) for --layers layers, each layer its own random packed weights, so that at 30
layers (425 MB of panels) they come from DRAM each call as in a decode step; at 1 layer they stay in cache.
Reports the median call (of --repeats after a warm-up), GFLOP/s and the panels' streamed GB/s, per row count,
beside this process's one-core SGEMM rate. For an A/B of the kernel, run it at two commits.

    python launch/bench_products.py --rows=32,8,1 --layers=30
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import interleaved, pin_one_core, sgemm_gflops  # noqa: E402  (launch/benchlib.py)

pin_one_core()  # before JAX starts

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from cna_jax import cpu_kernels  # noqa: E402

flags.DEFINE_string("rows", "32,8,1", "Row counts (a decode step's slots) to measure.")
flags.DEFINE_integer("layers", 30, "Layers of distinct weights (30: SmolLM2's, the panels stream from DRAM).")
flags.DEFINE_integer("repeats", 15, "Timed calls per row count (median reported).")
FLAGS = flags.FLAGS

SHAPES = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))


def main(_):
    if not cpu_kernels.matmul_enabled():
        raise SystemExit("the packed-weight kernel is off or could not be built (CNA_JAX_CPU_KERNELS, a C++ compiler)")
    rng = np.random.default_rng(0)
    weights = [[cpu_kernels.pack(jnp.asarray(rng.standard_normal(s, np.float32) * 0.02)) for s in SHAPES]
               for _ in range(FLAGS.layers)]
    weight_bytes = 4 * FLAGS.layers * sum(k * n for k, n in SHAPES)
    print(f"one-core SGEMM (NumPy 2048^2 float32): {sgemm_gflops(repeats=3):.1f} GFLOP/s; panel width "
          f"{cpu_kernels.panel()}; {FLAGS.layers} layers, {weight_bytes / 1e6:.0f} MB of panels")
    for m in [int(r) for r in FLAGS.rows.split(",") if r]:
        x = jnp.asarray(rng.standard_normal((m, 1536), np.float32))

        @jax.jit
        def products(x, weights):
            out = jnp.zeros((m,), jnp.float32)
            for layer in weights:
                for (k, n), w in zip(SHAPES, layer):
                    out = out + cpu_kernels.packed_matmul(x[:, :k], w, n)[:, 0]  # one column kept: no big output
            return out

        products(x, weights).block_until_ready()
        s = interleaved([lambda: products(x, weights).block_until_ready()], FLAGS.repeats)[0]
        flop = 2 * m * weight_bytes / 4
        row = {"bar": "X2", "rows": m, "layers": FLAGS.layers, "ms": 1e3 * s, "gflop_s": flop / s / 1e9,
               "panel_gb_s": weight_bytes / s / 1e9}
        print(f"{m} rows: {1e3 * s:.1f} ms, {row['gflop_s']:.1f} GFLOP/s, panels {row['panel_gb_s']:.1f} GB/s")
        print(json.dumps(row))


if __name__ == "__main__":
    app.run(main)
