"""Benchmarks L1-L4 of ../shared/design/PERFORMANCE.md for the nodewise-LASSO graph engine.

  python -m launch.bench_lasso                 # L1, L2, L4, L3 (full 30 + 30 run)
  python -m launch.bench_lasso --quick         # fewer runs, L3 on 4 + 4 resamples, extrapolated
  python -m launch.bench_lasso --skip_l3 --full   # also the no-prescreen (all p-1 predictors) rows

One thread on both sides (set below, before NumPy / JAX load). Data: a simulated sparse Gaussian
graphical model (~2 edges per node) plus 20 shared latent factors, n = 2,000 rows, standardised, float32.
L1/L2 ("pre" rows): every node's LASSO path over its prescreened candidates (BH q = 0.05, top-50 --
the problem the study's pipeline solves); anchor: scikit-learn ``lasso_path`` with the candidates'
precomputed Gram, looped per node, same λ grid (30, lambda_max -> 0.01 lambda_max) and tolerance.
"full" rows: every node on all p - 1 others (dense shared-Gram solver). Correctness gate before any
time: relative duality gap <= tol for both solvers by the shared float64 evaluator and support
agreement >= 0.99 over every λ. Results go to BENCHMARKS.md, section "## LASSO graph engine".
"""
import os
import sys

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import pin_one_core  # noqa: E402  (launch/benchlib.py)

pin_one_core()  # XLA:CPU keeps a second thread whatever the flags say; one core for both sides
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()

import datetime  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import sklearn  # noqa: E402
from sklearn.linear_model import lasso_path  # noqa: E402

from cna_jax import graph as G  # noqa: E402
from cna_jax import lasso  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Fewer runs; L3 on a few resamples, extrapolated.")
_SKIP_L3 = flags.DEFINE_bool("skip_l3", False, "Skip the full stability run.")
_FULL = flags.DEFINE_bool(
    "full", False, "Also benchmark the no-prescreen (all p-1 predictors) problem (slow: can take > 10 min).")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs (median) after warm-up.")
_SK_NODES = flags.DEFINE_integer("sk_nodes", 0, "Nodes for the sklearn anchor (0 = all for 'pre' rows).")
_OUT = flags.DEFINE_string("out", "BENCHMARKS.md", "Markdown file to update.")
_N = 2000
_TOL = 1e-4
_SECTION = "## LASSO graph engine"


def simulate(p, n=_N, seed=0, factors=20):
    """Standardised float32 rows: a random sparse GGM (~2 edges per node, weights ±0.3) plus shared
    latent factors (each node loads ±0.5 on 2 of 20), so that -- like neuron activations -- many
    pairs are correlated and the prescreen fills each node's top-50 candidate list."""
    rng = np.random.default_rng(seed)
    iu = np.triu_indices(p, 1)
    sel = rng.choice(len(iu[0]), p, replace=False)
    t = np.zeros((p, p))
    t[iu[0][sel], iu[1][sel]] = 0.3 * rng.choice([-1, 1], p)
    t = t + t.T
    t += np.eye(p) * (max(0.0, -np.linalg.eigvalsh(t).min()) + 0.5)
    x = rng.standard_normal((n, p)) @ np.linalg.cholesky(np.linalg.inv(t)).T
    w = np.zeros((factors, p))
    for j in range(p):
        w[rng.choice(factors, 2, replace=False), j] = 0.5 * rng.choice([-1, 1], 2)
    x = x + rng.standard_normal((n, factors)) @ w
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


def exact_gram(x):
    """float64-accumulated X^T X / n rounded to float32 (scikit-learn spot-checks the Gram it is given)."""
    x64 = x.astype(np.float64)
    return (x64.T @ x64 / x.shape[0]).astype(np.float32)


