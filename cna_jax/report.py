"""The study report: the seed's four tables (Markdown + CSV + JSON) with their statistics, and PNG figures."""
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


def _ci(r: dict, key: str) -> str:
    """The 95% Wilson interval of refusal rate ``key`` as "lo-hi%"; "n/a" in results written before
    intervals were stored (or with no prompts)."""
    ci = r.get("refusal_ci", {}).get(key)
    if ci is None or any(x is None or math.isnan(x) for x in ci):
        return "n/a"
    return f"{100 * ci[0]:.0f}-{100 * ci[1]:.0f}%"


def _p(x) -> str:
    """A p-value: three decimals, or two significant digits in e-notation below 0.001; "n/a" if absent."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


def _mcnemar(r: dict, key: str) -> str:
    return _p(r.get("mcnemar_p", {}).get(key))


def tables(rows: Sequence[dict]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The four tables of the seed, one row per model result (``study.summarize`` output), with the
    statistics of docs/METHOD.md §5 added as columns: a 95% Wilson interval beside each refusal rate, the
    exact McNemar p of each condition against no intervention ("Base"), and table d's empirical p."""
    a = (["Model", "CNA # of Neurons", "Graph # of Neurons", "Refusal Rate - Base", "Base 95% CI",
          "Refusal Rate - CNA", "CNA 95% CI", "Refusal Rate - Graph", "Graph 95% CI", "CNA vs Base p",
          "Graph vs Base p"],
         [[r["model"], f"{r['cna_neurons']:,}", f"{r['graph_neurons']:,}",
           _pct(r["refusal"]["harmful/none"]), _ci(r, "harmful/none"),
           _pct(r["refusal"]["harmful/cna"]), _ci(r, "harmful/cna"),
           _pct(r["refusal"]["harmful/contrast_graph"]), _ci(r, "harmful/contrast_graph"),
           _mcnemar(r, "harmful/cna"), _mcnemar(r, "harmful/contrast_graph")] for r in rows])
    b = (["model", "instruct E", "base E", "shared E", "edge Jaccard", "base retention of instruct edges"],
         [[r["model"], f"{r['edges']['instruct']:,}", f"{r['edges']['base']:,}", f"{r['edges']['shared']:,}",
           f"{r['edges']['jaccard']:.3f}", _pct(r["edges"]["retention"], 1)] for r in rows])
    c = (["model", "no intervention", "no intervention 95% CI", "harmful/non-harmful contrast graph",
          "contrast graph 95% CI", "harmful-only graph", "harmful-only graph 95% CI", "contrast graph p",
          "harmful-only graph p"],
         [[r["model"], _pct(r["refusal"]["harmful/none"]), _ci(r, "harmful/none"),
           _pct(r["refusal"]["harmful/contrast_graph"]), _ci(r, "harmful/contrast_graph"),
           _pct(r["refusal"]["harmful/harmful_graph"]), _ci(r, "harmful/harmful_graph"),
           _mcnemar(r, "harmful/contrast_graph"), _mcnemar(r, "harmful/harmful_graph")] for r in rows])
    d_rows = []
    for r in rows:
        nl = r["nulls"]
        for x in nl["rows"]:
            d_rows.append([r["model"], f"{nl['graph_n']:,}", _pct(nl["graph_fraction_of_cna"]),
                           _pct(nl["graph_reduction"]), x["family"].replace("_", "-"), str(x["n"]),
                           _pct(x["mean_reduction"], 1), _pct(x["max_reduction"], 1),
                           f"{x['n_at_least_graph']}/{x['n']}", _p(x.get("empirical_p"))])
    d = (["model", "graph n", "graph/CNA", "graph refusal reduction", "null set", "n", "null mean", "null max",
          "nulls >= graph", "empirical p"], d_rows)
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
    ci = result.get("refusal_ci", {})

    def yerr(prompt_set):  # 95% Wilson intervals as error bars; none in results written before they existed
        keys = [f"{prompt_set}/{n}" for n in names]
        if not all(k in ci for k in keys):
            return None
        # clipped at 0: an interval bound can sit an ulp on the wrong side of a rate of exactly 0 or 1
        return np.maximum(0.0, [[rate[k] - ci[k][0] for k in keys], [ci[k][1] - rate[k] for k in keys]])

    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(x - 0.2, [rate[f"harmful/{n}"] for n in names], 0.4, yerr=yerr("harmful"), capsize=3,
           label="harmful (eval)", color="tab:red")
    if f"harmless/none" in rate:
        ax.bar(x + 0.2, [rate[f"harmless/{n}"] for n in names], 0.4, yerr=yerr("harmless"), capsize=3,
               label="harmless (eval)", color="tab:green")
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


def subset_rule(result: dict, adjacency: dict, largest_component: bool | None = None) -> str:
    """The sentence saying which rule made the graph subsets (``graph.largest_component``).

    ``largest_component`` True / False states the rule; None takes ``result["largest_component"]`` when
    present, else reads it off the results: the degree rule when the contrast and harmful-only subset
    sizes equal their graphs' degree >= 1 counts (when the largest component has the same size it is the
    same node set), else the largest component when its sizes match."""
    from cna_jax.graph import connected_subset

    if largest_component is None:
        largest_component = result.get("largest_component")
    if largest_component is None:
        sizes = {"contrast_instruct": result.get("graph_neurons"),
                 "harmful_instruct": result.get("harmful_graph_neurons")}

        def matches(largest: bool) -> bool:
            return all(k in adjacency and len(connected_subset(adjacency[k], largest)) == n
                       for k, n in sizes.items() if n is not None)

        largest_component = not matches(False) and matches(True)
    if largest_component:
        return ("Graph subsets are the nodes of the largest connected component of each stability graph "
                "(edge frequency >= threshold).")
    return "Graph subsets are the degree >= 1 nodes of the stability graphs (edge frequency >= threshold)."


def write(out: str, result: dict, adjacency: dict, pool, largest_component: bool | None = None) -> str:
    """Writes report.md, results.json, table CSVs and figures into ``out``; returns report.md's path.

    adjacency: graph kind -> [p, p] bool; pool: the CNA NeuronSet (graph nodes); largest_component:
    the ``graph.largest_component`` setting the subsets were made with (None: see :func:`subset_rule`)."""
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
            ["condition", "harmless refusal", "harmless 95% CI", "harmless p vs none", "harmless quality",
             "harmful quality"],
            [[n, _pct(rate[f"harmless/{n}"]), _ci(result, f"harmless/{n}"),
              "-" if n == "none" else _mcnemar(result, f"harmless/{n}"), f"{q[f'harmless/{n}']:.3f}",
              f"{q[f'harmful/{n}']:.3f}"]
             for n in ("none", "cna", "contrast_graph", "harmful_graph")]) + "\n")
    timings = "\n".join(f"| {k} | {v:.1f} s |" for k, v in result.get("timings", {}).items())
    md = f"""# Study report: {result['model']}

Refusal measured on {result['n_eval_harmful']} held-out harmful prompts with the `{result['detector']}`
detector. {subset_rule(result, adjacency, largest_component)}
Beside each rate, its 95% Wilson score interval; "p" columns: the exact two-sided McNemar test of that
condition against no intervention on the same prompts (paired flags); "empirical p" (table d):
(1 + nulls whose refusal reduction is >= the graph subset's) / (1 + number of nulls).

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
