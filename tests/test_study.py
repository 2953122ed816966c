"""End-to-end study on a tiny random model pair (SmolLM2's tokenizer and chat template)."""
import copy
import json
import os
import shutil
import sys
import time

import numpy as np
import pytest

from cna_jax.config import study_config
from cna_jax.study import Study, null_subsets
from cna_jax.neurons import NeuronSet
from hf_models import save_tiny_chat

SHAPE = dict(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
             rope_scaling=None, tie_word_embeddings=True, max_position_embeddings=512)

_HF_SHAPE = {k: v for k, v in SHAPE.items() if k not in ("model_type", "rope_theta", "rope_scaling")}  # save_tiny's


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return [save_tiny_chat(root, "llama", seed=seed, **_HF_SHAPE)[0] for seed in (0, 1)]


def tiny_config(pair):
    c = study_config(name="tiny-pair", base=pair[0], instruct=pair[1], shape=dict(SHAPE), dtype="float32")
    c.cna.k = 24
    c.data.n_eval = 10
    c.generation.max_new_tokens = 6
    c.generation.batch_size = 16
    c.collect.batch_size = 64
    c.nulls.n_layer_matched = 3
    c.nulls.n_uniform = 3
    c.graph.n_resamples = 4
    c.mesh.devices = 1  # single device here; test_sharded_study_equals_single_device uses the 8 simulated
    return c


def _numbers(results):
    r = copy.deepcopy(results)
    r.pop("timings", None)
    return json.loads(json.dumps(r, default=str))


@pytest.fixture(scope="module")
def single_study(tiny_pair, tmp_path_factory):
    """The tiny study run once on one device: (config, workdir, results, the stages it ran); the end-to-end
    test checks it and the sharded test compares the mesh's run with it."""
    c = tiny_config(tiny_pair)
    ran = []
    workdir = tmp_path_factory.mktemp("study") / "full"
    results = Study(c, str(workdir), progress=False, on_stage=ran.append).run()
    return c, workdir, results, ran


