"""Orbax convert-once: a tiny model round-trips exactly and restores straight into a mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cna_jax import checkpoint, convert, sharding as S
from cna_jax.models import forward
from hf_models import left_padded_batch, save_tiny


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    path, _ = save_tiny(d, "qwen2", num_attention_heads=8, num_key_value_heads=8)  # q/k/v biases too
    cfg, params = convert.load(path)
    out = checkpoint.convert_once(path, str(d / "orbax"), dtype=jnp.float32)
    return path, out, cfg, params


def test_round_trip_exact(converted):
    _, out, cfg, params = converted
    cfg2, restored = checkpoint.restore(out)
    assert cfg2 == cfg
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # convert_once does not convert again when the checkpoint exists.
    assert checkpoint.convert_once("/nonexistent/model", out) == out


def test_restore_sharded_into_mesh(converted):
    _, out, cfg, params = converted
    layout = S.make_layout(cfg, S.make_mesh((2, 1, 4)), "generation")
    cfg2, restored = checkpoint.restore(out, layout=layout)
    want = layout.params(cfg)
    for leaf, sh, ref in zip(jax.tree.leaves(restored), jax.tree.leaves(want), jax.tree.leaves(params)):
        assert leaf.sharding == sh  # restored into the requested sharding, not the saved one
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))
    per_dev = S.per_device_bytes(restored)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert max(per_dev.values()) < 0.5 * total
    tokens, valid = left_padded_batch(np.random.default_rng(0), cfg.vocab_size, [4, 9, 6, 9], 9)
    np.testing.assert_allclose(np.asarray(S.sharded_forward(cfg, layout)(restored, tokens, valid, None)),
                               np.asarray(forward(params, tokens, valid, None, cfg=cfg)), atol=2e-5, rtol=1e-5)


def test_restore_casts_and_reports_missing(converted, tmp_path):
    _, out, cfg, params = converted
    _, bf = checkpoint.restore(out, dtype=jnp.bfloat16)
    leaf = jax.tree.leaves(bf)[0]
    assert leaf.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(jax.tree.leaves(params)[0].astype(jnp.bfloat16)))
    with pytest.raises(FileNotFoundError, match="not a cna_jax Orbax checkpoint"):
        checkpoint.restore(str(tmp_path))


def test_convert_once_from_sharded_load(converted, tmp_path):
    """Loading straight into a mesh (no whole copy on one device) and saving from there."""
    path, _, cfg, params = converted
    layout = S.make_layout(cfg, S.make_mesh((1, 1, 8)), "generation")
    out = checkpoint.convert_once(path, str(tmp_path / "sharded"), dtype=jnp.float32, layout=layout)
    _, restored = checkpoint.restore(out)  # onto one device: every slice was written
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
