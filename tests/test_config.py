"""Configs: the pair table, config strings with dotted overrides, mesh presets, and the one validation at
the command-line boundary (mesh and distributed settings included) that fails before any weights load."""
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from cna_jax import config as C
from cna_jax.models.config import from_hf_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = os.path.join(ROOT, "configs", "pairs.py")
TESTBED = os.path.join(ROOT, "configs", "smollm2_testbed.py")

# CNA neuron counts k = ceil(0.001 x layers x intermediate size) that the seed study reports per model.
SEED_COUNTS = {"llama_3_2_1b": 132, "llama_3_2_3b": 230, "llama_3_1_8b": 459, "llama_3_1_70b": 2294,
               "qwen2_5_1_5b": 251, "qwen2_5_3b": 397, "qwen2_5_7b": 531, "qwen2_5_72b": 2366}


def pair(name, overrides=()):
    return C.load_config_file(f"{PAIRS}:{name}", overrides)


def test_every_config_in_configs_loads_and_validates():
    strings = C.config_strings(os.path.join(ROOT, "configs"))
    assert TESTBED in strings and f"{PAIRS}:qwen2_5_72b" in strings and len(strings) == 11
    for s in strings:
        C.validate(C.load_config_file(s))


def test_pair_shapes_give_the_seed_cna_counts():
    for name, k in SEED_COUNTS.items():
        assert from_hf_dict(pair(name).model.shape.to_dict()).default_cna_k() == k, name


def test_pair_table_rows():
    c = pair("qwen2_5_7b")
    assert (c.name, c.model.base, c.model.instruct, c.model.dtype) == (
        "Qwen2.5-7B", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", "bfloat16")
    assert c.model.shape.num_key_value_heads == 4 and c.model.shape.vocab_size == 152064
    with pytest.raises(ValueError, match="qwen2_5_7b"):  # an unknown row lists the known ones
        pair("qwen9")
    # The testbed is the SmolLM2 row with the testbed's models.
    tb = C.load_config_file(TESTBED)
    assert tb.model.shape.to_dict() == pair("smollm2_135m").model.shape.to_dict()
    assert (tb.model.base, tb.model.instruct, tb.model.base_chat) == ("smollm2", "testbed", True)


def test_load_config_file_dotted_overrides_are_the_command_line_syntax(tmp_path):
    c = pair("qwen2_5_7b", ["nulls.n_uniform=5", "data.harmful=jbb", "cna.exclude_layers=(0, 1, 2)",
                            "graph.prescreen=false", "mesh.tensor=4"])
    assert c.nulls.n_uniform == 5 and c.data.harmful == "jbb" and tuple(c.cna.exclude_layers) == (0, 1, 2)
    assert c.graph.prescreen is False and c.mesh.tensor == 4
    with pytest.raises(ValueError, match="unknown config field.*n_uniform"):  # with a did-you-mean
        pair("qwen2_5_7b", ["nulls.n_unform=5"])
    with pytest.raises(ValueError, match="bad config override.*n_uniform"):
        pair("qwen2_5_7b", ["nulls.n_uniform=many"])
    with pytest.raises(FileNotFoundError):
        C.load_config_file(str(tmp_path / "nope.py:x"))


def test_mesh_presets_and_explicit_fields():
    assert C.mesh_settings(pair("qwen2_5_7b")) == dict(C.MESH_DEFAULTS, preset="")  # all devices on data
    for big in ("llama_3_1_70b", "qwen2_5_72b"):
        m = C.mesh_settings(pair(big))
        assert (m["preset"], m["data"], m["fsdp"], m["tensor"], m["devices"]) == ("gpu-8x80", 1, 1, 8, 8)
    m = C.mesh_settings(pair("qwen2_5_7b", ["mesh.preset=v5e-16"]))
    assert (m["data"], m["fsdp"], m["tensor"], m["rules"], m["devices"]) == (1, 2, 8, "fsdp", 16)
    # A field set explicitly wins over the preset's, in whichever order the flags come.
    m = C.mesh_settings(pair("llama_3_1_70b", ["mesh.tensor=4", "mesh.preset=cpu-8"]))
    assert (m["data"], m["tensor"], m["devices"]) == (4, 4, 8)


@pytest.mark.parametrize("overrides, message", [
    (["mesh.tensor=0"], r"sizes must be positive or -1.*'tensor': 0"),
    (["mesh.fsdp=-2"], r"sizes must be positive or -1.*'fsdp': -2"),
    (["mesh.tensor=-1"], r"at most one of data, fsdp, tensor may be -1"),
    (["mesh.rules=pipeline"], r"rules='pipeline' is not a rule preset; known: \['collection', 'fsdp', 'generation'\]"),
    (["mesh.kv_heads=drop"], r"mesh.kv_heads='drop' must be one of"),
    (["mesh.devices=0"], r"mesh.devices must be -1 \(all\) or a positive count, got 0"),
    (["mesh.preset=tpu-9000"], r"mesh.preset='tpu-9000' is not a preset; known: \['cpu-8'"),
    (["distributed=3"], r"bad config override.*distributed"),  # typed: the flag parser rejects it
])
def test_static_mesh_and_distributed_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        C.validate(pair("qwen2_5_7b", overrides))


def with_distributed(value):
    d = pair("qwen2_5_7b").to_dict()
    d["distributed"] = value
    return ml_collections.ConfigDict(d)


def test_distributed_is_a_bool_or_initialize_arguments():
    C.validate(with_distributed(dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=0)))
    with pytest.raises(ValueError, match=r"config.distributed has unknown field\(s\) \['coordinator'\]"):
        C.validate(with_distributed(dict(coordinator="127.0.0.1:1234")))
    with pytest.raises(ValueError, match=r"config.distributed must be True, False or a mapping.*'yes'"):
        C.validate(with_distributed("yes"))
    c = pair("qwen2_5_7b")
    c.mesh.pipeline = 2
    with pytest.raises(ValueError, match=r"config.mesh has unknown field\(s\) \['pipeline'\]"):
        C.validate(c)


