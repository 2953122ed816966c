"""Dependence-graph fitting defaults (METHOD.md section 2). Every default is a field here.

Use: ``python -m launch.fit_graphs --config=configs/graph.py --config.q=0.1 --config.criterion=bic``.
``validate(cfg)`` turns it into the frozen ``cna_jax.graph.GraphSettings`` and rejects unknown fields
or values with a ValueError.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Prescreen: Pearson -> Fisher z -> Benjamini–Hochberg at q -> top-k candidates per node.
    c.prescreen = True  # False: every node regresses on all others (dense shared-Gram solver)
    c.q = 0.05
    c.k_candidates = 50
    # LASSO path and per-node λ choice.
    c.n_lambdas = 30
    c.lambda_min_ratio = 0.01
    c.criterion = "ebic"  # ebic | bic | cv | fixed
    c.ebic_gamma = 0.5
    c.cv_folds = 5
    c.fixed_lambda = 0.1  # on standardised data; used when criterion == "fixed"
    c.merge = "and"  # and | or
    c.tol = 1e-4  # relative duality gap (scikit-learn's tol semantics)
    c.max_iter = 1000  # sweeps per λ
    c.block_size = 64  # dense solver row block
    # Stability selection with matched nulls.
    c.n_resamples = 30
    c.subsample_fraction = 0.5
    c.freq_threshold = 0.6
    c.largest_component = False  # graph-connected subset: degree >= 1 (False) or largest component
    c.resample_batch = 1  # resamples vmapped together (helps on accelerators)
    c.seed = 0
    c.dtype = "float32"  # float64 enables x64 only inside the fit
    c.on_constant = "error"  # error | isolate
    c.progress = True
    return c


def validate(cfg):
    """ConfigDict -> cna_jax.graph.GraphSettings (raises ValueError on bad fields)."""
    from cna_jax.graph import GraphSettings

    return GraphSettings.from_config(cfg)
