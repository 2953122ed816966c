"""Qwen2.5-7B pair: base `Qwen/Qwen2.5-7B`, instruct `Qwen/Qwen2.5-7B-Instruct`.

Shape numbers are the real model's config.json values; they are checked against the checkpoint at load.
"""
from cna_jax.config import study_config


def get_config():
    return study_config(
        name='Qwen2.5-7B',
        base='Qwen/Qwen2.5-7B',
        instruct='Qwen/Qwen2.5-7B-Instruct',
        dtype='bfloat16',
        shape=dict(
            model_type='qwen2',
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            head_dim=128,
            rms_norm_eps=1e-06,
            rope_theta=1000000.0,
            rope_scaling=None,
            tie_word_embeddings=False,
            max_position_embeddings=131072,
        ),
    )