def test_study_end_to_end_reuse_and_resume(single_study, tmp_path):
    c, workdir, full, ran = single_study
    assert ran == ["cna", "acts-instruct", "acts-base", "graph-contrast_instruct", "graph-harmful_instruct",
                   "graph-contrast_base", "direction", "generation", "damage", "sweeps"]
    # Every table cell is filled from computed results.
    report = open(workdir / "report" / "report.md").read()
    from cna_jax.report import tables
    for name, (header, rows) in tables([full]).items():
        assert rows and all(len(r) == len(header) for r in rows), name
        for row in rows:
            for cell in row:
                assert cell not in ("", "None", "nan"), (name, row)
                assert cell in report
    assert full["cna_neurons"] == 24
    assert set(full["refusal"]) >= {"harmful/none", "harmful/cna", "harmful/contrast_graph", "harmful/harmful_graph"}
    assert len(json.load(open(workdir / "stages" / [d for d in os.listdir(workdir / "stages")
                                                               if d.startswith("generation")][0] / "meta.json"))["nulls"]) == 6
    # The report notebook redraws the tables and figures from the report folder alone.
    from test_notebooks import outputs, run_notebook
    nb = run_notebook("report.ipynb", {"CNA_REPORT_DIR": str(workdir / "report"), "TMPDIR": str(tmp_path)})
    assert "CNA # of Neurons" in outputs(nb) and os.path.getsize(tmp_path / "cna_redraw" / "graphs.png") > 5000
    # The baselines and sweeps (docs/METHOD.md §4): the direction layer among the middle 20-80% (layers
    # 1-3 of 4), every condition's KLs, no intervention's exactly 0, and every sweep point.
    d = full["direction"]
    assert d["selected"] and d["layer"] in (1, 2, 3) and sorted(d["rates"]) == ["1", "2", "3"]
    assert d["rates"][str(d["layer"])] == min(d["rates"].values())
    assert d["alpha"] == pytest.approx(-d["harmful_projection"])
    assert set(full["damage"]) == {"none", "cna", "contrast_graph", "harmful_graph", "direction_ablation", "act_add"}
    assert full["damage"]["none"] == {"kl_first": 0.0, "kl_seq": 0.0}
    assert all(v["kl_first"] > 0 and v["kl_seq"] > 0 for k, v in full["damage"].items() if k != "none")
    assert [(x["sweep"], x["value"]) for x in full["sweeps"]] == \
        [("k_percent", v) for v in (0.05, 0.1, 0.2, 0.5, 1.0)] + [("multiplier", v) for v in (-1, 0, 0.5, 1.5, 2)] \
        + [("alpha_scale", v) for v in (0.5, 1.0, 1.5)]
    same = {(x["sweep"], x["value"]): x["same_as"] for x in full["sweeps"]}
    assert same[("multiplier", 0.0)] == "cna" and same[("alpha_scale", 1.0)] == "act_add"
    assert sum(v is not None for v in same.values()) == 2  # k = 24 is none of the sweep's sizes
    m0 = next(x for x in full["sweeps"] if x["same_as"] == "cna")
    assert m0["harmful"]["rate"] == full["refusal"]["harmful/cna"] and m0["kl_seq"] == full["damage"]["cna"]["kl_seq"]
    # Harmless quality only: the sweeps job stops harmful rows once their flag settles (docs/METHOD.md §5.3).
    assert all(x["harmful"]["mean_quality"] is None and 0 <= x["harmless"]["mean_quality"] <= 1 for x in full["sweeps"])
    # The multiplier sweep's m = 1.5 and m = 0.5 points move the model less than m = -1 (KL_first, in nats).
    kl_m = {x["value"]: x["kl_first"] for x in full["sweeps"] if x["sweep"] == "multiplier"}
    assert kl_m[-1.0] > kl_m[0.5] and kl_m[-1.0] > kl_m[1.5]
    for fig in ("graphs.png", "refusal.png", "nulls.png", "sweeps.png"):
        assert os.path.getsize(workdir / "report" / fig) > 5000
    for name in ("table_a_refusal.csv", "table_b_edges.csv", "table_c_harmful_only.csv", "table_d_nulls.csv",
                 "table_e_baselines.csv", "table_f_sweeps.csv", "results.json"):
        assert os.path.exists(workdir / "report" / name)
    assert NeuronSet.load(str(workdir / "report" / "neuron_set.json")).pairs()
    assert os.path.exists(workdir / "report" / "graph_contrast_base.graphml")

    # A second run reuses every stage.
    ran.clear()
    again = Study(c, str(workdir), progress=False, on_stage=ran.append).run()
    assert ran == [] and _numbers(again) == _numbers(full)

    # The multi-model driver: a row per model in one combined report (both rows reuse this workdir).
    from cna_jax.study import run_many
    results, combined = run_many([("full", c), ("full", c)], str(workdir.parent), progress=False)
    text = open(combined).read()
    assert [_numbers(r) for r in results] == [_numbers(full)] * 2
    # tables a, b, c: one row each; d: two per model; e: six conditions; f: thirteen sweep points
    assert text.count("| tiny-pair |") == 2 * (1 + 1 + 1 + 2 + 6 + 13)

    # A run killed inside the generation job resumes with the rows that had finished (appended to the
    # stage's row log) and generates only the rest; the tables come out the same.
    from cna_jax import engine
    from cna_jax.store import Stage

    appended, jobs = [], []
    original_append, original_run = Stage.append_row, engine.run

    def flaky(self, log, obj):
        original_append(self, log, obj)
        appended.append(obj)
        if len(appended) == 7:
            raise RuntimeError("killed")

    Stage.append_row = flaky
    try:
        with pytest.raises(RuntimeError, match="killed"):
            Study(c, str(tmp_path / "resume"), progress=False).run()
    finally:
        Stage.append_row = original_append
    total = 6 * 2 * 10 + 6 * 10  # (6 conditions x harmful, harmless + 6 nulls) x 10 held-out prompts
    sweep_rows = 11 * 2 * 10  # 13 sweep points, 2 of them equal to main conditions (reused)

    def counting(lm, rows, *args, **kw):
        jobs.append(len(rows))
        return original_run(lm, rows, *args, **kw)

    engine.run = counting
    ran.clear()
    try:
        resumed = Study(c, str(tmp_path / "resume"), progress=False, on_stage=ran.append).run()
    finally:
        engine.run = original_run
    assert ran == ["generation", "damage", "sweeps"]  # the interrupted stage and the two never reached
    assert jobs == [total - 7, sweep_rows]
    assert _numbers(resumed) == _numbers(full)


