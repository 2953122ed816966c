"""Helpers shared by the CPU benchmarks in launch/: one-core pinning, interleaved timing, the models."""
import os
import statistics
import time


def pin_one_core(core: int | None = None) -> None:
    """Runs this process on one core, before JAX / torch start: XLA:CPU in jax 0.10 keeps a second
    worker thread whatever XLA_FLAGS say (measured: 2 s of CPU per 1 s of wall), so the flags alone do
    not give the one-thread comparison PERFORMANCE.md asks for. Pinning does, for both sides alike.
    The core is ``core``, else $BENCH_CORE, else 0 (two benchmarks can then run side by side)."""
    if core is None:
        core = int(os.environ.get("BENCH_CORE", "0"))
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    os.sched_setaffinity(0, {core})


def interleaved(fns, repeats):
    """Median seconds per function, timing them in turn each round so that the load of a shared
    machine falls on every side alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def smollm2_both(source: str = "smollm2"):
    """A SmolLM2-135M model fp32 twice: through cna_jax (LM) and through transformers.

    source: ``smollm2`` (the Instruct model as shipped: transformers' own GGUF load) or ``testbed`` (the
    study's tuned instruct model, built on first use; both sides read its exported HF directory)."""
    import torch
    import transformers

    from cna_jax.lm import LM, smollm2_gguf_path

    torch.set_num_threads(1)
    if source == "smollm2":
        path = smollm2_gguf_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                               dtype=torch.float32)
        return LM.load("smollm2"), hf.eval()
    if source == "testbed":
        from cna_jax.testbed import ensure_testbed

        path = ensure_testbed()
        return LM.load(path, name="testbed"), transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32).eval()
    raise ValueError(f"unknown model {source!r} (smollm2, testbed)")


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This process's float32 n x n matmul rate (NumPy / OpenBLAS, one thread once pinned), GFLOP/s,
    median of ``repeats``: the scale of every "fraction of the SGEMM-bound limit"."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9
