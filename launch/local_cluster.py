"""Run any launch command as N local JAX processes: a multi-controller (pod-style) job on one machine.

    python launch/local_cluster.py --num_processes=2 --devices_per_process=4 -- \
        python launch/study.py --config=configs/smollm2_testbed.py --workdir=workdir/cluster

Each process gets the coordinator settings in its environment (read by
``cna_jax.distributed.initialize()``): ``JAX_COORDINATOR_ADDRESS`` (a free localhost port),
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``JAX_NUM_CPU_DEVICES`` and gloo CPU collectives. Output is
streamed with a ``[p0]``/``[p1]`` prefix. When a process exits with a non-zero code the others are
killed and this exits non-zero, naming the process; after ``--timeout`` seconds everything is killed.
``--pin_cores`` gives each process its own cores (``CNA_CPU_CORES``, applied by
``cna_jax.distributed.initialize()`` before JAX starts its threads); ``launch/study.py`` runs a CPU study
this way by default (``config.cpu_processes``).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

# Environment variables the launcher sets and cna_jax.distributed.initialize() reads.
ENV_MARKER = "CNA_LOCAL_CLUSTER"  # "1": started by this launcher (implies --config.distributed)
ENV_HEARTBEAT = "CNA_HEARTBEAT_TIMEOUT_S"
ENV_SHUTDOWN = "CNA_SHUTDOWN_TIMEOUT_S"
ENV_CORES = "CNA_CPU_CORES"  # cores the process pins itself to (cna_jax.distributed.pin_cores_from_env)
# glibc's allocator in each process (a GLIBC_TUNABLES the caller set wins): one arena, no mapped chunks, no
# trimming. XLA:CPU mallocs each call's buffers; glibc maps one above 32 MB fresh and unmaps it on free (from a
# thread's arena, smaller ones too), so the next call page-faults and the kernel zeroes it again: the damage
# stage's logits, [rows, 150, 49k] floats per condition, ~120 MB a call. Kept in one heap they are reused: a
# damage batch of 8 on one core 17.8 -> 16.2 s (page faults 522k -> 0), decode jobs unchanged. The price: a
# process keeps its peak heap until it exits. Other C libraries ignore the variable.
MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def free_port() -> int:
    """A port nobody listens on right now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def core_groups(num_processes: int) -> list[list[int]]:
    """The cores this process may use, split into ``num_processes`` contiguous groups (sizes differ by at
    most one): one group per process for ``--pin_cores``."""
    cores = sorted(os.sched_getaffinity(0))
    if num_processes > len(cores):
        raise ValueError(f"--pin_cores: {num_processes} processes but only {len(cores)} usable cores")
    per, extra = divmod(len(cores), num_processes)
    groups, start = [], 0
    for i in range(num_processes):
        size = per + (i < extra)
        groups.append(cores[start:start + size])
        start += size
    return groups


def process_env(base: dict, port: int, num_processes: int, process_id: int, devices: int,
                heartbeat_s: int, shutdown_s: int, cores: list[int] | None = None) -> dict:
    """One process's environment: the coordinator settings, CPU devices, no simulated-device flag
    (``--xla_force_host_platform_device_count`` would override ``JAX_NUM_CPU_DEVICES``) and
    :data:`MALLOC_TUNABLES` unless ``base`` sets ``GLIBC_TUNABLES``; with ``cores``, the cores it pins
    itself to."""
    env = dict(base)
    env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env.update({
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(num_processes),
        "JAX_PROCESS_ID": str(process_id),
        "JAX_NUM_CPU_DEVICES": str(devices),
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "JAX_PLATFORMS": "cpu",  # a local cluster simulates hosts with CPU devices, even on a GPU machine
        ENV_MARKER: "1",
        ENV_HEARTBEAT: str(heartbeat_s),
        ENV_SHUTDOWN: str(shutdown_s),
        "PYTHONUNBUFFERED": "1",  # lines reach the prefixer as they are printed
    })
    env.pop(ENV_CORES, None)
    if cores is not None:
        env[ENV_CORES] = ",".join(map(str, cores))
    return env


