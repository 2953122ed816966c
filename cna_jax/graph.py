"""Nodewise-LASSO dependence graphs over CNA neurons: data matrices, prescreen, stability, utilities.

Pipeline for one data matrix ``x [rows, nodes]`` (:func:`fit_graph`; jitted stages
:func:`screen_arrays` and :func:`select_arrays`, vmapped over resamples by :func:`fit_graph_batch`): standardise columns ->
normalised Gram ``S = z^T z / n`` (= Pearson correlations) -> Fisher z p-values -> Benjamini–Hochberg
at level q over the ``p (p - 1) / 2`` pairs -> each node keeps at most its top-k significant partners
-> warm-started LASSO path per node over its candidates (:mod:`cna_jax.lasso`) -> per-node λ by
EBIC / BIC / CV / fixed -> AND / OR merge. :func:`stability_graph` runs that on R half-subsamples and
on a matched null of each (every column permuted independently) and keeps edges by frequency.

Documented results for awkward input: NaN/inf, fewer than 2 nodes or too few rows raise ValueError;
constant columns of the full matrix (:func:`constant_columns`, one threshold ``CONSTANT_TOL`` shared with
:func:`standardize`) raise ValueError naming them, before any solve, unless ``on_constant="isolate"``;
a column that becomes constant inside a resample is standardised to zero and is an isolated node there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
from typing import Optional

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
from jax import lax

from cna_jax import lasso

MODES = ("contrast", "harmful_only")
MIN_ROWS = 8  # Fisher z needs n > 3; below ~8 rows a half-subsample is meaningless.
# A column is constant when its population standard deviation is at most CONSTANT_TOL * (1 + max |x_j|).
# The one threshold of both check_matrix (which raises) and standardize (which zeroes the column): fits
# run in float32 by default, whose rounding puts a spread of a few 1e-7 of a column's magnitude on a
# truly constant column, so dividing by anything at or below 1e-6 of it would scale rounding noise.
CONSTANT_TOL = 1e-6


def _constant_mask(sd, absmax):
    """The constant-column rule (NumPy or JAX arrays): sd <= CONSTANT_TOL * (1 + max |x|)."""
    return sd <= CONSTANT_TOL * (1.0 + absmax)


# ---------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GraphSettings(lasso.LassoSettings):
    """Validated, hashable settings for the whole pipeline (static under jit): the solver's
    (:class:`cna_jax.lasso.LassoSettings`, inherited) and the pipeline's own."""

    q: float = 0.05
    k_candidates: int = 50
    prescreen: bool = True
    n_resamples: int = 30
    subsample_fraction: float = 0.5
    freq_threshold: float = 0.6
    largest_component: bool = False
    seed: int = 0
    dtype: str = "float32"
    on_constant: str = "error"
    resample_batch: int = 1
    block_size: int = 64
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()  # the solver fields
        if not 0.0 < self.q < 1.0:
            raise ValueError(f"q must be in (0, 1), got {self.q}")
        if self.k_candidates < 1:
            raise ValueError("k_candidates must be >= 1")
        if self.n_resamples < 1:
            raise ValueError("n_resamples must be >= 1")
        if not 0.0 < self.subsample_fraction <= 1.0:
            raise ValueError("subsample_fraction must be in (0, 1]")
        if not 0.0 < self.freq_threshold <= 1.0:
            raise ValueError("freq_threshold must be in (0, 1]")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.on_constant not in ("error", "isolate"):
            raise ValueError(f"on_constant must be 'error' or 'isolate', got {self.on_constant!r}")
        if self.resample_batch < 1 or self.block_size < 1:
            raise ValueError("resample_batch and block_size must be >= 1")
        if not self.prescreen and self.criterion == "cv":
            raise ValueError("criterion='cv' needs prescreen=True (the dense solver selects on the fly)")

    def lasso_kwargs(self):
        """The solver's fields alone (a plain LassoSettings keeps the solver's compiled code shared
        between pipelines that differ only in other fields)."""
        names = [f.name for f in dataclasses.fields(lasso.LassoSettings)]
        return {k: getattr(self, k) for k in names}

    @classmethod
    def from_config(cls, cfg) -> "GraphSettings":
        """Build from an ``ml_collections.ConfigDict`` (or dict); unknown keys are an error."""
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown graph config fields: {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self):
        return dataclasses.asdict(self)


