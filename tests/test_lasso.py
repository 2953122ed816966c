"""Batched Gram LASSO vs scikit-learn, the shared duality-gap certifier, selection and merges."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Lasso, lasso_path

from cna_jax import lasso


def _standardised(n, p, seed, rho=0.5):
    """Correlated Gaussian columns (AR(1) covariance rho^|i-j|), standardised like the pipeline."""
    rng = np.random.default_rng(seed)
    cov = rho ** np.abs(np.subtract.outer(np.arange(p), np.arange(p)))
    x = rng.multivariate_normal(np.zeros(p), cov, size=n)
    return (x - x.mean(0)) / x.std(0)


def _full_candidates(p):
    """Every node's candidates = all other nodes: [p, p-1]."""
    return np.stack([np.r_[0:j, j + 1 : p] for j in range(p)]).astype(np.int32)


def test_candidate_path_matches_sklearn_lasso_at_every_lambda():
    n, p = 300, 12
    x = _standardised(n, p, 0)
    gram = x.T @ x / n
    cand = _full_candidates(p)
    with jax.enable_x64(True):
        g = jnp.asarray(gram)
        sub, xty, yty = lasso.gather_candidates(g, jnp.asarray(cand), jnp.ones(cand.shape, bool), jnp.arange(p))
        lam_max = jnp.max(jnp.abs(xty), axis=1)
        grid = lasso.lambda_grid(lam_max, 30, 0.01)
        res = lasso.lasso_path_candidates(sub, xty, yty, jnp.ones(cand.shape, bool), grid, 1e-12, max_iter=20000)
        coef, grid = np.asarray(res.coef), np.asarray(grid)
        assert coef.dtype == np.float64
    assert not jax.config.jax_enable_x64  # the scope did not leak
    for j in (0, 5, 11):
        for t in range(30):
            sk = Lasso(alpha=grid[j, t], fit_intercept=False, tol=1e-12, max_iter=100000)
            sk.fit(x[:, cand[j]], x[:, j])
            ref = sk.coef_
            scale = max(np.abs(ref).max(), 1e-3)
            np.testing.assert_array_less(np.abs(coef[t, j] - ref).max(), 1e-4 * scale)
            # One certifier for both solutions.
            _, rel_ours = lasso.duality_gap(gram[np.ix_(cand[j], cand[j])], gram[cand[j], j], gram[j, j], coef[t, j], grid[j, t])
            _, rel_sk = lasso.duality_gap(gram[np.ix_(cand[j], cand[j])], gram[cand[j], j], gram[j, j], ref, grid[j, t])
            assert rel_ours <= 1e-9 and rel_sk <= 1e-9


def test_dense_path_matches_sklearn_and_candidate_solver():
    n, p = 200, 40
    x = _standardised(n, p, 1, rho=0.6)
    gram = x.T @ x / n
    with jax.enable_x64(True):
        g = jnp.asarray(gram)
        mask = ~jnp.eye(p, dtype=bool)
        lam_max = jnp.max(jnp.abs(jnp.where(mask, g, 0.0)), axis=0)
        grid = lasso.lambda_grid(lam_max, 30, 0.01)
        # block_size 16 does not divide 40: exercises the padded rows.
        res = lasso.lasso_path_dense(g, mask, grid, 1e-11, max_iter=20000, block_size=16, keep_path=True, n_rows=n)
        path, grid = np.asarray(res.coef_path), np.asarray(grid)
    for j in (0, 17, 39):
        others = np.r_[0:j, j + 1 : p]
        _, coefs, _ = lasso_path(x[:, others], x[:, j], alphas=grid[j], precompute=gram[np.ix_(others, others)] * n,
                                 Xy=gram[others, j] * n, tol=1e-12, max_iter=100000)
        for t in range(30):
            ref = coefs[:, t]
            ours = path[t, others, j]
            assert path[t, j, j] == 0.0
            np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4 * max(np.abs(ref).max(), 1e-3))


