"""The study of docs/METHOD.md §4 for one (base, instruct) model pair, as checkpointed stages.

Stages, each keyed by a hash of the config parts it depends on (``cna_jax.store``):
  cna            CNA neuron set on the instruct model (train prompts)
  acts-instruct  per-prompt activations of the CNA neurons, instruct model (paired train prompts)
  acts-base      the same neurons on the base model (raw prompts, as base models get; every neuron is
                 collected and the CNA neurons sliced out, so it reuses the cna stage's compiled programs)
  graph-*        stability graphs: contrast (instruct), harmful-only (instruct), contrast (base)
  direction      the refusal direction of the residual stream and its layer (training prompts only; the
                 last-token residuals were kept by the cna stage's collection of the same prompts)
  generation     one engine job: every condition (none, CNA, both graph subsets, directional ablation,
                 activation addition) on the held-out prompts and every layer-matched and uniform null
                 subset of the contrast-graph subset (rows appended as they finish)
  damage         KL_first / KL_seq of every condition and every new sweep point on the held-out harmless
                 prompts (one pass: the unmodified model's reference is computed once)
  sweeps         one engine job over CNA set size, multiplier and alpha (their KLs from the damage stage)
A rerun skips finished stages; killing an engine job loses at most the rows in flight.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from cna_jax import cna as cna_lib
from cna_jax import config as config_lib
from cna_jax import damage
from cna_jax import data as data_lib
from cna_jax import direction as direction_lib
from cna_jax import engine
from cna_jax import graph as graph_lib
from cna_jax import stats as stats_lib
from cna_jax.collect import collect
from cna_jax.distributed import barrier, is_writer
from cna_jax.batching import split_shared_prefix
from cna_jax.lm import LM
from cna_jax.models.config import from_hf_dict
from cna_jax.neurons import NeuronSet
from cna_jax.refusal import refusal_report, settled_stop
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


def direction_split(n: int, selection_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(selection, fit): a seeded split of the n training pairs (the same rows on both sides), the
    direction's layer chosen on the first, its means taken over the second (docs/METHOD.md §5.1)."""
    order = np.random.default_rng(seed).permutation(n)
    n_sel = min(max(1, round(selection_fraction * n)), n - 1)
    return sorted(order[:n_sel].tolist()), sorted(order[n_sel:].tolist())


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
            from cna_jax import checkpoint, testbed

            m = self.c.model
            chat = side == "instruct" or bool(m.base_chat)
            lm = testbed.load(m[side], dtype=getattr(jnp, m.dtype), chat=chat,
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
                                         cache_dir=self.cache_dir, progress=self.progress,
                                         residuals=self._shares_residuals(), **discover_kwargs(c))
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

    def _shares_residuals(self) -> bool:
        """Whether the cna stage's collection keeps the last-token residual stream in the study's cache, so
        that the direction stage's means come from it instead of another pass over the same prompts."""
        return bool(self.c.direction.enabled and self.c.cna.position == "last")

    def _key_acts(self, side: str):
        return (self._key_cna(), self.c.model[side], self.c.collect)

    def stage_acts(self, side: str, pool: NeuronSet) -> dict[str, np.ndarray]:
        c = self.c

        def run(stage):
            lm = self.lm(side)
            # residuals as in the cna stage: the same compiled programs (the base side's residuals go unused)
            kw = dict(position="last", batch_size=c.collect.batch_size, cache_dir=self.cache_dir,
                      progress=self.progress, residuals=self._shares_residuals())
            harmful, harmless = self.prompts.train_harmful, self.prompts.train_harmless
            # Every neuron where the cna stage collected every neuron (discover's rule, both sets at once):
            # the same compiled programs (this side compiles nothing new), kept in the cache; the pool's
            # columns are then sliced from it.
            dense = cna_lib.keeps_dense(lm, max(len(harmful), len(harmless)), self.cache_dir, c.cna.position)

            def node_acts(prompts, desc):
                if dense:
                    collect(lm, prompts, nodes="all", desc=desc, **kw)
                return collect(lm, prompts, nodes=pool, desc=desc, **kw).node_acts

            h = node_acts(harmful, f"{side}: harmful")
            b = node_acts(harmless, f"{side}: harmless")
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

    def _engine_job(self, stage, lm, items: list[tuple], conds: list, desc: str, full: tuple = (),
                    flag_only: Callable[[str], bool] = lambda item: False, table_rows: int = 0) -> dict:
        """Runs (or resumes) one engine job and returns {(item, i): tokens} for every row.

        items: (item name, prompts, index into conds); conds: engine Conditions. Each finished row is
        appended to ``rows.jsonl`` in the stage directory, so a killed run loses only the rows in flight
        and a rerun generates the rest. With ``generation.stop_when_scored`` a row stops once its
        refusal flag and quality can no longer change (``refusal.settled_rule``), or only its flag for
        the items where ``flag_only(item)`` (nobody reads their quality), except the rows of the items
        in ``full``, which run to EOS or ``max_new_tokens``. table_rows: the engine's ``min_table_rows``
        (jobs passing the same value share compiled programs)."""
        g = self.c.generation
        byte_level = lm.byte_level_decode
        scored = settled_stop(g.detector, lm.decode, byte_level=byte_level) if g.stop_when_scored else None
        flagged = settled_stop(g.detector, lm.decode, False, byte_level) if g.stop_when_scored else None
        done = stage.read_rows("rows.jsonl")  # {(item, i): tokens} of an interrupted run
        ids = {}
        for _, prompts, _ in items:
            if id(prompts) not in ids:
                ids[id(prompts)] = lm.encode(prompts)
        prefix, _, q = split_shared_prefix([x for v in ids.values() for x in v])
        todo, where = [], []
        for item, prompts, c in items:
            for i, tok in enumerate(ids[id(prompts)]):
                if (item, i) not in done:
                    todo.append((tok[q:], c))
                    where.append((item, i))
        log.info("%s: %d rows (%d done before), %d conditions", desc, len(todo) + len(done), len(done), len(conds))

        def finished(r, tokens):
            done[where[r]] = tokens
            stage.append_row("rows.jsonl", {"item": where[r][0], "i": where[r][1], "tokens": tokens})

        def settled(r, tokens):
            item = where[r][0]
            return item not in full and (flagged if flag_only(item) else scored)(tokens)

        engine.run(lm, todo, conds, max_new_tokens=g.max_new_tokens, slots=g.batch_size,
                   prefix=None if prefix is None else np.asarray(prefix).tolist(), on_finish=finished,
                   progress=self.progress, desc=desc, length_multiple=engine.JOB_LENGTH_MULTIPLE,
                   stop=None if scored is None else settled, min_table_rows=table_rows)
        return done

    def _score(self, stage, lm, item: str, prompts: list[str], done: dict, n_neurons: int) -> dict:
        """Decodes and scores one item's rows, saves the item (texts, flags, tokens) and returns it."""
        g = self.c.generation
        tokens = [done[(item, i)] for i in range(len(prompts))]
        texts = [lm.decode(t) for t in tokens]
        rep = refusal_report(texts, detector=g.detector, prompts=prompts)
        out = {"item": item, "rate": rep.rate, "n": rep.n, "mean_quality": rep.mean_quality, "n_neurons": n_neurons,
               "flags": rep.flags, "quality": rep.quality, "generations": texts, "tokens": tokens}
        stage.save_item(item, out)
        return out

    def _prompt_sets(self) -> dict[str, list[str]]:
        p = self.prompts
        return {"harmful": p.eval_harmful, **({"harmless": p.eval_harmless} if self.c.generation.harmless_eval else {})}

    def stage_generation(self, conditions: dict[str, tuple], nulls: list[tuple], key, table_rows: int = 0
                         ) -> tuple[dict[str, dict], list[dict], list | None]:
        """Every held-out generation of the study as one engine job (docs/METHOD.md §4.2).

        Rows are (prompt, condition): the refusal conditions on the held-out harmful (and harmless)
        prompts and every null subset on the harmful ones; rows finish in any order and are appended to
        disk as they do. conditions: name -> (engine.Condition, number of neurons it touches);
        nulls: (family, i, engine.Condition, size, overlap_allowed, indices into the pool).
        Returns (refusal: "<prompt set>/<name>" -> item summary, nulls: one dict per null subset,
        the unmodified model's harmless token lists or None). table_rows: as for :meth:`_engine_job`."""
        sets = self._prompt_sets()
        conds = [cond for cond, _ in conditions.values()] + [n[2] for n in nulls]
        items = [(f"{ps}-{name}", sets[ps], k, name, ps) for k, name in enumerate(conditions) for ps in sets]
        items += [(f"null-{family}-{i:03d}", sets["harmful"], len(conditions) + j, None, "harmful")
                  for j, (family, i, *_rest) in enumerate(nulls)]

        def run(stage):
            lm = self.lm("instruct")
            # The unmodified model's harmless continuations run in full: the damage stage scores KL along them.
            # Only the nulls' refusal rates are read, so a null row stops as soon as its flag is settled.
            done = self._engine_job(stage, lm, [x[:3] for x in items], conds, "generation job", full=("harmless-none",),
                                    flag_only=lambda item: item.startswith("null-"), table_rows=table_rows)
            refusal, rates = {}, {}
            for item, prompts, k, name, ps in items:
                n_neurons = conditions[name][1] if name is not None else nulls[k - len(conditions)][3]
                out = self._score(stage, lm, item, prompts, done, n_neurons)
                rates[item] = out["rate"]
                if name is not None:
                    refusal[f"{ps}/{name}"] = {k2: out[k2] for k2 in ("rate", "n", "mean_quality", "n_neurons", "flags")}
            null_rows = [{"family": family, "i": i, "rate": rates[f"null-{family}-{i:03d}"], "size": size,
                          "overlap_allowed": overlap, "pool_indices": idx.tolist()}
                         for family, i, _, size, overlap, idx in nulls]
            plain = [done[("harmless-none", i)] for i in range(len(sets["harmless"]))] if "harmless" in sets else None
            return None, {"conditions": refusal, "nulls": null_rows, "harmless_none_tokens": plain}

        stage = self._run_stage("generation", key, run)
        meta = stage.load()[1]
        return meta["conditions"], meta["nulls"], meta["harmless_none_tokens"]

    def _key_direction(self):
        c = self.c
        return (self._key_cna(), c.direction, c.generation.detector, c.collect.batch_size)

    def stage_direction(self) -> dict:
        """The refusal direction and its layer (docs/METHOD.md §5.1): means of the residual stream at the
        last prompt token over the training pairs outside a seeded selection slice; the layer chosen by
        directional ablation on the slice's harmful prompts (or ``direction.layer``); alpha for
        activation addition. Returns {"direction" [E], "layer", "alpha", "rates", ...}."""
        c, d, p = self.c, self.c.direction, self.prompts

        def run(stage):
            lm = self.lm("instruct")
            sel, fit = direction_split(len(p.train_harmful), d.selection_fraction, d.seed)

            def means(prompts, name):
                if not self._shares_residuals():
                    return direction_lib.residual_means(lm, [prompts[i] for i in fit], c.collect.batch_size,
                                                        progress=self.progress, desc=f"residual means, {name}")
                # The cna stage's collection of these prompts (same model, same formatting) kept them.
                acts = collect(lm, prompts, position="last", last_k=c.cna.last_k, batch_size=c.collect.batch_size,
                               cache_dir=self.cache_dir, progress=self.progress, desc=f"residuals, {name}",
                               residuals=True)
                return acts.residuals[np.isin(acts.row_prompt, fit)].astype(np.float64).mean(0)

            mean_h, mean_b = means(p.train_harmful, "harmful"), means(p.train_harmless, "harmless")
            dirs = mean_h - mean_b
            rates = {}
            if d.layer == -1:
                layer, rates = direction_lib.select_direction_layer(
                    lm, dirs, [p.train_harmful[i] for i in sel], detector=c.generation.detector,
                    max_new_tokens=d.selection_tokens, slots=c.generation.batch_size,
                    stop_when_scored=c.generation.stop_when_scored, progress=self.progress)
            else:
                layer = int(d.layer)
            r = dirs[layer] / np.linalg.norm(dirs[layer])
            alpha = float(-(mean_h[layer] @ r)) if d.alpha is None else float(d.alpha)
            return ({"directions": dirs.astype(np.float32), "mean_harmful": mean_h.astype(np.float32),
                     "mean_harmless": mean_b.astype(np.float32)},
                    {"layer": int(layer), "alpha": alpha, "selected": d.layer == -1,
                     "rates": {str(k): v for k, v in rates.items()}, "n_fit": len(fit), "n_selection": len(sel),
                     "norm": float(np.linalg.norm(dirs[layer])),
                     "harmful_projection": float(mean_h[layer] @ r), "harmless_projection": float(mean_b[layer] @ r)})

        stage = self._run_stage("direction", self._key_direction(), run)
        arrays, meta = stage.load()
        return dict(meta, direction=arrays["directions"][meta["layer"]].astype(np.float64))

    def _kl(self, lm, plain_tokens: list, conds: list, desc: str) -> np.ndarray:
        """[C, P, N] KL of ``conds`` along the unmodified model's harmless continuations."""
        dc = self.c.damage
        return damage.kl_along(lm, lm.encode(self.prompts.eval_harmless), plain_tokens, conds,
                               max_positions=None if dc.max_positions == -1 else dc.max_positions,
                               batch_size=dc.batch_size, progress=self.progress, desc=desc)

    def stage_damage(self, conditions: dict[str, tuple], plain_tokens: list, key, extra: Sequence = ()
                     ) -> tuple[dict[str, dict], list[dict]]:
        """KL_first and KL_seq of every condition on the held-out harmless prompts (docs/METHOD.md §5.2),
        along the unmodified model's greedy continuations, and of the ``extra`` engine Conditions (the new
        sweep points) in the same pass: the unmodified model's residual stream and reference distribution
        are computed once for all of them. Returns (name -> {"kl_first", "kl_seq"}, one such dict per extra)."""
        names = [n for n in conditions if n != "none"]

        def run(stage):
            lm = self.lm("instruct")
            kl = self._kl(lm, plain_tokens, [conditions[n][0] for n in names] + list(extra), "damage (KL)")
            s = damage.summarize_kl(kl)
            both = [{"kl_first": float(s["kl_first"][j]), "kl_seq": float(s["kl_seq"][j])} for j in range(len(kl))]
            arrays = {"kl": kl[:len(names)].astype(np.float32)}
            if len(extra):  # orbax saves no zero-size array (a study without sweeps has no extra)
                arrays["kl_extra"] = kl[len(names):].astype(np.float32)
            return arrays, {"names": names, "damage": dict(zip(names, both)), "extra": both[len(names):]}

        stage = self._run_stage("damage", key, run)
        meta = stage.load()[1]
        return {"none": {"kl_first": 0.0, "kl_seq": 0.0}, **meta["damage"]}, meta["extra"]

    def sweep_points(self, pool: NeuronSet, direction: dict | None) -> list[dict]:
        """The sweeps' conditions (docs/METHOD.md §5.3): {"sweep", "value", "condition", "n_neurons",
        "same_as"} -- same_as names the main condition a point equals (its results are reused)."""
        c, s, g = self.c, self.c.sweeps, self.c.generation
        shape = from_hf_dict(c.model.shape.to_dict())
        n = c.cna
        exclude = None
        points = []
        for pct in s.k_percent:
            k = config_lib.sweep_k(shape, pct)
            if k == len(pool):
                ns = pool
            else:
                if n.drop_universal and exclude is None:
                    exclude = cna_lib.universal_neurons(self.lm("instruct"), cna_lib.NEUTRAL_PROMPTS)
                ns = cna_lib.select_neurons(self.delta, k, n.exclude_layers, n.positive_only, exclude)
            points.append(dict(sweep="k_percent", value=float(pct), condition=engine.Condition(ns.multiplier(g.multiplier)),
                               n_neurons=k, same_as="cna" if k == len(pool) else None))
        for m in s.multipliers:
            points.append(dict(sweep="multiplier", value=float(m), condition=engine.Condition(pool.multiplier(m)),
                               n_neurons=len(pool), same_as="cna" if m == g.multiplier else None))
        if direction is not None:
            r, layer, alpha = direction["direction"], direction["layer"], direction["alpha"]
            for a in s.alpha_scales:
                points.append(dict(sweep="alpha_scale", value=float(a), n_neurons=0,
                                   condition=engine.Condition(direction=r, add={layer: a * alpha}),
                                   same_as="act_add" if a == 1.0 else None))
        return points

    def stage_sweeps(self, points: list[dict], kl: list[dict] | None, key, table_rows: int = 0) -> list[dict]:
        """Refusal (harmful, harmless) and quality at every sweep point not equal to a main condition, as
        one engine job, with the points' KLs (``kl``: one dict per new point, from :meth:`stage_damage`, or
        None); returns one dict per new point (in ``points`` order). table_rows: as for :meth:`_engine_job`."""
        new = new_sweep_points(points)
        sets = self._prompt_sets()

        def run(stage):
            lm = self.lm("instruct")
            items = [(f"{ps}-{p['sweep']}-{p['value']:g}", sets[ps], j, ps) for j, p in enumerate(new) for ps in sets]
            # The sweeps report harmless quality only (docs/METHOD.md §4.3), so a harmful row stops as soon as
            # its refusal flag is settled.
            done = self._engine_job(stage, lm, [x[:3] for x in items], [p["condition"] for p in new], "sweeps job",
                                    flag_only=lambda item: item.startswith("harmful-"), table_rows=table_rows)
            out = [{"sweep": p["sweep"], "value": p["value"], "n_neurons": p["n_neurons"]} for p in new]
            for item, prompts, j, ps in items:
                r = self._score(stage, lm, item, prompts, done, new[j]["n_neurons"])
                # no harmful quality: those generations stop once their flag settled
                out[j][ps] = {k: r[k] for k in ("rate", "n", "flags") + (("mean_quality",) if ps == "harmless" else ())}
            if kl is not None:  # one KL dict per new point, in the same order
                for o, k in zip(out, kl, strict=True):
                    o.update(k)
            return None, {"points": out}

        stage = self._run_stage("sweeps", key, run)
        return stage.load()[1]["points"]

    # -- the whole study ------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.time()
        c = self.c
        gen = c.generation
        pool = self.stage_cna()
        acts = {side: self.stage_acts(side, pool) for side in ("instruct", "base")}
        graphs = {}
        for kind, (side, _) in GRAPHS.items():
            graphs[kind] = self.stage_graph(kind, acts[side], pool, self._key_acts(side))
        largest = bool(c.graph.largest_component)
        subsets = {k: graph_lib.connected_subset(graphs[k].adjacency, largest) for k in ("contrast_instruct",
                                                                                        "harmful_instruct")}
        direction = self.stage_direction() if c.direction.enabled else None

        def ablate(ns):
            return engine.Condition(ns.multiplier(gen.multiplier)), len(ns)

        conditions = {"none": (engine.Condition(), 0), "cna": ablate(pool),
                      "contrast_graph": ablate(pool.subset(subsets["contrast_instruct"])),
                      "harmful_graph": ablate(pool.subset(subsets["harmful_instruct"]))}
        if direction is not None:
            r, layer = direction["direction"], direction["layer"]
            conditions["direction_ablation"] = (engine.Condition(direction=r, ablate=True), 0)
            conditions["act_add"] = (engine.Condition(direction=r, add={layer: direction["alpha"]}), 0)
        graph_key = tuple(config_hash(g.frequency) for g in graphs.values())
        direction_key = None if direction is None else (self._key_direction(), config_hash(direction["direction"]))
        refusal_key = (self._key_cna(), c.generation, graph_key, c.graph.largest_component, direction_key)
        nc = c.nulls
        null_sets = [(family, i, ablate(pool.subset(idx))[0], len(idx), overlap, idx)
                     for family, n in (("layer_matched", nc.n_layer_matched), ("uniform", nc.n_uniform))
                     for i, (idx, overlap) in enumerate(null_subsets(pool, subsets["contrast_instruct"], n, family,
                                                                     nc.seed))]
        points = self.sweep_points(pool, direction) if c.sweeps.enabled else []
        # The generation and sweeps jobs (same prompts, slots and lengths) share their compiled programs
        # when their condition tables have one size.
        new_points = new_sweep_points(points)
        rows = max(len(conditions) + len(null_sets), len(new_points))
        refusal, nulls, plain = self.stage_generation(conditions, null_sets, (refusal_key, c.nulls), rows)
        kl = kl_points = None
        sweeps_key = (c.sweeps, c.data.n_eval) if c.sweeps.enabled else None
        if c.damage.enabled and plain is not None:
            kl, kl_points = self.stage_damage(conditions, plain, (refusal_key, c.damage, sweeps_key),
                                              [p["condition"] for p in new_points])
        sweeps = None
        if c.sweeps.enabled:
            new = self.stage_sweeps(points, kl_points, (refusal_key, sweeps_key, c.damage), rows)
            sweeps = sweep_rows(points, new, refusal, kl)
        results = summarize(c, pool, graphs, subsets, refusal, nulls)
        results.update(damage=kl, sweeps=sweeps, direction=None if direction is None else {
            k: v for k, v in direction.items() if k != "direction"})
        results["timings"] = {**self.timings, "this run": time.time() - t0}
        from cna_jax import report

        if is_writer():
            report.write(self.report_dir, results, {k: g.adjacency for k, g in graphs.items()}, pool)
        barrier("study-report")  # the other processes may read the report next
        return results