def _precision(settings: GraphSettings):
    """float64 is enabled only inside this scope; other code keeps JAX's float32 default."""
    return jax.enable_x64(True) if settings.dtype == "float64" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------
# Data matrices
# ---------------------------------------------------------------------------------------------------
PAIRINGS = ("index", "shuffled")


def contrast_rows(harmful, harmless, seed: int = 0, pairing: str = "index"):
    """Signed per-pair differences ``h_harmful_i - h_harmless_i``: [n_h, p], [n_l, p] -> [pairs, p].

    ``pairing="index"`` (default, what the study does: its rows come already paired by ``data.pair``):
    row i pairs the i-th harmful with the i-th harmless row, truncated to the shorter list.
    ``"shuffled"``: both lists are first permuted with ``seed``, then paired by index and truncated.
    """
    harmful = np.asarray(harmful)
    harmless = np.asarray(harmless)
    if harmful.ndim != 2 or harmless.ndim != 2 or harmful.shape[1] != harmless.shape[1]:
        raise ValueError(f"need [n, p] arrays with equal p, got {harmful.shape} and {harmless.shape}")
    n = min(len(harmful), len(harmless))
    if pairing == "shuffled":
        rng = np.random.default_rng(seed)
        harmful = harmful[rng.permutation(len(harmful))[:n]]
        harmless = harmless[rng.permutation(len(harmless))[:n]]
    elif pairing == "index":
        harmful, harmless = harmful[:n], harmless[:n]
    else:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    return harmful.astype(np.float64) - harmless.astype(np.float64)


def data_matrix(harmful, harmless=None, mode: str = "contrast", seed: int = 0, pairing: str = "index"):
    """Rows x nodes for a graph: ``contrast`` (signed pair differences, :func:`contrast_rows` with
    ``pairing``, by default ``"index"`` as in the study; ``seed`` is used by ``"shuffled"`` only) or
    ``harmful_only``."""
    if mode == "contrast":
        if harmless is None:
            raise ValueError("mode='contrast' needs harmless activations")
        return contrast_rows(harmful, harmless, seed, pairing)
    if mode == "harmful_only":
        return np.asarray(harmful, np.float64)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def constant_columns(x) -> np.ndarray:
    """Indices of the constant columns of x [rows, nodes] (float64): population standard deviation at
    most ``CONSTANT_TOL * (1 + max |x_j|)``, the rule :func:`standardize` applies inside every fit.
    Computed here in float64; a float32 fit's standard deviation differs by rounding (~1e-7 of the
    column's magnitude), so only a column within that of the threshold can be judged differently."""
    x = np.asarray(x, np.float64)
    return np.flatnonzero(_constant_mask(x.std(axis=0), np.abs(x).max(axis=0)))