def test_float32_solution_certified_by_float64_evaluator_and_sklearn_support_agreement():
    n, p = 500, 60
    x = _standardised(n, p, 2).astype(np.float32)
    gram = (x.T @ x / n).astype(np.float32)
    cand = _full_candidates(p)
    m = jnp.ones(cand.shape, bool)
    sub, xty, yty = lasso.gather_candidates(jnp.asarray(gram), jnp.asarray(cand), m, jnp.arange(p))
    grid = lasso.lambda_grid(jnp.max(jnp.abs(xty), axis=1), 30, 0.01)
    res = lasso.lasso_path_candidates(sub, xty, yty, m, grid, 1e-4, max_iter=1000)
    coef, grid = np.asarray(res.coef), np.asarray(grid)
    g64 = gram.astype(np.float64)
    agree = []
    for j in range(0, p, 7):
        others = cand[j]
        _, rel = lasso.duality_gap(g64[np.ix_(others, others)], g64[others, j], g64[j, j], coef[:, j], grid[j])
        assert np.all(rel <= 1.05e-4), rel.max()  # float32 rounding of the in-solver gap, 5% slack
        _, sk, _ = lasso_path(x[:, others], x[:, j], alphas=grid[j], precompute=gram[np.ix_(others, others)] * n,
                              Xy=gram[others, j] * n, tol=1e-4)
        _, rel_sk = lasso.duality_gap(g64[np.ix_(others, others)], g64[others, j], g64[j, j], sk.T, grid[j])
        assert np.all(rel_sk <= 1.05e-4), rel_sk.max()
        agree.append(((coef[:, j] != 0) == (sk.T != 0)).mean())
    assert np.mean(agree) >= 0.99


def test_duality_gap_against_primal_dual_from_raw_data():
    """Independent check of the Gram formula: primal and dual objectives computed from X itself."""
    rng = np.random.default_rng(3)
    n, p = 80, 10
    x = _standardised(n, p + 1, 4)
    y, xs = x[:, 0], x[:, 1:]
    lam = 0.05
    for _ in range(5):
        b = rng.normal(size=p) * 0.2
        r = y - xs @ b
        primal = 0.5 * r @ r / n + lam * np.abs(b).sum()
        dn = np.abs(xs.T @ r / n).max()
        theta = r * min(1.0, lam / dn)  # dual point scaled into the feasible set
        dual = 0.5 * y @ y / n - 0.5 * (y - theta) @ (y - theta) / n
        gap, rel = lasso.duality_gap(xs.T @ xs / n, xs.T @ y / n, y @ y / n, b, lam)
        np.testing.assert_allclose(gap, primal - dual, rtol=1e-10, atol=1e-12)
        assert gap >= 0 and rel == pytest.approx(gap / (y @ y / n))


def test_vmap_over_resamples_equals_separate_runs():
    """Resamples as a leading batch axis [resamples, nodes, K, K] give the per-resample answers."""
    p, k = 15, 6
    subs, xtys, ytys = [], [], []
    for s in range(3):
        x = _standardised(120, p, 10 + s).astype(np.float32)
        g = jnp.asarray(x.T @ x / 120)
        cand = jnp.asarray(_full_candidates(p)[:, :k])
        sub, xty, yty = lasso.gather_candidates(g, cand, jnp.ones((p, k), bool), jnp.arange(p))
        subs.append(sub), xtys.append(xty), ytys.append(yty)
    sub, xty, yty = jnp.stack(subs), jnp.stack(xtys), jnp.stack(ytys)
    grid = jax.vmap(lambda c: lasso.lambda_grid(jnp.max(jnp.abs(c), 1), 10, 0.05))(xty)
    m = jnp.ones((3, p, k), bool)
    batched = jax.vmap(lambda a, b, c, d, e: lasso.lasso_path_candidates(a, b, c, d, e, 1e-6, max_iter=500))(
        sub, xty, yty, m, grid)
    for s in range(3):
        one = lasso.lasso_path_candidates(sub[s], xty[s], yty[s], m[s], grid[s], 1e-6, max_iter=500)
        np.testing.assert_allclose(batched.coef[s], one.coef, atol=1e-4)


def test_node_order_and_chunking_do_not_change_answers():
    """Nodes are regrouped into chunks (sorted by sum(xty**2), their squared correlations with their
    candidates) inside the solver and put back: any node order and chunk size (with padding) gives
    every node its own path."""
    n, p = 200, 13
    x = _standardised(n, p, 3, rho=0.7)
    cand = _full_candidates(p)
    with jax.enable_x64(True):
        g = jnp.asarray(x.T @ x / n)
        sub, xty, yty = lasso.gather_candidates(g, jnp.asarray(cand), jnp.ones(cand.shape, bool), jnp.arange(p))
        grid = lasso.lambda_grid(jnp.max(jnp.abs(xty), axis=1), 12, 0.01)
        m = jnp.ones(cand.shape, bool)
        ref = lasso.lasso_path_candidates(sub, xty, yty, m, grid, 1e-12, max_iter=20000, chunk=1).coef
        perm = np.random.default_rng(0).permutation(p)
        for chunk in (4, 32):
            out = lasso.lasso_path_candidates(sub[perm], xty[perm], yty[perm], m[perm], grid[perm], 1e-12,
                                              max_iter=20000, chunk=chunk)
            np.testing.assert_allclose(np.asarray(out.coef), np.asarray(ref)[:, perm], atol=1e-8)
            assert np.all(np.asarray(out.gap) <= 1e-12)


