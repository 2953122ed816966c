"""Hand-written CPU kernels behind XLA's FFI: the engine's decode attention and its weight products, and
the damage stage's log-softmax and KL over the vocabulary.

Decode attention: in a decode step each slot's 1-4 query rows per KV head meet the whole cache window.
XLA:CPU runs that as batched matmuls over every column, masked ones included, at ~7 GB/s of cache read
(the largest cost of a SmolLM2 step at 64 slots after the weight products). ``csrc/decode_attention.cc``
reads only the columns each slot's mask marks valid, so it costs what the slots' real lengths do (about
half the window in the study's jobs), and is ~2x faster per column read.

Packed matmul: a decode step multiplies a few dozen rows by every weight once, streaming the weights from
memory; XLA:CPU repacks each weight per call, which at 32 rows costs about as much as the arithmetic.
``csrc/packed_matmul.cc`` reads weights :func:`pack` laid out once per model (a second copy of every
weight) in panels one register tile wide (:func:`panel`: 48 columns with AVX-512, 24 otherwise): one core,
SmolLM2 shapes at 32 rows, 95-104 GFLOP/s against XLA's 71-82 on the AVX-512 machine (``engine.packed_weights``
and ``engine.PACKED_MAX_SLOTS`` say when the engine uses it).

Row KL: the damage stage (``cna_jax.damage``) scores every condition at ~600 positions per
device and batch, each a 49k-entry distribution. XLA:CPU runs its row reductions over fused elementwise work
at ~3 ns per entry: ~380 ms per condition and batch on one core, 40% of a condition that starts in the last
layers. ``csrc/row_kl.cc`` runs each row's passes in 8-lane vectors while the row is in cache (~40 ms).

Threads: where the process may use more than one CPU (its affinity mask; a study process pinned to one
core may not), the packed matmul splits its column tiles and decode attention its slots over XLA's intra-op
thread pool (``csrc/parallel.h``); a tile or slot is computed whole by one thread, so the bits do not depend
on the number of threads. On 2 cores the decode step's products run 1.5-2x faster than on one (the testbed
build's original answers: 37.7 -> 21.3 s).

Each kernel is compiled on first use with the system's C++ compiler into ``$CNA_JAX_CACHE/kernels`` (else
``~/.cache/cna_jax/kernels``), keyed by its source and csrc's headers, jaxlib's version and the flags,
and registered with ``jax.ffi``. Fixed flags give the same bits on every machine of a kind: AVX2 + FMA on
x86-64 that has them, else portable code; the matmul also uses AVX-512 where the CPU has it, with the same bits as its
AVX2 and portable builds (each output is one multiply-add chain in k order). Without a compiler, or with
``CNA_JAX_CPU_KERNELS=0``, the model keeps its XLA path (one warning); both agree to float32 rounding
(tests/test_cpu_kernels.py).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
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
PACKED_MATMUL = "cna_packed_matmul"
ROW_KL = "cna_row_kl"
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_COMMON_FLAGS = ("-std=c++17", "-shared", "-fPIC", "-O3", "-fno-math-errno", "-fopenmp-simd", "-w")
ENV = "CNA_JAX_CPU_KERNELS"  # "0" turns the kernels off


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _arch_flags(widest: bool = False) -> tuple[str, ...]:
    """AVX2 + FMA on x86-64 that has them (with ``widest``: AVX-512 where the CPU has it), else none."""
    flags = _cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= flags:
        return ()
    if widest and "avx512f" in flags:
        return ("-mavx2", "-mfma", "-mavx512f")
    return ("-mavx2", "-mfma")


def panel_width(flags: tuple[str, ...]) -> int:
    """Columns per packed weight panel of the matmul build with these ``_arch_flags`` (kPanel in
    csrc/packed_matmul.cc, one register tile's width): 48 with AVX-512, else 24."""
    return 48 if "-mavx512f" in flags else 24


def panel() -> int:
    """The panel width of the matmul build this process uses (:func:`pack`'s layout)."""
    return panel_width(_arch_flags(widest=_KERNELS["packed_matmul"][1]))


def _build(compiler: str, name: str, flags: tuple[str, ...]) -> str:
    """Compiles ``csrc/<name>.cc`` once per (source, jaxlib, flags); returns the library's path."""
    import jaxlib

    flags = _COMMON_FLAGS + flags
    source = os.path.join(_CSRC, f"{name}.cc")
    digest = hashlib.sha256(repr((jaxlib.__version__, flags)).encode())
    for part in [source] + sorted(os.path.join(_CSRC, f) for f in os.listdir(_CSRC) if f.endswith(".h")):
        with open(part, "rb") as f:  # the kernel's source and the headers it may include
            digest.update(f.read())
    key = digest.hexdigest()[:16]
    path = os.path.join(cache_root(), "kernels", f"{name}-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        cmd = [compiler, *flags, f"-I{jax.ffi.include_dir()}", source, "-o", tmp]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, path)  # atomic: a concurrent process sees no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# name (csrc/<name>.cc) -> ((handler symbol, FFI target) per handler, whether it is built for the widest vectors)
_KERNELS = {"decode_attention": ((("CnaDecodeAttention", DECODE_ATTENTION),), False),
            "packed_matmul": ((("CnaPackedMatmul", PACKED_MATMUL),), True),
            "row_kl": ((("CnaRowKl", ROW_KL),), False)}


def _build_and_register(name: str) -> bool:
    handlers, widest = _KERNELS[name]
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        log.warning("cna_jax: no C++ compiler found; %s on CPU uses the (slower) XLA path", name)
        return False
    try:
        import ctypes

        lib = ctypes.cdll.LoadLibrary(_build(compiler, name, _arch_flags(widest)))
        for symbol, target in handlers:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", "") or e
        log.warning("cna_jax: building the CPU kernel %s failed (%s); using the XLA path", name, detail)
        return False
    return True


_load = functools.cache(_build_and_register)  # once per process and kernel


def enabled() -> bool:
    """Whether the decode-attention kernel is on (``CNA_JAX_CPU_KERNELS`` not "0") and built."""
    return os.environ.get(ENV, "1") != "0" and _load("decode_attention")


def matmul_enabled() -> bool:
    """Whether the packed-weight matmul kernel is on (``CNA_JAX_CPU_KERNELS`` not "0") and built."""
    return os.environ.get(ENV, "1") != "0" and _load("packed_matmul")


def row_kl_enabled() -> bool:
    """Whether the damage stage's KL kernel is on (``CNA_JAX_CPU_KERNELS`` not "0") and built."""
    return os.environ.get(ENV, "1") != "0" and _load("row_kl")


def register_all() -> None:
    """Builds and registers every kernel that is on: a process that loads a program another process compiled
    (:mod:`cna_jax.precompile`) has not traced the calls that register them on first use."""
    if os.environ.get(ENV, "1") != "0":
        for name in _KERNELS:
            _load(name)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """softmax(scale * q k^T over the valid columns) v, per slot and KV head, float32 (one device's arrays).

    q: [B, K, G, D] (G query rows per KV head); k, v: [B, K, S, D]; mask: [B, S] bool (True = attend);
    D a multiple of 8. Returns [B, K, G, D]; a slot with no valid column gets zeros."""
    call = jax.ffi.ffi_call(DECODE_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask.astype(bool),
                scale=np.float32(scale))


def pack(w: jax.Array, width: int | None = None) -> jax.Array:
    """w [K, N] float32 -> [ceil(N / W), K, W]: column panels, k-major, zero past N (the layout
    :func:`packed_matmul` reads). W: ``width``, default :func:`panel` (this process's build)."""
    k, n = w.shape
    width = width or panel()
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, -n % width)))
    return w.reshape(k, -1, width).transpose(1, 0, 2)


def packed_matmul(x: jax.Array, w_packed: jax.Array, n: int) -> jax.Array:
    """x [..., K] times the weight w [K, N] that :func:`pack` made ``w_packed`` from -> [..., N] float32.

    Each output is one fused multiply-add chain over K in order: the same bits on AVX-512 and AVX2."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    call = jax.ffi.ffi_call(PACKED_MATMUL, jax.ShapeDtypeStruct((rows, n), jnp.float32))
    return call(x.reshape(rows, k).astype(jnp.float32), w_packed).reshape(*lead, n)


def row_kl(z: jax.Array, ref: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis, natural log: p = softmax(ref), q = softmax(z). z, ref: [..., V] logits
    -> [...] float32 (one device's arrays). Where z equals ref, exactly 0."""
    call = jax.ffi.ffi_call(ROW_KL, jax.ShapeDtypeStruct(z.shape[:-1], jnp.float32))
    return call(z.astype(jnp.float32), ref.astype(jnp.float32))