def new_sweep_points(points: list[dict]) -> list[dict]:
    """The sweep points the sweeps job generates: those equal to no main condition (``same_as`` None)."""
    return [p for p in points if p["same_as"] is None]


def sweep_rows(points: list[dict], new: list[dict], refusal: dict, damage: dict | None) -> list[dict]:
    """One row per sweep point (in ``points`` order): rates, counts, 95% Wilson intervals, qualities,
    KLs and the McNemar p against no intervention, the main condition's results where a point equals one."""
    it = iter(new)
    rows = []
    for p in points:
        row = {"sweep": p["sweep"], "value": p["value"], "n_neurons": p["n_neurons"], "same_as": p["same_as"]}
        if p["same_as"] is None:
            src = next(it)
            per_set = {ps: src[ps] for ps in ("harmful", "harmless") if ps in src}
            kl = {k: src.get(k) for k in ("kl_first", "kl_seq")}
        else:
            per_set = {ps: refusal[f"{ps}/{p['same_as']}"] for ps in ("harmful", "harmless")
                       if f"{ps}/{p['same_as']}" in refusal}
            kl = dict((damage or {}).get(p["same_as"], {"kl_first": None, "kl_seq": None}))
        for ps, v in per_set.items():
            count = int(sum(v["flags"]))
            none = refusal[f"{ps}/none"]
            # harmless quality only: the sweeps job stops harmful rows once their flag settles
            row[ps] = {"rate": v["rate"], "n": v["n"], "count": count,
                       "mean_quality": v["mean_quality"] if ps == "harmless" else None,
                       "ci": list(stats_lib.wilson_interval(count, v["n"])),
                       "mcnemar_p": stats_lib.mcnemar_exact(none["flags"], v["flags"])}
        row.update(kl)
        rows.append(row)
    return rows


def refusal_statistics(refusal: dict[str, dict]) -> dict:
    """Wilson intervals and paired McNemar p-values of the refusal stage's conditions (docs/METHOD.md §5.4).

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