def test_masked_candidates_and_empty_nodes_stay_zero_without_nan():
    p, k = 6, 3
    x = _standardised(100, p, 5).astype(np.float32)
    g = jnp.asarray(x.T @ x / 100)
    cand = jnp.asarray(np.array([[1, 2, 3]] + [[0, 1, 2]] * (p - 1)), jnp.int32)
    mask = np.ones((p, k), bool)
    mask[0, 1:] = False  # node 0: one candidate
    mask[1] = False  # node 1: none
    sub, xty, yty = lasso.gather_candidates(g, cand, jnp.asarray(mask), jnp.arange(p))
    lam_max = jnp.max(jnp.abs(xty), axis=1)
    grid = lasso.lambda_grid(jnp.where(lam_max > 0, lam_max, 1.0), 8, 0.01)
    res = lasso.lasso_path_candidates(sub, xty, yty, jnp.asarray(mask), grid, 1e-5)
    coef = np.asarray(res.coef)
    assert np.isfinite(coef).all() and np.isfinite(np.asarray(res.gap)).all()
    assert np.all(coef[:, 0, 1:] == 0) and np.all(coef[:, 1] == 0)
    assert np.any(coef[-1, 0, 0] != 0)


def test_information_criteria_selection_and_merge_by_hand():
    rss = jnp.array([[1.0, 1.0], [0.5, 0.9], [0.49, 0.2]])
    df = jnp.array([[0, 0], [1, 1], [5, 2]])
    n, P = 100, jnp.array([9, 9])
    crit = lasso.information_criterion(rss, df, n, P, gamma=0.5)
    expect = n * np.log(np.asarray(rss)) + np.asarray(df) * (np.log(n) + np.log(9.0))
    np.testing.assert_allclose(crit, expect, rtol=1e-6)
    np.testing.assert_array_equal(lasso.select_index(crit), [1, 2])
    # Ties go to the smaller λ (later index).
    np.testing.assert_array_equal(lasso.select_index(jnp.array([[1.0], [1.0]])), [1])
    d = jnp.array([[0, 1, 1], [1, 0, 0], [0, 1, 0]], bool)
    np.testing.assert_array_equal(lasso.merge(d, "and"), [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(lasso.merge(d, "or"), [[0, 1, 1], [1, 0, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="merge"):
        lasso.merge(d, "xor")
    coef = jnp.array([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])
    cand = jnp.array([[1, 2], [0, 2], [0, 1]])
    np.testing.assert_array_equal(lasso.directed_adjacency(coef, cand, 3), [[0, 0, 1], [1, 0, 0], [0, 0, 0]])


def test_validation_loss_equals_direct_residuals():
    n, p = 50, 5
    x = _standardised(n, p, 6)
    coef = np.random.default_rng(0).normal(size=(3, 1, p - 1))
    others = np.arange(1, p)
    g = x.T @ x / n
    loss = lasso.validation_loss(jnp.asarray(coef), jnp.asarray(g[np.ix_(others, others)])[None],
                                 jnp.asarray(g[others, 0])[None], jnp.asarray(g[:1, 0]))
    direct = [np.mean((x[:, 0] - x[:, others] @ c[0]) ** 2) for c in coef]
    np.testing.assert_allclose(np.asarray(loss)[:, 0], direct, rtol=1e-5)


@pytest.mark.parametrize(
    "kw,msg",
    [(dict(criterion="aic"), "criterion"), (dict(merge="both"), "merge"), (dict(lambda_min_ratio=0.0), "lambda_min_ratio"),
     (dict(n_lambdas=0), "n_lambdas"), (dict(criterion="cv", cv_folds=1), "cv_folds"), (dict(tol=0.0), "tol")],
)
def test_lasso_settings_reject_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        lasso.LassoSettings(**kw)
    with pytest.raises(ValueError):
        lasso.lasso_path_dense(jnp.eye(3), jnp.ones((3, 3), bool), jnp.ones((3, 2)), select="cv")


def test_merge_large_bool_matrix_regression():
    """jax 0.10.2 XLA CPU segfaulted on a fused bool ``d & d.T & ~eye`` at p = 1000 (see merge)."""
    d = np.random.default_rng(7).uniform(size=(1000, 1000)) < 0.02
    a = np.asarray(jax.jit(lambda d: lasso.merge(d, "and"))(jnp.asarray(d)))
    o = np.asarray(jax.jit(lambda d: lasso.merge(d, "or"))(jnp.asarray(d)))
    want_a, want_o = d & d.T, d | d.T
    np.fill_diagonal(want_a, False), np.fill_diagonal(want_o, False)
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_array_equal(o, want_o)
