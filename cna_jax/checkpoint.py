"""Convert once, restore sharded: the Flax parameter tree as an Orbax checkpoint.

A HF checkpoint is converted (tensor by tensor, straight into its shardings) and saved once with
:func:`convert_once`; later runs :func:`restore` it directly into a mesh. Restore targets are
``jax.ShapeDtypeStruct`` leaves that carry their ``NamedSharding`` explicitly -- an abstract target
without a sharding makes Orbax fall back to the saved layout (and to a whole copy per host for a 70B
model). The model config is stored beside the arrays (``model_config.json``) so a restore needs no HF
files.

Layout on disk: ``<path>/params`` (Orbax, one file set per array, written cooperatively by every
process) and ``<path>/model_config.json`` (written by process 0).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from cna_jax.models.config import ModelConfig

_CONFIG = "model_config.json"
_PARAMS = "params"


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def exists(path: str) -> bool:
    return os.path.exists(os.path.join(path, _CONFIG)) and os.path.isdir(os.path.join(path, _PARAMS))


def save(path: str, params: dict, cfg: ModelConfig, dtype=None, meta: dict | None = None) -> str:
    """Saves ``params`` (sharded or not) and the model config. Every process must call it (Orbax writes
    each process's shards); only process 0 writes the config file."""
    from cna_jax.distributed import is_writer

    path = os.path.abspath(path)
    dtype = jnp.dtype(dtype or jax.tree.leaves(params)[0].dtype)
    ckpt = _checkpointer()
    ckpt.save(os.path.join(path, _PARAMS), params, force=True)
    ckpt.wait_until_finished()
    if is_writer():
        with open(os.path.join(path, _CONFIG), "w") as f:
            json.dump(dict(config=cfg.to_dict(), dtype=dtype.name, meta=meta or {}), f, indent=1)
    return path


def read_config(path: str) -> tuple[ModelConfig, jnp.dtype, dict]:
    cfg_path = os.path.join(path, _CONFIG)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path} is not a cna_jax Orbax checkpoint (no {_CONFIG}); "
                                "create one with cna_jax.checkpoint.convert_once")
    with open(cfg_path) as f:
        d = json.load(f)
    return ModelConfig.from_dict(d["config"]), jnp.dtype(d["dtype"]), d.get("meta", {})


def abstract_target(cfg: ModelConfig, dtype, shardings=None) -> dict:
    """ShapeDtypeStruct leaves with an explicit sharding each (``shardings`` tree, or the first device)."""
    from cna_jax.convert import abstract_params

    shapes = abstract_params(cfg, dtype)
    if shardings is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype), sharding=sh), shapes, shardings)


def restore(path: str, layout=None, shardings=None, dtype=None) -> tuple[ModelConfig, dict]:
    """Restores (config, params) straight into ``layout`` (a ``cna_jax.sharding.Layout``) or an explicit
    ``shardings`` tree; with neither, onto the first device. ``dtype`` casts on restore (default: the
    saved dtype). Each device reads only its own slices."""
    path = os.path.abspath(path)
    cfg, saved_dtype, _ = read_config(path)
    dtype = jnp.dtype(dtype or saved_dtype)
    if layout is not None:
        if shardings is not None:
            raise ValueError("pass layout or shardings, not both")
        shardings = layout.params(cfg, dtype)
    target = abstract_target(cfg, dtype, shardings)
    params = _checkpointer().restore(os.path.join(path, _PARAMS), target)
    return cfg, params


def convert_once(source: str, path: str, dtype=jnp.bfloat16, layout=None, progress: bool = False,
                 overwrite: bool = False) -> str:
    """Converts a HF directory / hub id / GGUF file to an Orbax checkpoint at ``path`` unless one is
    already there. With ``layout``, tensors are loaded straight into their shardings (no host holds the
    whole model) and saved from there."""
    if exists(path) and not overwrite:
        return os.path.abspath(path)
    from cna_jax import convert

    shardings = None if layout is None else (lambda c: layout.params(c, dtype))
    cfg, params = convert.load(source, dtype=dtype, shardings=shardings, progress=progress)
    return save(path, params, cfg, dtype, meta=dict(source=source))
