"""Hand-written CPU kernels behind XLA's FFI; today one: the engine's decode attention.

Why: in a decode step each slot's 1-4 query rows per KV head meet the whole cache window. XLA:CPU runs
that as batched matmuls over every column, masked ones included, at ~7 GB/s of cache read (the largest
cost of a SmolLM2 step at 64 slots after the weight products). ``csrc/decode_attention.cc`` reads only
the columns each slot's mask marks valid, so it costs what the slots' real lengths do (about half the
window in the study's jobs), and is ~2x faster per column read.

The kernel is compiled on first use with the system's C++ compiler into ``$CNA_JAX_CACHE/kernels`` (else
``~/.cache/cna_jax/kernels``), keyed by its source, jaxlib's version and the flags, and registered with
``jax.ffi``. Fixed flags (AVX2 + FMA on x86-64 that has them, else portable code) give the same bits on
every machine of a kind. Without a compiler, or with ``CNA_JAX_CPU_KERNELS=0``, the model keeps its XLA
path (one warning); both agree to float32 rounding (tests/test_cpu_kernels.py).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from cna_jax import cache_root

log = logging.getLogger(__name__)

DECODE_ATTENTION = "cna_decode_attention"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "decode_attention.cc")
_COMMON_FLAGS = ("-std=c++17", "-shared", "-fPIC", "-O3", "-fno-math-errno", "-fopenmp-simd", "-w")
ENV = "CNA_JAX_CPU_KERNELS"  # "0" turns the kernels off


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _arch_flags() -> tuple[str, ...]:
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        return ("-mavx2", "-mfma")
    return ()


def _build(compiler: str) -> str:
    """Compiles the kernel library once per (source, jaxlib, flags); returns its path."""
    import jaxlib

    flags = _COMMON_FLAGS + _arch_flags()
    with open(_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + repr((jaxlib.__version__, flags)).encode()).hexdigest()[:16]
    path = os.path.join(cache_root(), "kernels", f"decode_attention-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, path)  # atomic: a concurrent process sees no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _build_and_register() -> bool:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        log.warning("cna_jax: no C++ compiler found; decode attention on CPU uses the (slower) XLA path")
        return False
    try:
        import ctypes

        lib = ctypes.cdll.LoadLibrary(_build(compiler))
        jax.ffi.register_ffi_target(DECODE_ATTENTION, jax.ffi.pycapsule(lib.CnaDecodeAttention), platform="cpu")
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("cna_jax: building the CPU decode-attention kernel failed (%s); using the XLA path", detail)
        return False
    return True


_load = functools.cache(_build_and_register)  # once per process


def enabled() -> bool:
    """Whether the decode-attention kernel is on (``CNA_JAX_CPU_KERNELS`` not "0") and built."""
    return os.environ.get(ENV, "1") != "0" and _load()


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """softmax(scale * q k^T over the valid columns) v, per slot and KV head, float32 (one device's arrays).

    q: [B, K, G, D] (G query rows per KV head); k, v: [B, K, S, D]; mask: [B, S] bool (True = attend);
    D a multiple of 8. Returns [B, K, G, D]; a slot with no valid column gets zeros."""
    call = jax.ffi.ffi_call(DECODE_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask.astype(bool),
                scale=np.float32(scale))
