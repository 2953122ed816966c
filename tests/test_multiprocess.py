"""A genuine multi-process (multi-controller) JAX run on CPU: launch/local_cluster.py starts 2 processes
x 4 CPU devices over localhost, the pod code path (``jax.distributed``, global arrays, one writer).

Run as a script, this file is also the drivers the tests launch (``python tests/test_multiprocess.py
audit|die ...``), so every process runs exactly the code the test names.
"""
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "local_cluster.py")
WRITE_SYSCALLS = "open,openat,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,rmdir,truncate"


# -- drivers (run in the launched processes) ------------------------------------------------------------
def _audit_driver(log: str, root: str, script: str, args: list[str]) -> None:
    """Runs ``script`` as __main__; in processes other than 0 first installs an audit hook that records
    every Python-level write (open for writing, mkdir, rename/replace, remove, rmtree) under ``root``
    and dumps the list to ``log`` at exit."""
    import atexit
    import runpy

    root = os.path.abspath(root)
    writes = []

    def under_root(path) -> bool:
        if isinstance(path, int):
            return False
        return os.path.abspath(os.fsdecode(path)).startswith(root)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(m in str(mode) for m in "wax+")) or \
                (mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and under_root(path):
                writes.append([event, os.fsdecode(path)])
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate",
                       "os.link", "os.symlink", "shutil.copyfile", "shutil.move"):
            if args and under_root(args[0]):
                writes.append([event, os.fsdecode(args[0])])

    if os.environ["JAX_PROCESS_ID"] != "0":
        if shutil.which("strace") and not os.environ.get("CNA_TEST_UNDER_STRACE"):
            # C-level writes too (Orbax writes arrays through tensorstore): rerun under strace, which
            # logs every file-writing system call of the process and its threads.
            os.environ["CNA_TEST_UNDER_STRACE"] = "1"
            os.execvp("strace", ["strace", "-f", "-qq", "--seccomp-bpf", "-y", "-e", f"trace={WRITE_SYSCALLS}",
                                 "-o", log + ".strace", sys.executable, *sys.argv])
        sys.addaudithook(hook)
        atexit.register(lambda: json.dump(writes, open(log, "w")))
    sys.argv = [script] + args
    runpy.run_path(script, run_name="__main__")


def _die_driver() -> None:
    """Every process joins, runs a sharded collective over all devices; process 1 then dies with exit
    code 3 and process 0 keeps running collectives (for at most 120 s, then exits 0: a test failure)."""
    from cna_jax import distributed
    distributed.initialize()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("d",))
    n = len(jax.devices())
    x = jax.make_array_from_callback((n,), NamedSharding(mesh, P("d")), lambda i: np.arange(n, dtype=np.float32)[i])
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
    print(f"process {jax.process_index()}: sum over {n} devices = {float(total(x))}", flush=True)
    if jax.process_index() == 1:
        os._exit(3)
    t = time.time()
    while time.time() - t < 120:
        float(total(x))
        time.sleep(0.05)
    print("process 0: still running after 120 s", flush=True)


