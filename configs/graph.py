"""Dependence-graph fitting defaults (docs/METHOD.md §3): the fields and defaults of
``cna_jax.graph.GraphSettings``, the one place they are kept (what each field means is there and in
docs/METHOD.md §3).

Use: ``python -m launch.fit_graphs --config=configs/graph.py --config.q=0.1 --config.criterion=bic``.
``validate(cfg)`` turns it into the frozen ``GraphSettings`` and rejects unknown fields or values with a
ValueError.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    from cna_jax.graph import GraphSettings

    return ml_collections.ConfigDict(GraphSettings().to_dict())


def validate(cfg):
    """ConfigDict -> cna_jax.graph.GraphSettings (raises ValueError on bad fields)."""
    from cna_jax.graph import GraphSettings

    return GraphSettings.from_config(cfg)
