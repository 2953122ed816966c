"""The CPU decode-attention kernel (cna_jax/csrc/decode_attention.cc through cna_jax.cpu_kernels) against a
float64 NumPy softmax-attention written here, and its place in the engine's compiled decode step (one
device and a (4, 1, 2) mesh); the packed-weight matmul (csrc/packed_matmul.cc) against float64 NumPy,
its builds for other vector widths bit for bit, and the engine's prefill and decode through it against
XLA's dots. Greedy tokens through both kernels are checked against HF ``generate`` by tests/test_engine.py
and tests/test_steering.py, which run the engine with the kernels on (the default)."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cna_jax import convert, cpu_kernels, engine, sharding as S
from hf_models import save_tiny


def _reference(q, k, v, mask, scale):
    """float64: softmax over the valid columns of scale * q k^T, times v; [B, K, G, D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bkgd,bksd->bkgs", q, k) * scale
    s = np.where(mask[:, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bkgs,bksd->bkgd", p, v)


@pytest.mark.parametrize("b,kv,g,d,s", [(5, 3, 3, 64, 37), (4, 2, 1, 8, 9), (3, 1, 4, 128, 70), (2, 2, 2, 24, 5)])
def test_kernel_matches_a_float64_reference(b, kv, g, d, s):
    """Masks as the engine makes them (left padding, a gap after a short prompt, a generated tail) and a
    slot with one valid column; scores large enough that the softmax is peaked. float32 rounding over
    <= 128-term dot products and <= 70-term sums: 2e-5 relative to the values' scale."""
    assert cpu_kernels.enabled()
    rng = np.random.default_rng(b * 1000 + d)
    q = rng.standard_normal((b, kv, g, d)).astype(np.float32) * 3
    k = rng.standard_normal((b, kv, s, d)).astype(np.float32)
    v = rng.standard_normal((b, kv, s, d)).astype(np.float32)
    mask = rng.random((b, s)) < 0.6
    mask[0] = False
    mask[0, s // 2] = True  # one valid column: the output is that column's values
    if b > 2:
        mask[1] = np.arange(s) >= s // 3  # left padding
        mask[2] = (np.arange(s) < 3) | (np.arange(s) >= s - 2)  # prefix, gap, generated tail
    got = np.asarray(jax.jit(cpu_kernels.decode_attention, static_argnums=4)(q, k, v, mask, d ** -0.5))
    want = _reference(q, k, v, mask, d ** -0.5)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(v).max())
    np.testing.assert_array_equal(got[0], v[0][:, None, s // 2].repeat(g, 1))
    # A slot with no valid column (an empty engine slot) gives zeros, not NaN.
    mask[-1] = False
    got = np.asarray(jax.jit(cpu_kernels.decode_attention, static_argnums=4)(q, k, v, mask, d ** -0.5))
    assert np.isfinite(got).all() and not got[-1].any()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = save_tiny(tmp_path_factory.mktemp("kernels"), "llama", num_attention_heads=8, num_key_value_heads=4)
    return path, *convert.load(path)


def _targets(text):
    return text.count(f'custom_call_target="{cpu_kernels.DECODE_ATTENTION}"')


def test_engine_decode_runs_the_kernel_per_device(tiny, monkeypatch):
    """The compiled decode step calls the kernel once per layer, on one device and on a (4, 1, 2) mesh,
    where each device's call sees its own slots and KV heads (shapes [1, 2, 2, 8] of [4, 4, 2, 8]: no
    gathered cache); with CNA_JAX_CPU_KERNELS=0 the step has no such call."""
    path, cfg, params = tiny
    slots, width, n = 4, 20, 8
    table = engine.put_host_table(engine.stack_conditions(cfg, [engine.Condition()]))
    eos = jnp.asarray([1], jnp.int32)
    state = engine.single_device_functions(cfg, jnp.float32, slots, width, n, 2).empty()
    stat = dict(cfg=cfg, dtype=jnp.float32, steps=2)

    def compiled():  # traced again (cleared caches), so it sees the environment
        jax.clear_caches()
        fn = jax.jit(engine.decode_fn, static_argnames=("cfg", "dtype", "steps"))
        return fn.lower(params, state, table, eos, **stat).compile().as_text()

    assert _targets(compiled()) == cfg.num_hidden_layers
    layout = S.make_layout(cfg, S.make_mesh((4, 1, 2)), "generation")
    fns = engine.sharded_functions(cfg, layout, jnp.float32, slots, width, n, 2)
    text = fns.decode.lower(S.shard_params(params, cfg, layout), fns.empty(),
                            fns.put_table(engine.stack_conditions(cfg, [engine.Condition()])), eos).compile().as_text()
    calls = [line for line in text.splitlines() if cpu_kernels.DECODE_ATTENTION in line]
    assert len(calls) == cfg.num_hidden_layers and all("f32[1,2,2,8]" in line for line in calls), calls[:1]
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert _targets(compiled()) == 0


def test_without_a_compiler_the_model_keeps_its_xla_path(monkeypatch, caplog):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="cna_jax.cpu_kernels"):
        assert cpu_kernels._build_and_register("decode_attention") is False
        assert cpu_kernels._build_and_register("packed_matmul") is False
    assert "no C++ compiler" in caplog.text


def test_a_failing_build_is_reported_not_raised(monkeypatch, caplog, tmp_path):
    """A compiler that fails (here: one that does not exist) leaves the XLA path and says why."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CNA_JAX_CACHE", str(tmp_path))  # nothing built there yet
    with caplog.at_level(logging.WARNING, logger="cna_jax.cpu_kernels"):
        assert cpu_kernels._build_and_register("packed_matmul") is False
    assert "building the CPU kernel packed_matmul failed" in caplog.text


@pytest.mark.parametrize("m,k,n", [(32, 64, 96), (5, 37, 50), (1, 8, 1), (13, 130, 200), (48, 96, 48)])
def test_packed_matmul_matches_a_float64_product(m, k, n):
    """Rows that do not fill a register tile, columns past the last whole panel, odd K. float32 rounding of a
    K-term multiply-add chain: <= K * eps relative to sum |x| |w|."""
    assert cpu_kernels.matmul_enabled()
    rng = np.random.default_rng(m * 7 + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    wp = jax.jit(cpu_kernels.pack)(w)
    w_ = cpu_kernels.panel()
    assert wp.shape == (-(-n // w_), k, w_) and w_ in (24, 48)
    got = np.asarray(jax.jit(cpu_kernels.packed_matmul, static_argnums=2)(x, wp, n))
    want = x.astype(np.float64) @ w.astype(np.float64)
    bound = k * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))
    assert got.shape == (m, n) and (np.abs(got - want) <= bound).all()
    # Leading axes are rows: [2, 3, K] x w is the [6, K] product.
    x3 = rng.standard_normal((2, 3, k)).astype(np.float32)
    got3 = np.asarray(jax.jit(cpu_kernels.packed_matmul, static_argnums=2)(x3, wp, n))
    np.testing.assert_array_equal(got3.reshape(6, n), np.asarray(cpu_kernels.packed_matmul(x3.reshape(6, k), wp, n)))


@pytest.mark.parametrize("n", [100, 4 * 48, 5 * 48 + 7, 1000])
def test_few_rows_give_the_bits_of_many(n):
    """One or two rows (a batch-1 decode step) take the kernel's few-row path, several panels at once; each
    output is the same multiply-add chain as in a full row block, so the rows' bits equal those of the same rows
    inside a larger product. n: fewer panels than one group (AVX-512), whole groups, a short last group."""
    assert cpu_kernels.matmul_enabled()
    rng = np.random.default_rng(n)
    k = 130
    x = rng.standard_normal((16, k)).astype(np.float32)
    wp = cpu_kernels.pack(rng.standard_normal((k, n)).astype(np.float32))
    matmul = jax.jit(cpu_kernels.packed_matmul, static_argnums=2)
    many = np.asarray(matmul(x, wp, n))
    for m in (1, 2, 3):
        np.testing.assert_array_equal(np.asarray(matmul(x[:m], wp, n)), many[:m], err_msg=f"{m} rows")


def test_packed_matmul_builds_agree_bit_for_bit(tmp_path, monkeypatch):
    """The build the engine uses (AVX-512 where the CPU has it) against the AVX2 + FMA build and the portable
    one (no vector flags: std::fma per term), all loaded here: every output is the same multiply-add chain,
    so the bits are equal (the claim that makes results independent of the vector width)."""
    import ctypes
    import shutil

    assert cpu_kernels.matmul_enabled()
    monkeypatch.setenv("CNA_JAX_CACHE", str(tmp_path))
    compiler = shutil.which("g++") or shutil.which("c++")
    rng = np.random.default_rng(0)
    k, n = 75, 300  # 7 panels of 48 columns, 13 of 24: the few-row path's groups of 4 panels, the last one short
    x = rng.standard_normal((11, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    want = np.asarray(cpu_kernels.packed_matmul(x, cpu_kernels.pack(w), n))
    builds = {"portable": ()}
    if cpu_kernels._arch_flags():
        builds["avx2"] = cpu_kernels._arch_flags()
    for name, flags in builds.items():
        lib = ctypes.cdll.LoadLibrary(cpu_kernels._build(compiler, "packed_matmul", flags))
        target = f"test_packed_matmul_{name}"
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.CnaPackedMatmul), platform="cpu")
        wp = cpu_kernels.pack(w, cpu_kernels.panel_width(flags))  # each build reads its own panel width
        for m in (11, 2, 1):  # a full row block and a short one; one and two rows (the few-row path)
            got = np.asarray(jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32))(x[:m], wp))
            np.testing.assert_array_equal(got, want[:m], err_msg=f"{name}, {m} rows")
        other = cpu_kernels.pack(w, 72 - cpu_kernels.panel_width(flags))  # 24 <-> 48: refused, not misread
        with pytest.raises(Exception, match="panel width"):
            jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((len(x), n), jnp.float32))(x, other).block_until_ready()


def test_kernels_give_the_same_bits_on_one_cpu_and_on_several():
    """Where the process may use several CPUs the packed matmul splits its column tiles and decode attention
    its slots over XLA's intra-op threads (csrc/parallel.h); each tile or slot is still computed whole by one
    thread, so the outputs equal, bit for bit, those of the same process pinned to one CPU (where neither
    splits). The shapes are large enough to split (a part keeps ~1 MFLOP)."""
    import os

    assert cpu_kernels.matmul_enabled() and cpu_kernels.enabled()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((48, 576)).astype(np.float32))
    wp = cpu_kernels.pack(jnp.asarray(rng.standard_normal((576, 1000)).astype(np.float32)))
    q = jnp.asarray(rng.standard_normal((16, 3, 3, 64)).astype(np.float32))
    k, v = (jnp.asarray(rng.standard_normal((16, 3, 200, 64)).astype(np.float32)) for _ in range(2))
    mask = jnp.asarray(rng.random((16, 200)) < 0.7)
    matmul = jax.jit(cpu_kernels.packed_matmul, static_argnums=2)
    attention = jax.jit(cpu_kernels.decode_attention, static_argnums=4)
    cpus = os.sched_getaffinity(0)
    outs = []
    try:
        for allowed in (cpus, {min(cpus)}):
            os.sched_setaffinity(0, allowed)
            outs.append((np.asarray(matmul(x, wp, 1000)), np.asarray(attention(q, k, v, mask, 0.125))))
    finally:
        os.sched_setaffinity(0, cpus)
    for several, one in zip(*outs):
        np.testing.assert_array_equal(several, one)
    np.testing.assert_allclose(outs[0][0], np.asarray(x) @ np.asarray(
        wp.transpose(1, 0, 2).reshape(576, -1)[:, :1000]), rtol=2e-4, atol=2e-4)


def test_engine_through_packed_weights(tiny, monkeypatch):
    """engine.packed_weights packs a model once (the same object for the next job), only on one CPU device in
    float32. Compiled with them, prefill and the decode step call the kernel for every weight product (7 per
    layer and the head: in prefill 7 in the scanned layer), and prefill plus 4 decode steps give XLA's greedy
    tokens (the kernel only reorders float32 sums)."""
    path, cfg, params = tiny

    class Lm:  # what packed_weights reads of an LM
        layout, dtype = None, jnp.float32

    lm = Lm()
    lm.cfg, lm.params = cfg, params
    packed = engine.packed_weights(lm)
    assert packed is not None and engine.packed_weights(lm) is packed
    lm.dtype = jnp.bfloat16
    assert engine.packed_weights(lm) is None
    lm.dtype = jnp.float32
    slots, width, n = 8, 24, 8
    fns = engine.single_device_functions(cfg, jnp.float32, slots, width, n, 4)
    mult = np.where(np.arange(cfg.num_neurons) % 3, 1.0, 0.0).reshape(cfg.num_hidden_layers, -1)
    table = fns.put_table(engine.stack_conditions(cfg, [engine.Condition(), engine.Condition(neuron_mult=mult)]))
    never = jnp.asarray([-1], jnp.int32)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, cfg.vocab_size, (2, 6)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    valid[1, :2] = False  # left padding
    cond = np.arange(2, dtype=np.int32)
    kernel_calls = 7 * cfg.num_hidden_layers + 1
    prefill = engine._forwards("cpu")[1]
    text = prefill.lower(params, None, tokens, valid, cond, table, never, packed=packed, cfg=cfg,
                         dtype=jnp.float32, width=width - n, max_new_tokens=n).compile().as_text()
    assert text.count(f'custom_call_target="{cpu_kernels.PACKED_MATMUL}"') == 7 + 1  # the layer scanned
    states = {}
    for name, kw in (("packed", {"packed": packed}), ("xla", {})):
        state = fns.empty()
        for i in range(0, slots, 2):  # every slot, in prefill calls of 2 rows
            state = fns.insert(params, state, None, tokens, valid, cond, np.arange(i, i + 2, dtype=np.int32), table,
                               never, **kw)
        states[name] = fns.decode(params, state, table, never, **kw)
    text = jax.jit(engine.decode_fn, static_argnames=("cfg", "dtype", "steps")).lower(
        params, state, table, never, packed, cfg=cfg, dtype=jnp.float32, steps=4).compile().as_text()
    assert text.count(f'custom_call_target="{cpu_kernels.PACKED_MATMUL}"') == kernel_calls
    ours, xla = states["packed"], states["xla"]
    np.testing.assert_array_equal(np.asarray(ours.out), np.asarray(xla.out))
    assert int(np.asarray(ours.step).min()) == 5  # the prefill's token and 4 decode steps
    np.testing.assert_allclose(np.asarray(ours.cache.k[-1]), np.asarray(xla.cache.k[-1]), rtol=0, atol=1e-5)
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert engine.packed_weights(lm) is None


def _log_softmax64(z):
    z = np.asarray(z, np.float64)
    s = z - z.max(-1, keepdims=True)
    return s - np.log(np.exp(s).sum(-1, keepdims=True))


@pytest.mark.parametrize("shape,scale", [((3, 5, 49152), 3.0), ((4, 37), 1.0), ((2, 2, 8), 20.0), ((6, 1), 1.0),
                                         ((3, 1000), 40.0)])
def test_row_kl_matches_float64(shape, scale):
    """KL between two rows of logits over the last axis (csrc/row_kl.cc) against float64 NumPy: a 49k
    vocabulary, rows that are not a whole number of 8-lane vectors, one-entry rows, peaked rows whose small
    entries fall below exp(-87). float32 rounding of 49k-term sums: 2e-5 relative. Logits equal to the
    reference's give a KL of exactly 0, as damage.kl_along's neutral conditions need."""
    assert cpu_kernels.row_kl_enabled()
    rng = np.random.default_rng(shape[-1] + int(scale))
    z = rng.standard_normal(shape).astype(np.float32) * scale
    zr = rng.standard_normal(shape).astype(np.float32) * scale
    got = np.asarray(jax.jit(cpu_kernels.row_kl)(z, zr))
    lp, lq = _log_softmax64(zr), _log_softmax64(z)
    want = (np.exp(lp) * (lp - lq)).sum(-1)
    assert got.shape == shape[:-1]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * scale)
    assert (np.asarray(jax.jit(cpu_kernels.row_kl)(zr, zr)) == 0).all()


def test_kl_along_through_the_row_kernels_one_device_and_a_mesh(tiny, monkeypatch):
    """damage.kl_along takes the row kernels on CPU: one device and a (4, 1, 2) mesh (each device's kernel
    calls see its own rows: [1, N, V] of [4, N, V]) agree with XLA's log-softmax path to float32 rounding,
    and the neutral condition is exactly 0 on both. The mesh's value equals one device's to rounding."""
    from cna_jax import damage
    from cna_jax.lm import LM

    path, cfg, params = tiny
    rng = np.random.default_rng(5)
    ids = [rng.integers(3, cfg.vocab_size, k).tolist() for k in (6, 4, 8, 5, 7)]
    conts = [rng.integers(3, cfg.vocab_size, k).tolist() for k in (5, 7, 3, 6, 2)]
    mult = np.ones((cfg.num_hidden_layers, cfg.intermediate_size), np.float32)
    mult[-1, :16] = 30.0
    conditions = [engine.Condition(mult), engine.Condition(direction=rng.normal(size=cfg.hidden_size), ablate=True),
                  engine.Condition()]
    layout = S.make_layout(cfg, S.make_mesh((4, 1, 2)), "generation")
    _, sharded = convert.load(path, shardings=lambda c: layout.params(c))
    lms = {"one": LM(cfg, params, tokenizer=None, chat=False),
           "mesh": LM(cfg, sharded, tokenizer=None, chat=False, layout=layout)}
    got = {}
    for name, lm in lms.items():
        assert damage.use_row_kernels(lm)
        got[name] = damage.kl_along(lm, ids, conts, conditions, batch_size=4)
    # The compiled KL program on the mesh: one kernel call per device, on that device's 1 of 4 rows.
    text = damage.kl_fn.lower(
        np.zeros((4, 3, cfg.vocab_size), np.float32), sharded, jnp.zeros((2, 4, 5, cfg.hidden_size), jnp.float32),
        jnp.int32(0), np.ones((4, 5), bool), np.zeros((4, 3), np.int32),
        engine.put_host_table(engine.stack_conditions(cfg, [engine.Condition(), engine.Condition()], steering=True)),
        jnp.zeros((4,), jnp.int32), cfg=cfg, dtype=jnp.float32, grid=1, kernel=True, layout=layout).compile().as_text()
    calls = [line for line in text.splitlines() if cpu_kernels.ROW_KL in line and "custom_call_target" in line]
    assert calls and all(f"f32[1,3,{cfg.vocab_size}]" in line for line in calls), calls[:1]
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert not damage.use_row_kernels(lms["one"])
    xla = damage.kl_along(lms["one"], ids, conts, conditions, batch_size=4)
    assert np.isnan(xla).sum() == np.isnan(got["one"]).sum() > 0
    for name in lms:
        np.testing.assert_allclose(got[name], xla, rtol=1e-4, atol=1e-6)
        assert np.all(got[name][2][~np.isnan(got[name][2])] == 0)
    assert np.nanmax(xla[:2]) > 1e-3  # the conditions move the distribution
