"""Flax Llama / Qwen2 decoders with neuron multipliers, and the pure jitted functions built on them."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cna_jax.models.config import ConfigError, ModelConfig, RopeScaling, from_hf_config_file, from_hf_dict
from cna_jax.models.llama import Decoder, DecoderOutput, KVCache, causal_mask, padding_positions


def forward_fn(params, tokens, valid, neuron_mult=None, *, cfg: ModelConfig, dtype=jnp.float32):
    """Full-sequence logits. tokens, valid: [B, T] (left padding: valid False at pads);
    neuron_mult: [L, I] or None. Returns logits [B, T, V] float32."""
    out = Decoder(cfg, dtype).apply({"params": params}, tokens, padding_positions(valid), causal_mask(valid),
                                    neuron_mult)
    return out.logits


forward = jax.jit(forward_fn, static_argnames=("cfg", "dtype"))


def boxed_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves in their logical-axis boxes (no memory).

    Every decoder layer has the same parameters, so a one-layer model is traced and its ``layers_0`` stands
    for each of the ``L`` layers: tracing the init of all layers took seconds per call for 80-layer models."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    one = dataclasses.replace(cfg, num_hidden_layers=1)
    params = dict(jax.eval_shape(lambda: Decoder(one, dtype).init(jax.random.PRNGKey(0), tokens, tokens,
                                                                  jnp.ones((1, 1, 1), bool)))["params"])
    layer = params.pop("layers_0")
    return {**params, **{f"layers_{i}": layer for i in range(cfg.num_hidden_layers)}}


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (no memory), with logical-axis boxes removed."""
    return nn.meta.unbox(boxed_params(cfg, dtype))


__all__ = ["ConfigError", "Decoder", "DecoderOutput", "KVCache", "ModelConfig", "RopeScaling", "abstract_params",
           "boxed_params", "causal_mask", "forward", "forward_fn", "from_hf_config_file", "from_hf_dict", "padding_positions"]
