"""Graph pipeline: recovery on simulated Gaussian graphical models, nulls, bad input, prescreen,
utilities, save/load, config and the launch script."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import pytest
import scipy.stats

from cna_jax import graph as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chain_precision(p, rho=0.4):
    """AR(1)/chain GGM: tridiagonal precision, every true partial correlation = rho."""
    return np.eye(p) + np.diag(np.full(p - 1, -rho), 1) + np.diag(np.full(p - 1, -rho), -1)


def random_sparse_precision(p, degree=2, w=0.3, seed=0):
    """Random sparse GGM: ~degree*p/2 edges of weight ±w, diagonal shifted to min eigenvalue 0.5."""
    rng = np.random.default_rng(seed)
    iu = np.triu_indices(p, 1)
    k = int(degree * p / 2)
    sel = rng.choice(len(iu[0]), k, replace=False)
    t = np.zeros((p, p))
    t[iu[0][sel], iu[1][sel]] = w * rng.choice([-1, 1], k)
    t = t + t.T
    t += np.eye(p) * (max(0.0, -np.linalg.eigvalsh(t).min()) + 0.5)
    return t


def sample(precision, n, seed):
    chol = np.linalg.cholesky(np.linalg.inv(precision))
    return np.random.default_rng(seed).standard_normal((n, precision.shape[0])) @ chol.T


def tpr_fdr(adj, precision):
    truth = G.edge_set(np.abs(precision) > 1e-12)
    found = G.edge_set(adj)
    tp = len(found & truth)
    return tp / len(truth), (len(found) - tp) / max(len(found), 1)


def min_partial_corr(precision):
    d = np.sqrt(np.diag(precision))
    pc = np.abs(precision / np.outer(d, d))
    return pc[np.triu(np.abs(precision) > 1e-12, 1)].min()


# Thresholds. Every true edge below has |partial correlation| >= 0.2, so even in a half-subsample of
# 100 rows the marginal/partial signal is ~2-4 standard errors and at n >= 400 it is > 4: power to see
# every edge is essentially 1, hence TPR >= 0.95 (0.8 for random graphs under stability, where a few
# edges of high-degree nodes have weaker marginal correlation and miss the 0.6 frequency cut at R=6).
# A single EBIC(0.5) fit keeps some 2-hop edges (observed FDR 0.09-0.15), hence FDR <= 0.25; stability
# at frequency >= 0.6 removes nearly all of them (observed <= 0.02), hence FDR <= 0.05.
@pytest.mark.parametrize(
    "name,precision,n",
    [("chain", chain_precision(100), 200), ("random", random_sparse_precision(200, seed=1), 800)],
)
def test_ggm_recovery_single_fit_and_stability(name, precision, n):
    assert min_partial_corr(precision) >= 0.19
    x = sample(precision, n, seed=2)
    tpr, fdr = tpr_fdr(G.fit_graph(x)["adjacency"], precision)
    print(f"{name} p={precision.shape[0]} n={n} single fit: TPR {tpr:.3f} FDR {fdr:.3f}")
    assert tpr >= 0.95 and fdr <= 0.25
    res = G.stability_graph(x, G.GraphSettings(n_resamples=6, progress=False))
    tpr, fdr = tpr_fdr(res.adjacency, precision)
    print(f"{name} stability R=6: TPR {tpr:.3f} FDR {fdr:.3f}; null edges {res.null_edge_counts.tolist()}")
    assert tpr >= (0.95 if name == "chain" else 0.8) and fdr <= 0.05
    # The matched nulls see the same marginals without dependence: (nearly) nothing survives.
    assert G.n_edges(res.null_adjacency) == 0 and res.null_edge_counts.max() <= 3
    assert res.max_gap <= 1.05e-4


def test_ggm_recovery_p500_n2000():
    precision = random_sparse_precision(500, seed=3)
    x = sample(precision, 2000, seed=4)
    tpr, fdr = tpr_fdr(G.fit_graph(x)["adjacency"], precision)
    print(f"random p=500 n=2000 single fit: TPR {tpr:.3f} FDR {fdr:.3f}")
    assert tpr >= 0.95 and fdr <= 0.2


def test_independent_data_gives_near_empty_graphs():
    # BH at q=0.05 under the global null controls the chance of any discovery at 5%, so a single fit
    # on independent columns is almost surely empty; allow 2 stray edges.
    x = np.random.default_rng(5).standard_normal((400, 100))
    assert G.n_edges(G.fit_graph(x)["adjacency"]) <= 2
    res = G.stability_graph(x, G.GraphSettings(n_resamples=5, progress=False))
    assert G.n_edges(res.adjacency) <= 1 and G.n_edges(res.null_adjacency) == 0
    assert res.edge_counts.max() <= 3 and res.null_edge_counts.max() <= 3


def test_dense_solver_pipeline_agrees_with_prescreened_on_chain():
    x = sample(chain_precision(60), 600, seed=6)
    a = G.fit_graph(x, G.GraphSettings(prescreen=False))["adjacency"]
    b = G.fit_graph(x)["adjacency"]
    assert tpr_fdr(a, chain_precision(60))[0] == 1.0
    assert G.edge_jaccard(a, b) >= 0.8


@pytest.mark.parametrize("criterion", ["bic", "cv", "fixed"])
def test_other_criteria_recover_chain(criterion):
    x = sample(chain_precision(40), 500, seed=7)
    out = G.fit_graph(x, G.GraphSettings(criterion=criterion, fixed_lambda=0.1, cv_folds=3))
    tpr, fdr = tpr_fdr(out["adjacency"], chain_precision(40))
    # BIC and CV are known to over-select relative to EBIC; we only require they find the chain.
    assert tpr >= 0.95 and fdr <= (0.6 if criterion == "cv" else 0.3)
    if criterion == "fixed":
        np.testing.assert_allclose(out["lam"], 0.1, rtol=1e-5)


def test_or_merge_is_superset_of_and():
    x = sample(chain_precision(40), 300, seed=8)
    a = G.fit_graph(x, G.GraphSettings(merge="and"))
    o = G.fit_graph(x, G.GraphSettings(merge="or"))
    assert G.edge_set(a["adjacency"]) <= G.edge_set(o["adjacency"])
    np.testing.assert_array_equal(o["adjacency"], o["directed"] | o["directed"].T)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((50, 5))
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        G.fit_graph(bad)
    with pytest.raises(ValueError, match="NaN"):
        G.stability_graph(np.where(np.isnan(bad), np.inf, bad), G.GraphSettings(progress=False))
    const = x.copy()
    const[:, 1] = 3.0
    with pytest.raises(ValueError, match="constant"):
        G.fit_graph(const)
    with pytest.raises(ValueError, match="at least 2 nodes"):
        G.fit_graph(x[:, :1])
    with pytest.raises(ValueError, match="rows"):
        G.fit_graph(x[:5])
    with pytest.raises(ValueError, match="too small"):
        G.stability_graph(x[:12], G.GraphSettings(progress=False))
    with pytest.raises(ValueError, match="rows"):
        G.stability_graph(x, G.GraphSettings(progress=False), nodes=np.zeros((4, 2)))
    with pytest.raises(ValueError):
        G.contrast_rows(x, x[:, :3])
    with pytest.raises(ValueError, match="mode"):
        G.data_matrix(x, x, mode="difference")


def test_near_constant_column_raises_before_any_solve(monkeypatch):
    """One threshold (G.CONSTANT_TOL) for the check and for standardize: a column whose spread is far
    below it, but far above the old check's 1e-12, raises a ValueError naming it before any fit runs,
    and with on_constant="isolate" exactly that column is the one standardize zeroes."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((60, 6))
    # Column 2: relative spread sd / (1 + max|x|) ~ 1e-8 / 6 (~600x below CONSTANT_TOL, 1e3x above 1e-12);
    # column 4: ~1e-3 / 6, ~170x above: real, if small, variation. These factors keep both far from the
    # threshold in float32 too (its rounding of a value near 5 is ~5e-7 absolute, i.e. ~1e-7 relative).
    x[:, 2] = 5.0 + 1e-8 * rng.standard_normal(60)
    x[:, 4] = 5.0 + 1e-3 * rng.standard_normal(60)
    rel = x.std(axis=0) / (1.0 + np.abs(x).max(axis=0))  # the documented rule, by hand in float64
    assert rel[2] < G.CONSTANT_TOL / 50 and rel[2] > 1e-12 * 1e3 and rel[4] > 50 * G.CONSTANT_TOL
    assert G.CONSTANT_TOL == 1e-6  # docs/METHOD.md §3.1 states this number
    np.testing.assert_array_equal(G.constant_columns(x), [2])

    def no_solve(*a, **k):
        raise AssertionError("a solve ran before the constant-column check")

    monkeypatch.setattr(G, "fit_graph_batch", no_solve)
    for run in (lambda: G.fit_graph(x), lambda: G.stability_graph(x, G.GraphSettings(progress=False))):
        with pytest.raises(ValueError, match=r"1 constant column\(s\) \[2\]"):
            run()
    monkeypatch.undo()
    # The fit's own standardisation (float32 and float64) flags the same column, and only it.
    for dtype in ("float32", "float64"):
        with jax.enable_x64(dtype == "float64"):
            _, const = G.standardize(jnp.asarray(x, dtype))
            np.testing.assert_array_equal(np.flatnonzero(np.asarray(const)), [2])
    out = G.fit_graph(x, G.GraphSettings(on_constant="isolate", progress=False))
    np.testing.assert_array_equal(np.flatnonzero(out["constant"]), [2])
    assert not out["adjacency"][2].any()
    with pytest.raises(ValueError, match="on_constant"):
        G.check_matrix(x, on_constant="ignore")


