"""A genuine multi-process (multi-controller) JAX run on CPU: launch/local_cluster.py starts 2 processes
x 4 CPU devices over localhost, the pod code path (``jax.distributed``, global arrays, one writer).

Run as a script, this file is also the drivers the tests launch (``python tests/test_multiprocess.py
audit|die ...``), so every process runs exactly the code the test names. The study as 2 processes is
tests/test_study.py's ``test_two_processes_equal_one_process`` (it shares that file's in-process mesh run).
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


def engine_job(cfg):
    """A small mixed-condition engine job on a tiny model: (prefix, rows, conditions). The third condition
    leaves layer 0 unchanged, so the job prefills its rows from a store pass (every program kind runs)."""
    import numpy as np
    from cna_jax import engine

    rng = np.random.default_rng(3)
    prefix = rng.integers(4, cfg.vocab_size, 6).tolist()
    suffixes = [rng.integers(4, cfg.vocab_size, k).tolist() for k in [5, 9, 12, 3, 7, 12, 2, 10, 4, 6]]
    conds = [engine.Condition()]
    for seed, n, low in ((2, 60, 0), (3, 150, 1)):
        m = np.ones((cfg.num_hidden_layers, cfg.intermediate_size), np.float32)
        r = np.random.default_rng(seed)
        m[r.integers(low, cfg.num_hidden_layers, n), r.integers(0, cfg.intermediate_size, n)] = 0
        conds.append(engine.Condition(m))
    return prefix, [(s, c) for s in suffixes for c in range(3)], conds


def _engine_driver(path: str, out: str) -> None:
    """Runs :func:`engine_job` on a (8, 1, 1) mesh over both processes (packed weights, the CPU kernels),
    then the KL of its conditions along the generated tokens (``damage.kl_along``); every process writes its
    tokens, KLs, precompile counts and the jit caches' sizes of the programs (0: every call ran a program
    precompile.spread compiled or loaded)."""
    from cna_jax import distributed
    distributed.initialize()
    import jax
    from cna_jax import convert, damage, engine, precompile
    from cna_jax import sharding as S
    from cna_jax.lm import LM

    cfg, _ = convert.load(path)
    layout = S.make_layout(cfg, S.make_mesh((8, 1, 1)), "generation")
    lm = LM(cfg, convert.load(path, shardings=lambda c: layout.params(c))[1], tokenizer=None, chat=False,
            layout=layout)
    prefix, rows, conds = engine_job(cfg)
    tokens = engine.run(lm, rows, conds, max_new_tokens=12, slots=16, chunk=3, prefix=prefix, eos_ids=[7], pad_id=0,
                        length_multiple=4)
    kl = damage.kl_along(lm, [prefix + ids for ids, _ in rows], tokens, conds, batch_size=8)
    fns = engine.sharded_functions(cfg, layout, lm.dtype, 16, 6 + 12 + 12, 12, 3)
    jitted = {"prefix": fns.prefix, "decode": fns.decode, "prefill": fns.prefill.at(4), "place": fns.place.at(4)}
    jitted.update(zip(("residuals", "kl"),
                      damage.sharded_kl_functions(cfg, layout, lm.dtype, damage.use_row_kernels(lm),
                                                  1)))  # grid 1: a tiny model's streams fit the budget
    json.dump({"tokens": tokens, "kl": kl.tolist(), "stats": precompile.stats,
               "jit_cache": {k: f.jitted._cache_size() for k, f in jitted.items()}},
              open(f"{out}.{jax.process_index()}", "w"))


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
    elif sys.argv[1] == "engine":  # engine <model dir> <output prefix>
        _engine_driver(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown driver {sys.argv[1]!r}")
    sys.exit(0)

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
            "'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_CPU_DEVICES', 'JAX_CPU_COLLECTIVES_IMPLEMENTATION', "
            "'GLIBC_TUNABLES', 'XLA_FLAGS')))")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false"}
    env.pop("GLIBC_TUNABLES", None)
    cmd = [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=3", "--", sys.executable, "-c", show]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    lines = sorted(line.split() for line in run.stdout.splitlines())
    assert [x[0] for x in lines] == ["[p0]", "[p1]"]
    (_, id0, n0, addr0, dev0, coll0, malloc0, flags0), (_, id1, n1, addr1, dev1, coll1, malloc1, flags1) = lines
    assert (id0, id1, n0, n1, dev0, dev1, coll0, coll1) == ("0", "1", "2", "2", "3", "3", "gloo", "gloo")
    assert addr0 == addr1 and addr0.startswith("127.0.0.1:")
    assert malloc0 == malloc1 == ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                                  "glibc.malloc.trim_threshold=68719476736")
    assert flags0 == flags1 == "--xla_cpu_enable_fast_math=false"
    # A GLIBC_TUNABLES of the caller's own is passed on as it is.
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         env={**env, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert run.returncode == 0, run.stderr
    assert {line.split()[6] for line in run.stdout.splitlines()} == {"glibc.malloc.arena_max=2"}

    t = time.time()
    cmd = [sys.executable, LAUNCHER, "--num_processes=2", "--timeout=2", "--", sys.executable, "-c",
           "import time; time.sleep(60)"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 124 and "timeout after 2s" in run.stderr, run.stderr
    assert time.time() - t < 20


def test_engine_programs_compile_once_over_processes(tmp_path):
    """A sharded engine job and the KL along its tokens over 2 processes x 4 devices: the programs (prefix,
    store, prefills, place, decode; the KL's residuals, reference log-probabilities and KL per batch shape)
    are compiled each by one process and loaded by the other (cna_jax.precompile), every call runs them (the
    jitted functions' own caches stay empty), and the tokens equal the same job on one device in this
    process, the KLs too up to float32 rounding."""
    import numpy as np
    from hf_models import save_tiny
    from cna_jax import convert, damage, engine
    from cna_jax.lm import LM

    path, _ = save_tiny(tmp_path, "llama", num_attention_heads=8, num_key_value_heads=4)
    out = str(tmp_path / "engine.json")
    run = _cluster([sys.executable, os.path.abspath(__file__), "engine", path, out], timeout=300,
                   launcher_args=["--timeout=280"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = [json.load(open(f"{out}.{i}")) for i in range(2)]
    cfg, params = convert.load(path)
    prefix, rows, conds = engine_job(cfg)
    want = engine.run(LM(cfg, params, tokenizer=None, chat=False), rows, conds, max_new_tokens=12, slots=16, chunk=3,
                      prefix=prefix, eos_ids=[7], pad_id=0, length_multiple=4)
    assert res[0]["tokens"] == res[1]["tokens"] == want
    kl = damage.kl_along(LM(cfg, params, tokenizer=None, chat=False), [prefix + ids for ids, _ in rows], want, conds,
                         batch_size=8)
    assert res[0]["kl"] == res[1]["kl"]
    np.testing.assert_allclose(np.array(res[0]["kl"], float), kl, rtol=1e-4, atol=1e-6)
    assert np.isfinite(kl).all() and (kl[0] == 0).all() and (kl[1:].max(axis=(1, 2)) > 1e-5).all()  # none; masks
    for r in res:
        assert r["stats"]["compiled"] >= 2 and r["stats"]["loaded"] >= 2, r["stats"]
        assert r["stats"]["calls"] >= 10, r["stats"]
        assert r["jit_cache"] == dict.fromkeys(["prefix", "decode", "prefill", "place", "residuals", "kl"],
                                               0), r["jit_cache"]
    programs = [r["stats"]["compiled"] + r["stats"]["loaded"] for r in res]
    assert programs[0] == programs[1], programs