def check_matrix(x, min_rows: int = MIN_ROWS, on_constant: str = "error"):
    """Validate a data matrix [rows, nodes]; returns it as float64 NumPy. Raises ValueError on NaN/inf,
    fewer than 2 nodes, fewer than ``min_rows`` rows, or (``on_constant="error"``) constant columns
    (:func:`constant_columns`, the same threshold as :func:`standardize`), naming them."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"data matrix must be [rows, nodes], got shape {x.shape}")
    n, p = x.shape
    if p < 2:
        raise ValueError(f"a dependence graph needs at least 2 nodes, got p={p}")
    if n < min_rows:
        raise ValueError(f"need at least {min_rows} rows, got {n}")
    bad = ~np.isfinite(x)
    if bad.any():
        cols = np.unique(np.nonzero(bad)[1])[:10].tolist()
        raise ValueError(f"data matrix has {int(bad.sum())} NaN/inf entries (columns {cols}...)")
    if on_constant not in ("error", "isolate"):
        raise ValueError(f"on_constant must be 'error' or 'isolate', got {on_constant!r}")
    const = constant_columns(x)
    if const.size and on_constant == "error":
        more = "..." if const.size > 10 else ""
        raise ValueError(
            f"{const.size} constant column(s) {const[:10].tolist()}{more} (standard deviation <= "
            f"{CONSTANT_TOL:g} x (1 + max |x|)): standardisation is undefined; drop them or set "
            "on_constant='isolate' (they become isolated nodes)"
        )
    return x


def standardize(x):
    """Zero mean, unit (population) variance per column: [rows, nodes] -> (z, constant [nodes]).
    Constant columns (``CONSTANT_TOL``, the threshold :func:`check_matrix` raises on) become all-zero
    columns (no correlation with anything) instead of NaN."""
    mu = jnp.mean(x, axis=0)
    xc = x - mu
    sd = jnp.sqrt(jnp.mean(xc * xc, axis=0))
    const = _constant_mask(sd, jnp.max(jnp.abs(x), axis=0))
    return jnp.where(const[None, :], 0.0, xc / jnp.where(const, 1.0, sd)[None, :]), const


# ---------------------------------------------------------------------------------------------------
# Prescreen: Pearson -> Fisher z -> Benjamini–Hochberg -> top-k per node
# ---------------------------------------------------------------------------------------------------
def fisher_pvalues(r, n_rows: int):
    """Two-sided p-values of Pearson correlations via Fisher's z: ``atanh(r) sqrt(n - 3)`` ~ N(0, 1)."""
    lim = 1.0 - 4.0 * jnp.finfo(r.dtype).eps
    z = jnp.arctanh(jnp.clip(r, -lim, lim)) * math.sqrt(max(n_rows - 3, 1))
    return jax.scipy.special.erfc(jnp.abs(z) / math.sqrt(2.0))


def bh_reject(pvals, q: float):
    """Benjamini–Hochberg step-up at level q over a flat vector [m] -> bool [m]."""
    m = pvals.shape[0]
    ps = jnp.sort(pvals)
    ranks = jnp.arange(1, m + 1, dtype=pvals.dtype)
    ok = ps <= q * ranks / m
    kmax = jnp.max(jnp.where(ok, jnp.arange(1, m + 1), 0))
    thr = jnp.where(kmax > 0, ps[jnp.maximum(kmax - 1, 0)], -1.0)
    return pvals <= thr


def prescreen(gram, n_rows: int, q: float, k: int):
    """Candidates per node from the correlation matrix gram [p, p].

    Returns (cand [p, k] int, cand_mask [p, k] bool, significant [p, p] bool): each node's at most k
    BH-significant partners with the largest |r|; BH runs once over the p (p - 1) / 2 pairs.
    """
    p = gram.shape[0]
    iu, ju = np.triu_indices(p, 1)
    pv = fisher_pvalues(gram[iu, ju], n_rows)
    rej = bh_reject(pv, q)
    sig = jnp.zeros((p, p), jnp.int8).at[iu, ju].set(rej.astype(jnp.int8))
    sig = jnp.maximum(sig, sig.T) > 0  # int8: see lasso.merge on fused bool transposes
    score = jnp.where(sig, jnp.abs(gram), -1.0)
    vals, cand = lax.top_k(score, k)
    return cand.astype(jnp.int32), vals >= 0, sig


# ---------------------------------------------------------------------------------------------------
# One graph fit (jitted end to end)
# ---------------------------------------------------------------------------------------------------
def _grid(lam_max, st: GraphSettings):
    if st.criterion == "fixed":
        top = jnp.maximum(lam_max, st.fixed_lambda)
        t = jnp.linspace(0.0, 1.0, st.n_lambdas, dtype=lam_max.dtype)
        return top[:, None] * (st.fixed_lambda / top)[:, None] ** t[None, :]
    safe = jnp.where(lam_max > 0, lam_max, 1.0)  # no candidates: any grid, solution stays 0
    return lasso.lambda_grid(safe, st.n_lambdas, st.lambda_min_ratio)


