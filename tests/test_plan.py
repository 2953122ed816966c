"""The AOT planner on a small config: compiles generation and collection on abstract shapes (no
weights) for a mesh of simulated devices and reports per-device memory with a verdict."""
import json
import math
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest

from cna_jax import sharding as S
from cna_jax.collect import sharded_collect
from cna_jax.models.config import from_hf_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch import plan as planner  # noqa: E402

SHAPE = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False, max_position_embeddings=1024)


def test_plan_small_config_in_process():
    cfg = from_hf_dict(SHAPE)
    res = planner.plan(cfg, (2, 1, 4), "generation", batch=8, context=96, new_tokens=32, dtype=jnp.bfloat16,
                       device_memory_gb=1.0, headroom=0.1, nodes=16)
    gen, col = res
    assert (gen.program, col.program) == ("generation", "collection")
    # Parameters per device, counted independently on HF's own model of the same config (meta device:
    # shapes only). The "generation" rules are Megatron tensor parallelism: every weight matrix (embed
    # and lm_head by vocab, q/k/v/o by heads, gate/up/down by mlp) is cut 4 ways over tensor=4 and the
    # RMSNorm vectors are replicated; nothing is cut over data. bf16: 2 bytes each.
    hf = [p.shape for p in _hf_meta_model(SHAPE).parameters()]
    assert {len(s) for s in hf} == {1, 2}  # matrices and norm vectors only (no biases in SHAPE)
    matrices = sum(math.prod(s) for s in hf if len(s) == 2)
    vectors = sum(math.prod(s) for s in hf if len(s) == 1)
    assert gen.params == 2 * (matrices // 4 + vectors)
    # The KV cache: K and V x layers x batch / data x context x kv_heads / tensor x head_dim x 2 bytes.
    assert gen.kv_cache == 2 * 2 * (8 // 2) * 96 * (4 // 4) * 16 * 2
    # The engine's slot state (the cache) is resident in every call: an argument place and decode update
    # in place (donated), alive beside prefill.
    assert gen.call in ("prefill", "place", "decode")
    if gen.call != "prefill":
        assert gen.aliased >= gen.kv_cache
    assert gen.total >= gen.params + gen.kv_cache + gen.temporaries
    for r in res:
        assert r.total >= r.params + r.temporaries and r.fits and r.platform == "cpu"
        assert "| fits |" in r.row()
    tight = planner.plan(cfg, (2, 1, 4), "generation", batch=8, context=96, new_tokens=32, dtype=jnp.bfloat16,
                         device_memory_gb=gen.total / 1e9 / 0.95, headroom=0.1, programs=("generation",))[0]
    assert not tight.fits and "does not fit" in tight.row()


def _hf_meta_model(shape: dict):
    """HF's own model for an HF-style shape dict, on the meta device (no memory, no weights)."""
    import torch
    import transformers

    d = dict(shape)
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_cfg)


# Published totals (the safetensors metadata of the hub checkpoints): a third, external count.
PUBLISHED = {"smollm2_135m": 134_515_008, "llama_3_2_1b": 1_235_814_400, "llama_3_1_8b": 8_030_261_248,
             "qwen2_5_7b": 7_615_616_512}


def test_param_counts_equal_hf_models_of_the_same_config():
    """ModelConfig.num_params (the planner's count) and the Flax parameter tree (convert.abstract_params)
    against HF's num_parameters() of the same config built on the meta device, for the test's SHAPE and
    real configs: tied embeddings (SmolLM2, Llama 3.2 1B), attention biases (Qwen2.5), llama3 RoPE."""
    import jax

    from cna_jax import convert
    from cna_jax.config import load_config_file

    shapes = {"small": SHAPE}
    for name in PUBLISHED:
        shapes[name] = load_config_file(os.path.join(ROOT, "configs", f"pairs.py:{name}")).model.shape.to_dict()
    for name, shape in shapes.items():
        want = _hf_meta_model(shape).num_parameters()
        assert from_hf_dict(shape).num_params() == want, name
        if name in PUBLISHED:
            assert want == PUBLISHED[name], name
        # The Flax tree on two layers (per-layer shapes unchanged; tracing 32 layers only costs time).
        two = {**shape, "num_hidden_layers": 2}
        tree = convert.abstract_params(from_hf_dict(two))
        assert sum(math.prod(x.shape) for x in jax.tree.leaves(tree)) == _hf_meta_model(two).num_parameters(), name


def test_plan_rejects_non_dividing_mesh():
    cfg = from_hf_dict(SHAPE)
    with pytest.raises(S.ShardingError, match="num_key_value_heads=4"):
        planner.plan(cfg, (1, 1, 8), "generation", batch=8, context=64, new_tokens=16, programs=("generation",))


def test_cpu_compiler_options_keep_the_memory_analysis():
    """Planning compiles on CPU without LLVM optimisations (CPU_PLAN_COMPILER_OPTIONS): the memory
    analysis must be the one of a default compile."""
    import jax

    cfg = from_hf_dict(SHAPE)
    layout = S.make_layout(cfg, S.make_mesh((2, 1, 4)), "collection")
    sd = jax.ShapeDtypeStruct
    b2 = layout.batch(2)
    args = (S.abstract_sharded_params(cfg, layout, jnp.float32), sd((8, 64), jnp.int32, sharding=b2),
            sd((8, 64), jnp.bool_, sharding=b2), sd((8, 1), jnp.int32, sharding=b2), sd((8, 1), jnp.bool_, sharding=b2),
            sd((2, 256), jnp.float32, sharding=layout.sharding(("layers", "neurons"))),
            sd((16,), jnp.int32, sharding=layout.replicated()))
    lowered = sharded_collect(cfg, layout, jnp.float32).lower(*args)
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes")
    default = lowered.compile().memory_analysis()
    fast = lowered.compile(compiler_options=planner.CPU_PLAN_COMPILER_OPTIONS).memory_analysis()
    assert [getattr(fast, f) for f in fields] == [getattr(default, f) for f in fields]


def _small_config(tmp_path, preset="cpu-8"):
    conf = tmp_path / "small.py"
    conf.write_text(textwrap.dedent(f"""
        from cna_jax.config import study_config
        def get_config():
            c = study_config(name="small", base="b", instruct="i", dtype="bfloat16", shape={SHAPE!r})
            c.mesh.preset = {preset!r}
            c.generation.batch_size = 8
            c.cna.exclude_layers = ()  # two layers only
            return c
    """))
    return str(conf)


def test_plan_cli_plans_the_configs_own_mesh(tmp_path):
    out = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")  # plan.py sets the device count itself
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "plan.py"), f"--config={_small_config(tmp_path)}",
         "--context=64", "--new_tokens=16", "--nodes=8", f"--json_out={out}"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # cpu-8: 8 devices as (data=4, tensor=2), batch from config.generation.batch_size, 8 GB per device.
    assert "VERDICT: fits" in proc.stdout and "| generation | 4x1x2 generation | 8 x 64 |" in proc.stdout
    res = json.loads(out.read_text())
    assert res["preset"] == "cpu-8" and res["devices"] == 8 and res["fits"]
    assert {r["device_memory"] for r in res["results"]} == {8 * 10**9}