@pytest.mark.parametrize("name, overrides, devices, message", [
    # the device count: a 70B preset on one device, a fixed mesh on the wrong count, too many devices asked
    ("llama_3_1_70b", [], 1, r"config.mesh.devices=8 but only 1 devices are available"),
    ("qwen2_5_7b", ["mesh.data=2", "mesh.tensor=2"], 8, r"\(data=2, fsdp=1, tensor=2\) needs 4 devices but 8 are"),
    ("qwen2_5_7b", ["mesh.tensor=3"], 8, r"fixed axes multiply to 3, which does not divide 8"),
    # the model: heads (28), KV heads (4 on Qwen2.5-7B; 8 on 72B), intermediate size, vocab over tensor
    ("qwen2_5_7b", ["mesh.data=1", "mesh.tensor=8", "mesh.kv_heads=replicate"], 8,
     r"num_attention_heads=28 \(logical axis 'heads'\) is not divisible by tensor=8 = 8"),
    ("qwen2_5_7b", ["mesh.data=1", "mesh.tensor=8"], 8, r"num_key_value_heads=4 is not divisible by the tensor=8"),
    ("qwen2_5_72b", ["mesh.tensor=16", "mesh.devices=16"], 16,
     r"num_key_value_heads=8 is not divisible by the tensor=16"),
    # Qwen2.5-0.5B on tensor=7: its 14 heads divide, KV heads replicated; 4864 and 151936 do not divide
    ("qwen2_5_0_5b", ["mesh.tensor=7", "mesh.kv_heads=replicate"], 7,
     r"vocab_size=151936 \(logical axis 'vocab'\) is not divisible by tensor=7 = 7(.|\n)*"
     r"intermediate_size=4864 \(logical axis 'mlp'\) is not divisible by tensor=7 = 7"),
    ("qwen2_5_7b", ["mesh.preset=v5e-16"], 16, r"preset 'v5e-16', 16 devices.*num_key_value_heads=4"),
])
def test_mesh_against_devices_and_model(name, overrides, devices, message):
    c = pair(name, overrides)
    C.validate(c)  # statically fine: only the device count and the model's sizes rule it out
    with pytest.raises(ValueError, match=message):
        C.validate(c, devices=devices)


