"""Convert once, restore sharded: the Flax parameter tree as an Orbax checkpoint.

A HF checkpoint is converted (tensor by tensor, straight into its shardings) and saved once with
:func:`convert_once`; later runs :func:`restore` it directly into a mesh. Restore targets are
``jax.ShapeDtypeStruct`` leaves that carry their ``NamedSharding`` explicitly -- an abstract target
without a sharding makes Orbax fall back to the saved layout (and to a whole copy per host for a 70B
model). The model config is stored beside the arrays (``model_config.json``) so a restore needs no HF
files.

Layout on disk: ``<path>/params`` (Orbax, one file set per array, written cooperatively by every
process) and ``<path>/model_config.json`` (written by process 0).

The converted-copy cache (``LM.load(..., cache_dir=...)``) keeps such checkpoints, plus the tokenizer, under
``<cache_dir>/<name>-<hash of source and dtype>/<hash of the source files' identity>``; see :func:`cache_lookup`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp

from cna_jax.models.config import ModelConfig

_CONFIG = "model_config.json"
_PARAMS = "params"
_TOKENIZER = "tokenizer"
_COMPLETE = "complete.json"  # written last: an entry without it is an interrupted write and is redone
# Part of every cache key: bump it when the Flax parameter tree changes, so old converted copies miss.
_CACHE_FORMAT = 1

log = logging.getLogger("cna_jax.checkpoint")


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
    # The saved shapes come from Orbax's metadata: no trace of the model (seconds for a 30-layer model).
    shapes = _checkpointer().metadata(os.path.join(path, _PARAMS)).item_metadata.tree
    if shardings is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh), shapes, shardings)
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


# ---------------------------------------------------------------------------------------------------
# Converted-copy cache: convert a source once, restore it on every later load without opening it.

def cache_dir_from_config(value: str, workdir: str) -> str | None:
    """``model.convert_cache`` as a directory: "" = None (no cache); a relative path is under ``workdir``."""
    if not value:
        return None
    return os.path.abspath(os.path.join(workdir, os.path.expanduser(value)))


def _is_hub_id(source: str) -> bool:
    """The same test ``convert.resolve_source`` applies: not a local path, shaped like ``owner/name``."""
    source = os.path.expanduser(source)
    return not os.path.exists(source) and not (source.endswith(".gguf") or source.startswith((".", "/"))
                                               or source.count("/") != 1)


def source_identity(path: str) -> list:
    """(name, size, mtime_ns) of a file, or of every regular file in a directory: a new download, an
    edit or a re-export changes it. Only ``stat`` is used, so the files themselves are never opened."""
    names = [""] if os.path.isfile(path) else sorted(os.listdir(path))
    out = []
    for name in names:
        st = os.stat(os.path.join(path, name) if name else path)  # follows the HF cache's blob symlinks
        if name == "" or os.path.isfile(os.path.join(path, name)):
            out.append((name or os.path.basename(path), st.st_size, st.st_mtime_ns))
    return out


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_group(cache_dir: str, source: str, dtype) -> str:
    """Where the converted copies of ``source`` (a local path or hub id, after alias resolution) in
    ``dtype`` live: one entry per identity of the source files."""
    key = source if _is_hub_id(source) else os.path.abspath(os.path.expanduser(source))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(key.rstrip("/")) or "model")[:48]
    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), f"{name}-{_digest(key, jnp.dtype(dtype).name, _CACHE_FORMAT)}")


def is_cached(entry: str) -> bool:
    return os.path.exists(os.path.join(entry, _COMPLETE))


def cache_lookup(cache_dir: str, source: str, dtype) -> tuple[str, bool]:
    """(entry directory, whether a complete converted copy is there) for ``source`` in ``dtype``.

    The entry is keyed by the source (absolute path or hub id), the dtype and the identity of the
    resolved source files (:func:`source_identity`; for a hub id the snapshot directory also names the
    revision). A source that no longer resolves (moved away, deleted after conversion, an offline hub id
    missing from the HF cache) is served from its newest complete entry, with a warning."""
    from cna_jax import convert

    group = cache_group(cache_dir, source, dtype)
    try:
        path = convert.resolve_source(source)
    except FileNotFoundError:
        entries = [os.path.join(group, e) for e in (os.listdir(group) if os.path.isdir(group) else [])]
        entries = [e for e in entries if is_cached(e)]
        if not entries:
            raise
        newest = max(entries, key=lambda e: os.stat(os.path.join(e, _COMPLETE)).st_mtime_ns)
        log.warning("%s not found; using its converted copy %s", source, newest)
        return newest, True
    entry = os.path.join(group, _digest(os.path.abspath(path), source_identity(path)))
    return entry, is_cached(entry)


def save_cached(entry: str, params: dict, cfg: ModelConfig, dtype, tokenizer, meta: dict) -> str:
    """Writes a cache entry: the params (Orbax, every process), config, tokenizer and, last, the
    completion marker (process 0). Older entries of the same source and dtype are removed: they
    describe source files that no longer exist, and each may be the size of the model."""
    from cna_jax.distributed import is_writer

    save(entry, params, cfg, dtype, meta=meta)
    if is_writer():
        tokenizer.save_pretrained(os.path.join(entry, _TOKENIZER))
        with open(os.path.join(entry, _COMPLETE), "w") as f:
            json.dump(meta, f, indent=1)
        group = os.path.dirname(entry)
        for other in os.listdir(group):
            if os.path.join(group, other) != entry:
                shutil.rmtree(os.path.join(group, other), ignore_errors=True)
    return entry


def tokenizer_dir(entry: str) -> str:
    return os.path.join(entry, _TOKENIZER)
