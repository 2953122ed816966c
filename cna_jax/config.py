"""The study configuration schema: every default of METHOD.md as a field (configs are data), validated once."""
from __future__ import annotations

import ml_collections


def study_config(name: str, base: str, instruct: str, shape: dict, dtype: str = "bfloat16") -> ml_collections.ConfigDict:
    """The full config for one (base, instruct) model pair.

    ``shape`` holds the real model's HF shape numbers; they are checked against the checkpoint's
    config.json at load time, so a config can never silently describe a different model.
    """
    c = ml_collections.ConfigDict()
    c.name = name
    c.model = ml_collections.ConfigDict(dict(base=base, instruct=instruct, dtype=dtype, shape=shape))

    c.data = ml_collections.ConfigDict(dict(
        harmful="builtin:harmful", harmless="builtin:harmless",  # a file, a known set name or a hub id
        eval_fraction=0.3, seed=0,
        n_pairs=-1,  # -1: all train pairs
        n_eval=-1,  # -1: every held-out prompt
    ))
    c.cna = ml_collections.ConfigDict(dict(
        k=-1,  # -1: ceil(fraction * layers * intermediate_size)
        fraction=0.001, exclude_layers=(0, 1), positive_only=False, drop_universal=False,
        position="last",  # "last" | "all" | "last_k"
        last_k=1,
    ))
    c.graph = ml_collections.ConfigDict(dict(
        q=0.05, k_candidates=50, n_lambdas=30, lambda_min_ratio=0.01, criterion="ebic", ebic_gamma=0.5,
        merge="and", n_resamples=30, subsample_fraction=0.5, freq_threshold=0.6, seed=0,
        subset="degree",  # "degree" (degree >= 1) | "largest_component"
    ))
    c.generation = ml_collections.ConfigDict(dict(
        max_new_tokens=150, batch_size=32, detector="regex", multiplier=0.0))
    c.nulls = ml_collections.ConfigDict(dict(n_layer_matched=30, n_uniform=30, seed=0))
    c.collect = ml_collections.ConfigDict(dict(batch_size=32))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="generation"))
    c.distributed = False  # call jax.distributed.initialize() first (multi-host pods)
    return c
