"""The study of docs/METHOD.md §4 for one (base, instruct) model pair, as checkpointed stages.

Stages, each keyed by a hash of the config parts it depends on (``cna_jax.store``):
  cna            CNA neuron set on the instruct model (train prompts)
  acts-instruct  per-prompt activations of the CNA neurons, instruct model (paired train prompts)
  acts-base      the same neurons on the base model (raw prompts, as base models get)
  graph-*        stability graphs: contrast (instruct), harmful-only (instruct), contrast (base)
  generation     one engine job: every refusal condition on the held-out prompts and every layer-matched
                 and uniform null subset of the contrast-graph subset (rows appended as they finish)
A rerun skips finished stages; killing the generation job loses at most the rows in flight.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np

from cna_jax import cna as cna_lib
from cna_jax import config as config_lib
from cna_jax import data as data_lib
from cna_jax import graph as graph_lib
from cna_jax import stats as stats_lib
from cna_jax.collect import collect
from cna_jax.distributed import barrier, is_writer
from cna_jax.generate import GENERATE_LENGTH_MULTIPLE
from cna_jax.lm import LM, split_shared_prefix
from cna_jax.models.config import from_hf_dict
from cna_jax.neurons import NeuronSet
from cna_jax.refusal import refusal_report
from cna_jax.store import Stage, config_hash

log = logging.getLogger("cna_jax.study")

# Parts of the config that define *which* study a workdir holds; other fields may change between runs
# (changed stages are recomputed under a new key).
_IDENTITY = ("name", "model.base", "model.instruct", "data.harmful", "data.harmless", "data.eval_fraction",
             "data.seed")
GRAPHS = {"contrast_instruct": ("instruct", "contrast"), "harmful_instruct": ("instruct", "harmful_only"),
          "contrast_base": ("base", "contrast")}


def _get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c.to_dict() if hasattr(c, "to_dict") else c


@dataclasses.dataclass
class Prompts:
    train_harmful: list[str]
    train_harmless: list[str]
    eval_harmful: list[str]
    eval_harmless: list[str]


def prepare_prompts(c) -> Prompts:
    """Loads, splits and pairs the prompt sets (cheap; fails fast on empty or bad sources)."""
    d = c.data
    harmful = data_lib.load_prompts(d.harmful, kind="harmful")
    harmless = data_lib.load_prompts(d.harmless, kind="harmless")
    tr_h, ev_h = data_lib.split(harmful, d.eval_fraction, d.seed)
    tr_b, ev_b = data_lib.split(harmless, d.eval_fraction, d.seed)
    n_pairs = None if d.n_pairs == -1 else d.n_pairs
    tr_h, tr_b = data_lib.pair(tr_h, tr_b, d.seed, n_pairs)
    n_eval = None if d.n_eval == -1 else d.n_eval
    return Prompts(list(tr_h), list(tr_b), list(ev_h)[:n_eval], list(ev_b)[:n_eval])


def discover_kwargs(c) -> dict:
    """``cna.discover`` settings from a study config's ``cna`` and ``collect`` sections."""
    n = c.cna
    return dict(k=n.k, fraction=n.fraction, exclude_layers=tuple(n.exclude_layers), positive_only=n.positive_only,
                drop_universal=n.drop_universal, position=n.position, last_k=n.last_k,
                batch_size=c.collect.batch_size)


def null_subsets(pool: NeuronSet, subset_idx: np.ndarray, n: int, family: str, seed: int):
    """Null subsets of the CNA pool, the size of the graph subset.

    family "layer_matched": the same count per layer as the subset; "uniform": any layers.
    Draws are disjoint from the subset when it is at most half the pool (and, layer-matched, when the
    layer has room); otherwise they come from the whole pool with overlap allowed. Returns a list of
    (indices into the pool, overlap_allowed)."""
    size = len(subset_idx)
    all_idx = np.arange(len(pool))
    outside = np.setdiff1d(all_idx, subset_idx)
    disjoint = size <= len(pool) / 2
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 0 if family == "layer_matched" else 1, i])
        if family == "uniform":
            source = outside if disjoint else all_idx
            out.append((np.sort(rng.choice(source, size, replace=False)), not disjoint))
            continue
        picks, overlap = [], not disjoint
        for layer, count in zip(*np.unique(pool.layers[subset_idx], return_counts=True)):
            in_layer = all_idx[pool.layers == layer]
            room = np.setdiff1d(in_layer, subset_idx)
            source = room if disjoint and len(room) >= count else in_layer
            overlap |= source is in_layer
            picks.append(rng.choice(source, count, replace=False))
        out.append((np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64), bool(overlap)))
    return out