def test_base_activations_are_sliced_from_an_all_neuron_collection(single_study):
    """The acts-base stage collects every neuron, as the cna stage did on the instruct side (the same
    compiled programs), and keeps the pool's columns: equal to a direct collection of the pool's nodes."""
    import hashlib

    import jax.numpy as jnp

    from cna_jax.collect import Activations, collect
    from cna_jax.lm import LM
    from cna_jax.store import Stage
    from cna_jax.study import prepare_prompts

    c, workdir, _, _ = single_study
    base = LM.load(c.model.base, dtype=jnp.float32, chat=bool(c.model.base_chat))
    cached = [Activations.load(str(f)) for f in sorted((workdir / "cache").glob("activations-*.npz"))]
    dense = [a for a in cached if a.node_acts.shape[1] == 4 * 128]  # rows x every neuron
    assert len(dense) == 4 and sum(a.meta["model"] == base.describe() for a in dense) == 2  # both sides, both sets
    name = next(d for d in os.listdir(workdir / "stages") if d.startswith("acts-base-"))
    acts = Stage(str(workdir), "acts-base", name[len("acts-base-"):]).load()[0]
    pool = NeuronSet.load(str(workdir / "report" / "neuron_set.json"))
    cols = np.array([layer * 128 + i for layer, i in pool.pairs()])
    prompts = prepare_prompts(c)
    for kind, texts in (("harmful", prompts.train_harmful), ("harmless", prompts.train_harmless)):
        sha = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]
        full = next(a for a in dense if a.meta["model"] == base.describe() and a.meta["prompts_sha256"] == sha)
        np.testing.assert_array_equal(acts[kind], full.node_acts[:, cols])
        direct = collect(base, texts, nodes=pool, batch_size=c.collect.batch_size, progress=False)
        np.testing.assert_allclose(acts[kind], direct.node_acts, atol=1e-5, rtol=1e-5)


def test_direction_means_are_read_from_the_cna_collection(single_study):
    """The cna stage's collection of the instruct model's training prompts keeps the last-token residual
    stream in the cache; the direction stage's means over its fit slice come from there and equal an
    independent pass (direction.residual_means, checked against HF hidden_states in test_steering)."""
    import jax.numpy as jnp

    from cna_jax.collect import Activations
    from cna_jax.direction import residual_means
    from cna_jax.lm import LM
    from cna_jax.store import Stage
    from cna_jax.study import direction_split, prepare_prompts

    c, workdir, _, _ = single_study
    instruct = LM.load(c.model.instruct, dtype=jnp.float32, chat=True)
    cached = [Activations.load(str(f)) for f in sorted((workdir / "cache").glob("activations-*.npz"))]
    mine = [a for a in cached if a.meta["model"] == instruct.describe()]
    assert len(mine) == 2 and all(a.residuals is not None for a in mine)  # the cna stage's two collections
    name = next(d for d in os.listdir(workdir / "stages") if d.startswith("direction-"))
    arrays = Stage(str(workdir), "direction", name[len("direction-"):]).load()[0]
    prompts = prepare_prompts(c)
    _, fit = direction_split(len(prompts.train_harmful), c.direction.selection_fraction, c.direction.seed)
    for key, texts in (("mean_harmful", prompts.train_harmful), ("mean_harmless", prompts.train_harmless)):
        want = residual_means(instruct, [texts[i] for i in fit], batch_size=c.collect.batch_size)
        # float32 stored; two passes over differently shaped batches (shared prefix vs whole prompts)
        np.testing.assert_allclose(arrays[key], want, atol=1e-5, rtol=1e-5)


