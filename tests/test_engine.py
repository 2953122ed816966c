"""The continuous-batching engine against HF ``generate``: per-row conditions, more rows than slots, rows
ending at different steps, three prefill length buckets; on one device and on a (4, 1, 2) mesh of 8
simulated CPU devices.

The reference for a row under condition c is HF greedy ``generate`` with a ``down_proj`` forward
pre-hook that multiplies its input (the neurons) by c's multiplier -- independent code from ours.
SmolLM2 under mixed conditions (neuron multipliers and steering in one job, more rows than slots, rows
ending at different steps) is checked the same way in tests/test_steering.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cna_jax import convert, engine, sharding as S
from cna_jax.batching import bucket, left_pad
from cna_jax.lm import LM
from hf_models import save_tiny


def _hooked(hf, mult):
    """Registers down_proj pre-hooks multiplying the neurons by ``mult`` [L, I]; returns the handles."""
    handles = []
    for layer, m in enumerate(mult):
        scale = torch.tensor(m)
        handles.append(hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, scale=scale: (args[0] * scale,)))
    return handles


def _hf_rows(hf, ids, mult, n, eos, pad):
    """HF greedy continuations (cut after the first EOS) of token lists under one multiplier."""
    tokens, valid = left_pad(ids, bucket(max(map(len, ids))), pad)
    handles = [] if mult is None else _hooked(hf, mult)
    try:
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                              attention_mask=torch.tensor(valid.astype(np.int64)), max_new_tokens=n,
                              do_sample=False, eos_token_id=list(eos) if eos else None, pad_token_id=pad)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for r in out[:, tokens.shape[1]:].numpy().tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:cut])
    return rows


def _random_mult(cfg, seed, n):
    rng = np.random.default_rng(seed)
    m = np.ones((cfg.num_hidden_layers, cfg.intermediate_size), np.float32)
    m[rng.integers(2 % cfg.num_hidden_layers, cfg.num_hidden_layers, n), rng.integers(0, cfg.intermediate_size, n)] = 0
    return m


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    """A tiny random Llama (8 heads, 4 KV heads), 20 rows over 3 conditions and the HF reference tokens.

    A random model rarely emits a particular EOS, so the EOS id is chosen from HF's own unlimited
    continuations: the token that first appears mid-generation in the most rows, so rows end at
    different steps."""
    path, hf = save_tiny(tmp_path_factory.mktemp("engine"), "llama", num_attention_heads=8, num_key_value_heads=4)
    hf.generation_config.eos_token_id = None  # unlimited continuations; our EOS is chosen below
    cfg, params = convert.load(path)
    rng = np.random.default_rng(3)
    prefix = rng.integers(4, cfg.vocab_size, 6).tolist()
    suffixes = [rng.integers(4, cfg.vocab_size, k).tolist() for k in [5, 9, 12, 3, 7, 12, 2, 10, 4, 6]]
    ids = [prefix + s for s in suffixes]
    n = 12
    conds = [None, _random_mult(cfg, 2, 60), _random_mult(cfg, 3, 150)]
    free = {c: _hf_rows(hf, ids, conds[c], n, (), 0) for c in range(3)}
    first = {}
    for c in range(3):
        for r in free[c]:
            for i, t in enumerate(r[:n - 2]):
                if i >= 1 and t not in r[:i]:
                    first[t] = first.get(t, 0) + 1
    eos = min(first, key=lambda t: (-first[t], t))
    want = {c: [r[:r.index(eos) + 1] if eos in r else r for r in free[c]] for c in range(3)}
    rows = [(suffixes[j], c) for j in range(len(suffixes)) for c in (0, 1, 2)][:20]
    return path, cfg, params, prefix, rows, conds, eos, want, suffixes


def _check_tiny(lm, job, slots=8):
    """length_multiple=4: the 2-12-token suffixes fall in three prefill length buckets (4, 8, 12), so
    shorter rows sit after a gap of unused columns in their slot."""
    _, _, _, prefix, rows, conds, eos, want, suffixes = job
    got = engine.run(lm, rows, [engine.Condition(m) for m in conds], max_new_tokens=12, slots=slots, chunk=3,
                     prefix=prefix, eos_ids=[eos], pad_id=0, length_multiple=4)
    for (tok, c), out in zip(rows, got):
        assert out == want[c][suffixes.index(tok)], (c, suffixes.index(tok))
    assert len({len(x) for x in got}) >= 3 and len(rows) > 8


def test_tiny_mixed_conditions_single_device(tiny_job):
    _, cfg, params, *_ = tiny_job
    _check_tiny(LM(cfg, params, tokenizer=None, chat=False), tiny_job)


def test_tiny_mixed_conditions_on_a_4x1x2_mesh(tiny_job):
    path, cfg, *_ = tiny_job
    layout = S.make_layout(cfg, S.make_mesh((4, 1, 2)), "generation")
    _, params = convert.load(path, shardings=lambda c: layout.params(c))
    lm = LM(cfg, params, tokenizer=None, chat=False, layout=layout)
    _check_tiny(lm, tiny_job)  # 8 slots: prefill calls of 2 rows, replicated (2 does not divide over data=4)
    _check_tiny(lm, tiny_job, slots=16)  # 4 rows, split over the data axis
    _check_stop(lm, tiny_job)


def test_tiny_mixed_conditions_on_a_data_parallel_mesh_through_packed_weights(tiny_job):
    """On a (4, 1, 1) mesh (weights replicated) the engine takes the packed weights: each device's kernel
    calls multiply only its own rows (4 of 16 slots in a decode step), and every row's tokens are HF's. A
    mesh that splits weights over ``tensor`` keeps XLA's dots."""
    from cna_jax import cpu_kernels

    path, cfg, *_ = tiny_job
    layout = S.make_layout(cfg, S.make_mesh((4, 1, 1), devices=jax.devices()[:4]), "generation")
    _, params = convert.load(path, shardings=lambda c: layout.params(c))
    lm = LM(cfg, params, tokenizer=None, chat=False, layout=layout)
    packed = engine.packed_weights(lm)
    assert packed is not None and all(x.sharding.is_fully_replicated for x in jax.tree.leaves(packed))
    _check_tiny(lm, tiny_job)  # prefill calls of 2 rows, replicated
    _check_tiny(lm, tiny_job, slots=16)  # 4 rows, split; 4 slots per device
    _check_stop(lm, tiny_job)
    fns = engine.sharded_functions(cfg, layout, jnp.float32, 16, 40, 12, 3)
    table = fns.put_table(engine.stack_conditions(cfg, [engine.Condition()]))
    text = fns.decode.lower(params, fns.empty(), table, jnp.asarray([1], jnp.int32), packed=packed).compile().as_text()
    calls = [line for line in text.splitlines() if f'custom_call_target="{cpu_kernels.PACKED_MATMUL}"' in line]
    assert len(calls) == 7 * cfg.num_hidden_layers + 1
    assert all(line.split("= f32[")[1].startswith("4,") for line in calls), calls[0]
    split = S.make_layout(cfg, S.make_mesh((4, 1, 2)), "generation")
    _, split_params = convert.load(path, shardings=lambda c: split.params(c))
    assert engine.packed_weights(LM(cfg, split_params, tokenizer=None, chat=False, layout=split)) is None