def _dense_fit(x, st: GraphSettings):
    """No prescreen: every node on all others through the shared-Gram solver. x [rows, nodes]."""
    n, p = x.shape
    z, const = standardize(x)
    gram = z.T @ z / n
    nodes = jnp.arange(p)
    mask = ~jnp.eye(p, dtype=bool) & ~const[None, :] & ~const[:, None]
    lam_max = jnp.max(jnp.abs(jnp.where(mask, gram, 0.0)), axis=0)
    grid = _grid(lam_max, st)
    res = lasso.lasso_path_dense(
        gram, mask, grid, st.tol, max_iter=st.max_iter, block_size=st.block_size, n_rows=n,
        ebic_gamma=st.ebic_gamma, select=st.criterion,
    )
    directed = (res.best != 0).T
    return dict(adjacency=lasso.merge(directed, st.merge), directed=directed, lam=grid[nodes, res.best_index],
                n_candidates=jnp.sum(mask, axis=0), max_gap=jnp.max(res.gap), constant=const)


def screen_arrays(x, st: GraphSettings):
    """Stage 1 of a fit: x [rows, nodes] -> z [rows, nodes] (standardised), gram [p, p], constant [p],
    cand [p, k] and cand_mask [p, k] (valid candidates first, by decreasing |r|)."""
    n, p = x.shape
    z, const = standardize(x)
    gram = z.T @ z / n
    cand, cmask, _ = prescreen(gram, n, st.q, min(st.k_candidates, p - 1))
    return dict(z=z, gram=gram, constant=const, cand=cand, cand_mask=cmask)


def fold_problems(z, cand, cmask, fold_ids, fold: int):
    """CV fold ``fold``'s candidate problems: (train, validation) ``gather_candidates`` triples from the
    full-data standardisation z [rows, nodes] (folds share it and the λ grid)."""
    n, p = z.shape
    w = (fold_ids != fold).astype(z.dtype)
    n_tr = jnp.maximum(jnp.sum(w), 1.0)
    n_va = jnp.maximum(n - jnp.sum(w), 1.0)
    g_tr = (z * w[:, None]).T @ z / n_tr
    g_va = (z * (1.0 - w)[:, None]).T @ z / n_va
    nodes = jnp.arange(p)
    return lasso.gather_candidates(g_tr, cand, cmask, nodes), lasso.gather_candidates(g_va, cand, cmask, nodes)


def choose(path, cv_loss, grid, cand, cmask, const, n_rows: int, st: GraphSettings):
    """Per-node λ (by ``st.criterion``; ``cv_loss [lambdas, nodes]`` is used by CV only) and the merged
    graph: the :func:`select_arrays` dict."""
    p = cand.shape[0]
    nodes = jnp.arange(p)
    if st.criterion in ("ebic", "bic"):
        gamma = st.ebic_gamma if st.criterion == "ebic" else 0.0
        # Model space = all p - 1 other nodes: the prescreen is itself a data-driven search over them.
        crit = lasso.information_criterion(path.rss, path.df, n_rows, jnp.full((p,), p - 1), gamma)
        idx = lasso.select_index(crit)
    elif st.criterion == "cv":
        idx = lasso.select_index(cv_loss)
    else:  # fixed: the grid ends at fixed_lambda
        idx = jnp.full((p,), st.n_lambdas - 1, jnp.int32)
    coef = path.coef[idx, nodes]  # [p, K]
    directed = lasso.directed_adjacency(coef * cmask, cand, p)
    return dict(adjacency=lasso.merge(directed, st.merge), directed=directed, lam=grid[nodes, idx],
                n_candidates=jnp.sum(cmask, axis=1), max_gap=jnp.max(path.gap), constant=const)


