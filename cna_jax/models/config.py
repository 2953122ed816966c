"""Frozen model configuration built from a HF ``config.json``, validated once against a whitelist.

Only what the Flax decoder really implements is accepted: a key we do not know, or a known key with a
value we do not implement (a rope scaling type, sliding-window attention, MLP biases, ...), raises a
``ConfigError`` naming the key, instead of silently producing a different model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class ConfigError(ValueError):
    """An unsupported or malformed model configuration."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x ``rope_type: llama3`` frequency scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Llama / Qwen2 decoder.

    Axis names used in docstrings elsewhere: ``layers`` = num_hidden_layers, ``embed`` = hidden_size,
    ``neurons`` = intermediate_size, ``heads`` / ``kv_heads`` / ``head_dim``, ``vocab``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False  # q/k/v bias (Qwen2); o_proj never has one here
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type={self.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def num_neurons(self) -> int:
        """All MLP neurons over all layers."""
        return self.num_hidden_layers * self.intermediate_size

    def num_params(self) -> int:
        e, i, l = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = e * q + 2 * e * kv + q * e + (q + 2 * kv if self.attention_bias else 0)
        per_layer = attn + 3 * e * i + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + l * per_layer + e + head

    def default_cna_k(self, fraction: float = 0.001) -> int:
        """The CNA default neuron count: ceil(fraction * layers * intermediate_size) (docs/METHOD.md §1.5)."""
        return math.ceil(round(fraction * self.num_neurons, 9))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def shape_mismatches(self, other: "ModelConfig") -> list[str]:
        """Fields that differ in what the forward pass computes (floats compared to 1e-6 relative:
        GGUF stores eps as float32; token ids and the context limit are not shapes)."""
        out = []
        for f in dataclasses.fields(self):
            if f.name in ("bos_token_id", "eos_token_ids", "max_position_embeddings"):
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            same = math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) and isinstance(b, float) else a == b
            if not same:
                out.append(f"{f.name}: {a!r} != {b!r}")
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


# HF keys that carry no information about the forward pass (or only about training / other APIs).
_IGNORED_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range", "use_cache",
    "pad_token_id", "attention_dropout", "output_hidden_states", "output_attentions", "return_dict",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
    "_name_or_path", "tokenizer_class", "max_window_layers", "sliding_window", "bos_token_id",
    "eos_token_id", "model_type", "_attn_implementation_autoset", "unsloth_fixed",
})
# Keys read into ModelConfig (possibly after a value check).
_READ_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "attention_bias", "tie_word_embeddings", "max_position_embeddings", "hidden_act", "mlp_bias",
    "pretraining_tp", "use_sliding_window", "layer_types", "use_mrope",
})


def _rope_from_hf(hf: Mapping[str, Any], model_type: str) -> tuple[float, RopeScaling | None]:
    """Reads rope theta and scaling from either the hub format (``rope_theta`` + ``rope_scaling``) or
    the transformers>=5 format (``rope_parameters``)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling is not None:
        params = {**params, **scaling}
    default_theta = 1e6 if model_type == "qwen2" else 10000.0
    theta = float(hf.get("rope_theta", params.get("rope_theta", default_theta)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (supported: default, llama3)")
    try:
        return theta, RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"rope_scaling of type llama3 is missing field {e.args[0]!r}") from None


def from_hf_dict(hf: Mapping[str, Any]) -> ModelConfig:
    """Validates a HF config dict and returns the frozen ModelConfig."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type={model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
    unknown = sorted(set(hf) - _IGNORED_KEYS - _READ_KEYS)
    if unknown:
        raise ConfigError(f"unsupported config key(s) {unknown} for model_type={model_type!r}; "
                          "cna_jax implements plain Llama / Qwen2 decoders only")

    def require(key, ok, what):
        if key in hf and not ok(hf[key]):
            raise ConfigError(f"config key {key!r}={hf[key]!r} is not supported ({what})")

    require("hidden_act", lambda v: v == "silu", "only silu / SwiGLU MLPs")
    require("mlp_bias", lambda v: not v, "MLP biases are not implemented")
    require("pretraining_tp", lambda v: v in (None, 1), "tensor-parallel pretraining slices must be 1")
    require("use_sliding_window", lambda v: not v, "sliding-window attention is not implemented")
    require("use_mrope", lambda v: not v, "multimodal rope is not implemented")
    require("layer_types", lambda v: v is None or all(t == "full_attention" for t in v),
            "only full attention layers")
    if model_type == "llama":
        require("attention_bias", lambda v: not v, "Llama attention biases are not implemented")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ConfigError(f"config is missing required key {key!r}")

    theta, scaling = _rope_from_hf(hf, model_type)
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        # Qwen2 always has q/k/v biases (HF hard-codes them; the config has no key for it).
        attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def from_hf_config_file(path: str | os.PathLike) -> ModelConfig:
    """Reads ``config.json`` (or a directory holding one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model config at {path}")
    with open(path) as f:
        return from_hf_dict(json.load(f))