def test_bad_configs_fail_fast(tiny_pair, tmp_path):
    c = tiny_config(tiny_pair)
    bad = copy.deepcopy(c)
    bad.cna.k = 10_000
    with pytest.raises(ValueError, match="cna.k"):
        Study(bad, str(tmp_path / "a"), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n")
    bad = copy.deepcopy(c)
    bad.data.harmful = str(empty)
    with pytest.raises(ValueError, match="empty|no prompts"):
        Study(bad, str(tmp_path / "b"), progress=False)
    bad = copy.deepcopy(c)
    bad.model.shape.model_type = "gpt2"
    with pytest.raises(ValueError, match="gpt2"):
        Study(bad, str(tmp_path / "c"), progress=False)
    Study(c, str(tmp_path / "d"), progress=False)
    other = copy.deepcopy(c)
    other.data.seed = 1
    with pytest.raises(ValueError, match="different config"):
        Study(other, str(tmp_path / "d"), progress=False)
    wrong_shape = copy.deepcopy(c)
    wrong_shape.model.shape.intermediate_size = 256
    with pytest.raises(ValueError, match="does not match"):
        Study(wrong_shape, str(tmp_path / "e"), progress=False).lm("instruct")
    # The baselines' settings and the scorer fail before any model is loaded (Study() loads none).
    for field, value, match in (("direction.layer", 4, r"direction.layer=4 is out of range \[0, 4\)"),
                                ("sweeps.k_percent", (), "sweeps.k_percent is empty"),
                                ("sweeps.alpha_scales", (), "sweeps.alpha_scales is empty"),
                                ("sweeps.k_percent", (100.0,), "gives k=512, outside"),
                                ("generation.detector", "custom_scorer:wrong_length", "returned 1 flags for 2 texts"),
                                ("generation.detector", "no_such_module_x:f", "not importable")):
        bad = copy.deepcopy(c)
        section, name = field.split(".")
        bad[section][name] = value
        with pytest.raises(ValueError, match=match):
            Study(bad, str(tmp_path / "g"), progress=False)
    missing = copy.deepcopy(c)
    missing.model.instruct = str(tmp_path / "no_model_here")
    with pytest.raises(FileNotFoundError):
        Study(missing, str(tmp_path / "f"), progress=False).lm("instruct")


def test_null_subsets_layer_matched_and_disjoint():
    pool = NeuronSet.from_pairs([(l, i) for l in range(2, 6) for i in range(10)], 6, 10)
    subset = np.array([0, 1, 12, 35])  # layers 2, 2, 3, 5
    lm = null_subsets(pool, subset, 5, "layer_matched", seed=0)
    for idx, overlap in lm:
        assert not overlap and not set(idx) & set(subset)
        assert sorted(pool.layers[idx].tolist()) == sorted(pool.layers[subset].tolist())
    un = null_subsets(pool, subset, 5, "uniform", seed=0)
    assert all(len(i) == 4 and not set(i) & set(subset) for i, _ in un)
    assert len({tuple(i) for i, _ in un}) > 1
    big = np.arange(30)  # more than half the pool: overlap must be allowed
    assert all(o for _, o in null_subsets(pool, big, 3, "uniform", seed=0))
    assert [i.tolist() for i, _ in null_subsets(pool, subset, 3, "uniform", 0)] == \
        [i.tolist() for i, _ in null_subsets(pool, subset, 3, "uniform", 0)]


def mesh_config(pair):
    """The tiny study on a (data=4, tensor=2) mesh over all devices: 8 simulated devices in one process, or
    2 processes x 4 CPU devices (test_two_processes_equal_one_process)."""
    c = tiny_config(pair)
    c.mesh.devices, c.mesh.data, c.mesh.tensor = -1, 4, 2
    return c


@pytest.fixture(scope="module")
def mesh_study(tiny_pair, tmp_path_factory):
    """The tiny study run once on the (4, 1, 2) mesh of the 8 simulated devices: (config, workdir, results,
    the Study); compared with the single-device run and with the same study as 2 processes."""
    c = mesh_config(tiny_pair)
    workdir = tmp_path_factory.mktemp("study") / "mesh"
    study = Study(c, str(workdir), progress=False)
    return c, workdir, study.run(), study


def test_sharded_study_equals_single_device(single_study, mesh_study):
    """The stages that touch the model (CNA, activations, refusal) on a (4, 1, 2) mesh of the 8 simulated
    devices give the single-device results."""
    single = single_study[2]
    _, _, sharded, study = mesh_study
    assert study.lm("instruct").layout is not None
    assert len(study.lm("instruct").params["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 8
    for key in ("cna_neurons", "graph_neurons", "refusal", "edges"):
        assert _numbers(sharded)[key] == _numbers(single)[key], key
    assert sharded["direction"]["layer"] == single["direction"]["layer"]
    assert [x.get("harmful", {}).get("flags") for x in sharded["sweeps"]] == \
        [x.get("harmful", {}).get("flags") for x in single["sweeps"]]
    # A KL is sum_v p_v (log p_v - log q_v) of float32 log-probabilities of size ~log(49152) = 11, whose
    # last bits follow the mesh's reduction order: each term is off by ~11 x 6e-8 and the p-weighted sum by
    # about as much, so KLs agree to ~1e-6 absolute (not relatively: these KLs are ~1e-4).
    for name, v in single["damage"].items():
        assert sharded["damage"][name] == pytest.approx(v, rel=1e-3, abs=2e-6), name


# -- the same study as 2 processes x 4 CPU devices (launch/local_cluster.py; tests/test_multiprocess.py has
# the launcher's own tests and the drivers the processes run) ------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVERS = os.path.join(ROOT, "tests", "test_multiprocess.py")  # the audit driver the processes run

CONFIG_FILE = """
import json
from cna_jax.config import study_config


def set_leaves(node, values):
    for k, v in values.items():
        if isinstance(v, dict) and hasattr(node[k], "to_dict"):
            set_leaves(node[k], v)
        else:
            node[k] = tuple(v) if isinstance(node[k], tuple) else v


def get_config():
    c = json.load(open({path!r}))
    m = c["model"]
    out = study_config(name=c["name"], base=m["base"], instruct=m["instruct"], shape=m["shape"], dtype=m["dtype"])
    set_leaves(out, c)
    return out
"""


def write_config_file(c, directory) -> str:
    """A config file for launch/study.py that rebuilds ``c`` (the values go through a JSON file)."""
    values = os.path.join(directory, "config.values.json")
    with open(values, "w") as f:
        json.dump(c.to_dict(), f)
    path = os.path.join(directory, "tiny_config.py")
    with open(path, "w") as f:
        f.write(CONFIG_FILE.format(path=values))
    return path


def _strace_writes(path: str, root: str) -> list[str]:
    """System calls in an strace log that create, change or remove anything under ``root``."""
    out = []
    for line in open(path):
        if root not in line or "resumed>" in line:  # a call split across threads: its first line has the arguments
            continue
        call = line.split("(", 1)[0].split()[-1]
        if call in ("open", "openat") and not any(f in line for f in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")):
            continue  # a read
        out.append(line.strip())
    return out


def test_two_processes_equal_one_process(mesh_study, tmp_path):
    """The study as 2 processes x 4 CPU devices (launch/local_cluster.py + launch/study.py) writes the
    same stage results and report as the same study in this process on 8 simulated devices (the module's
    mesh run); process 1 writes nothing but its own shards of the converted weights; a rerun reuses every
    stage."""
    from test_multiprocess import _cluster, _finish, _start_cluster

    c, one, in_process, _ = mesh_study
    config = write_config_file(c, str(tmp_path))
    multi, one = str(tmp_path / "multi"), str(one)

    def study_cmd(log):
        return [sys.executable, DRIVERS, "audit", log, multi, os.path.join(ROOT, "launch", "study.py"),
                f"--config={config}", f"--workdir={multi}", "--progress=false"]

    t = time.time()
    run = _finish(_start_cluster(study_cmd(str(tmp_path / "p1_writes.json")), ["--timeout=500"]), timeout=540)
    print(f"2 processes x 4 devices: {time.time() - t:.0f}s")
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert "all 2 processes exited 0" in run.stderr
    assert "[p1] " in run.stdout and "study finished" in run.stdout

    # Process 1 wrote nothing under the workdir (no Python-level write; with strace, no system call)
    # except its own shards of the converted weights: a sharded Orbax save is collective, each process
    # writes the shards its devices hold (ocdbt.process_1/, array_metadatas/process_1), as on a pod.
    _check_p1_writes(str(tmp_path / "p1_writes.json"), multi,
                     lambda path: "/converted/" in path and ("/ocdbt.process_1" in path
                                                             or "/array_metadatas/process_1" in path))

    # Same files (so the same stage keys), and the same contents: every JSON (report numbers, the
    # neuron set, graphs, per-item generations and refusal flags) and CSV table, the activation cache
    # and every stage's Orbax arrays. (Orbax's own files, in a stage's arrays/ or the converted
    # weights' params/, have random or per-process names: the arrays are compared restored, below.)
    def files(root):
        rels = (os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
        return sorted(r for r in rels if "/arrays/" not in r and "/params/" not in r)

    def same_contents():
        assert files(multi) == files(one)
        for rel in files(one):
            a, b = os.path.join(multi, rel), os.path.join(one, rel)
            name = os.path.basename(rel)
            if name in ("done.json", "config.json", "complete.json"):  # wall-clock times, paths
                continue
            if name.endswith(".json"):
                _assert_close(_numbers(json.load(open(a))), _numbers(json.load(open(b))), rel)
            elif name.endswith((".csv", ".graphml")):
                assert open(a).read() == open(b).read(), rel
            elif name.endswith(".npz"):
                with np.load(a) as x, np.load(b) as y:
                    assert sorted(x.files) == sorted(y.files), rel
                    for k in x.files:
                        _assert_close(x[k], y[k], f"{rel}:{k}")
        from cna_jax.store import Stage
        for stage in os.listdir(os.path.join(one, "stages")):
            name, key = stage.rsplit("-", 1)
            x, y = Stage(multi, name, key).load()[0], Stage(one, name, key).load()[0]
            assert sorted(x) == sorted(y), stage
            for k in x:
                _assert_close(x[k], y[k], f"{stage}:{k}")

    same_contents()
    _assert_close(_numbers(json.load(open(os.path.join(multi, "report", "results.json")))), _numbers(in_process),
                  "results")

    # A rerun as 2 processes reuses every stage (every process agrees that each is done) and restores
    # the converted weights into the 8-device mesh: process 1 writes nothing at all.
    t = time.time()
    rerun = _cluster(study_cmd(str(tmp_path / "p1_rerun.json")), timeout=300, launcher_args=["--timeout=270"])
    print(f"rerun: {time.time() - t:.0f}s")
    assert rerun.returncode == 0, rerun.stdout[-5000:] + rerun.stderr[-3000:]
    n_stages = len(os.listdir(os.path.join(multi, "stages")))
    for p in ("[p0]", "[p1]"):
        reused = [line for line in rerun.stdout.splitlines() if line.startswith(p) and ": reused (" in line]
        assert len(reused) == n_stages, rerun.stdout[-5000:]
    assert ": done in" not in rerun.stdout, rerun.stdout[-5000:]
    _check_p1_writes(str(tmp_path / "p1_rerun.json"), multi, lambda path: False)
    same_contents()


# Floats (2 processes against 1): the two runs compile the same sharded programs, but the 2-process one reduces over the
# tensor axis through gloo and XLA may fuse the cross-process collectives differently, so float32 sums
# (activations, their means and deltas) may differ in the last bits: seen up to 2.3e-7 relative, ~2
# float32 ulps. 1e-5 relative (+1e-6 absolute, for sums that cancel to ~0) leaves room for the
# longer reductions of other shapes and is still far below any discrete step: a refusal rate moves in
# steps of 1/8, an edge frequency in 1/4. Everything discrete (ints, strings, flags, texts, neuron and
# edge indices) is compared exactly.
RTOL, ATOL = 1e-5, 1e-6


def _assert_close(a, b, where: str) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=where)
        else:
            np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == b or abs(a - b) <= ATOL + RTOL * abs(b) or (a != a and b != b), (where, a, b)
    else:
        assert a == b and type(a) is type(b), (where, a, b)


def _check_p1_writes(log: str, root: str, allowed) -> None:
    python_writes = json.load(open(log))
    assert all(allowed(p) for _, p in python_writes), python_writes
    if shutil.which("strace"):
        assert os.path.getsize(log + ".strace") > 0  # the tracing worked
        syscalls = _strace_writes(log + ".strace", root)
        assert all(allowed(line) for line in syscalls), [x for x in syscalls if not allowed(x)]




def test_study_launch_runs_one_process_per_cpu_device(single_study, tmp_path):
    """launch/study.py on a CPU host, 2 CPU devices: the study runs as 2 local processes x 1 device, each
    pinned to its own core (cna_jax.distributed.local_process_plan, launch/local_cluster.py --pin_cores),
    and gives the single-device study's results. On a 1-core machine the same config is refused before
    anything runs."""
    import subprocess

    c = copy.deepcopy(single_study[0])
    c.mesh.devices, c.cpu_devices, c.cpu_processes = -1, 2, 2
    config = write_config_file(c, str(tmp_path))
    workdir = tmp_path / "split"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["PYTHONPATH"] = ROOT
    run = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "study.py"), f"--config={config}",
                          f"--workdir={workdir}", "--progress=false"], capture_output=True, text=True, env=env,
                         timeout=600, cwd=ROOT)
    if len(os.sched_getaffinity(0)) < 2:
        assert run.returncode != 0 and "cpu_processes=2 exceeds this machine's 1 usable cores" in run.stderr
        assert not workdir.exists()
        return
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert "running the study as 2 local processes x 1 CPU device(s)" in run.stdout
    assert "started 2 processes x 1 CPU devices" in run.stderr and "all 2 processes exited 0" in run.stderr
    assert "[p0] study finished" in run.stdout and "[p1] study finished" in run.stdout
    results = json.load(open(workdir / "report" / "results.json"))
    single = single_study[2]
    for key in ("cna_neurons", "graph_neurons", "refusal", "edges"):
        assert _numbers(results)[key] == _numbers(single)[key], key
    assert [x.get("harmful", {}).get("flags") for x in results["sweeps"]] == \
        [x.get("harmful", {}).get("flags") for x in single["sweeps"]]


def test_load_config_file_overrides(tmp_path):
    from cna_jax.config import load_config_file, validate
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config_file(os.path.join(root, "configs", "pairs.py:qwen2_5_7b"),
                         ["nulls.n_uniform=5", "data.harmful=jbb"])
    assert c.nulls.n_uniform == 5 and c.data.harmful == "jbb"
    validate(c)
    with pytest.raises(ValueError, match="unknown config field"):
        load_config_file(os.path.join(root, "configs", "pairs.py:qwen2_5_7b"), ["nulls.n_unform=5"])
    with pytest.raises(FileNotFoundError):
        load_config_file(str(tmp_path / "nope.py"))


@pytest.fixture(scope="module")
def varied_pair(tmp_path_factory):
    """The tiny pair with a larger weight scale (initializer_range 0.3): the default 0.02 pair greedily
    repeats one token ("\\n" x 6) for every prompt, so no scorer of the texts could tell prompts or
    conditions apart; at 0.3 every prompt gets different word pieces."""
    root = tmp_path_factory.mktemp("varied")
    return [save_tiny_chat(root, "llama", seed=seed, initializer_range=0.3, **_HF_SHAPE)[0] for seed in (0, 1)]


@pytest.fixture(scope="module")
def varied_study(varied_pair, tmp_path_factory):
    """The tiny study of the varied pair with a ``module:function`` scorer: (config, workdir, results)."""
    c = tiny_config(varied_pair)
    c.generation.detector = "custom_scorer:has_letter_y"
    workdir = tmp_path_factory.mktemp("varied_study") / "w"
    return c, workdir, Study(c, str(workdir), progress=False).run()


def test_study_with_custom_scorer_and_statistics(varied_study):
    """A ``module:function`` behaviour scorer drives every rate of the study, and the statistics in the
    results match statsmodels on the stored per-prompt flags."""
    import glob

    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.proportion import proportion_confint

    from custom_scorer import has_letter_y

    c, workdir, results = varied_study
    assert results["detector"] == "custom_scorer:has_letter_y"

    items = {}
    for path in glob.glob(str(workdir / "stages" / "*" / "items" / "*.json")):
        item = json.load(open(path))
        # Every stored item was scored by the custom scorer on its own generations.
        assert item["flags"] == has_letter_y(item["generations"]), item["item"]
        assert item["rate"] == sum(item["flags"]) / len(item["flags"])  # exact: the same division
        items[item["item"]] = item
    for key, rate in results["refusal"].items():
        item = items[key.replace("/", "-")]
        flags = has_letter_y(item["generations"])
        assert rate == sum(flags) / len(flags), key
    # A behaviour the tiny random models show sometimes: the test is not vacuous.
    assert 0 < sum(sum(i["flags"]) for i in items.values()) < sum(len(i["flags"]) for i in items.values())
    for x in results["null_items"]:
        item = items[f"null-{x['family']}-{x['i']:03d}"]
        assert x["rate"] == sum(has_letter_y(item["generations"])) / item["n"]

    # Statistics against independent references (1e-12: the same float64 formulas in another order).
    for key in results["refusal"]:
        flags = items[key.replace("/", "-")]["flags"]
        low, high = proportion_confint(sum(flags), len(flags), alpha=0.05, method="wilson")
        assert results["refusal_ci"][key] == pytest.approx([low, high], abs=1e-12), key
        prompt_set, name = key.split("/")
        if name != "none":
            a = np.array(items[f"{prompt_set}-none"]["flags"])
            b = np.array(flags)
            table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
            assert results["mcnemar_p"][key] == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-12), key
    # Empirical p: nulls at least as good as the graph subset are those with at most as many flagged
    # prompts (same prompts, same n), counted in integers here.
    graph_count = sum(items["harmful-contrast_graph"]["flags"])
    for row in results["nulls"]["rows"]:
        counts = [sum(items[f"null-{row['family']}-{x['i']:03d}"]["flags"]) for x in results["null_items"]
                  if x["family"] == row["family"]]
        assert row["empirical_p"] == (1 + sum(k <= graph_count for k in counts)) / (1 + len(counts))
    # The tables carry the new columns, and every cell is in report.md.
    from cna_jax.report import tables
    report = open(workdir / "report" / "report.md").read()
    t = tables([results])
    assert t["a_refusal"][0][4] == "Base 95% CI" and t["d_nulls"][0][-1] == "empirical p"
    lo, hi = results["refusal_ci"]["harmful/none"]
    assert t["a_refusal"][1][0][4] == f"{100 * lo:.0f}-{100 * hi:.0f}%"
    for header, rows in t.values():
        for row in rows:
            assert all(cell in report and cell != "n/a" for cell in row)