def timed(fn, runs):
    """(compile-or-first seconds, median seconds over runs, result)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return first, float(np.median(ts)), out


def sgemm_rate(runs):
    """Measured single-thread SGEMM rate of this machine (NumPy / OpenBLAS), GFLOP/s."""
    m = 2048
    a = np.random.default_rng(0).standard_normal((m, m)).astype(np.float32)
    b = a.T.copy()
    a @ b
    ts = []
    for _ in range(max(runs, 5)):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * m**3 / np.median(ts) / 1e9


def sklearn_path(x, gram, j, feats, grid_j):
    if len(feats) == 0:  # no candidates: the solution is 0 (free for the anchor too)
        return np.zeros((len(grid_j), 0), x.dtype)
    g = np.ascontiguousarray(gram[np.ix_(feats, feats)]) * x.shape[0]
    xy = gram[feats, j] * x.shape[0]
    _, coefs, _ = lasso_path(x[:, feats], x[:, j], alphas=grid_j, precompute=g, Xy=xy, tol=_TOL, max_iter=1000)
    return coefs.T  # [lambdas, features]


def gate(gram, ours, sk, feats_of, grid, nodes):
    """Shared-evaluator gaps for both + support agreement. ours/sk: {node: [lambdas, K]}."""
    g64 = gram.astype(np.float64)
    worst_o = worst_s = 0.0
    same = total = 0
    for j in nodes:
        f = feats_of(j)
        gg, c, y = g64[np.ix_(f, f)], g64[f, j], g64[j, j]
        worst_o = max(worst_o, float(lasso.duality_gap(gg, c, y, ours[j], grid[j])[1].max()))
        worst_s = max(worst_s, float(lasso.duality_gap(gg, c, y, sk[j], grid[j])[1].max()))
        same += int(((ours[j] != 0) == (sk[j] != 0)).sum())
        total += ours[j].size
    return worst_o, worst_s, same / max(total, 1)


def bench_pre(p, runs, sk_nodes, rng):
    """L1/L2 on prescreened candidates."""
    x = simulate(p)
    gram = exact_gram(x)  # the same float32 Gram goes to both solvers
    gram_j = jnp.asarray(gram)
    cand, cmask, _ = G.prescreen(gram_j, _N, 0.05, 50)
    k = G.solved_width(cmask)  # the width the pipeline solves
    cand, cmask = cand[:, :k], cmask[:, :k]
    nodes = jnp.arange(p)

    @jax.jit
    def ours_fn(gram, cand, cmask):
        sub, xty, yty = lasso.gather_candidates(gram, cand, cmask, nodes)
        lam_max = jnp.max(jnp.abs(xty), axis=1)
        grid = lasso.lambda_grid(jnp.where(lam_max > 0, lam_max, 1.0), 30, 0.01)
        return lasso.lasso_path_candidates(sub, xty, yty, cmask, grid, _TOL, max_iter=1000), grid

    first, t_ours, (res, grid) = timed(lambda: ours_fn(gram_j, cand, cmask), runs)
    coef, grid, cand, cmask = map(np.asarray, (res.coef, grid, cand, cmask))
    node_sweeps = float(np.asarray(res.node_sweeps).sum())
    sweeps = node_sweeps / p  # mean sweeps per node over the whole path
    flops = 2.0 * k * k * node_sweeps  # the rank-1 gradient updates dominate
    sk_set = np.arange(p) if sk_nodes <= 0 or sk_nodes >= p else np.sort(rng.choice(p, sk_nodes, replace=False))
    feats_of = lambda j: cand[j][cmask[j]]  # noqa: E731
    sk, ts = {}, []
    for rep in range(max(1, runs if len(sk_set) * p < 2e6 else 1)):
        t0 = time.perf_counter()
        for j in sk_set:
            sk[j] = sklearn_path(x, gram, j, feats_of(j), grid[j])
        ts.append(time.perf_counter() - t0)
    t_sk = float(np.median(ts)) * p / len(sk_set)
    ours = {j: coef[:, j][:, cmask[j]] for j in sk_set}
    go, gs, agree = gate(gram, ours, sk, feats_of, grid, sk_set)
    return dict(p=p, t_ours=t_ours, compile=first - t_ours, t_sk=t_sk, sk_nodes=len(sk_set), sk_runs=len(ts),
                gap_ours=go, gap_sk=gs, agree=agree, gflops=flops / t_ours / 1e9, sweeps=sweeps,
                k_mean=float(cmask.sum(1).mean()))


def bench_full(p, runs, sk_nodes, rng):
    """No prescreen: all p - 1 predictors per node, dense shared-Gram solver."""
    x = simulate(p)
    gram = exact_gram(x)  # the same float32 Gram goes to both solvers
    gram_j = jnp.asarray(gram)
    mask = ~jnp.eye(p, dtype=bool)
    lam_max = jnp.max(jnp.abs(jnp.where(mask, gram_j, 0.0)), axis=0)
    grid_j = lasso.lambda_grid(lam_max, 30, 0.01)
    fn = lambda keep: lasso.lasso_path_dense(gram_j, mask, grid_j, _TOL, n_rows=_N, keep_path=keep, block_size=16)  # noqa: E731
    first, t_ours, res = timed(lambda: fn(False), runs)
    sweeps = int(np.asarray(res.n_iter).sum())
    flops = 2.0 * p * p * p * sweeps  # upper bound: blocks with nothing to do are skipped
    path = np.asarray(fn(True).coef_path)  # same solver, path kept for the gate
    grid = np.asarray(grid_j)
    sk_set = np.sort(rng.choice(p, sk_nodes, replace=False))
    feats_of = lambda j: np.r_[0:j, j + 1 : p]  # noqa: E731
    sk = {}
    t0 = time.perf_counter()
    for j in sk_set:
        sk[j] = sklearn_path(x, gram, j, feats_of(j), grid[j])
    t_sk = (time.perf_counter() - t0) * p / len(sk_set)
    ours = {j: path[:, feats_of(j), j] for j in sk_set}
    del path
    go, gs, agree = gate(gram, ours, sk, feats_of, grid, sk_set)
    return dict(p=p, t_ours=t_ours, compile=first - t_ours, t_sk=t_sk, sk_nodes=len(sk_set), sk_runs=1,
                gap_ours=go, gap_sk=gs, agree=agree, gflops=flops / t_ours / 1e9, sweeps=sweeps, k_mean=p - 1)


def bench_l4(runs, peak):
    """Gram (z^T z, p = 2,500, n = 2,000) and KKT products (S[:, I] @ dB, full S @ B) under XLA."""
    p = 2500
    z = jnp.asarray(np.random.default_rng(1).standard_normal((_N, p)).astype(np.float32))
    gram_fn = jax.jit(lambda z: z.T @ z / _N)
    _, t_gram, s = timed(lambda: gram_fn(z), runs)
    b = jnp.asarray(np.random.default_rng(2).standard_normal((p, p)).astype(np.float32))
    kkt_fn = jax.jit(lambda s, b: s - s @ b)
    _, t_kkt, _ = timed(lambda: kkt_fn(s, b), runs)
    blk = jax.jit(lambda s, d: s[:, :64] @ d)
    _, t_blk, _ = timed(lambda: blk(s, b[:64]), runs)
    return dict(gram=2 * _N * p * p / t_gram / 1e9, kkt=2 * p**3 / t_kkt / 1e9, blk=2 * p * 64 * p / t_blk / 1e9,
                t_gram=t_gram, t_kkt=t_kkt, t_blk=t_blk, peak=peak)


def bench_l3(quick):
    p = 2500
    r = 4 if quick else 30
    x = simulate(p, seed=5)
    st = G.GraphSettings(n_resamples=r, progress=True)
    t0 = time.perf_counter()
    res = G.stability_graph(x, st)
    t = time.perf_counter() - t0
    s = res.summary()
    return dict(seconds=t, resamples=r, est_full=t * 30 / r, summary=s)


def write_markdown(path, rows, info):
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    body = "\n".join([_SECTION, ""] + info + [""] + rows) + "\n"
    pat = re.compile(rf"^{re.escape(_SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pat.sub(body + "\n", text) if pat.search(text) else text.rstrip("\n") + "\n\n" + body
    with open(path, "w") as f:
        f.write(text)


def main(argv):
    del argv
    quick = _QUICK.value
    runs = 3 if quick and _RUNS.value == 5 else _RUNS.value
    rng = np.random.default_rng(0)
    peak = sgemm_rate(runs)
    print(f"measured SGEMM (NumPy/OpenBLAS, 1 thread, 2048^3): {peak:.1f} GFLOP/s", flush=True)
    rows = ["| bar | what | ours (median) | anchor | ratio | must | gate | notes |",
            "|---|---|---|---|---|---|---|---|"]
    results = {}
    for bar, p, must, sk_nodes in [("L1", 1000, 20, _SK_NODES.value), ("L2", 2500, 25, _SK_NODES.value or 500)]:
        r = bench_pre(p, runs, sk_nodes, rng)
        results[bar] = r
        ok = r["gap_ours"] <= _TOL and r["gap_sk"] <= _TOL and r["agree"] >= 0.99
        ratio = r["t_sk"] / r["t_ours"]
        print(bar, r, f"ratio {ratio:.1f}x", flush=True)
        scaled = "" if r["sk_nodes"] == p else f"; anchor timed on {r['sk_nodes']} random nodes x{r['sk_runs']}, scaled to {p}"
        rows.append(
            f"| {bar} | nodewise path, prescreened (mean {r['k_mean']:.0f} candidates), p={p}, n={_N}, 30 λ | "
            f"{r['t_ours']:.3f} s ({r['gflops']:.1f} GFLOP/s CD; compile {r['compile']:.1f} s) | {r['t_sk']:.1f} s | "
            f"{ratio:.1f}x | >= {must}x | gap {r['gap_ours']:.2e}/{r['gap_sk']:.2e}, support {r['agree']:.4f} "
            f"{'PASS' if ok else 'FAIL'} | {r['sweeps']:.0f} CD sweeps per node over the path{scaled} |")
    if _FULL.value:
        # p = 2,500 without prescreen takes minutes per run here; only p = 1,000 is measured.
        for bar, p, must, n_sk in [("L1-full", 1000, 20, 100)]:
            r = bench_full(p, 1 if p > 1000 else runs, n_sk, rng)
            ok = r["gap_ours"] <= _TOL and r["gap_sk"] <= _TOL and r["agree"] >= 0.99
            ratio = r["t_sk"] / r["t_ours"]
            print(bar, r, f"ratio {ratio:.1f}x", flush=True)
            rows.append(
                f"| {bar} | nodewise path, all p-1 predictors (no prescreen), p={p}, n={_N}, 30 λ | "
                f"{r['t_ours']:.2f} s (<= {r['gflops']:.1f} GFLOP/s; compile {r['compile']:.1f} s) | {r['t_sk']:.1f} s | "
                f"{ratio:.1f}x | >= {must}x | gap {r['gap_ours']:.2e}/{r['gap_sk']:.2e}, support {r['agree']:.4f} "
                f"{'PASS' if ok else 'FAIL'} | anchor on {r['sk_nodes']} random nodes x1, scaled; ours "
                f"{'1 run' if p > 1000 else f'median of {runs}'} |")
    l4 = bench_l4(runs, peak)
    print("L4", l4, flush=True)
    rows.append(
        f"| L4 | Gram z^T z (p=2500, n=2000) / KKT S - S@B (2500^3) / block update S[:, I]@dB (I=64) under XLA | "
        f"{l4['gram']:.1f} / {l4['kkt']:.1f} / {l4['blk']:.1f} GFLOP/s | SGEMM {peak:.1f} GFLOP/s | "
        f"{l4['gram'] / peak:.0%} / {l4['kkt'] / peak:.0%} / {l4['blk'] / peak:.0%} | >= 60% | n/a | "
        f"times {l4['t_gram'] * 1e3:.0f} / {l4['t_kkt'] * 1e3:.0f} / {l4['t_blk'] * 1e3:.1f} ms |")
    if not _SKIP_L3.value:
        l3 = bench_l3(quick)
        print("L3", l3, flush=True)
        s = l3["summary"]
        est = "" if l3["resamples"] == 30 else f" (measured {l3['seconds']:.0f} s on {l3['resamples']}+{l3['resamples']}, scaled to 30+30)"
        rows.append(
            f"| L3 | stability run, {l3['resamples']}+{l3['resamples']} resamples, p=2500, n={_N}, defaults | "
            f"{l3['est_full'] / 60:.1f} min{est} | — | — | <= 30 min | max gap {s['max_relative_gap']:.2e} | "
            f"edges {s['edges']}, null edges {s['null_edges']} (per resample mean "
            f"{s['null_edges_per_resample_mean']:.1f}), subset {s['connected_subset_size']} |")
    info = [
        f"Machine: {platform.processor() or platform.machine()} ({os.cpu_count()} vCPU, shared), 1 thread both sides. "
        f"Versions: jax {jax.__version__}, numpy {np.__version__}, scikit-learn {sklearn.__version__}, "
        f"python {platform.python_version()}. Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Command: `python -m launch.bench_lasso {' '.join(sys.argv[1:])}`. Data: simulated sparse GGM + 20 latent factors, "
        "standardised float32; tol 1e-4 relative duality gap for both; gate = shared float64 evaluator "
        "(ours/anchor max relative gap) + support agreement over every λ. GFLOP/s for the CD counts "
        "2·K²·(node sweeps) (K = candidate width). The process is pinned to one core ($BENCH_CORE, default 0; "
        "`launch/benchlib.py`); ratios are from the same run.",
    ]
    write_markdown(_OUT.value, rows, info)
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
