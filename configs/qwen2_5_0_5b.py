"""Qwen2.5-0.5B pair: base `Qwen/Qwen2.5-0.5B`, instruct `Qwen/Qwen2.5-0.5B-Instruct`.

Shape numbers are the real model's config.json values; they are checked against the checkpoint at load.
"""
from cna_jax.config import study_config


def get_config():
    return study_config(
        name='Qwen2.5-0.5B',
        base='Qwen/Qwen2.5-0.5B',
        instruct='Qwen/Qwen2.5-0.5B-Instruct',
        dtype='bfloat16',
        shape=dict(
            model_type='qwen2',
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            head_dim=64,
            rms_norm_eps=1e-06,
            rope_theta=1000000.0,
            rope_scaling=None,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
        ),
    )