def _check_stop(lm, job):
    """``stop`` ends rows of condition 1 once they hold 5 tokens: each ends with a prefix of HF's row at
    least that long, is never asked about again, and its slot goes to the queue (more rows than slots);
    the other rows are unchanged."""
    _, _, _, prefix, rows, conds, eos, want, suffixes = job
    asked_after = []

    def stop(r, tokens):
        if r in stopped:
            asked_after.append(r)
        if rows[r][1] == 1 and len(tokens) >= 5:
            stopped.add(r)
            return True
        return False

    stopped = set()
    got = engine.run(lm, rows, [engine.Condition(m) for m in conds], max_new_tokens=12, slots=4, chunk=3,
                     prefix=prefix, eos_ids=[eos], pad_id=0, length_multiple=4, stop=stop)
    cut = 0
    for r, ((tok, c), out) in enumerate(zip(rows, got)):
        ref = want[c][suffixes.index(tok)]
        if r in stopped:
            assert 5 <= len(out) < len(ref) and out == ref[:len(out)], (r, out, ref)
            cut += 1
        else:
            assert out == ref, (r, c)
    assert cut >= 2 and not asked_after


def test_stop_ends_rows_early(tiny_job):
    _, cfg, params, *_ = tiny_job
    _check_stop(LM(cfg, params, tokenizer=None, chat=False), tiny_job)