def select_arrays(z, gram, const, cand, cmask, fold_ids, st: GraphSettings, solver=None):
    """Stage 2: LASSO paths over candidates [p, K], per-node λ, merge. fold_ids [rows] (CV only).

    ``solver``: the candidate-set path solver ``(sub_gram, xty, yty, mask, lambdas, tol) -> PathResult``;
    None is :func:`cna_jax.lasso.lasso_path_candidates` (traced into the caller's jit), and
    :func:`cna_jax.lasso.sharded_lasso` splits the node axis over a mesh.

    Returns adjacency [p, p] bool (merged, undirected), directed [p, p] bool (``[j, i]`` = node j
    selects i), lam [p] selected λ, n_candidates [p], max_gap (relative duality gap, max over nodes
    and λ), constant [p] bool.
    """
    solve = solver or functools.partial(lasso.lasso_path_candidates, max_iter=st.max_iter)
    n, p = z.shape
    sub, xty, yty = lasso.gather_candidates(gram, cand, cmask, jnp.arange(p))
    grid = _grid(jnp.max(jnp.abs(xty), axis=1), st)
    path = solve(sub, xty, yty, cmask, grid, st.tol)
    loss = None
    if st.criterion == "cv":
        loss = jnp.zeros_like(path.rss)
        for f in range(st.cv_folds):
            (s_tr, c_tr, y_tr), (s_va, c_va, y_va) = fold_problems(z, cand, cmask, fold_ids, f)
            pf = solve(s_tr, c_tr, y_tr, cmask, grid, st.tol)
            loss = loss + lasso.validation_loss(pf.coef, s_va, c_va, y_va)
    return choose(path, loss, grid, cand, cmask, const, n, st)


@functools.lru_cache(maxsize=None)
def _batched(st: GraphSettings):
    """Jitted stages vmapped over a leading resample axis [batch, rows, nodes]."""
    dense = jax.jit(jax.vmap(lambda x: _dense_fit(x, st)))
    screen = jax.jit(jax.vmap(lambda x: screen_arrays(x, st)))
    select = jax.jit(jax.vmap(lambda z, g, c, ca, cm, f: select_arrays(z, g, c, ca, cm, f, st)))
    return dense, screen, select


def solved_width(cand_mask, min_k: int = 1) -> int:
    """Candidate width actually solved for cand_mask [..., p, k]: the next power of two >= the widest
    node, at least ``min_k``, at most k. Solving padding costs K^2 per node and sweep, and sparse data
    often has far fewer than k candidates; powers of two keep recompiles to a handful."""
    width, widest = cand_mask.shape[-1], int(jnp.max(jnp.sum(cand_mask, axis=-1)))
    b = 1
    while b < widest:
        b *= 2
    return min(max(b, min_k, 1), width)


def fit_graph_batch(xs, fold_ids, st: GraphSettings, min_k: int = 1):
    """Graphs for a batch of data matrices xs [batch, rows, nodes]; fold_ids [batch, rows].
    Returns the :func:`select_arrays` dict with a leading batch axis (JAX arrays) plus ``k_solved``,
    the candidate width used (at least ``min_k``, so a caller can keep it from shrinking and
    avoid recompiles)."""
    dense, screen, select = _batched(st)
    if not st.prescreen:
        return dict(dense(xs), k_solved=xs.shape[-1] - 1)
    s = screen(xs)
    k = solved_width(s["cand_mask"], min_k)
    out = select(s["z"], s["gram"], s["constant"], s["cand"][..., :k], s["cand_mask"][..., :k], fold_ids)
    return dict(out, k_solved=k)


def _fold_ids(n: int, folds: int, rng):
    return rng.permutation(np.arange(n) % folds).astype(np.int32)