def test_plan_cli_rejects_a_mesh_that_does_not_divide_the_model(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "plan.py"), f"--config={_small_config(tmp_path)}",
         "--config.mesh.data=1", "--config.mesh.tensor=8", "--context=64", "--new_tokens=16"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "num_key_value_heads=4" in proc.stderr and "tensor=8" in proc.stderr
    assert "| generation |" not in proc.stdout  # failed before compiling anything


@pytest.mark.parametrize("depth", [12, 16])
def test_depth_probe_against_full_compiles(depth):
    """The depth probe (4- and 8-layer compiles, extrapolated) against full compiles of the same model
    at ``depth`` layers on a (2, 1, 4) mesh: the engine's calls within 2% of the total (collection is
    never probed: its temporaries are not linear in depth)."""
    cfg = from_hf_dict(dict(SHAPE, num_hidden_layers=depth))
    kw = dict(batch=8, context=96, new_tokens=32, dtype=jnp.bfloat16, device_memory_gb=1.0, headroom=0.1, nodes=16)
    full = planner.plan(cfg, (2, 1, 4), "generation", programs=("generation",), **kw)
    probed = planner.plan(cfg, (2, 1, 4), "generation", programs=("generation",), probe=True, **kw)
    for f, p in zip(full, probed):
        assert (f.program, f.call, f.params, f.kv_cache) == (p.program, p.call, p.params, p.kv_cache)
        # Compiled sizes are buffer assignments, not formulas: allow 2% of the total.
        for field in ("arguments", "outputs", "temporaries", "aliased", "total"):
            assert abs(getattr(f, field) - getattr(p, field)) <= 0.02 * f.total, (f.program, field, f, p)


def test_every_config_fits_its_default_target():
    """Every config in configs/ (each row of configs/pairs.py, the testbed) planned by plan.py on its
    own mesh and target at its own batch size, 2k context: abstract shapes, no weights; generation with the
    depth probe (``plan_program(probe=True)``, checked above against full compiles; unrolling 80 layers
    takes minutes per call), collection in full. Two worker processes share the configs, largest first."""
    import concurrent.futures
    import functools
    import multiprocessing

    from cna_jax.config import config_strings, load_config_file

    paths = config_strings(os.path.join(ROOT, "configs"))
    paths.sort(key=lambda p: -load_config_file(p).model.shape.num_hidden_layers)
    # Spawned workers inherit the environment: conftest's 8 simulated CPU devices (enough for gpu-8x80).
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        plans = dict(zip(paths, pool.map(functools.partial(planner.plan_config_file, probe=True), paths)))
    verdicts = {os.path.basename(p): [(r["program"], tuple(r["mesh"]), r["batch"], round(r["total"] / 1e9, 1),
                                       r["device_memory"] // 10**9, r["fits"]) for r in rows]
                for p, rows in plans.items()}
    assert len(verdicts) >= 11 and all(verdicts.values())
    bad = {k: v for k, v in verdicts.items() if not all(r[-1] for r in v)}
    assert not bad, bad
    # The 70B/72B pairs default to tensor=8 on 8 x 80 GB (not all data-parallel, which cannot fit).
    for big in ("pairs.py:llama_3_1_70b", "pairs.py:qwen2_5_72b"):
        assert {(r[1], r[4]) for r in verdicts[big]} == {((1, 1, 8), 80)}, verdicts[big]
