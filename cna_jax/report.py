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
    statistics of docs/METHOD.md §5.4 added as columns: a 95% Wilson interval beside each refusal rate, the
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
    out = {"a_refusal": a, "b_edges": b, "c_harmful_only": c, "d_nulls": d}
    if any(r.get("damage") is not None or "harmful/direction_ablation" in r["refusal"] for r in rows):
        out["e_baselines"] = baselines_table(rows)
    if any(r.get("sweeps") for r in rows):
        out["f_sweeps"] = sweeps_table(rows)
    return out


BASELINES = {"none": "no intervention", "cna": "CNA set", "contrast_graph": "contrast graph",
             "harmful_graph": "harmful-only graph", "direction_ablation": "directional ablation",
             "act_add": "activation addition"}


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def baselines_table(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Every condition of the generation job beside the others (docs/METHOD.md §5): refusal on held-out
    harmful and harmless prompts with 95% Wilson intervals, quality, the two KLs on harmless prompts and
    the McNemar p against no intervention."""
    header = ["model", "condition", "neurons", "refusal", "refusal 95% CI", "p vs none", "harmless refusal",
              "harmless 95% CI", "harmful quality", "harmless quality", "KL_first", "KL_seq"]
    body = []
    for r in rows:
        rate, q, kl = r["refusal"], r["quality"], r.get("damage") or {}
        for name, label in BASELINES.items():
            if f"harmful/{name}" not in rate:
                continue
            neurons = {"none": 0, "cna": r["cna_neurons"], "contrast_graph": r["graph_neurons"],
                       "harmful_graph": r["harmful_graph_neurons"]}.get(name, 0)
            body.append([r["model"], label, f"{neurons:,}" if neurons else "-", _pct(rate[f"harmful/{name}"]),
                         _ci(r, f"harmful/{name}"), "-" if name == "none" else _mcnemar(r, f"harmful/{name}"),
                         _pct(rate.get(f"harmless/{name}")), _ci(r, f"harmless/{name}"),
                         _num(q.get(f"harmful/{name}")), _num(q.get(f"harmless/{name}")),
                         _num(kl.get(name, {}).get("kl_first"), 4), _num(kl.get(name, {}).get("kl_seq"), 4)])
    return header, body


SWEEP_LABELS = {"k_percent": "CNA k (% of neurons)", "multiplier": "multiplier m", "alpha_scale": "alpha / default"}


def _interval(ci) -> str:
    return "n/a" if ci is None else f"{100 * ci[0]:.0f}-{100 * ci[1]:.0f}%"


def sweeps_table(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per sweep point: refusal (harmful, harmless) with intervals and McNemar p against no
    intervention, harmless quality and the KLs; "same as" names a main condition it equals."""
    header = ["model", "sweep", "value", "neurons", "refusal", "refusal 95% CI", "p vs none", "harmless refusal",
              "harmless 95% CI", "harmless quality", "KL_first", "KL_seq", "same as"]
    body = []
    for r in rows:
        for x in r.get("sweeps") or []:
            h, b = x.get("harmful", {}), x.get("harmless", {})
            body.append([r["model"], SWEEP_LABELS[x["sweep"]], f"{x['value']:g}",
                         f"{x['n_neurons']:,}" if x["n_neurons"] else "-", _pct(h.get("rate")), _interval(h.get("ci")),
                         _p(h.get("mcnemar_p")), _pct(b.get("rate")), _interval(b.get("ci")),
                         _num(b.get("mean_quality")), _num(x.get("kl_first"), 4), _num(x.get("kl_seq"), 4),
                         BASELINES.get(x["same_as"], "-") if x["same_as"] else "-"])
    return header, body


def plot_sweeps(path: str, result: dict) -> None:
    """Refusal (harmful, harmless; 95% Wilson bands) and KL against each sweep's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [k for k in SWEEP_LABELS if any(x["sweep"] == k for x in result["sweeps"])]
    fig, axes = plt.subplots(2, len(sweeps), figsize=(4.2 * len(sweeps), 6), squeeze=False)
    none = result["refusal"]
    for j, name in enumerate(sweeps):
        pts = sorted((x for x in result["sweeps"] if x["sweep"] == name), key=lambda x: x["value"])
        v = [x["value"] for x in pts]
        ax = axes[0, j]
        for ps, color in (("harmful", "tab:red"), ("harmless", "tab:green")):
            if not all(ps in x for x in pts):
                continue
            ax.plot(v, [x[ps]["rate"] for x in pts], "o-", color=color, label=ps)
            ax.fill_between(v, [x[ps]["ci"][0] for x in pts], [x[ps]["ci"][1] for x in pts], color=color, alpha=0.2)
            if f"{ps}/none" in none:
                ax.axhline(none[f"{ps}/none"], color=color, ls=":", lw=1)
        ax.set_ylim(0, 1)
        ax.set_title(SWEEP_LABELS[name])
        if j == 0:
            ax.set_ylabel("refusal rate (dotted: none)")
            ax.legend(fontsize=8)
        ax = axes[1, j]
        for key, style in (("kl_first", "s-"), ("kl_seq", "^-")):
            if all(x.get(key) is not None for x in pts):
                ax.plot(v, [x[key] for x in pts], style, label=key)
        ax.set_xlabel(SWEEP_LABELS[name])
        if j == 0:
            ax.set_ylabel("KL on harmless prompts (nats)")
            ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: sweeps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _write_tables(out_dir: str, rows: Sequence[dict]) -> str:
    titles = {"a_refusal": "Graph-connected neurons and refusal (held-out harmful prompts)",
              "b_edges": "Base vs instruct graphs on the instruct CNA neuron set",
              "c_harmful_only": "Contrast graph vs harmful-only graph (refusal rate)",
              "d_nulls": "Graph subset vs random subsets of the CNA pool (refusal reduction)",
              "e_baselines": "Every condition beside the standard baselines (refusal, quality, damage)",
              "f_sweeps": "Sweeps: CNA set size, multiplier and activation-addition alpha"}
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

    rate = result["refusal"]
    names = [n for n in BASELINES if f"harmful/{n}" in rate]
    labels = [BASELINES[n].replace(" ", "\n", 1) for n in names]
    ci = result.get("refusal_ci", {})

    def yerr(prompt_set):  # 95% Wilson intervals as error bars; none in results written before they existed
        keys = [f"{prompt_set}/{n}" for n in names]
        if not all(k in ci for k in keys):
            return None
        # clipped at 0: an interval bound can sit an ulp on the wrong side of a rate of exactly 0 or 1
        return np.maximum(0.0, [[rate[k] - ci[k][0] for k in keys], [ci[k][1] - rate[k] for k in keys]])

    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.8))
    ax.bar(x - 0.2, [rate[f"harmful/{n}"] for n in names], 0.4, yerr=yerr("harmful"), capsize=3,
           label="harmful (eval)", color="tab:red")
    if "harmless/none" in rate:
        ax.bar(x + 0.2, [rate[f"harmless/{n}"] for n in names], 0.4, yerr=yerr("harmless"), capsize=3,
               label="harmless (eval)", color="tab:green")
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"refusal rate ({result['detector']} detector)")
    ax.legend()
    ax.set_title(f"{result['model']}: refusal under each intervention")
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


def direction_note(result: dict) -> str:
    """The paragraph saying how the residual-direction baselines and the damage columns were made."""
    d = result.get("direction")
    if not d:
        return ""
    how = (f"selected among layers {min(map(int, d['rates']))}-{max(map(int, d['rates']))} as the one whose "
           f"directional ablation refuses least on {d['n_selection']} held-out *training* harmful prompts "
           f"(refusal {_pct(d['rates'][str(d['layer'])])} there)") if d.get("selected") else "set in the config"
    return (f"\nBaselines: the refusal direction is the difference of mean residual streams (harmful minus "
            f"harmless, last prompt token, {d['n_fit']} training pairs) entering layer {d['layer']} ({how}). "
            f"Directional ablation projects it out everywhere; activation addition adds alpha = {d['alpha']:.3g} "
            f"times it at layer {d['layer']} (mean projections: harmful {d['harmful_projection']:.3g}, harmless "
            f"{d['harmless_projection']:.3g}). KL_first / KL_seq: KL(unmodified || condition) in nats on the "
            "held-out harmless prompts, at the first generated position / averaged along the unmodified "
            "model's own greedy continuation.\n")


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
    if result.get("sweeps"):
        plot_sweeps(os.path.join(out, "sweeps.png"), result)
    q = result["quality"]
    rate = result["refusal"]
    cost = ""
    if "harmless/none" in rate and "e_baselines" not in tables([result]):
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
{direction_note(result)}
{_write_tables(out, [result])}{cost}
### Null edges (matched-null pipeline, same threshold)

{markdown_table(["graph", "edges", "null edges"], [[k, str(result['graph_summaries'][k]['edges']), str(v)] for k, v in result['null_edges'].items()])}

### Figures

![graphs](graphs.png)

![refusal](refusal.png)

{'![nulls](nulls.png)' if nulls else ''}

{'![sweeps](sweeps.png)' if result.get('sweeps') else ''}

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