class Study:
    """Runs (or resumes) the study for one config in ``workdir``."""

    def __init__(self, c, workdir: str, progress: bool = True, on_stage: Callable[[str], None] | None = None):
        config_lib.validate(c)
        self.c, self.workdir, self.progress = c, workdir, progress
        self.on_stage = on_stage or (lambda name: None)  # test hook: called before each stage runs
        self._lms: dict[str, LM] = {}
        self._check_workdir()
        self.prompts = prepare_prompts(c)
        if len(self.prompts.train_harmful) < 4:
            raise ValueError(f"only {len(self.prompts.train_harmful)} train pairs: too few for CNA and graphs")
        self.cache_dir = os.path.join(workdir, "cache")
        self.report_dir = os.path.join(workdir, "report")
        if is_writer():  # multi-process: process 0 writes every file, the others only read
            os.makedirs(self.report_dir, exist_ok=True)
        self.timings: dict[str, float] = {}

    # -- bookkeeping --------------------------------------------------------------------------------
    def _check_workdir(self):
        path = os.path.join(self.workdir, "config.json")
        mine = {k: _get(self.c, k) for k in _IDENTITY}
        if os.path.exists(path):  # every process checks before process 0 rewrites it (barrier below)
            with open(path) as f:
                theirs = json.load(f).get("identity", {})
            diff = sorted(k for k in _IDENTITY if json.dumps(theirs.get(k), sort_keys=True, default=str)
                          != json.dumps(mine[k], sort_keys=True, default=str))
            if diff:
                raise ValueError(f"workdir {self.workdir} holds a study of a different config (differs in "
                                 f"{diff}); use another --workdir")
        barrier("study-workdir-checked")
        if is_writer():
            os.makedirs(self.workdir, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump({"identity": mine, "config": json.loads(self.c.to_json_best_effort())}, f, indent=2)
            os.replace(path + ".tmp", path)

    def lm(self, side: str) -> LM:
        if side not in self._lms:
            from cna_jax import checkpoint

            m = self.c.model
            chat = side == "instruct" or bool(m.base_chat)
            lm = LM.load(m[side], dtype=getattr(jnp, m.dtype), chat=chat,
                         mesh_config=config_lib.mesh_settings(self.c), progress=self.progress,
                         cache_dir=checkpoint.cache_dir_from_config(m.get("convert_cache", ""), self.workdir))
            diff = lm.cfg.shape_mismatches(from_hf_dict(m.shape.to_dict()))
            if diff:
                raise ValueError(f"{m[side]} does not match config.model.shape: {'; '.join(diff)}")
            self._lms[side] = lm
        return self._lms[side]

    def _run_stage(self, name: str, key_parts: tuple, fn):
        stage = Stage(self.workdir, name, config_hash(*key_parts))
        if stage.done:
            self.timings[name] = stage.seconds()  # when it was computed
            log.info("stage %s: reused (%s)", name, stage.path)
            return stage
        self.on_stage(name)
        t = time.time()
        arrays, meta = fn(stage)
        stage.save(arrays, meta, seconds=time.time() - t)
        self.timings[name] = time.time() - t
        log.info("stage %s: done in %.1fs", name, time.time() - t)
        return stage

    # -- stages ---------------------------------------------------------------------------------------
    def _key_cna(self):
        c, d = self.c, self.c.data
        train_data = (d.harmful, d.harmless, d.eval_fraction, d.seed, d.n_pairs)  # not n_eval
        return (c.model.instruct, c.model.dtype, c.model.base_chat, train_data, c.cna)

    def stage_cna(self) -> NeuronSet:
        c = self.c

        def run(stage):
            ns, delta = cna_lib.discover(self.lm("instruct"), self.prompts.train_harmful, self.prompts.train_harmless,
                                         cache_dir=self.cache_dir, progress=self.progress, **discover_kwargs(c))
            arrays = {"delta": delta.astype(np.float32), "layers": ns.layers, "indices": ns.indices, "deltas": ns.deltas}
            return arrays, {"num_layers": ns.num_layers, "intermediate_size": ns.intermediate_size,
                            "report": ns.report(), "meta": ns.meta}

        stage = self._run_stage("cna", self._key_cna(), run)
        arrays, meta = stage.load()
        ns = NeuronSet(arrays["layers"].astype(np.int64), arrays["indices"].astype(np.int64),
                       arrays["deltas"].astype(np.float32), meta["num_layers"], meta["intermediate_size"], meta["meta"])
        if is_writer():
            ns.save(os.path.join(self.report_dir, "neuron_set.json"))
        self.delta = arrays["delta"]
        return ns

    def _key_acts(self, side: str):
        return (self._key_cna(), self.c.model[side], self.c.collect)

    def stage_acts(self, side: str, pool: NeuronSet) -> dict[str, np.ndarray]:
        c = self.c

        def run(stage):
            lm = self.lm(side)
            kw = dict(nodes=pool, position="last", batch_size=c.collect.batch_size, cache_dir=self.cache_dir,
                      progress=self.progress)
            h = collect(lm, self.prompts.train_harmful, desc=f"{side}: harmful", **kw).node_acts
            b = collect(lm, self.prompts.train_harmless, desc=f"{side}: harmless", **kw).node_acts
            return {"harmful": h, "harmless": b}, {"side": side, "n_pairs": len(h)}

        stage = self._run_stage(f"acts-{side}", self._key_acts(side), run)
        return stage.load()[0]

    def stage_graph(self, kind: str, acts: dict[str, np.ndarray], pool: NeuronSet, acts_key) -> graph_lib.StabilityResult:
        side, mode = GRAPHS[kind]
        settings = graph_lib.GraphSettings.from_config(self.c.graph)

        def run(stage):
            if mode == "contrast":  # rows were paired by data.pair already
                x = graph_lib.contrast_rows(acts["harmful"], acts["harmless"], pairing="index")
            else:
                x = graph_lib.data_matrix(acts["harmful"], mode="harmful_only")
            res = graph_lib.stability_graph(x, settings, nodes=np.stack([pool.layers, pool.indices], 1),
                                            meta={"kind": kind})
            arrays = {"frequency": res.frequency, "null_frequency": res.null_frequency,
                      "edge_counts": res.edge_counts, "null_edge_counts": res.null_edge_counts}
            return arrays, {"threshold": res.threshold, "n_rows": res.n_rows, "max_gap": res.max_gap,
                            "settings": res.settings, "summary": res.summary()}

        stage = self._run_stage(f"graph-{kind}", (acts_key, self.c.graph, kind), run)
        arrays, meta = stage.load()
        res = graph_lib.StabilityResult(arrays["frequency"], arrays["null_frequency"], meta["threshold"],
                                        arrays["edge_counts"], arrays["null_edge_counts"],
                                        np.stack([pool.layers, pool.indices], 1), meta["n_rows"], meta["max_gap"],
                                        meta["settings"], {"kind": kind})
        if is_writer():
            graph_lib.write_json(os.path.join(self.report_dir, f"graph_{kind}.json"), res.adjacency, res.nodes,
                                 res.frequency)
            graph_lib.write_graphml(os.path.join(self.report_dir, f"graph_{kind}.graphml"), res.adjacency,
                                    res.nodes, res.frequency)
        return res

    def _job_items(self, pool: NeuronSet, conditions: dict[str, NeuronSet | None], nulls: list[tuple]
                   ) -> list[tuple]:
        """(item name, prompts, neuron set, result key) for every (condition, prompt set) of the job."""
        p, items = self.prompts, []
        for name, neurons in conditions.items():
            items.append((f"harmful-{name}", p.eval_harmful, neurons, f"harmful/{name}"))
            if self.c.generation.harmless_eval:
                items.append((f"harmless-{name}", p.eval_harmless, neurons, f"harmless/{name}"))
        for family, i, idx, _ in nulls:
            items.append((f"null-{family}-{i:03d}", p.eval_harmful, pool.subset(idx), None))
        return items

    def stage_generation(self, pool: NeuronSet, conditions: dict[str, NeuronSet | None], nulls: list[tuple], key
                         ) -> tuple[dict[str, dict], list[dict]]:
        """Every held-out generation of the study as one engine job (docs/METHOD.md §4).

        Rows are (prompt, condition): the refusal conditions on the held-out harmful (and harmless)
        prompts and every null subset on the harmful ones. Rows finish in any order; each finished row
        is appended to ``rows.jsonl`` in the stage directory, so a killed run loses only the rows in
        flight and a rerun generates the rest. nulls: (family, i, indices into the pool, overlap_allowed).
        Returns (refusal: result key -> item summary, nulls: one dict per null subset)."""
        from cna_jax import engine

        g = self.c.generation
        items = self._job_items(pool, conditions, nulls)

        def run(stage):
            lm = self.lm("instruct")
            done = stage.read_rows("rows.jsonl")  # {(item, i): tokens} of an interrupted run
            cond_of, conds = {}, []  # one engine condition per distinct neuron set (None: no intervention)
            for _, _, n, _ in items:
                if id(n) not in cond_of:
                    cond_of[id(n)] = len(conds)
                    conds.append(engine.Condition(None if n is None else n.multiplier(g.multiplier)))
            ids = {}
            for _, prompts, _, _ in items:
                if id(prompts) not in ids:
                    ids[id(prompts)] = lm.encode(prompts)
            every = [x for v in ids.values() for x in v]
            prefix, _, q = split_shared_prefix(every)
            todo, where = [], []
            for item, prompts, neurons, _ in items:
                for i, tok in enumerate(ids[id(prompts)]):
                    if (item, i) not in done:
                        todo.append((tok[q:], cond_of[id(neurons)]))
                        where.append((item, i))
            log.info("generation: %d rows (%d done before), %d conditions", len(todo) + len(done), len(done),
                     len(conds))

            def finished(r, tokens):
                done[where[r]] = tokens
                stage.append_row("rows.jsonl", {"item": where[r][0], "i": where[r][1], "tokens": tokens})

            engine.run(lm, todo, conds, max_new_tokens=g.max_new_tokens, slots=g.batch_size,
                       prefix=None if prefix is None else np.asarray(prefix).tolist(), on_finish=finished,
                       progress=self.progress, desc="generation job", length_multiple=GENERATE_LENGTH_MULTIPLE)
            refusal, null_rows, rates = {}, [], {}
            for item, prompts, neurons, result_key in items:
                texts = [lm.decode(done[(item, i)]) for i in range(len(prompts))]
                rep = refusal_report(texts, detector=g.detector, prompts=prompts)
                out = {"item": item, "rate": rep.rate, "n": rep.n, "mean_quality": rep.mean_quality,
                       "n_neurons": 0 if neurons is None else len(neurons), "flags": rep.flags,
                       "quality": rep.quality, "generations": texts}
                stage.save_item(item, out)
                rates[item] = rep.rate
                if result_key is not None:
                    refusal[result_key] = {k: out[k] for k in ("rate", "n", "mean_quality", "n_neurons", "flags")}
            for (family, i, idx, overlap), (item, *_rest) in zip(nulls, items[len(items) - len(nulls):]):
                null_rows.append({"family": family, "i": i, "rate": rates[item], "size": len(idx),
                                  "overlap_allowed": overlap, "pool_indices": idx.tolist()})
            return None, {"conditions": refusal, "nulls": null_rows}

        stage = self._run_stage("generation", key, run)
        meta = stage.load()[1]
        return meta["conditions"], meta["nulls"]

    # -- the whole study ------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.time()
        c = self.c
        pool = self.stage_cna()
        acts = {side: self.stage_acts(side, pool) for side in ("instruct", "base")}
        graphs = {}
        for kind, (side, _) in GRAPHS.items():
            graphs[kind] = self.stage_graph(kind, acts[side], pool, self._key_acts(side))
        largest = bool(c.graph.largest_component)
        subsets = {k: graph_lib.connected_subset(graphs[k].adjacency, largest) for k in ("contrast_instruct",
                                                                                        "harmful_instruct")}
        conditions = {"none": None, "cna": pool, "contrast_graph": pool.subset(subsets["contrast_instruct"]),
                      "harmful_graph": pool.subset(subsets["harmful_instruct"])}
        graph_key = tuple(config_hash(g.frequency) for g in graphs.values())
        refusal_key = (self._key_cna(), c.generation, graph_key, c.graph.largest_component)
        nc = c.nulls
        null_sets = [(family, i, idx, overlap)
                     for family, n in (("layer_matched", nc.n_layer_matched), ("uniform", nc.n_uniform))
                     for i, (idx, overlap) in enumerate(null_subsets(pool, subsets["contrast_instruct"], n, family,
                                                                     nc.seed))]
        refusal, nulls = self.stage_generation(pool, conditions, null_sets, (refusal_key, c.nulls))
        results = summarize(c, pool, graphs, subsets, refusal, nulls)
        results["timings"] = {**self.timings, "this run": time.time() - t0}
        from cna_jax import report

        if is_writer():
            report.write(self.report_dir, results, {k: g.adjacency for k, g in graphs.items()}, pool)
        barrier("study-report")  # the other processes may read the report next
        return results


def refusal_statistics(refusal: dict[str, dict]) -> dict:
    """Wilson intervals and paired McNemar p-values of the refusal stage's conditions (docs/METHOD.md §5).

    refusal: "harmful/<name>" / "harmless/<name>" -> {"rate", "n", "flags" (list[bool], per prompt), ...}.
    Returns {"count", "n", "ci"}, each keyed like ``refusal`` (ci: [low, high], 95% Wilson), and
    "mcnemar_p": for every condition but "none", the exact two-sided McNemar p against "<set>/none" on
    the same prompts; None where flags were not stored (a refusal stage written before they were).
    """
    count, n, ci, p = {}, {}, {}, {}
    for key, v in refusal.items():
        # rate = count / n exactly, so rounding rate * n recovers the count when flags are absent.
        count[key] = int(sum(v["flags"])) if "flags" in v else int(round(v["rate"] * v["n"]))
        n[key] = int(v["n"])
        ci[key] = list(stats_lib.wilson_interval(count[key], n[key]))
    for key, v in refusal.items():
        prompt_set, name = key.split("/", 1)
        none = refusal.get(f"{prompt_set}/none")
        if name == "none" or none is None:
            continue
        paired = "flags" in v and "flags" in none
        p[key] = stats_lib.mcnemar_exact(none["flags"], v["flags"]) if paired else None
    return {"count": count, "n": n, "ci": ci, "mcnemar_p": p}


def summarize(c, pool, graphs, subsets, refusal, nulls) -> dict:
    """Every number of the four tables, computed from the stage results."""
    gi, gb, gh = graphs["contrast_instruct"], graphs["contrast_base"], graphs["harmful_instruct"]
    ei, eb = gi.adjacency, gb.adjacency
    rate = {k: v["rate"] for k, v in refusal.items()}
    none = rate["harmful/none"]
    graph_red = none - rate["harmful/contrast_graph"]
    null_rows = []
    for family in ("layer_matched", "uniform"):
        reds = np.array([none - x["rate"] for x in nulls if x["family"] == family])
        null_rows.append({
            "family": family, "n": int(len(reds)),
            "mean_reduction": float(reds.mean()) if len(reds) else float("nan"),
            "max_reduction": float(reds.max()) if len(reds) else float("nan"),
            "n_at_least_graph": int((reds >= graph_red - stats_lib.TIE_TOLERANCE).sum()),
            "empirical_p": stats_lib.empirical_p(reds, graph_red),
            "overlap_allowed": bool(any(x["overlap_allowed"] for x in nulls if x["family"] == family)),
        })
    n_sub = len(subsets["contrast_instruct"])
    st = refusal_statistics(refusal)
    return {
        "model": c.name,
        "cna_neurons": len(pool),
        "graph_neurons": n_sub,
        "harmful_graph_neurons": len(subsets["harmful_instruct"]),
        "refusal": rate,
        "refusal_count": st["count"],
        "refusal_n": st["n"],
        "refusal_ci": st["ci"],  # 95% Wilson [low, high]
        "mcnemar_p": st["mcnemar_p"],  # each condition vs none on the same prompts (exact, two-sided)
        "quality": {k: v["mean_quality"] for k, v in refusal.items()},
        "n_eval_harmful": refusal["harmful/none"]["n"],
        "edges": {"instruct": graph_lib.n_edges(ei), "base": graph_lib.n_edges(eb),
                  "shared": graph_lib.n_edges(ei & eb), "harmful_instruct": graph_lib.n_edges(gh.adjacency),
                  "jaccard": graph_lib.edge_jaccard(ei, eb) if (ei | eb).any() else 0.0,
                  "retention": graph_lib.retention(eb, ei)},
        "null_edges": {k: graph_lib.n_edges(g.null_adjacency) for k, g in graphs.items()},
        "graph_summaries": {k: g.summary() for k, g in graphs.items()},
        "nulls": {"graph_n": n_sub, "graph_fraction_of_cna": n_sub / max(len(pool), 1),
                  "graph_reduction": graph_red, "rows": null_rows},
        "detector": c.generation.detector,
        "null_items": [{k: x[k] for k in ("family", "i", "rate", "size", "overlap_allowed")} for x in nulls],
    }


def run_many(configs, workdir: str, progress: bool = True) -> tuple[list[dict], str]:
    """Runs (or resumes) the study for each ``(name, config)`` in ``<workdir>/<name>`` and writes one
    combined report with a row per model to ``<workdir>/combined``. Every config is validated first."""
    from cna_jax import report

    for _, c in configs:
        config_lib.validate(c)
    results = [Study(c, os.path.join(workdir, name), progress=progress).run() for name, c in configs]
    combined = os.path.join(workdir, "combined")
    path = report.write_combined(combined, results) if is_writer() else os.path.join(combined, "report.md")
    barrier("study-combined-report")
    return results, path
