"""Fit a stability-selected nodewise-LASSO dependence graph from saved activations.

  python -m launch.fit_graphs --activations=acts.npz --mode=contrast --workdir=out/graph \
      --config=configs/graph.py --config.n_resamples=30 --config.criterion=ebic

acts.npz holds ``harmful`` [n, p] and ``harmless`` [n, p] (harmless optional for harmful_only), and
optionally ``nodes`` [p, 2] int (layer, neuron index). Writes into workdir: ``graph.npz`` +
``graph.json`` (StabilityResult), ``graph.graphml``, ``graph_edges.json``, ``summary.json``.
"""
import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

_CONFIG = config_flags.DEFINE_config_file("config", "configs/graph.py", "Graph config file.")
_ACTS = flags.DEFINE_string("activations", None, "npz with harmful [n, p], harmless [n, p], nodes [p, 2].")
_MODE = flags.DEFINE_enum("mode", "contrast", ["contrast", "harmful_only"], "Rows of the data matrix.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_NAME = flags.DEFINE_string("name", "graph", "Output file stem.")


def run(activations: str, mode: str, workdir: str, cfg, name: str = "graph") -> dict:
    """Fit, write outputs, return the summary dict."""
    from cna_jax import graph

    settings = graph.GraphSettings.from_config(cfg)
    with np.load(activations) as z:
        if "harmful" not in z.files:
            raise ValueError(f"{activations} has no 'harmful' array (found {z.files})")
        harmful = z["harmful"]
        harmless = z["harmless"] if "harmless" in z.files else None
        nodes = z["nodes"] if "nodes" in z.files else None
    x = graph.data_matrix(harmful, harmless, mode=mode, seed=settings.seed)
    logging.info("data matrix %s (%s), settings %s", x.shape, mode, settings)
    t0 = time.perf_counter()
    res = graph.stability_graph(x, settings, nodes=nodes, meta=dict(mode=mode, activations=activations))
    seconds = time.perf_counter() - t0
    os.makedirs(workdir, exist_ok=True)
    stem = os.path.join(workdir, name)
    res.save(stem)
    graph.write_graphml(stem + ".graphml", res.adjacency, res.nodes, res.frequency)
    graph.write_json(stem + "_edges.json", res.adjacency, res.nodes, res.frequency)
    summary = dict(res.summary(), mode=mode, seconds=round(seconds, 2),
                   connected_subset=graph.connected_subset(
                       res.adjacency, settings.largest_component).tolist())
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv):
    del argv
    if not _ACTS.value or not _WORKDIR.value:
        raise app.UsageError("--activations and --workdir are required")
    s = run(_ACTS.value, _MODE.value, _WORKDIR.value, _CONFIG.value, _NAME.value)
    print(f"nodes {s['nodes']}  edges {s['edges']}  null edges {s['null_edges']} "
          f"(per resample mean {s['null_edges_per_resample_mean']:.1f})  "
          f"connected subset {s['connected_subset_size']}  [{s['seconds']} s]")


if __name__ == "__main__":
    app.run(main)
