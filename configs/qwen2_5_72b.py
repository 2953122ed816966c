"""Qwen2.5-72B pair: base `Qwen/Qwen2.5-72B`, instruct `Qwen/Qwen2.5-72B-Instruct`.

Shape numbers are the real model's config.json values; they are checked against the checkpoint at load.
"""
from cna_jax.config import study_config


def get_config():
    return study_config(
        name='Qwen2.5-72B',
        base='Qwen/Qwen2.5-72B',
        instruct='Qwen/Qwen2.5-72B-Instruct',
        dtype='bfloat16',
        shape=dict(
            model_type='qwen2',
            vocab_size=152064,
            hidden_size=8192,
            intermediate_size=29568,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-06,
            rope_theta=1000000.0,
            rope_scaling=None,
            tie_word_embeddings=False,
            max_position_embeddings=131072,
        ),
    )