def fit_graph(x, settings: Optional[GraphSettings] = None, check: bool = True, solver=None):
    """One graph (no resampling) from x [rows, nodes]; NumPy versions of :func:`select_arrays`.

    ``solver`` (prescreen only): a candidate-set path solver for :func:`select_arrays`, e.g.
    :func:`cna_jax.lasso.sharded_lasso`; the screen is the same jitted stage either way, and the rest of
    stage 2 then runs around the solver's own jitted calls instead of inside one jit."""
    st = settings or GraphSettings()
    if solver is not None and not st.prescreen:
        raise ValueError("a solver splits the candidate-set problems: use prescreen=True (the dense "
                         "all-node solver runs on one device)")
    if check:
        x = check_matrix(x, on_constant=st.on_constant)
    with _precision(st):
        xj = jnp.asarray(x, st.dtype)[None]
        folds = jnp.asarray(_fold_ids(x.shape[0], st.cv_folds, np.random.default_rng(st.seed)))[None]
        if solver is None:
            out = fit_graph_batch(xj, folds, st)
            k = out.pop("k_solved")
            out = {name: v[0] for name, v in out.items()}
        else:
            s = {name: v[0] for name, v in _batched(st)[1](xj).items()}
            k = solved_width(s["cand_mask"])
            out = select_arrays(s["z"], s["gram"], s["constant"], s["cand"][:, :k], s["cand_mask"][:, :k], folds[0],
                                st, solver)
        return dict({name: np.asarray(v) for name, v in out.items()}, k_solved=k)


def sharded_fit_graph(layout, settings: Optional[GraphSettings] = None):
    """:func:`fit_graph` with the LASSO paths (the cost) split over the layout's ``nodes`` mesh axes
    (:func:`cna_jax.lasso.sharded_lasso`; ``cna_jax.sharding.node_layout(mesh)`` uses every device):
    ``x [rows, nodes] -> dict`` as :func:`fit_graph`; the solver is the function's ``solver`` attribute."""
    from cna_jax.sharding import ShardingError

    st = settings or GraphSettings()
    if not st.prescreen:
        raise ShardingError("sharded_fit_graph splits the candidate-set solver over nodes: use prescreen=True "
                            "(the dense all-node solver runs on one device through cna_jax.graph.fit_graph)")
    fit = functools.partial(fit_graph, settings=st, solver=lasso.sharded_lasso(layout, st.max_iter))
    fit.solver = fit.keywords["solver"]
    return fit


