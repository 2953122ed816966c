"""Sharded forward / generation (the engine) / collection / LASSO on 8 simulated CPU devices equal one device.

A tiny random Llama (8 heads, 4 KV heads) saved with ``save_pretrained`` is loaded through the real
loader straight into each mesh's shardings; every mesh (data, fsdp, tensor) in MESHES must reproduce
the single-device logits, greedy tokens, collected activations and LASSO graphs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cna_jax import convert, engine, sharding as S
from cna_jax.collect import collect_fn, prefix_fn, sharded_collect, sharded_prefix
from cna_jax.batching import left_pad
from cna_jax.lm import LM
from cna_jax.models import forward
from cna_jax.models.config import from_hf_dict
from hf_models import left_padded_batch, save_tiny

MESHES = [(1, 1, 8), (2, 1, 4), (8, 1, 1)]
# KV heads (4) don't divide tensor=8: that mesh needs a fallback; the others don't.
KV = {(1, 1, 8): "batch", (2, 1, 4): None, (8, 1, 1): None}
NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = save_tiny(tmp_path_factory.mktemp("shard"), "llama", num_attention_heads=8, num_key_value_heads=4)
    cfg, params = convert.load(path)
    tokens, valid = left_padded_batch(np.random.default_rng(0), cfg.vocab_size, [5, 9, 12, 3, 7, 12, 1, 10], 12)
    mult = np.ones((cfg.num_hidden_layers, cfg.intermediate_size), np.float32)
    mult[1, :7] = 0.0  # a mask really in play
    eos = np.asarray([3], np.int32)
    select = np.full((8, 2), 11, np.int32)
    select[:, 0] = 10
    select_valid = np.ones((8, 2), bool)
    select_valid[6, 0] = False  # row 6 has a single token
    node_index = np.asarray([0, 5, 96 + 3, 2 * 96 + 95], np.int32)
    ref = dict(
        logits=np.asarray(forward(params, tokens, valid, mult, cfg=cfg)),
        gen=_generate(cfg, params, _rows(tokens, valid), mult, eos),
        collect=[np.asarray(a) for a in jax.jit(collect_fn, static_argnames=("cfg", "dtype"))(
            params, tokens, valid, select, select_valid, mult, node_index, cfg=cfg)],
    )
    inputs = dict(tokens=tokens, valid=valid, mult=mult, eos=eos, select=select, select_valid=select_valid,
                  node_index=node_index)
    return path, cfg, params, inputs, ref


def _rows(tokens, valid):
    """Left-padded [B, T] -> the token lists."""
    return [t[v].tolist() for t, v in zip(tokens, valid)]


def _generate(cfg, params, rows, mult, eos, layout=None, prefix=None):
    """Greedy rows through the engine (one condition, a slot per row) on one device or the layout."""
    lm = LM(cfg, params, tokenizer=None, chat=False, layout=layout)
    return engine.run(lm, [(r, 0) for r in rows], [engine.Condition(neuron_mult=mult)], max_new_tokens=NEW,
                      slots=len(rows), prefix=prefix, eos_ids=eos.tolist(), pad_id=0)


def _bytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_equals_single_device(tiny, shape):
    path, cfg, ref_params, x, ref = tiny
    mesh = S.make_mesh(shape)
    gen_layout = S.make_layout(cfg, mesh, "generation", kv_heads=KV[shape], batch=8)
    _, params = convert.load(path, shardings=lambda c: gen_layout.params(c))

    # Parameters really sharded: each device holds exactly its slices.
    total = _bytes(ref_params)
    per_dev = S.per_device_bytes(params)
    assert len(per_dev) == 8
    shardings = gen_layout.params(cfg)
    expected = sum(int(np.prod(sh.shard_shape(v.shape))) * v.dtype.itemsize
                   for v, sh in zip(jax.tree.leaves(ref_params), jax.tree.leaves(shardings)))
    assert set(per_dev.values()) == {expected}
    if shape[2] > 1:
        assert max(per_dev.values()) < 0.5 * total, (per_dev, total)
    else:  # data-parallel generation keeps full weights on every device
        assert min(per_dev.values()) == total

    logits = S.sharded_forward(cfg, gen_layout)(params, x["tokens"], x["valid"], x["mult"])
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=2e-5, rtol=1e-5)

    assert _generate(cfg, params, _rows(x["tokens"], x["valid"]), x["mult"], x["eos"], gen_layout) == ref["gen"]

    col_layout = S.make_layout(cfg, mesh, "collection", kv_heads="replicate", batch=8)
    col_params = S.shard_params(params, cfg, col_layout)
    sums, sumsq, acts = sharded_collect(cfg, col_layout)(
        col_params, x["tokens"], x["valid"], x["select"], x["select_valid"], x["mult"], x["node_index"])
    for got, want in zip((sums, sumsq, acts), ref["collect"]):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    assert acts.sharding.spec[0] == S.make_layout(cfg, mesh, "collection", kv_heads="replicate").spec(("batch",))[0]


@pytest.mark.parametrize("shape", [(2, 1, 4), (8, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_collect_with_shared_prefix(tiny, shape):
    """Collection with a shared prefix (its own batch-1 program, its keys and values replicated and read by the
    batch-split rows) on a mesh = one device with the prefix = one device on the full prompts."""
    path, cfg, params, x, _ = tiny
    rng = np.random.default_rng(3)
    prefix = rng.integers(0, cfg.vocab_size, 6).astype(np.int32)
    lengths = [5, 9, 12, 3, 7, 12, 2, 10]
    suffixes = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    tokens, valid = left_pad(suffixes, 12, 0)
    full_tokens, full_valid = left_pad([prefix.tolist() + s for s in suffixes], 18, 0)
    sel_valid = np.ones((8, 2), bool)
    last2 = lambda t: np.broadcast_to(np.arange(t - 2, t, dtype=np.int32), (8, 2)).copy()  # noqa: E731
    single = jax.jit(collect_fn, static_argnames=("cfg", "dtype"))
    want = single(params, full_tokens, full_valid, last2(18), sel_valid, x["mult"], x["node_index"], cfg=cfg)
    kv = jax.jit(prefix_fn, static_argnames=("cfg", "dtype"))(params, prefix, x["mult"], cfg=cfg)
    got1 = single(params, tokens, valid, last2(12), sel_valid, x["mult"], x["node_index"], kv, cfg=cfg)
    layout = S.make_layout(cfg, S.make_mesh(shape), "collection", kv_heads="replicate", batch=8)
    fn = sharded_collect(cfg, layout)
    sharded_params = S.shard_params(params, cfg, layout)
    kv_mesh = sharded_prefix(cfg, layout)(sharded_params, prefix, x["mult"])
    assert kv_mesh.k.sharding.is_fully_replicated
    got = fn(sharded_params, tokens, valid, last2(12), sel_valid, x["mult"], x["node_index"], kv_mesh)
    for g, g1, w in zip(got, got1, want):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(w), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)
    assert got[2].sharding.spec[0] == layout.spec(("batch",))[0]
    # Without the trailing prefix argument the sharded function runs the plain path (prefix None).
    plain = fn(S.shard_params(params, cfg, layout), full_tokens, full_valid, last2(18), sel_valid, x["mult"],
               x["node_index"])
    np.testing.assert_allclose(np.asarray(plain[2]), np.asarray(want[2]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 1, 4)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_generate_with_shared_prefix(tiny, shape):
    """Generation with a shared prefix (run once, its keys and values copied into every row's first cache
    slots) on a mesh = one device with the prefix = one device on the full prompts."""
    path, cfg, params, x, _ = tiny
    rng = np.random.default_rng(4)
    prefix = rng.integers(4, cfg.vocab_size, 6).tolist()
    suffixes = [rng.integers(4, cfg.vocab_size, n).tolist() for n in [5, 9, 12, 3, 7, 12, 2, 10]]
    want = _generate(cfg, params, [prefix + s for s in suffixes], x["mult"], x["eos"])
    assert _generate(cfg, params, suffixes, x["mult"], x["eos"], prefix=prefix) == want
    layout = S.make_layout(cfg, S.make_mesh(shape), "generation", kv_heads=KV[shape], batch=8)
    _, sharded_params = convert.load(path, shardings=lambda c: layout.params(c))
    assert _generate(cfg, sharded_params, suffixes, x["mult"], x["eos"], layout, prefix) == want


def test_kv_replicate_fallback_generation(tiny):
    path, cfg, _, x, ref = tiny
    layout = S.make_layout(cfg, S.make_mesh((1, 1, 8)), "generation", kv_heads="replicate")
    assert layout.rules_dict["kv_heads"] is None and layout.rules_dict["heads"] == "tensor"
    _, params = convert.load(path, shardings=lambda c: layout.params(c))
    assert _generate(cfg, params, _rows(x["tokens"], x["valid"]), x["mult"], x["eos"], layout) == ref["gen"]


def test_mesh_resolution_and_readable_errors(tiny):
    _, cfg, *_ = tiny
    assert S.resolve_mesh_shape((-1, 1, 4), 8) == (2, 1, 4)
    assert S.resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
    assert S.resolve_mesh_shape(None, 8) == (8, 1, 1)
    with pytest.raises(S.ShardingError, match="needs 16 devices but 8 are available"):
        S.make_mesh((2, 2, 4))
    with pytest.raises(S.ShardingError, match="multiply to 3, which does not divide 8"):
        S.make_mesh((3, 1, -1))
    with pytest.raises(S.ShardingError, match="at most one axis may be -1"):
        S.make_mesh((-1, 1, -1))

    import ml_collections

    lay = S.layout_from_config(cfg, ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=4, rules="collection")),
                               batch=8)
    assert dict(lay.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4} and lay.preset == "collection"

    mesh = S.make_mesh((1, 1, 8))
    # KV heads (4) on tensor=8: the error names both ways out.
    with pytest.raises(S.ShardingError, match=r"num_key_value_heads=4 .* kv_heads='replicate' .* kv_heads='batch'"):
        S.make_layout(cfg, mesh, "generation")
    # 4 query heads don't divide tensor=8 at all.
    small = from_hf_dict({**_hf(cfg), "num_attention_heads": 4, "num_key_value_heads": 2})
    with pytest.raises(S.ShardingError, match=r"num_attention_heads=4 \(logical axis 'heads'\) is not divisible by tensor=8"):
        S.make_layout(small, mesh, "generation", kv_heads="replicate")
    with pytest.raises(S.ShardingError, match=r"batch=5 .* not divisible by data=2"):
        S.make_layout(cfg, S.make_mesh((2, 1, 4)), "generation", batch=5)
    with pytest.raises(S.ShardingError, match="unknown rule preset"):
        S.make_layout(cfg, mesh, "nope")


def test_sharded_function_takes_dynamic_arguments_by_name(tiny):
    """A ShardedFunction's dynamic arguments go by position or by name; the ones left out are None, a
    name it does not have or one already given by position is an error (before any compile)."""
    _, cfg, *_ = tiny
    layout = S.make_layout(cfg, S.make_mesh((8, 1, 1)), "generation")

    def f(a, b=None, c=None, *, scale):
        return a * scale + (0 if b is None else b) + (0 if c is None else 10 * c)

    rep = layout.replicated()
    fn = S.ShardedFunction(f, layout, (rep, rep, rep), rep, {"scale": 2.0})
    one = jnp.ones((8,))
    np.testing.assert_array_equal(np.asarray(fn(one, c=one)), np.full((8,), 12.0))
    np.testing.assert_array_equal(np.asarray(fn(one, one)), np.full((8,), 3.0))
    np.testing.assert_array_equal(np.asarray(fn(a=one, b=one, c=one)), np.full((8,), 13.0))
    with pytest.raises(TypeError, match="no dynamic argument 'scale'"):
        fn(one, scale=one)
    with pytest.raises(TypeError, match="no dynamic argument 'a'"):
        fn(one, a=one)


def test_llama70b_kv_heads_on_tensor16_error_and_fallbacks():
    """Pitfall 8 on the real shape (no devices needed beyond an abstract check of divisibility)."""
    import importlib

    shape = importlib.import_module("configs.pairs").get_config("llama_3_1_70b").model.shape.to_dict()
    cfg = from_hf_dict(shape)
    devices = np.asarray(jax.devices() * 2, dtype=object)[:16]  # 16 entries: shape checks only
    mesh = jax.sharding.Mesh(devices.reshape(1, 1, 16), S.AXES)
    with pytest.raises(S.ShardingError, match=r"num_key_value_heads=8 is not divisible by the tensor=16"):
        S.make_layout(cfg, mesh, "generation")
    rep = S.make_layout(cfg, mesh, "generation", kv_heads="replicate")
    assert rep.spec(("layers", "cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")) == \
        jax.sharding.PartitionSpec(None, "data", None, None, None)
    bat = S.make_layout(cfg, mesh, "generation", kv_heads="batch", batch=64)
    assert bat.spec(("cache_batch",)) == jax.sharding.PartitionSpec(("data", "tensor"))
    # 8 x 80 GB layout: tensor=8 divides everything.
    mesh8 = jax.sharding.Mesh(np.asarray(jax.devices(), dtype=object).reshape(1, 1, 8), S.AXES)
    lay = S.make_layout(cfg, mesh8, "generation", batch=64)
    assert S.cache_bytes_per_device(cfg, lay, 64, 2048, jnp.bfloat16) == 2 * 80 * 64 * 2048 * 1 * 128 * 2


def _hf(cfg):
    d = cfg.to_dict()
    d.pop("eos_token_ids")
    d["model_type"] = cfg.model_type
    return d


@pytest.fixture(scope="module")
def lasso_data():
    rng = np.random.default_rng(1)
    n, p = 160, 21  # p not a multiple of 8: the node axis is padded
    z = rng.normal(size=(n, 6))
    w = rng.normal(size=(6, p)) * (rng.random((6, p)) < 0.4)
    return z @ w + rng.normal(size=(n, p))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_lasso_graph_equals_single_device(lasso_data, shape):
    from cna_jax import graph, lasso

    st = graph.GraphSettings(k_candidates=8, n_lambdas=12, progress=False)
    want = graph.fit_graph(lasso_data, st)
    layout = S.node_layout(S.make_mesh(shape))
    fit = graph.sharded_fit_graph(layout, st)
    got = fit(lasso_data)
    assert want["adjacency"].sum() > 0
    assert got["k_solved"] == want["k_solved"]
    for key in ("adjacency", "directed", "n_candidates", "constant"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # λ grids start at max |x_j . y| / n: a float32 sum of 160 products whose order follows the kernel and
    # the sharding; its relative error is bounded by ~n * eps = 2e-5, and ~sqrt(n) * eps in practice.
    np.testing.assert_allclose(got["lam"], want["lam"], rtol=2e-5)
    # The duality gap is a difference of two O(1) objectives (standardised columns: y.y/n = 1), so its
    # last bits follow the reduction order (seen: 9.6058e-05 vs 9.6118e-05 on an AVX2-only machine).
    # What matters: both solves certify the tolerance, and agree to a few float32 ulps of the objective.
    assert got["max_gap"] <= st.tol and want["max_gap"] <= st.tol
    np.testing.assert_allclose(got["max_gap"], want["max_gap"], rtol=0, atol=2e-6)

    # The batched solver itself: node axis padded to a multiple of 8 and split, same path as one device.
    xj = jnp.asarray(graph.standardize(jnp.asarray(lasso_data, jnp.float32))[0])
    gram = xj.T @ xj / xj.shape[0]
    p = gram.shape[0]
    cand = jnp.asarray(np.stack([np.delete(np.arange(p), j)[:8] for j in range(p)]), jnp.int32)
    cmask = jnp.ones(cand.shape, bool)
    sub, xty, yty = lasso.gather_candidates(gram, cand, cmask, jnp.arange(p))
    grid = lasso.lambda_grid(jnp.max(jnp.abs(xty), axis=1), 10, 0.05)
    ref = lasso.lasso_path_candidates(sub, xty, yty, cmask, grid, 1e-4)
    res = fit.solver(sub, xty, yty, cmask, grid, 1e-4)
    assert res.coef.shape == ref.coef.shape
    # Each node's solve is independent (no cross-device reduction), but the per-device batch may pick
    # other CPU kernels, so floats may differ in their last bits: the supports and non-zero counts are
    # compared exactly; coefficients and RSS (O(1) for standardised data) at a few hundred float32 ulps;
    # both gaps certify the tolerance; sweep counts (work, not results) within one sweep.
    np.testing.assert_array_equal(np.asarray(res.coef) != 0, np.asarray(ref.coef) != 0)
    np.testing.assert_array_equal(np.asarray(res.df), np.asarray(ref.df))
    np.testing.assert_allclose(np.asarray(res.coef), np.asarray(ref.coef), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.rss), np.asarray(ref.rss), rtol=0, atol=1e-5)
    assert np.all(np.asarray(res.gap) <= 1e-4) and np.all(np.asarray(ref.gap) <= 1e-4)
    assert np.abs(np.asarray(res.n_iter) - np.asarray(ref.n_iter)).max() <= 1
    # Each device solved its own block of nodes. The solver's answer is cut back to the p real nodes
    # (that slice may be replicated: 8 devices hold it either way), so the split is read on the padded
    # program's own output: its node axis must be cut into one distinct block per device of the mesh
    # axes the layout assigns to ``nodes``, N / n_dev nodes each (a replicated or partly split output
    # has fewer distinct blocks or bigger ones).
    nodes_axes = layout.rules_dict["nodes"]
    nodes_axes = (nodes_axes,) if isinstance(nodes_axes, str) else tuple(nodes_axes or ())
    n_dev = int(np.prod([layout.mesh.shape[a] for a in nodes_axes]))
    assert n_dev == 8  # nodes span data x fsdp x tensor: every device of each mesh here
    n_pad = n_dev * p  # a multiple of the device count; the extra problems are inert (no candidates)
    pad = n_pad - p
    k = cand.shape[1]
    padded = (jnp.concatenate([sub, jnp.broadcast_to(jnp.eye(k, dtype=sub.dtype), (pad, k, k))]),
              jnp.concatenate([xty, jnp.zeros((pad, k), xty.dtype)]), jnp.concatenate([yty, jnp.ones((pad,))]),
              jnp.concatenate([cmask, jnp.zeros((pad, k), bool)]), jnp.concatenate([grid, jnp.ones((pad, 10))]))
    full = fit.solver.jitted(*padded, jnp.asarray(1e-4, jnp.float32))
    shards = full.coef.addressable_shards
    blocks = {s.index[1].indices(n_pad) for s in shards}
    assert len({s.device for s in shards}) == n_dev and len(blocks) == n_dev, (blocks, full.coef.sharding)
    assert {s.data.shape for s in shards} == {(10, n_pad // n_dev, k)}
    assert sorted(b[0] for b in blocks) == list(range(0, n_pad, n_pad // n_dev))
    np.testing.assert_array_equal(np.asarray(full.coef)[:, p:], 0.0)  # inert padding stays 0
    np.testing.assert_array_equal(np.asarray(full.coef)[:, :p], np.asarray(res.coef))  # same program, same nodes


def test_distributed_helpers_single_process():
    from cna_jax import distributed

    assert distributed.is_writer() and distributed.process_rows(8) == slice(0, 8)
    assert distributed.initialize_from_config({"distributed": False}) is False
    layout = S.make_layout(
        from_hf_dict({**_hf_tiny(), "num_attention_heads": 8, "num_key_value_heads": 8}), S.make_mesh((2, 1, 4)))
    local = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    arr = distributed.global_batch(local, layout.batch(2))
    assert arr.sharding == layout.batch(2)
    np.testing.assert_array_equal(np.asarray(arr), local)


def _hf_tiny():
    return dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