def test_refusal_statistics_hand_computed_and_without_flags():
    """Counts, Wilson intervals and McNemar p per condition; a stage stored without flags (written before
    they were kept) still gets its intervals from rate * n, and None for the paired test."""
    from cna_jax.study import refusal_statistics

    none = [True] * 8 + [False] * 2
    cna = [False] * 3 + [True] * 5 + [False] * 2  # 3 discordant pairs, all none -> cna refusal removed
    refusal = {"harmful/none": {"rate": 0.8, "n": 10, "flags": none},
               "harmful/cna": {"rate": 0.5, "n": 10, "flags": cna},
               "harmless/none": {"rate": 0.25, "n": 4},  # no flags stored
               "harmless/cna": {"rate": 0.0, "n": 4}}
    st = refusal_statistics(refusal)
    assert st["count"] == {"harmful/none": 8, "harmful/cna": 5, "harmless/none": 1, "harmless/cna": 0}
    assert st["n"] == {"harmful/none": 10, "harmful/cna": 10, "harmless/none": 4, "harmless/cna": 4}
    assert st["mcnemar_p"]["harmful/cna"] == pytest.approx(0.25, rel=1e-12)  # 2 * (1/2)^3, by hand
    assert st["mcnemar_p"]["harmless/cna"] is None
    assert set(st["mcnemar_p"]) == {"harmful/cna", "harmless/cna"}
    assert st["ci"]["harmless/cna"][0] == 0.0
    # k = 0: the upper bound is z^2 / (n + z^2) (1e-12: the same float64 formula in another order).
    z = 1.959963984540054
    assert st["ci"]["harmless/cna"][1] == pytest.approx(z * z / (4 + z * z), abs=1e-12)