# ---------------------------------------------------------------------------------------------------
# Stability selection with matched nulls
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StabilityResult:
    """Edge frequencies of the real resamples and of their matched nulls (all [p, p] symmetric).

    adjacency / null_adjacency: frequency >= threshold. edge_counts / null_edge_counts: edges of each
    resample's graph [resamples]. nodes [p, 2] (layer, index) or None. max_gap: worst relative
    duality gap seen."""

    frequency: np.ndarray
    null_frequency: np.ndarray
    threshold: float
    edge_counts: np.ndarray
    null_edge_counts: np.ndarray
    nodes: Optional[np.ndarray] = None
    n_rows: int = 0
    max_gap: float = 0.0
    settings: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def adjacency(self) -> np.ndarray:
        return self.frequency >= self.threshold

    @property
    def null_adjacency(self) -> np.ndarray:
        return self.null_frequency >= self.threshold

    def summary(self) -> dict:
        adj = self.adjacency
        sub = connected_subset(adj, largest_component=bool(self.settings.get("largest_component")))
        return dict(
            nodes=int(adj.shape[0]),
            edges=n_edges(adj),
            null_edges=n_edges(self.null_adjacency),
            null_edges_per_resample_mean=float(np.mean(self.null_edge_counts)),
            null_edges_per_resample_max=int(np.max(self.null_edge_counts)),
            edges_per_resample_mean=float(np.mean(self.edge_counts)),
            connected_subset_size=int(len(sub)),
            threshold=float(self.threshold),
            resamples=int(len(self.edge_counts)),
            rows=int(self.n_rows),
            max_relative_gap=float(self.max_gap),
        )

    def save(self, path: str):
        """Writes ``path.npz`` (arrays) and ``path.json`` (threshold, settings, summary, meta)."""
        path = path[:-4] if path.endswith(".npz") else path
        arrays = dict(frequency=self.frequency, null_frequency=self.null_frequency,
                      edge_counts=self.edge_counts, null_edge_counts=self.null_edge_counts)
        if self.nodes is not None:
            arrays["nodes"] = self.nodes
        np.savez_compressed(path + ".npz", **arrays)
        info = dict(threshold=self.threshold, n_rows=self.n_rows, max_gap=self.max_gap,
                    settings=self.settings, meta=self.meta, summary=self.summary())
        with open(path + ".json", "w") as f:
            json.dump(info, f, indent=2, default=_json_default)

    @classmethod
    def load(cls, path: str) -> "StabilityResult":
        path = path[:-4] if path.endswith(".npz") else path
        with np.load(path + ".npz") as z:
            arrays = {k: z[k] for k in z.files}
        with open(path + ".json") as f:
            info = json.load(f)
        return cls(frequency=arrays["frequency"], null_frequency=arrays["null_frequency"],
                   threshold=info["threshold"], edge_counts=arrays["edge_counts"],
                   null_edge_counts=arrays["null_edge_counts"], nodes=arrays.get("nodes"),
                   n_rows=info["n_rows"], max_gap=info["max_gap"], settings=info["settings"],
                   meta=info.get("meta", {}))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def stability_graph(x, settings: Optional[GraphSettings] = None, nodes=None, meta=None) -> StabilityResult:
    """Stability selection with matched nulls on x [rows, nodes].

    For r in 1..R: a subsample of ``floor(subsample_fraction * rows)`` rows without replacement
    (seeded), its graph, and the graph of a null copy with every column permuted independently
    (dependence destroyed, marginals kept) through the identical pipeline. Each real subsample and
    its null go through the jitted stages together as a leading ``[2 * resample_batch, rows, nodes]``
    axis (``resample_batch`` > 1 pays on accelerators; on CPU 1 is as fast and lighter on memory).
    """
    st = settings or GraphSettings()
    x = check_matrix(x, on_constant=st.on_constant)
    n, p = x.shape
    n_sub = int(math.floor(st.subsample_fraction * n))
    if n_sub < MIN_ROWS:
        raise ValueError(f"subsample of {n_sub} rows is too small (need >= {MIN_ROWS}); add rows")
    if nodes is not None:
        nodes = np.asarray(nodes)
        if nodes.shape[0] != p:
            raise ValueError(f"nodes has {nodes.shape[0]} rows but the matrix has {p} columns")
    rng = np.random.default_rng(st.seed)
    freq = np.zeros((p, p), np.int64)
    nfreq = np.zeros((p, p), np.int64)
    counts, ncounts, gaps = [], [], []
    k_seen = 1
    it = range(0, st.n_resamples, st.resample_batch)
    if st.progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="stability", unit="batch")
        except ImportError:  # pragma: no cover - tqdm is a dependency
            pass
    with _precision(st):
        for start in it:
            b = min(st.resample_batch, st.n_resamples - start)
            xs, xn, fs = [], [], []
            for _ in range(b):
                rows = rng.choice(n, n_sub, replace=False)
                sub = x[rows]
                xs.append(sub)
                xn.append(rng.permuted(sub, axis=0))  # each column permuted independently
                fs.append(_fold_ids(n_sub, st.cv_folds, rng))
            stack = jnp.asarray(np.stack(xs + xn), st.dtype)  # [2b, rows, nodes]: real then null
            folds = jnp.asarray(np.stack(fs + fs))
            out = fit_graph_batch(stack, folds, st, min_k=k_seen)
            k_seen = out.pop("k_solved")
            adj = np.asarray(out["adjacency"])
            gap = float(np.max(np.asarray(out["max_gap"])))
            freq += adj[:b].sum(0)
            nfreq += adj[b:].sum(0)
            counts += [n_edges(a) for a in adj[:b]]
            ncounts += [n_edges(a) for a in adj[b:]]
            gaps.append(gap)
    r = st.n_resamples
    return StabilityResult(
        frequency=(freq / r).astype(np.float32), null_frequency=(nfreq / r).astype(np.float32),
        threshold=st.freq_threshold, edge_counts=np.asarray(counts, np.int32),
        null_edge_counts=np.asarray(ncounts, np.int32), nodes=nodes, n_rows=n,
        max_gap=float(max(gaps)), settings=st.to_dict(), meta=dict(meta or {}),
    )