def test_constant_column_isolated_when_asked_and_never_nan():
    x = sample(chain_precision(10), 200, seed=10)
    x[:, 4] = 1.5
    st = G.GraphSettings(on_constant="isolate", n_resamples=3, progress=False)
    out = G.fit_graph(x, st)
    assert out["constant"][4] and not out["adjacency"][4].any()
    assert all(np.isfinite(v).all() for v in out.values() if np.asarray(v).dtype.kind == "f")
    res = G.stability_graph(x, st)
    assert np.isfinite(res.frequency).all() and res.frequency[4].sum() == 0
    # A column constant only inside a resample (mostly zeros) is isolated there, not NaN.
    y = np.random.default_rng(11).standard_normal((40, 6))
    y[:, 0] = 0.0
    y[0, 0] = 1.0
    res = G.stability_graph(y, G.GraphSettings(n_resamples=4, progress=False))
    assert np.isfinite(res.frequency).all()


# ---------------------------------------------------------------------------------------------------
# Prescreen
# ---------------------------------------------------------------------------------------------------
def _bh_by_hand(p, q):
    m = len(p)
    order = np.argsort(p)
    passed = np.nonzero(p[order] <= q * np.arange(1, m + 1) / m)[0]
    out = np.zeros(m, bool)
    if passed.size:
        out[order[: passed.max() + 1]] = True
    return out