def test_jobs_with_one_table_size_share_compiled_programs(tiny_job):
    """Two jobs with 3 and 2 conditions and ``min_table_rows=8`` run the same compiled prefix, prefill and
    decode programs (the study's generation and sweeps jobs), with HF's tokens; without it the
    2-condition job's table (bucket 2 instead of 4) compiles its own."""
    _, cfg, params, prefix, rows, conds, eos, want, suffixes = tiny_job
    lm = LM(cfg, params, tokenizer=None, chat=False)
    decode = engine._decode("cpu")
    fns = engine._forwards("cpu")[:2] + (decode,)

    def job(n_conds, **kw):
        job_rows = [r for r in rows if r[1] < n_conds]
        got = engine.run(lm, job_rows, [engine.Condition(m) for m in conds[:n_conds]], max_new_tokens=12, slots=8,
                         chunk=3, prefix=prefix, eos_ids=[eos], pad_id=0, length_multiple=4, **kw)
        for (tok, c), out in zip(job_rows, got):
            assert out == want[c][suffixes.index(tok)], (c, suffixes.index(tok))

    job(3, min_table_rows=8)
    compiled = [f._cache_size() for f in fns]
    job(2, min_table_rows=8)
    assert [f._cache_size() for f in fns] == compiled
    job(2)
    assert all(f._cache_size() > n for f, n in zip(fns, compiled))


def test_rows_start_at_their_first_changed_layer(tiny_job, monkeypatch):
    """Rows whose condition leaves layers 0-1 unchanged (none; multipliers on layer 2) are prefilled from
    layer 2 on the unmodified model's lower layers, computed once per prompt (the store pass), while a
    condition changing layer 0 runs every layer in the same job: every row's tokens equal HF's. With the
    store over its memory budget every row runs every layer, with the same tokens and no store pass."""
    from transformers import AutoModelForCausalLM

    path, cfg, params, prefix, _, conds, eos, want, suffixes = tiny_job
    low = np.ones_like(conds[1])
    low[0, :12] = 0
    conditions = [engine.Condition(conds[0]), engine.Condition(conds[1]), engine.Condition(low)]
    assert [c.first_layer(cfg.num_hidden_layers) for c in conditions] == [3, 2, 0]
    hf = AutoModelForCausalLM.from_pretrained(path)
    hf.generation_config.eos_token_id = None
    expect = {0: want[0], 1: want[1], 2: _hf_rows(hf, [prefix + s for s in suffixes], low, 12, (eos,), 0)}
    assert expect[2] != expect[0]  # the layer-0 condition changes tokens, so running it from layer 2 would fail
    job_rows = [(s, c) for s in suffixes for c in (0, 1, 2)]
    assert engine.lower_layer_start(cfg, conditions, job_rows, 12) == 2
    calls = []
    prefix_pass, prefill, store = engine._forwards("cpu")
    monkeypatch.setattr(engine, "_forwards", lambda platform: (
        prefix_pass, prefill, lambda *a, **k: calls.append(k["stop"]) or store(*a, **k)))
    lm = LM(cfg, params, tokenizer=None, chat=False)

    def job():
        return engine.run(lm, job_rows, conditions, max_new_tokens=12, slots=8, chunk=3, prefix=prefix,
                          eos_ids=[eos], pad_id=0, length_multiple=4)

    got = job()
    for (tok, c), out in zip(job_rows, got):
        assert out == expect[c][suffixes.index(tok)], (c, suffixes.index(tok))
    assert calls and set(calls) == {2}  # 10 prompts, prefill calls of 2 rows: 5 store calls
    monkeypatch.setattr(engine, "STORE_BYTES", 0)
    assert engine.lower_layer_start(cfg, conditions, job_rows, 12) == 0
    calls.clear()
    assert job() == got and not calls
    # The budget: STORE_BYTES on a CPU (no memory statistics), at most 2% of an accelerator's memory.
    monkeypatch.setattr(engine, "STORE_BYTES", 2 << 30)

    class Device:
        def memory_stats(self):
            return {"bytes_limit": 16 * 10**9, "bytes_in_use": 0}

    import jax
    assert engine.store_budget(jax.devices("cpu")) == 2 << 30
    assert engine.store_budget([Device()] + jax.devices("cpu")) == int(0.02 * 16 * 10**9)


