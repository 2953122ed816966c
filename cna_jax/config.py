"""The study configuration schema: every default of METHOD.md as a field (configs are data), validated once."""
from __future__ import annotations

import ml_collections

# Fields of the graph section come from cna_jax.graph.GraphSettings (one source of defaults).
_SECTIONS = ("model", "data", "cna", "graph", "generation", "nulls", "collect", "mesh")


def study_config(name: str, base: str, instruct: str, shape: dict, dtype: str = "bfloat16") -> ml_collections.ConfigDict:
    """The full config for one (base, instruct) model pair.

    ``shape`` holds the real model's HF shape numbers; they are checked against the checkpoint's
    config.json at load time, so a config can never silently describe a different model.
    """
    from cna_jax.graph import GraphSettings

    c = ml_collections.ConfigDict()
    c.name = name
    # base_chat: format base-side prompts with the chat template too (a base that is itself a chat model).
    c.model = ml_collections.ConfigDict(dict(base=base, instruct=instruct, dtype=dtype, shape=shape,
                                             base_chat=False))
    c.data = ml_collections.ConfigDict(dict(
        harmful="builtin:harmful", harmless="builtin:harmless",  # a file, a known set name or a hub id
        eval_fraction=0.3, seed=0,
        n_pairs=-1,  # train pairs for CNA and graphs; -1: all
        n_eval=-1,  # held-out harmful (and harmless) prompts for refusal; -1: all
    ))
    c.cna = ml_collections.ConfigDict(dict(
        k=-1,  # -1: ceil(fraction * layers * intermediate_size)
        fraction=0.001, exclude_layers=(0, 1), positive_only=False, drop_universal=False,
        position="last",  # "last" | "last_k" | "all"
        last_k=1,
    ))
    graph = GraphSettings().to_dict()
    graph["progress"] = False  # the study shows its own progress
    c.graph = ml_collections.ConfigDict(graph)
    c.generation = ml_collections.ConfigDict(dict(
        max_new_tokens=150, batch_size=32, detector="regex", multiplier=0.0, harmless_eval=True))
    c.nulls = ml_collections.ConfigDict(dict(n_layer_matched=30, n_uniform=30, seed=0))
    c.collect = ml_collections.ConfigDict(dict(batch_size=32))
    # devices: -1 = all (a mesh over more than one device shards loading, generation and collection).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="generation", devices=-1))
    c.distributed = False  # call jax.distributed.initialize() first (multi-host pods)
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError with a readable message for anything a study could not run with."""
    from cna_jax.graph import GraphSettings
    from cna_jax.models.config import from_hf_dict

    missing = [s for s in _SECTIONS if s not in c]
    if missing:
        raise ValueError(f"config is missing section(s) {missing}; build it with cna_jax.config.study_config")
    if not c.model.base or not c.model.instruct:
        raise ValueError("config.model.base and config.model.instruct must both be set")
    if c.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype must be float32 or bfloat16, got {c.model.dtype!r}")
    shape = from_hf_dict(c.model.shape.to_dict())
    if not 0.0 < c.data.eval_fraction < 1.0:
        raise ValueError(f"config.data.eval_fraction must be in (0, 1), got {c.data.eval_fraction}")
    k = shape.default_cna_k(c.cna.fraction) if c.cna.k == -1 else c.cna.k
    pool = shape.num_hidden_layers * shape.intermediate_size
    excluded = len([l for l in c.cna.exclude_layers if 0 <= l < shape.num_hidden_layers])
    eligible = pool - excluded * shape.intermediate_size
    if not 0 < k <= eligible:
        raise ValueError(f"config.cna.k={k} must be in [1, {eligible}] (the neurons outside excluded layers)")
    if c.cna.position not in ("last", "last_k", "all"):
        raise ValueError(f"config.cna.position must be last, last_k or all, got {c.cna.position!r}")
    GraphSettings.from_config(c.graph)
    if c.generation.detector not in ("regex", "substring"):
        raise ValueError(f"config.generation.detector must be regex or substring, got {c.generation.detector!r}")
    if c.generation.max_new_tokens < 1 or c.generation.batch_size < 1 or c.collect.batch_size < 1:
        raise ValueError("generation.max_new_tokens, generation.batch_size and collect.batch_size must be >= 1")
    if c.nulls.n_layer_matched < 0 or c.nulls.n_uniform < 0:
        raise ValueError("nulls.n_layer_matched and nulls.n_uniform must be >= 0")


def load_config_file(path: str, overrides=()) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file, with dotted ``key=value`` overrides (values parsed as JSON when
    they parse, else kept as strings); an unknown key raises."""
    import importlib.util
    import json
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        target = c
        for p in parents:
            target = target[p]
        if leaf not in target:
            raise ValueError(f"unknown config field {key!r} in override {item!r}")
        try:
            target[leaf] = json.loads(value)
        except json.JSONDecodeError:
            target[leaf] = value
    return c