def test_bh_matches_hand_and_scipy():
    rng = np.random.default_rng(12)
    for _ in range(5):
        p = np.concatenate([rng.uniform(size=300), rng.uniform(0, 1e-3, size=rng.integers(0, 40))])
        ours = np.asarray(G.bh_reject(jnp.asarray(p), 0.05))
        np.testing.assert_array_equal(ours, _bh_by_hand(p, 0.05))
        np.testing.assert_array_equal(ours, scipy.stats.false_discovery_control(p, method="bh") <= 0.05)


def test_prescreen_pvalues_candidates_and_topk():
    x = sample(random_sparse_precision(30, degree=4, seed=13), 150, seed=14)
    z = (x - x.mean(0)) / x.std(0)
    gram = z.T @ z / 150
    cand, cmask, sig = G.prescreen(jnp.asarray(gram, jnp.float32), 150, 0.05, 5)
    cand, cmask, sig = map(np.asarray, (cand, cmask, sig))
    iu = np.triu_indices(30, 1)
    r = gram[iu]
    pv = 2 * scipy.stats.norm.sf(np.abs(np.arctanh(r)) * np.sqrt(147))
    np.testing.assert_allclose(np.asarray(G.fisher_pvalues(jnp.asarray(r), 150)), pv, rtol=1e-4, atol=1e-7)
    expect = np.zeros((30, 30), bool)
    expect[iu] = _bh_by_hand(pv, 0.05)
    expect |= expect.T
    np.testing.assert_array_equal(sig, expect)
    for j in range(30):
        partners = np.flatnonzero(expect[j])
        want = partners[np.argsort(-np.abs(gram[j, partners]), kind="stable")][:5]
        got = cand[j][cmask[j]]
        assert set(got) == set(want) and j not in got