def test_condition_table_bucketing_and_bad_input(tiny_job):
    _, cfg, params, *_ = tiny_job
    mult, direction, ablate, add = engine.stack_conditions(cfg, [engine.Condition()] * 3, steering=True)
    assert mult.shape[0] == 4 and np.all(mult == 1) and not direction.any() and not ablate.any() and not add.any()
    # Without a direction in any condition the steering arrays are left out (None), unless asked for.
    assert engine.stack_conditions(cfg, [engine.Condition()] * 3)[1:] == (None, None, None)
    r = np.arange(cfg.hidden_size, dtype=np.float64) + 1
    steered = [engine.Condition(), engine.Condition(direction=r, ablate=True)]
    _, direction, ablate, add = engine.stack_conditions(cfg, steered)
    np.testing.assert_allclose(direction[1], r / np.linalg.norm(r), rtol=1e-6)
    assert ablate.tolist() == [0, 1] and not direction[0].any() and not add.any()
    with pytest.raises(ValueError, match="neuron_mult has shape"):
        engine.stack_conditions(cfg, [engine.Condition(np.ones((2, 2)))])
    with pytest.raises(ValueError, match="need a direction"):
        engine.stack_conditions(cfg, [engine.Condition(ablate=True)])
    with pytest.raises(ValueError, match="out of range"):
        engine.stack_conditions(cfg, [engine.Condition(direction=np.ones(cfg.hidden_size), add={99: 1.0})])
    lm = LM(cfg, params, tokenizer=None, chat=False)
    with pytest.raises(ValueError, match="names condition 3"):
        engine.run(lm, [([5, 6], 3)], [engine.Condition()], eos_ids=[1], pad_id=0)
    assert engine.prefill_rows(32) == 8 and engine.prefill_rows(3) == 1
    # Long prompts: at most PREFILL_TOKENS rows x length per call (2k tokens: 4 rows, 8k: 1).
    assert engine.prefill_rows(32, 2048) == 4 and engine.prefill_rows(64, 8192) == 1
    assert engine.prefill_rows(64, 128) == 16


def test_table_without_steering_arrays_gives_the_same_logits(tiny_job):
    """A neuron-only job's table leaves the steering arrays out (the model skips that arithmetic, an exact
    no-op for neutral rows); its logits equal those of the same conditions with neutral steering arrays up
    to float rounding (another compiled program: XLA may order the products' sums differently), and a
    steered row differs (so the comparison can fail). Within one program, neutral rows are bit-identical."""
    import jax
    import jax.numpy as jnp

    from cna_jax.models.llama import Decoder, Intervention, causal_mask, padding_positions

    _, cfg, params, _, _, conds, *_ = tiny_job
    conditions = [engine.Condition(neuron_mult=c) for c in conds]
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(4, cfg.vocab_size, (4, 9)), jnp.int32)
    valid = jnp.ones((4, 9), bool)
    cond = jnp.asarray([0, 1, 2, 1], jnp.int32)

    @jax.jit
    def logits(table):
        return Decoder(cfg).apply({"params": params}, tokens, padding_positions(valid), causal_mask(valid),
                                  intervention=Intervention(*table, cond)).logits

    bare = engine.stack_conditions(cfg, conditions)
    full = engine.stack_conditions(cfg, conditions, steering=True)
    assert bare[1:] == (None, None, None) and full[1] is not None
    np.testing.assert_allclose(np.asarray(logits(engine.put_host_table(bare))),
                               np.asarray(logits(engine.put_host_table(full))), rtol=1e-5, atol=1e-5)
    r = np.arange(cfg.hidden_size, dtype=np.float64) + 1
    steered = engine.stack_conditions(cfg, conditions[:2] + [engine.Condition(conds[2], direction=r, ablate=True)])
    diff = np.abs(np.asarray(logits(engine.put_host_table(steered))) - np.asarray(logits(engine.put_host_table(full))))
    assert diff[[0, 1, 3]].max() == 0 and diff[2].max() > 1e-4