def test_meshes_that_fit_pass_with_the_device_count():
    C.validate(pair("llama_3_1_70b"), devices=8)
    C.validate(pair("llama_3_1_70b"), devices=16)  # the preset takes the first 8
    C.validate(pair("qwen2_5_72b", ["mesh.preset=v5e-16"]), devices=16)
    C.validate(pair("qwen2_5_7b", ["mesh.data=2", "mesh.tensor=4"]), devices=8)
    C.validate(C.load_config_file(TESTBED), devices=1)


def _run(script, *args, workdir):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    t = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), f"--workdir={workdir}", *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    return proc, time.time() - t


def test_study_launch_rejects_a_mesh_that_does_not_divide_the_model_before_loading(tmp_path):
    # The README's default config (the testbed), 8 devices as (4, 1, 2): SmolLM2 has 9 heads, 3 KV heads.
    workdir = tmp_path / "study"
    proc, _ = _run("study.py", "--config.mesh.tensor=2", workdir=workdir)
    assert proc.returncode != 0
    assert "num_key_value_heads=3 is not divisible by the tensor=2" in proc.stderr, proc.stderr[-2000:]
    assert not workdir.exists()  # failed before the study started (nothing loaded, nothing written)


def test_multi_study_overrides_use_the_config_syntax(tmp_path):
    workdir = tmp_path / "multi"
    configs = "--configs=configs/pairs.py:smollm2_135m,configs/smollm2_testbed.py"
    # An override applies to every config; this one makes both meshes invalid on 8 devices.
    proc, _ = _run("multi_study.py", configs, "--config.mesh.tensor=3", workdir=workdir)
    assert proc.returncode != 0 and "fixed axes multiply to 3, which does not divide 8" in proc.stderr
    proc, _ = _run("multi_study.py", configs, "--config.nulls.n_unform=3", workdir=workdir)
    assert proc.returncode != 0 and "n_unform" in proc.stderr
    assert not workdir.exists()


_CPU_PROBE = """
import os, sys, jax
from cna_jax import distributed
from cna_jax.config import load_config_file, validate
c = load_config_file(sys.argv[1], sys.argv[2:])
validate(c)
print(distributed.configure_cpu_devices(c), len(jax.devices()), len(os.sched_getaffinity(0)))
"""


@pytest.mark.parametrize("overrides, xla_flags, expect", [
    ((), "", "auto"),  # testbed: 96 slots -> one device per core, at most 3
    (("generation.batch_size=32",), "", 1),  # a single batch-32 step: one device
    (("cpu_devices=3",), "", 3),
    ((), "--xla_force_host_platform_device_count=5", None),  # an explicit device count wins
])
def test_study_process_splits_the_cpu_into_devices(overrides, xla_flags, expect):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    out = subprocess.run([sys.executable, "-c", _CPU_PROBE, TESTBED, *overrides], capture_output=True, text=True,
                         env=env, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    got, devices, cores = out.stdout.split()[-3:]
    if expect is None:
        assert (got, devices) == ("None", "5")
    else:
        n = min(int(cores), 3) if expect == "auto" else expect
        assert (got, devices) == (str(n), str(n))


def test_cpu_devices_must_be_a_count():
    with pytest.raises(ValueError, match="cpu_devices must be 0"):
        C.validate(C.load_config_file(TESTBED, ["cpu_devices=-1"]))