def _stream(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
            sys.stdout.flush()


def _kill_all(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM to every live process group, then SIGKILL to what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)  # the group: also any children the command started
                except ProcessLookupError:
                    pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)


def _say(msg: str) -> None:
    print(f"local_cluster: {msg}", file=sys.stderr, flush=True)


def run(command: list[str], num_processes: int, devices_per_process: int, timeout: float,
        heartbeat_s: int = 10, shutdown_s: int = 300, kill_on_failure: bool = True, pin_cores: bool = False) -> int:
    """Starts the processes, streams their output, returns the launcher's exit code (0 when all
    processes exited 0; the failing process's code when one failed; 124 on timeout). pin_cores: each
    process runs on its own group of cores (:func:`core_groups`), so no two share one."""
    port = free_port()
    lock = threading.Lock()
    procs, threads = [], []
    groups = core_groups(num_processes) if pin_cores else [None] * num_processes
    for i in range(num_processes):
        env = process_env(os.environ, port, num_processes, i, devices_per_process, heartbeat_s, shutdown_s, groups[i])
        try:
            p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace", start_new_session=True)
        except OSError as e:  # e.g. no such program: stop the ones already started
            _kill_all(procs)
            _say(f"could not start process {i}: {e}")
            return 127
        procs.append(p)
        t = threading.Thread(target=_stream, args=(p, f"[p{i}]", lock), daemon=True)
        t.start()
        threads.append(t)
    pinned = f", cores {' | '.join(','.join(map(str, g)) for g in groups)}" if pin_cores else ""
    _say(f"started {num_processes} processes x {devices_per_process} CPU devices, coordinator 127.0.0.1:{port}"
         f"{pinned}")

    def on_signal(signum, frame):
        _kill_all(procs)
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    start, code, failed = time.time(), 0, None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad and failed is None:
                failed = bad[0]
                i, c = failed
                how = f"was killed by signal {-c}" if c < 0 else f"exited with code {c}"
                if kill_on_failure and any(x is None for x in codes):
                    _say(f"process {i} {how}; killing the other processes")
                    _kill_all(procs)
                else:
                    _say(f"process {i} {how}")
                code = 128 - c if c < 0 else c
            if all(c is not None for c in codes):
                break
            if time.time() - start > timeout:
                _say(f"timeout after {timeout:.0f}s; killing every process (still running: "
                     f"{[i for i, c in enumerate(codes) if c is None]})")
                _kill_all(procs)
                code = 124
                break
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for t in threads:
        t.join(timeout=5)
    if code == 0:
        _say(f"all {num_processes} processes exited 0 ({time.time() - start:.0f}s)")
    else:
        summary = ", ".join(f"p{i}={p.returncode}" for i, p in enumerate(procs))
        _say(f"FAILED (exit codes: {summary})")
    return code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        _say("usage: local_cluster.py [options] -- command ...")
        return 2
    split = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_processes", type=int, default=2)
    ap.add_argument("--devices_per_process", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before every process is killed")
    ap.add_argument("--heartbeat_timeout", type=int, default=10,
                    help="seconds without heartbeats after which JAX declares a process dead")
    ap.add_argument("--shutdown_timeout", type=int, default=300,
                    help="seconds a finished process waits at exit for the others to finish (JAX's default)")
    ap.add_argument("--no_kill_on_failure", dest="kill_on_failure", action="store_false",
                    help="leave the other processes running when one fails (to watch them detect it)")
    ap.add_argument("--pin_cores", action="store_true",
                    help="give each process its own cores (the command must call cna_jax.distributed.initialize)")
    args = ap.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command or args.num_processes < 1 or args.devices_per_process < 1:
        ap.error("need a command after --, and positive --num_processes / --devices_per_process")
    try:
        return run(command, args.num_processes, args.devices_per_process, args.timeout, args.heartbeat_timeout,
                   args.shutdown_timeout, args.kill_on_failure, args.pin_cores)
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