def test_damage_without_sweeps(varied_study, tmp_path):
    """sweeps.enabled = False: the damage stage scores the conditions alone (no sweep point to add to its
    pass, and no empty array to save) and gives each condition the KLs it had beside the sweep points."""
    c, workdir, results = varied_study
    d = tmp_path / "nosweeps"
    shutil.copytree(workdir / "stages", d / "stages",
                    ignore=lambda _, names: [n for n in names if n.split("-")[0] in ("damage", "sweeps")])
    cc = copy.deepcopy(c)
    cc.sweeps.enabled = False
    ran = []
    out = Study(cc, str(d), progress=False, on_stage=ran.append).run()
    assert ran == ["damage"] and out["sweeps"] is None
    assert len(results["damage"]) > 1 and out["damage"] == results["damage"]


def test_null_rows_stop_once_their_flag_is_settled(varied_study, tmp_path):
    """generation.stop_when_scored: a null row (only its flag is read) ends once a phrase is seen, a
    condition's row (flag and quality read) only once the quality window is covered too; every rate,
    quality and table is the same as without stopping (on the varied pair's study, reusing its stages
    before the generation job)."""
    c, workdir, _ = varied_study
    out = {}
    for stop in (False, True):
        d = tmp_path / f"stop{stop}"
        shutil.copytree(workdir / "stages", d / "stages", ignore=lambda _, names: [
            n for n in names if n.split("-")[0] in ("direction", "generation", "damage", "sweeps")])
        cc = copy.deepcopy(c)
        cc.generation.detector, cc.generation.max_new_tokens = "phrases:y", 12
        cc.generation.stop_when_scored = stop
        cc.direction.enabled = cc.damage.enabled = cc.sweeps.enabled = False
        ran = []
        results = Study(cc, str(d), progress=False, on_stage=ran.append).run()
        assert ran == ["generation"]
        gen = [x for x in os.listdir(d / "stages") if x.startswith("generation")][0]
        rows = [json.loads(line) for line in open(d / "stages" / gen / "rows.jsonl")]
        out[stop] = _numbers(results), {(r["item"], r["i"]): r["tokens"] for r in rows}
    (plain, full), (early, cut) = out[False], out[True]
    assert early == plain and 0 < max(n["rate"] for n in plain["null_items"])
    assert full.keys() == cut.keys()
    nulls = [k for k in full if k[0].startswith("null-")]
    assert all(cut[k] == full[k][:len(cut[k])] for k in nulls)
    assert sum(map(len, (cut[k] for k in nulls))) < sum(map(len, (full[k] for k in nulls)))
    assert all(cut[k] == full[k] for k in full if k not in nulls)  # 12 tokens never cover 200 characters