def test_decode_compiles_without_cpu_library_fusions(tiny_job):
    """On CPU the decode step is compiled without XLA's YNNPACK/XNNPACK library fusions (faster for its
    one-row-per-slot products: engine.DECODE_CPU_COMPILER_OPTIONS), on one device and on a mesh; the same
    step compiled with XLA's defaults does use them (so the check can fail)."""
    import jax
    import jax.numpy as jnp

    path, cfg, params, *_ = tiny_job
    s, width, n = 4, 20, 8
    table = engine.put_host_table(engine.stack_conditions(cfg, [engine.Condition()]))
    eos = jnp.asarray([1], jnp.int32)

    def library_fusions(text):
        return sum(text.count(k) for k in ("ynn_fusion", "xnn_fusion", "__xnn", "__ynn"))

    state = engine.single_device_functions(cfg, jnp.float32, s, width, n, 2).empty()
    stat = dict(cfg=cfg, dtype=jnp.float32, steps=2)
    default = jax.jit(engine.decode_fn, static_argnames=("cfg", "dtype", "steps"))
    assert library_fusions(default.lower(params, state, table, eos, **stat).compile().as_text()) > 0
    ours = engine._decode("cpu").lower(params, state, table, eos, **stat).compile().as_text()
    assert library_fusions(ours) == 0
    layout = S.make_layout(cfg, S.make_mesh((4, 1, 2)), "generation")
    fns = engine.sharded_functions(cfg, layout, jnp.float32, s, width, n, 2)
    sharded = fns.decode.lower(S.shard_params(params, cfg, layout), fns.empty(), fns.put_table(
        engine.stack_conditions(cfg, [engine.Condition()])), eos).compile().as_text()
    assert library_fusions(sharded) == 0