# ---------------------------------------------------------------------------------------------------
# Graph utilities (undirected graphs as symmetric bool [p, p] adjacency on one node set)
# ---------------------------------------------------------------------------------------------------
def _adj(a) -> np.ndarray:
    a = np.asarray(a, bool)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"adjacency must be square, got {a.shape}")
    a = a | a.T
    np.fill_diagonal(a, False)
    return a


def edge_set(adj) -> set:
    """Undirected edges {(i, j), i < j}."""
    i, j = np.nonzero(np.triu(_adj(adj), 1))
    return set(zip(i.tolist(), j.tolist()))


def n_edges(adj) -> int:
    return int(np.triu(_adj(adj), 1).sum())


def connected_subset(adj, largest_component: bool = False) -> np.ndarray:
    """Graph-connected subset: nodes with degree >= 1 (default) or the largest component's nodes
    (ties: the component with the smallest node index). Sorted indices."""
    a = _adj(adj)
    if not largest_component:
        return np.flatnonzero(a.any(axis=1))
    g = nx.from_numpy_array(a.astype(np.int8))
    comps = [c for c in nx.connected_components(g) if len(c) > 1]
    if not comps:
        return np.zeros((0,), np.int64)
    best = max(comps, key=lambda c: (len(c), -min(c)))
    return np.asarray(sorted(best), np.int64)


def edge_jaccard(a, b) -> float:
    """|E_a ∩ E_b| / |E_a ∪ E_b| on one node set; two empty graphs give 1.0 (identical)."""
    a, b = _adj(a), _adj(b)
    if a.shape != b.shape:
        raise ValueError(f"graphs on different node sets: {a.shape} vs {b.shape}")
    inter = int(np.triu(a & b, 1).sum())
    union = int(np.triu(a | b, 1).sum())
    return 1.0 if union == 0 else inter / union


def retention(base, instruct) -> float:
    """Base retention of instruct edges |E_b ∩ E_i| / |E_i|; NaN (documented) if E_i is empty."""
    b, i = _adj(base), _adj(instruct)
    if b.shape != i.shape:
        raise ValueError(f"graphs on different node sets: {b.shape} vs {i.shape}")
    ei = int(np.triu(i, 1).sum())
    return float("nan") if ei == 0 else int(np.triu(b & i, 1).sum()) / ei


def to_networkx(adj, nodes=None, weights=None) -> nx.Graph:
    """networkx Graph: node k has attributes layer/neuron from nodes [p, 2] if given; edges carry
    ``weight`` from weights [p, p] (e.g. the stability frequency) if given."""
    a = _adj(adj)
    g = nx.Graph()
    for k in range(a.shape[0]):
        attrs = {}
        if nodes is not None:
            attrs = dict(layer=int(nodes[k][0]), neuron=int(nodes[k][1]))
        g.add_node(k, **attrs)
    for i, j in sorted(edge_set(a)):
        g.add_edge(i, j, **({} if weights is None else dict(weight=float(weights[i, j]))))
    return g


def write_graphml(path: str, adj, nodes=None, weights=None):
    nx.write_graphml(to_networkx(adj, nodes, weights), path)


def to_json(adj, nodes=None, weights=None) -> dict:
    """JSON-ready dict: {"nodes": [{"id", "layer", "neuron"}], "edges": [{"source", "target", "weight"}]}."""
    g = to_networkx(adj, nodes, weights)
    return dict(
        nodes=[dict(id=k, **d) for k, d in g.nodes(data=True)],
        edges=[dict(source=i, target=j, **d) for i, j, d in g.edges(data=True)],
    )


def write_json(path: str, adj, nodes=None, weights=None):
    with open(path, "w") as f:
        json.dump(to_json(adj, nodes, weights), f, indent=1)