# ---------------------------------------------------------------------------------------------------
# Data matrices, utilities, save / load, export
# ---------------------------------------------------------------------------------------------------
def test_contrast_rows_seeded_pairing():
    rng = np.random.default_rng(15)
    h, l = rng.normal(size=(7, 3)), rng.normal(size=(9, 3))
    a, b = G.contrast_rows(h, l, seed=1, pairing="shuffled"), G.contrast_rows(h, l, seed=1, pairing="shuffled")
    np.testing.assert_array_equal(a, b)
    assert a.shape == (7, 3)
    # Each row is some harmful row minus some harmless row.
    hi = [np.flatnonzero([np.allclose(a[i] + l[k], h[j]) for j in range(7) for k in range(9)]) for i in range(7)]
    assert all(len(v) >= 1 for v in hi)
    np.testing.assert_array_equal(G.contrast_rows(h, l[:7], pairing="index"), h - l[:7])
    np.testing.assert_array_equal(G.data_matrix(h, mode="harmful_only"), h)


def test_contrast_pairing_defaults_to_index_as_in_the_study():
    """The study's rows come paired by index (data.pair): contrast_rows / data_matrix do the same by
    default (row i = harmful_i - harmless_i, truncated to the shorter list); "shuffled" is opt-in."""
    rng = np.random.default_rng(16)
    h, l = rng.normal(size=(7, 3)), rng.normal(size=(9, 3))
    want = h - l[:7]  # by hand, float64
    np.testing.assert_array_equal(G.contrast_rows(h, l), want)
    np.testing.assert_array_equal(G.data_matrix(h, l), want)
    np.testing.assert_array_equal(G.data_matrix(h, l, seed=5), want)  # the seed only moves "shuffled"
    np.testing.assert_array_equal(G.data_matrix(l, h), l[:7] - h)
    shuffled = G.data_matrix(h, l, seed=1, pairing="shuffled")
    np.testing.assert_array_equal(shuffled, G.contrast_rows(h, l, seed=1, pairing="shuffled"))
    # The shuffled pairing is the documented one: each list permuted with default_rng(seed), then paired.
    r = np.random.default_rng(1)
    np.testing.assert_array_equal(shuffled, h[r.permutation(7)[:7]] - l[r.permutation(9)[:7]])
    assert not np.array_equal(shuffled, want)
    with pytest.raises(ValueError, match="pairing"):
        G.data_matrix(h, l, pairing="random")