def test_forward_programs_compile_at_llvm_o1_with_the_same_bits(tiny_job):
    """On CPU the prefix, prefill and store passes and the collection programs (prefix, batch) are compiled at LLVM -O1
    (sharding.FORWARD_CPU_COMPILER_OPTIONS: about half the compile time, BENCHMARKS.md X1), on one device
    and on a mesh; their outputs equal, bit for bit, the same programs compiled with XLA's defaults, for rows
    under three conditions, one of them steered."""
    import jax
    import jax.numpy as jnp

    from cna_jax import collect

    _, cfg, params, prefix, rows, conds, eos, *_ = tiny_job
    o1 = (("xla_backend_optimization_level", 1),)
    assert S.forward_compiler_options("gpu") is None
    r = np.arange(cfg.hidden_size, dtype=np.float64) - 3
    conditions = [engine.Condition(m) for m in conds[:2]] + [engine.Condition(conds[2], direction=r, ablate=True)]
    table = engine.put_host_table(engine.stack_conditions(cfg, conditions))
    tokens, valid = (jnp.asarray(x) for x in left_pad([s for s, _ in rows[:6]], 12, 0))
    cond = jnp.asarray([c for _, c in rows[:6]], jnp.int32)
    stat = dict(cfg=cfg, dtype=jnp.float32)
    ours_prefix, ours_prefill, ours_store = engine._forwards("cpu")
    kv = ours_prefix(params, jnp.asarray(prefix, jnp.int32), table, **stat)
    args = (params, kv, tokens, valid, cond, table, jnp.asarray([eos], jnp.int32))
    fill = dict(stat, width=len(prefix) + 12, max_new_tokens=12)
    default = {name: jax.jit(fn, static_argnames=tuple(kw)) for name, fn, kw in (
        ("prefix", engine.prefix_fn, stat), ("prefill", engine.prefill_fn, fill),
        ("store", engine.store_fn, dict(stat, stop=2)))}
    pairs = [(kv, default["prefix"](params, jnp.asarray(prefix, jnp.int32), table, **stat)),
             (ours_prefill(*args, **fill), default["prefill"](*args, **fill)),
             (ours_store(*args[:6], **stat, stop=2), default["store"](*args[:6], **stat, stop=2))]
    node_index = jnp.arange(0, cfg.num_hidden_layers * cfg.intermediate_size, 5, dtype=jnp.int32)
    last = jnp.full((6, 1), 11, jnp.int32)
    pre = (params, jnp.asarray(prefix, jnp.int32), None)
    coll_kv = collect.collect_prefix(*pre, cfg=cfg)
    pairs.append((coll_kv, jax.jit(collect.prefix_fn, static_argnames=("cfg",))(*pre, cfg=cfg)))
    coll = (params, tokens, valid, last, jnp.ones((6, 1), bool), None, node_index, coll_kv)
    pairs.append((collect.collect_batch(*coll, cfg=cfg, residuals=True),
                  jax.jit(collect.collect_fn, static_argnames=("cfg", "residuals"))(*coll, cfg=cfg, residuals=True)))
    for ours, xla in pairs:
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(xla)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(kv.k[:, 2]) - np.asarray(kv.k[:, 0])).max() > 0  # the steered prefix differs
    # The options reach the compiles: the programs' lowerings carry them, on one device and on a mesh (the
    # decode step's carry its own).
    layout = S.make_layout(cfg, S.make_mesh((4, 1, 2)), "generation")
    fns = engine.sharded_functions(cfg, layout, jnp.float32, 4, len(prefix) + 24, 12, 2)
    two = S.make_layout(cfg, S.make_mesh((2, 1, 1), jax.devices()[:2]), "collection")
    lowered = [ours_prefill.lower(*args, **fill), ours_store.lower(*args[:6], **stat, stop=2),
               collect._jits("cpu")[0].lower(*coll, cfg=cfg, residuals=True),
               collect._jits("cpu")[1].lower(*pre, cfg=cfg),
               collect.sharded_collect(cfg, two).lower(*coll), collect.sharded_prefix(cfg, two).lower(*pre),
               fns.prefix.lower(S.shard_params(params, cfg, layout), jnp.asarray(prefix, jnp.int32),
                                fns.put_table(engine.stack_conditions(cfg, conditions)))]
    for low in lowered:
        assert low._lowering._compiler_options_kvs == o1
    state = engine.single_device_functions(cfg, jnp.float32, 4, len(prefix) + 24, 12, 2).empty()
    decode = engine._decode("cpu").lower(params, state, table, jnp.asarray([eos], jnp.int32), **stat, steps=2)
    assert dict(decode._lowering._compiler_options_kvs) == engine.DECODE_CPU_COMPILER_OPTIONS


