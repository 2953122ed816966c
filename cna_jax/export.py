"""Flax parameters -> a HF-style model directory that ``convert.load``, ``LM.load`` and transformers read.

The directory holds ``config.json`` (HF format), ``model.safetensors`` (HF names and layout, written with
``safetensors.numpy``), ``generation_config.json`` and, when a tokenizer is given, its
``save_pretrained`` files (chat template included). The tensor layout is the exact inverse of
``convert._KEY_TABLE``: every exported tensor is pushed back through convert's own forward transform and
must reproduce the Flax leaf bit for bit, otherwise ``ExportError`` is raised.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from flax import traverse_util

from cna_jax import convert
from cna_jax.models.config import ModelConfig

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class ExportError(ValueError):
    """A parameter tree that cannot be written as the HF checkpoint of ``cfg``."""


def hf_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The HF ``config.json`` content for ``cfg`` (read back by both ``from_hf_dict`` and transformers)."""
    eos = list(cfg.eos_token_ids)
    d: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if cfg.rope_scaling is not None:
        sc = cfg.rope_scaling
        d["rope_scaling"] = {"rope_type": "llama3", "factor": sc.factor, "low_freq_factor": sc.low_freq_factor,
                             "high_freq_factor": sc.high_freq_factor,
                             "original_max_position_embeddings": sc.original_max_position_embeddings}
    if cfg.model_type == "llama":
        d["attention_bias"] = cfg.attention_bias
        d["mlp_bias"] = False
    else:  # Qwen2: biases are implied by the architecture; no sliding window
        d["use_sliding_window"] = False
    return d


# Inverse layout transforms, keyed by the Flax leaf kind (the forward ones live in convert._KEY_TABLE).
def _inverse(flax_path: str, value: np.ndarray) -> np.ndarray:
    leaf = flax_path.rsplit("/", 2)
    if flax_path.endswith("/embedding") or flax_path.endswith("/weight"):
        return value  # embeddings and norm weights: same layout
    if flax_path.endswith("/bias"):  # [H, D] -> [H*D]
        return value.reshape(-1)
    if leaf[-2] in ("q_proj", "k_proj", "v_proj"):  # [E, H, D] -> [H*D, E]
        return value.reshape(value.shape[0], -1).T
    if leaf[-2] == "o_proj":  # [H, D, E] -> [E, H*D]
        return value.reshape(-1, value.shape[-1]).T
    if value.ndim == 2:  # Dense kernels [in, out] -> [out, in]
        return value.T
    raise ExportError(f"no HF layout known for {flax_path!r} of shape {value.shape}")


def _reverse_table() -> list[tuple[re.Pattern, str]]:
    """Flax path regex -> HF key template, derived from convert's table so the two cannot drift."""
    out = []
    for hf_pattern, flax_template, _ in convert._KEY_TABLE:
        flax_re = re.escape(flax_template).replace(re.escape("\\1"), r"(\d+)")
        # The HF pattern's one group becomes \1; its escaped dots become literal dots.
        hf_template = re.sub(r"\(\\d\+\)", r"\\1", hf_pattern).replace("\\.", ".")
        out.append((re.compile(flax_re), hf_template))
    return out


def hf_state_dict(cfg: ModelConfig, params: dict, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF-named, HF-layout numpy tensors for a Flax parameter tree; checked against convert's transforms."""
    flat = traverse_util.flatten_dict(params, sep="/")
    expected = traverse_util.flatten_dict(convert.abstract_params(cfg), sep="/")
    if set(flat) != set(expected):
        raise ExportError(f"parameter tree does not match the config: missing {sorted(set(expected) - set(flat))[:5]}, "
                          f"unexpected {sorted(set(flat) - set(expected))[:5]}")
    table = _reverse_table()
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        value = np.asarray(value)
        key = None
        for flax_re, hf_template in table:
            m = flax_re.fullmatch(path)
            if m:
                key = m.expand(hf_template)
                break
        if key is None:
            raise ExportError(f"no HF key for Flax parameter {path!r}")
        tensor = np.ascontiguousarray(_inverse(path, value))
        mapped = convert.flax_path(key)
        if mapped is None or mapped[0] != path or not np.array_equal(mapped[1](tensor, cfg), value):
            raise ExportError(f"export of {path!r} as {key!r} is not the inverse of convert's transform")
        if key in out:
            raise ExportError(f"two parameters map to {key!r}")
        out[key] = tensor.astype(dtype)
    return out


def export(cfg: ModelConfig, params: dict, out_dir: str, tokenizer=None, dtype=np.float32,
           extra_files: dict[str, Any] | None = None) -> str:
    """Writes the HF-style directory ``out_dir`` (created if needed) and returns it.

    ``tokenizer``: a HF tokenizer saved with ``save_pretrained`` (needed by ``LM.load``; optional for
    weights-only exports). ``extra_files``: name -> JSON-serialisable object, written beside the model.
    """
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = hf_state_dict(cfg, params, dtype)
    dtype_name = np.dtype(dtype).name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, dtype_name), f, indent=2)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf_config_dict(cfg)["eos_token_id"]}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    weights = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, weights, metadata={"format": "pt"})
    os.chmod(weights, 0o644)  # save_file's temporary file is private; the other files are not
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    for name, obj in (extra_files or {}).items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)
    return out_dir
