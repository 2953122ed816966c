"""Llama-3.2-3B pair: base `meta-llama/Llama-3.2-3B`, instruct `meta-llama/Llama-3.2-3B-Instruct`.

Shape numbers are the real model's config.json values; they are checked against the checkpoint at load.
"""
from cna_jax.config import study_config


def get_config():
    return study_config(
        name='Llama-3.2-3B',
        base='meta-llama/Llama-3.2-3B',
        instruct='meta-llama/Llama-3.2-3B-Instruct',
        dtype='bfloat16',
        shape=dict(
            model_type='llama',
            vocab_size=128256,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-05,
            rope_theta=500000.0,
            rope_scaling={'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192},
            tie_word_embeddings=True,
            max_position_embeddings=131072,
        ),
    )