def test_scanned_forward_passes_equal_the_unrolled_ones(tiny_job):
    """With the packed weights the prefix, store and prefill passes run their layers as one ``lax.scan``
    (engine._scanned); their outputs equal the same passes with the layers unrolled (the panels without
    their stacked copy), for rows under a neuron multiplier, directional ablation and activation addition
    at layer 2, through every layer and from the store (start 2): the store and prefill passes to the last
    bit; the prefix pass's last layer within float32 rounding (the unrolled program drops that layer's
    unused MLP and fuses its input's sum of squares otherwise: keys ~1e-7 apart). The prefill program is a
    scan only with the stacked panels (so the check compares two different programs)."""
    _, cfg, params, prefix, rows, conds, eos, *_ = tiny_job
    r = np.arange(cfg.hidden_size, dtype=np.float64) - 3
    conditions = [engine.Condition(), engine.Condition(conds[1]), engine.Condition(conds[2], direction=r, ablate=True),
                  engine.Condition(direction=r, add={2: 3.0})]
    assert [c.first_layer(cfg.num_hidden_layers) for c in conditions] == [3, 2, 0, 2]
    table = engine.put_host_table(engine.stack_conditions(cfg, conditions))
    stacked = engine.packed_weights(LM(cfg, params, tokenizer=None, chat=False))  # the CPU kernel's panels
    unrolled = {k: v for k, v in stacked.items() if k != "layers"}
    assert engine._scanned(stacked) and not engine._scanned(unrolled) and not engine._scanned(None)
    tokens, valid = (jnp.asarray(x) for x in left_pad([s for s, _ in rows[:8]], 12, 0))
    cond = jnp.asarray([0, 1, 2, 3, 3, 2, 1, 0], jnp.int32)
    stat = dict(cfg=cfg, dtype=jnp.float32)
    fill = dict(stat, width=len(prefix) + 12, max_new_tokens=12)
    prefix_pass, prefill, store = engine._forwards("cpu")
    eos_ids, pre = jnp.asarray([eos], jnp.int32), jnp.asarray(prefix, jnp.int32)
    outs = {}
    for name, packed in (("scan", stacked), ("unrolled", unrolled)):
        kv = prefix_pass(params, pre, table, packed, **stat)
        rows_args = (params, kv, tokens, valid, cond, table)
        low = jnp.asarray([0, 1, 3, 0], jnp.int32)  # the rows whose conditions change nothing below layer 2
        store_kv, store_res = store(params, kv, tokens[:4], valid[:4], low, table, packed, **stat, stop=2)
        outs[name] = (kv, store_kv, store_res, prefill(*rows_args, eos_ids, None, None, None, packed, **fill),
                      prefill(params, kv, tokens[:4], valid[:4], low, table, eos_ids, store_kv, store_res,
                              jnp.arange(4, dtype=jnp.int32), packed, **fill, start=2))
        text = prefill.lower(*rows_args, eos_ids, None, None, None, packed, **fill).as_text()
        assert ("stablehlo.while" in text) == (name == "scan")
    leaves = [jax.tree.leaves(outs[n]) for n in ("scan", "unrolled")]
    assert len(leaves[0]) == len(leaves[1]) > 10
    for a, b in zip(*leaves):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind == "f":  # float32 rounding: see the docstring
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)
    q = len(prefix)  # the store and the prefill passes' own columns: every bit
    exact = {n: jax.tree.leaves(outs[n][1:3]) + [x[:, :, q:] for s in outs[n][3:] for x in jax.tree.leaves(s.cache)]
             for n in ("scan", "unrolled")}
    for a, b in zip(exact["scan"], exact["unrolled"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The steered rows differ from the plain one (the comparison sees the steering).
    kv = outs["scan"][0]
    assert np.abs(np.asarray(kv.k[:, 2]) - np.asarray(kv.k[:, 0])).max() > 0
    assert np.abs(np.asarray(kv.k[2:, 3]) - np.asarray(kv.k[2:, 0])).max() > 0
    assert np.array_equal(np.asarray(kv.k[:2, 3]), np.asarray(kv.k[:2, 0]))  # the addition starts at layer 2
    # What the scan does not take is refused before any work.
    from cna_jax.models.llama import Decoder, causal_mask, padding_positions

    inputs = (tokens, padding_positions(valid), causal_mask(valid))
    with pytest.raises(ValueError, match="stacked packed weights"):
        Decoder(cfg).apply({"params": params, "packed": unrolled}, *inputs, scan_layers=True)
    with pytest.raises(ValueError, match="no prefix, neurons or traced start"):
        Decoder(cfg).apply({"params": params, "packed": stacked}, *inputs, return_neurons=True, scan_layers=True)
