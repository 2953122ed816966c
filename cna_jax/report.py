"""The study report: the seed's four tables (Markdown + CSV + JSON) and PNG figures."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Sequence

import numpy as np

from cna_jax.store import _json_default


def _pct(x, digits: int = 0) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def tables(rows: Sequence[dict]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The four tables of the seed, one row per model result (``study.summarize`` output)."""
    a = (["Model", "CNA # of Neurons", "Graph # of Neurons", "Refusal Rate - Base", "Refusal Rate - CNA",
          "Refusal Rate - Graph"],
         [[r["model"], f"{r['cna_neurons']:,}", f"{r['graph_neurons']:,}", _pct(r["refusal"]["harmful/none"]),
           _pct(r["refusal"]["harmful/cna"]), _pct(r["refusal"]["harmful/contrast_graph"])] for r in rows])
    b = (["model", "instruct E", "base E", "shared E", "edge Jaccard", "base retention of instruct edges"],
         [[r["model"], f"{r['edges']['instruct']:,}", f"{r['edges']['base']:,}", f"{r['edges']['shared']:,}",
           f"{r['edges']['jaccard']:.3f}", _pct(r["edges"]["retention"], 1)] for r in rows])
    c = (["model", "no intervention", "harmful/non-harmful contrast graph", "harmful-only graph"],
         [[r["model"], _pct(r["refusal"]["harmful/none"]), _pct(r["refusal"]["harmful/contrast_graph"]),
           _pct(r["refusal"]["harmful/harmful_graph"])] for r in rows])
    d_rows = []
    for r in rows:
        nl = r["nulls"]
        for x in nl["rows"]:
            d_rows.append([r["model"], f"{nl['graph_n']:,}", _pct(nl["graph_fraction_of_cna"]),
                           _pct(nl["graph_reduction"]), x["family"].replace("_", "-"), str(x["n"]),
                           _pct(x["mean_reduction"], 1), _pct(x["max_reduction"], 1),
                           f"{x['n_at_least_graph']}/{x['n']}"])
    d = (["model", "graph n", "graph/CNA", "graph refusal reduction", "null set", "n", "null mean", "null max",
          "nulls >= graph"], d_rows)
    return {"a_refusal": a, "b_edges": b, "c_harmful_only": c, "d_nulls": d}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _write_tables(out_dir: str, rows: Sequence[dict]) -> str:
    titles = {"a_refusal": "Graph-connected neurons and refusal (held-out harmful prompts)",
              "b_edges": "Base vs instruct graphs on the instruct CNA neuron set",
              "c_harmful_only": "Contrast graph vs harmful-only graph (refusal rate)",
              "d_nulls": "Graph subset vs random subsets of the CNA pool (refusal reduction)"}
    md = []
    for name, (header, body) in tables(rows).items():
        with open(os.path.join(out_dir, f"table_{name}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(body)
        md.append(f"### {titles[name]}\n\n{markdown_table(header, body)}\n")
    return "\n".join(md)


def plot_graphs(path: str, adjacency: dict, pool, num_layers: int, title: str) -> None:
    """Full-depth graphs, base on top and instruct below; nodes placed by layer (x) and rank in layer (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    layers = pool.layers
    y = np.zeros(len(pool))
    for l in np.unique(layers):
        idx = np.flatnonzero(layers == l)
        y[idx] = np.linspace(-1, 1, len(idx)) if len(idx) > 1 else 0.0
    for ax, (kind, label) in zip(axes, (("contrast_base", "base"), ("contrast_instruct", "instruct"))):
        adj = np.asarray(adjacency[kind], bool)
        iu = np.argwhere(np.triu(adj, 1))
        for a, b in iu:
            # Edges within one layer are drawn as arcs so they don't vanish into the layer's column.
            rad = 0.0 if layers[a] != layers[b] else 0.5
            ax.annotate("", xy=(layers[a], y[a]), xytext=(layers[b], y[b]), zorder=1,
                        arrowprops=dict(arrowstyle="-", color="0.45", lw=0.6, alpha=0.7,
                                        connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0))
        deg = adj.sum(1)
        colors = np.where(pool.deltas > 0, "tab:red", "tab:blue")
        ax.scatter(layers, y, s=12 + 10 * deg, c=colors, edgecolors="k", linewidths=0.3, zorder=2)
        ax.set_title(f"{label}: {len(iu)} edges, {(deg > 0).sum()} connected of {len(pool)} CNA neurons")
        ax.set_yticks([])
    axes[-1].set_xlabel("layer")
    axes[-1].set_xlim(-0.5, num_layers + 0.5)
    fig.suptitle(f"{title}: full-depth CNA graph (red: delta > 0, blue: delta < 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_refusal(path: str, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["none", "cna", "contrast_graph", "harmful_graph"]
    labels = ["no intervention", "CNA", "contrast graph", "harmful-only graph"]
    rate = result["refusal"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(x - 0.2, [rate[f"harmful/{n}"] for n in names], 0.4, label="harmful (eval)", color="tab:red")
    if f"harmless/none" in rate:
        ax.bar(x + 0.2, [rate[f"harmless/{n}"] for n in names], 0.4, label="harmless (eval)", color="tab:green")
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"refusal rate ({result['detector']} detector)")
    ax.legend()
    ax.set_title(f"{result['model']}: refusal under ablation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_nulls(path: str, result: dict, nulls: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    none = result["refusal"]["harmful/none"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, family in zip(axes, ("layer_matched", "uniform")):
        reds = [none - x["rate"] for x in nulls if x["family"] == family]
        if reds:
            ax.hist(reds, bins=min(15, max(3, len(reds) // 2)), color="0.6")
        ax.axvline(result["nulls"]["graph_reduction"], color="tab:red", lw=2, label="graph subset")
        ax.set_title(f"{family.replace('_', '-')} nulls (n={len(reds)})")
        ax.set_xlabel("refusal reduction")
        ax.legend()
    fig.suptitle(f"{result['model']}: graph subset vs random CNA subsets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: str, result: dict, adjacency: dict, pool) -> str:
    """Writes report.md, results.json, table CSVs and figures into ``out``; returns report.md's path.

    adjacency: graph kind -> [p, p] bool; pool: the CNA NeuronSet (graph nodes)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=_json_default)
    nulls = result.get("null_items")
    plot_graphs(os.path.join(out, "graphs.png"), adjacency, pool, pool.num_layers, result["model"])
    plot_refusal(os.path.join(out, "refusal.png"), result)
    if nulls:
        plot_nulls(os.path.join(out, "nulls.png"), result, nulls)
    q = result["quality"]
    rate = result["refusal"]
    cost = ""
    if "harmless/none" in rate:
        cost = ("\n### What ablation costs on harmless prompts\n\n" + markdown_table(
            ["condition", "harmless refusal", "harmless quality", "harmful quality"],
            [[n, _pct(rate[f"harmless/{n}"]), f"{q[f'harmless/{n}']:.3f}", f"{q[f'harmful/{n}']:.3f}"]
             for n in ("none", "cna", "contrast_graph", "harmful_graph")]) + "\n")
    timings = "\n".join(f"| {k} | {v:.1f} s |" for k, v in result.get("timings", {}).items())
    md = f"""# Study report: {result['model']}

Refusal measured on {result['n_eval_harmful']} held-out harmful prompts with the `{result['detector']}`
detector. Graph subsets are the degree >= 1 nodes of the stability graphs (edge frequency >= threshold).

{_write_tables(out, [result])}{cost}
### Null edges (matched-null pipeline, same threshold)

{markdown_table(["graph", "edges", "null edges"], [[k, str(result['graph_summaries'][k]['edges']), str(v)] for k, v in result['null_edges'].items()])}

### Figures

![graphs](graphs.png)

![refusal](refusal.png)

{'![nulls](nulls.png)' if nulls else ''}

### Stage times (when each stage was computed; "this run" = the invocation that wrote this report)

| stage | time |
|---|---|
{timings}
"""
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(md)
    return path


def write_combined(path_dir: str, results: Sequence[dict]) -> str:
    """One report with a row per model (the multi-model driver)."""
    os.makedirs(path_dir, exist_ok=True)
    with open(os.path.join(path_dir, "results.json"), "w") as f:
        json.dump(list(results), f, indent=2, default=_json_default)
    md = "# Combined study report\n\n" + _write_tables(path_dir, results)
    path = os.path.join(path_dir, "report.md")
    with open(path, "w") as f:
        f.write(md)
    return path