def test_graph_utilities_on_hand_made_graphs():
    a = np.zeros((6, 6), bool)
    for i, j in [(0, 1), (1, 2), (3, 4)]:
        a[i, j] = a[j, i] = True
    b = np.zeros((6, 6), bool)
    for i, j in [(0, 1), (3, 4), (4, 5), (2, 5)]:
        b[i, j] = True  # upper triangle only: utilities symmetrise
    assert G.n_edges(a) == 3 and G.n_edges(b) == 4
    assert G.edge_jaccard(a, b) == pytest.approx(2 / 5)
    assert G.retention(b, a) == pytest.approx(2 / 3)
    assert G.retention(a, b) == pytest.approx(2 / 4)
    np.testing.assert_array_equal(G.connected_subset(a), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(G.connected_subset(a, largest_component=True), [0, 1, 2])
    np.testing.assert_array_equal(G.connected_subset(b, largest_component=True), [2, 3, 4, 5])
    empty = np.zeros((6, 6), bool)
    assert G.edge_jaccard(empty, empty) == 1.0 and np.isnan(G.retention(a, empty))
    assert G.connected_subset(empty).size == 0 and G.connected_subset(empty, True).size == 0
    with pytest.raises(ValueError, match="different node sets"):
        G.edge_jaccard(a, np.zeros((5, 5), bool))


def test_export_networkx_graphml_json(tmp_path):
    a = np.zeros((4, 4), bool)
    a[0, 2] = a[2, 0] = a[1, 3] = a[3, 1] = True
    nodes = np.array([[2, 10], [2, 11], [5, 7], [9, 1]])
    w = np.full((4, 4), 0.75)
    g = G.to_networkx(a, nodes, w)
    assert set(g.edges()) == {(0, 2), (1, 3)} and g.nodes[2] == dict(layer=5, neuron=7)
    G.write_graphml(str(tmp_path / "g.graphml"), a, nodes, w)
    h = nx.read_graphml(str(tmp_path / "g.graphml"))
    assert h.number_of_edges() == 2 and h.nodes["3"]["layer"] == 9
    G.write_json(str(tmp_path / "g.json"), a, nodes, w)
    d = json.load(open(tmp_path / "g.json"))
    assert len(d["edges"]) == 2 and d["edges"][0]["weight"] == 0.75 and d["nodes"][1]["neuron"] == 11


def test_stability_result_save_load_and_summary(tmp_path):
    x = sample(chain_precision(12), 160, seed=16)
    nodes = np.stack([np.arange(12) // 4, np.arange(12)], 1)
    res = G.stability_graph(x, G.GraphSettings(n_resamples=3, progress=False), nodes=nodes, meta=dict(mode="t"))
    res.save(str(tmp_path / "r"))
    back = G.StabilityResult.load(str(tmp_path / "r.npz"))
    np.testing.assert_array_equal(back.frequency, res.frequency)
    np.testing.assert_array_equal(back.null_edge_counts, res.null_edge_counts)
    np.testing.assert_array_equal(back.nodes, nodes)
    assert back.summary() == res.summary() and back.meta == dict(mode="t")
    assert res.summary()["edges"] >= 9 and res.summary()["connected_subset_size"] >= 10
    assert G.GraphSettings.from_config(back.settings) == G.GraphSettings(n_resamples=3, progress=False)


def test_resample_batch_vmapped_equals_sequential():
    x = sample(chain_precision(15), 120, seed=17)
    one = G.stability_graph(x, G.GraphSettings(n_resamples=4, progress=False))
    two = G.stability_graph(x, G.GraphSettings(n_resamples=4, resample_batch=2, progress=False))
    np.testing.assert_array_equal(one.edge_counts, two.edge_counts)
    np.testing.assert_allclose(one.frequency, two.frequency)


def test_float64_setting_is_scoped():
    x = sample(chain_precision(10), 100, seed=18)
    out = G.fit_graph(x, G.GraphSettings(dtype="float64"))
    assert out["lam"].dtype == np.float64 and not jax.config.jax_enable_x64


def test_config_defaults_and_validation():
    sys.path.insert(0, ROOT)
    from configs import graph as cfg_mod

    cfg = cfg_mod.get_config()
    st = cfg_mod.validate(cfg)
    assert st == G.GraphSettings()
    assert (st.q, st.k_candidates, st.n_lambdas, st.lambda_min_ratio, st.criterion, st.ebic_gamma) == (
        0.05, 50, 30, 0.01, "ebic", 0.5)
    assert (st.merge, st.n_resamples, st.subsample_fraction, st.freq_threshold) == ("and", 30, 0.5, 0.6)
    for field, value, msg in [("criterion", "aic", "criterion"), ("merge", "x", "merge"), ("q", 1.5, "q"),
                              ("dtype", "bfloat16", "dtype"), ("freq_threshold", 0.0, "freq_threshold")]:
        bad = cfg_mod.get_config()
        setattr(bad, field, value)
        with pytest.raises(ValueError, match=msg):
            cfg_mod.validate(bad)
    bad = cfg_mod.get_config()
    bad.unknown_field = 1
    with pytest.raises(ValueError, match="unknown"):
        cfg_mod.validate(bad)
    bad = cfg_mod.get_config()
    bad.prescreen, bad.criterion = False, "cv"
    with pytest.raises(ValueError, match="cv"):
        cfg_mod.validate(bad)


def test_fit_graphs_launch_end_to_end(tmp_path):
    p, n = 20, 160
    harmful = sample(chain_precision(p), n, seed=19)
    harmless = np.random.default_rng(20).normal(scale=0.1, size=(n, p))
    nodes = np.stack([np.arange(p) // 5 + 2, np.arange(p) * 3], 1)
    np.savez(tmp_path / "acts.npz", harmful=harmful, harmless=harmless, nodes=nodes)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "launch.fit_graphs", f"--activations={tmp_path / 'acts.npz'}",
           f"--workdir={tmp_path / 'out'}", "--mode=contrast", "--config.n_resamples=3", "--config.progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "edges" in proc.stdout and "connected subset" in proc.stdout
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["nodes"] == p and summary["edges"] >= 15 and summary["null_edges"] == 0
    res = G.StabilityResult.load(str(tmp_path / "out" / "graph"))
    np.testing.assert_array_equal(res.nodes, nodes)
    assert nx.read_graphml(str(tmp_path / "out" / "graph.graphml")).number_of_nodes() == p