# -- tests -----------------------------------------------------------------------------------------------
def _start_cluster(args: list[str], launcher_args=()) -> subprocess.Popen:
    """launch/local_cluster.py with 2 processes x 4 CPU devices running ``args``; output captured."""
    cmd = [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=4", *launcher_args, "--", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # the launcher's own --timeout should have fired first
        proc.terminate()  # the launcher kills its processes on SIGTERM
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"launcher still running after {timeout}s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _cluster(args: list[str], timeout: float, launcher_args=()) -> subprocess.CompletedProcess:
    return _finish(_start_cluster(args, launcher_args), timeout)


if __name__ == "__main__":
    if sys.argv[1] == "audit":  # audit <log> <root> <script> [args...]
        _audit_driver(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    elif sys.argv[1] == "die":
        _die_driver()
    else:
        raise SystemExit(f"unknown driver {sys.argv[1]!r}")
    sys.exit(0)

import numpy as np  # noqa: E402

from test_study import tiny_config, tiny_pair  # noqa: E402,F401  (tiny_pair: the fixture)

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


def small_config(pair):
    """The tests' tiny study, smaller still (one null per family), on a (data=4, tensor=2) mesh over
    all devices: 8 simulated devices in one process, or 2 processes x 4 CPU devices."""
    c = tiny_config(pair)
    c.nulls.n_layer_matched = c.nulls.n_uniform = 1
    c.data.n_pairs, c.data.n_eval = 32, 8  # a time bound for the suite: 2 runs of the whole study
    # Every stage runs (direction, damage and sweeps too), the sweeps with one point of each kind.
    c.sweeps.k_percent, c.sweeps.multipliers, c.sweeps.alpha_scales = (1.0,), (0.5,), (1.5,)
    c.mesh.devices, c.mesh.data, c.mesh.tensor = -1, 4, 2
    return c


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


def test_two_processes_equal_one_process(tiny_pair, tmp_path):
    """The study as 2 processes x 4 CPU devices (launch/local_cluster.py + launch/study.py) writes the
    same stage results and report as the same study in this process on 8 simulated devices; process 1
    writes nothing but its own shards of the converted weights; a rerun reuses every stage."""
    from cna_jax.study import Study

    c = small_config(tiny_pair)
    config = write_config_file(c, str(tmp_path))
    multi, one = str(tmp_path / "multi"), str(tmp_path / "one")

    def study_cmd(log):
        return [sys.executable, os.path.abspath(__file__), "audit", log, multi, os.path.join(ROOT, "launch", "study.py"),
                f"--config={config}", f"--workdir={multi}", "--progress=false"]

    # The reference runs here while the cluster runs (they share nothing but the model files).
    t = time.time()
    cluster = _start_cluster(study_cmd(str(tmp_path / "p1_writes.json")), ["--timeout=500"])
    single = Study(c, one, progress=False).run()
    t_single = time.time() - t
    run = _finish(cluster, timeout=540)
    print(f"2 processes x 4 devices: {time.time() - t:.0f}s, 1 process x 8 devices (alongside): {t_single:.0f}s")
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert "all 2 processes exited 0" in run.stderr
    assert "[p1] " in run.stdout and "study finished" in run.stdout
    assert len(Study(c, one, progress=False).lm("instruct").params["layers_0"]["mlp"]["up_proj"]["kernel"]
               .sharding.device_set) == 8

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
    _assert_close(_numbers(json.load(open(os.path.join(multi, "report", "results.json")))), _numbers(single),
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


def _numbers(results):
    """JSON-plain results without wall-clock timings."""
    r = json.loads(json.dumps(results, default=str))
    if isinstance(r, dict):
        r.pop("timings", None)
    return r


# Floats: the two runs compile the same sharded programs, but the 2-process one reduces over the
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


def test_dead_process_stops_the_others():
    """Process 1 dies (exit code 3) after the first collective. The launcher kills process 0 at once
    and exits with code 3, naming process 1; without the launcher's kill (--no_kill_on_failure),
    process 0 detects the death itself through JAX's heartbeats (10 s, as the launcher sets them) and
    aborts with JAX's error instead of hanging."""
    driver = [sys.executable, os.path.abspath(__file__), "die"]
    t = time.time()
    run = _cluster(driver, timeout=120, launcher_args=["--timeout=100"])
    took = time.time() - t
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
    assert "process 1 exited with code 3; killing the other processes" in run.stderr
    assert "[p0] process 0: sum over 8 devices = 28.0" in run.stdout
    assert "still running" not in run.stdout
    assert took < 90, took

    t = time.time()
    run = _cluster(driver, timeout=150, launcher_args=["--timeout=130", "--heartbeat_timeout=10",
                                                       "--no_kill_on_failure"])
    took = time.time() - t
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
    codes = run.stderr.split("exit codes: ")[-1]
    assert "p1=3" in codes and "p0=0" not in codes and "p0=None" not in codes, run.stderr[-3000:]
    assert "another task died" in run.stdout or "stopped sending heartbeats" in run.stdout, run.stdout[-3000:]
    assert "still running" not in run.stdout and "timeout" not in run.stderr
    assert took < 90, took


def test_launcher_environment_and_timeout():
    """Each process gets its id, the coordinator on one shared port, its CPU device count and no
    simulated-device flag; output is prefixed per process; past --timeout everything is killed (124)."""
    show = ("import os; print(*(os.environ.get(k) for k in ('JAX_PROCESS_ID', 'JAX_NUM_PROCESSES', "
            "'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_CPU_DEVICES', 'JAX_CPU_COLLECTIVES_IMPLEMENTATION', 'XLA_FLAGS')))")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false"}
    cmd = [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=3", "--", sys.executable, "-c", show]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    lines = sorted(line.split() for line in run.stdout.splitlines())
    assert [x[0] for x in lines] == ["[p0]", "[p1]"]
    (_, id0, n0, addr0, dev0, coll0, flags0), (_, id1, n1, addr1, dev1, coll1, flags1) = lines
    assert (id0, id1, n0, n1, dev0, dev1, coll0, coll1) == ("0", "1", "2", "2", "3", "3", "gloo", "gloo")
    assert addr0 == addr1 and addr0.startswith("127.0.0.1:")
    assert flags0 == flags1 == "--xla_cpu_enable_fast_math=false"

    t = time.time()
    cmd = [sys.executable, LAUNCHER, "--num_processes=2", "--timeout=2", "--", sys.executable, "-c",
           "import time; time.sleep(60)"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 124 and "timeout after 2s" in run.stderr, run.stderr
    assert time.time() - t < 20
