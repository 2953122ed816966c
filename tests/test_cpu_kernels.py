"""The CPU decode-attention kernel (cna_jax/csrc/decode_attention.cc through cna_jax.cpu_kernels) against a
float64 NumPy softmax-attention written here, and its place in the engine's compiled decode step (one
device and a (4, 1, 2) mesh). Greedy tokens through it are checked against HF ``generate`` by
tests/test_engine.py and tests/test_steering.py, which run the engine with the kernel on (the default)."""
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
        assert cpu_kernels._build_and_register() is False
    assert "no C++ compiler" in caplog.text


def test_a_failing_build_is_reported_not_raised(monkeypatch, caplog, tmp_path):
    """A compiler that fails (here: one that does not exist) leaves the XLA path and says why."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CNA_JAX_CACHE", str(tmp_path))  # nothing built there yet
    with caplog.at_level(logging.WARNING, logger="cna_jax.cpu_kernels"):
        assert cpu_kernels._build_and_register() is False
    assert "building the CPU decode-attention kernel failed" in caplog.text
