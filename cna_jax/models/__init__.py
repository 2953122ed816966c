"""Flax Llama / Qwen2 decoders with neuron multipliers, and the pure jitted functions built on them."""
from __future__ import annotations

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


__all__ = ["ConfigError", "Decoder", "DecoderOutput", "KVCache", "ModelConfig", "RopeScaling", "causal_mask",
           "forward", "forward_fn", "from_hf_config_file", "from_hf_dict", "padding_positions"]
