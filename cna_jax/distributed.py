"""Multi-host set-up: ``jax.distributed.initialize()`` before any JAX work, process-local inputs, and
one writer.

On a TPU pod slice every worker runs the same command (``--config.distributed=True``); JAX finds the
coordinator and the process ids from the TPU metadata. On GPU clusters (SLURM, or by hand) pass
``coordinator_address``, ``num_processes`` and ``process_id`` (or set the ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` environment variables). On one machine,
launch/local_cluster.py starts N CPU processes with those variables set. Every process must then run
the same jitted calls in the same order; only process 0 writes files (:func:`is_writer`), decisions
read from shared files are process 0's (:func:`agree`), and readers wait for the writer (:func:`barrier`).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # for annotations only: the functions import JAX themselves
    import jax

_INITIALIZED = False


# Set by launch/local_cluster.py (N local processes): the coordinator is JAX_COORDINATOR_ADDRESS /
# JAX_NUM_PROCESSES / JAX_PROCESS_ID as on a GPU cluster, plus CPU devices per process and timeouts.
ENV_LOCAL_CLUSTER = "CNA_LOCAL_CLUSTER"
ENV_HEARTBEAT = "CNA_HEARTBEAT_TIMEOUT_S"
ENV_SHUTDOWN = "CNA_SHUTDOWN_TIMEOUT_S"
# Cores a local-cluster process pins itself to ("0" or "2,3"; launch/local_cluster.py --pin_cores).
ENV_CORES = "CNA_CPU_CORES"


def launched_by_cluster() -> bool:
    """True in a process started by ``launch/local_cluster.py``."""
    return os.environ.get(ENV_LOCAL_CLUSTER) == "1"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None,
               heartbeat_timeout_seconds: int | None = None, shutdown_timeout_seconds: int | None = None) -> None:
    """Calls ``jax.distributed.initialize`` once (idempotent). Must run before any other JAX call:
    afterwards it is too late, and this raises with a readable message instead of hanging.

    With no arguments on a TPU pod slice or under SLURM, JAX finds the coordinator itself. Otherwise the
    environment supplies what the arguments leave out: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``; ``JAX_NUM_CPU_DEVICES`` and ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` (CPU
    processes, as launch/local_cluster.py starts them); ``CNA_HEARTBEAT_TIMEOUT_S`` (a process that sent
    no heartbeat for this long is declared dead and every other process fails instead of hanging;
    JAX's default is 100 s) and ``CNA_SHUTDOWN_TIMEOUT_S`` (how long a finished process waits for the
    others at exit; JAX's default 300 s)."""
    global _INITIALIZED
    if _INITIALIZED:
        return
    pin_cores_from_env()  # before the CPU backend starts its threads (they inherit the affinity)
    import jax

    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    timeouts = {}
    if heartbeat_timeout_seconds is None and env.get(ENV_HEARTBEAT):
        heartbeat_timeout_seconds = int(env[ENV_HEARTBEAT])
    if heartbeat_timeout_seconds is not None:
        timeouts["heartbeat_timeout_seconds"] = heartbeat_timeout_seconds
    if shutdown_timeout_seconds is None and env.get(ENV_SHUTDOWN):
        shutdown_timeout_seconds = int(env[ENV_SHUTDOWN])
    if shutdown_timeout_seconds is not None:
        timeouts["shutdown_timeout_seconds"] = shutdown_timeout_seconds
    try:
        # CPU processes: these must be set before the backend starts (config updates, not only env,
        # so they also hold when JAX was imported before the environment was set).
        if env.get("JAX_NUM_CPU_DEVICES"):
            jax.config.update("jax_num_cpu_devices", int(env["JAX_NUM_CPU_DEVICES"]))
        if env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
            jax.config.update("jax_cpu_collectives_implementation", env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"])
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids, **timeouts)
    except RuntimeError as e:
        if "before" in str(e).lower() or "already" in str(e).lower():
            raise RuntimeError(
                "jax.distributed.initialize() must run before any JAX computation or device query; call "
                "cna_jax.distributed.initialize_from_config(config) first thing in main()") from e
        raise
    _INITIALIZED = True


def initialize_from_config(config: Any) -> bool:
    """Initializes when ``config.distributed`` is true (the ``--config.distributed`` flag) or the process
    was started by launch/local_cluster.py; returns whether it did. ``config.distributed`` may also be a
    mapping with coordinator_address / num_processes / process_id."""
    flag = getattr(config, "distributed", False) if not isinstance(config, dict) else config.get("distributed", False)
    if not flag and launched_by_cluster():  # launch/local_cluster.py implies a distributed run
        flag = True
    if not flag:
        return False
    if hasattr(flag, "to_dict") or isinstance(flag, dict):
        opts = flag.to_dict() if hasattr(flag, "to_dict") else dict(flag)
        initialize(**{k: v for k, v in opts.items() if v not in (None, "", -1)})
    else:
        initialize()
    return True


# A CPU device of at least this many engine slots: the per-device decode step reads every weight once, so
# smaller per-device batches spend more of each step on weight reads (only 32 and 64 were measured).
MIN_SLOTS_PER_CPU_DEVICE = 32


def usable_cores() -> int:
    """How many cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_device_count(config: Any) -> int:
    """How many CPU devices a study process should expose (``config.cpu_devices``; 0 = auto).

    Auto: one per core this process may run on, at most ``generation.batch_size // 32`` so every device
    keeps a batch-32 decode step. On 2 cores, 2 devices on the data axis generate ~1.15x faster than one
    device using both cores through XLA's intra-op threads (2 x 64 slots 322 tok/s against 1 x 128 281
    tok/s, SmolLM2 fp32): two single-threaded steps of batch 64 beat one two-threaded step of 128.
    Programs that do not shard (the testbed fine-tune) still use every core."""
    n = config.get("cpu_devices", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:  # checked here too: launch calls this before validate
        raise ValueError(f"config.cpu_devices must be 0 (one per core) or a positive count, got {n!r}")
    if n:
        return n
    cores = usable_cores()
    return max(1, min(cores, int(config.generation.batch_size) // MIN_SLOTS_PER_CPU_DEVICE))


def device_count_set_by_env() -> bool:
    """Whether the environment fixes the CPU device count (``JAX_NUM_CPU_DEVICES``, or
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``): then it, not the config, decides."""
    return bool(os.environ.get("JAX_NUM_CPU_DEVICES")) or "xla_force_host_platform_device_count" in os.environ.get(
        "XLA_FLAGS", "")


def pin_cores_from_env() -> None:
    """Pins this process to the cores in ``$CNA_CPU_CORES`` (set by launch/local_cluster.py
    ``--pin_cores``); nothing when unset. Must run before the JAX backend starts: its threads inherit
    the affinity, threads already running keep theirs."""
    cores = os.environ.get(ENV_CORES, "").strip()
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(x) for x in cores.split(",")})


def accelerator_host() -> bool:
    """Whether JAX may find an accelerator on this host, decided without starting a backend (a GPU
    backend would take the device's memory from the processes started next): ``JAX_PLATFORMS`` names
    something other than the CPU, or a JAX accelerator plugin (CUDA, ROCm: the ``jax_plugins`` entry
    points) or libtpu is installed."""
    import importlib.metadata
    import importlib.util

    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms != "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return True
    return bool(importlib.metadata.entry_points(group="jax_plugins"))


def local_process_plan(config: Any) -> tuple[int, int] | None:
    """``(processes, CPU devices per process)`` when launch/study.py should run the study as that many
    local processes (launch/local_cluster.py, each pinned to its own cores), else None (one process).

    On a CPU host a study of d = :func:`cpu_device_count` devices runs as ``config.cpu_processes``
    processes (0 = auto: one per device, when there are at least as many cores), d / processes devices
    each. Why: in one process the devices share XLA's thread pool, which runs every device's operations
    on every core, and the devices' decode steps then ran ~1.4x slower than the same steps in separate
    processes pinned to one core each (SmolLM2, 2 x 64 slots on 2 cores: 290 against 209 ms,
    BENCHMARKS.md). None for a run that is already distributed (``config.distributed``, or started by
    the launcher), an explicit device count (``JAX_NUM_CPU_DEVICES``, ``XLA_FLAGS``), an accelerator
    host, or one process."""
    n = config.get("cpu_processes", 0)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"config.cpu_processes must be 0 (auto) or a positive count, got {n!r}")
    if config.get("distributed", False) or launched_by_cluster():
        return None  # the processes exist already (a pinned one sees only its own cores)
    devices = cpu_device_count(config)
    cores = usable_cores()
    if n:
        if devices % n:
            raise ValueError(f"config.cpu_processes={n} does not divide the study's {devices} CPU devices "
                             f"(config.cpu_devices)")
        if n > cores:
            raise ValueError(f"config.cpu_processes={n} exceeds this machine's {cores} usable cores")
    else:
        n = devices if devices <= cores else 1
    if n < 2 or accelerator_host():
        return None
    if device_count_set_by_env():
        return None
    return n, devices // n


def configure_cpu_devices(config: Any) -> int | None:
    """Sets ``jax_num_cpu_devices`` from :func:`cpu_device_count` before the backend starts; returns the
    count, or None where something else decides it: a distributed run (its launcher or the cluster),
    ``JAX_NUM_CPU_DEVICES`` or ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``. Only the
    CPU backend is affected: on a GPU or TPU host the mesh is built from the accelerators."""
    if config.get("distributed", False) or launched_by_cluster():
        return None
    if device_count_set_by_env():
        return None
    import jax

    n = cpu_device_count(config)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:  # the backend already started: too late to split the CPU
        raise RuntimeError("configure_cpu_devices() must run before any JAX computation or device query") from e
    return n


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def is_writer() -> bool:
    """True on process 0 only: the one process that writes files (results, checkpoints' metadata, logs)."""
    return process_index() == 0


def process_rows(n_rows: int) -> slice:
    """This process's contiguous share of ``n_rows`` global rows (for building process-local inputs)."""
    count, index = process_count(), process_index()
    if n_rows % count:
        raise ValueError(f"{n_rows} global rows do not split evenly over {count} processes")
    per = n_rows // count
    return slice(index * per, (index + 1) * per)


def global_batch(local: np.ndarray, sharding) -> "jax.Array":
    """A global array from each process's local rows (leading axis split over processes in order):
    every process passes its own ``local`` block; the result has the global shape and ``sharding``."""
    import jax

    local = np.asarray(local)
    count = process_count()
    global_shape = (local.shape[0] * count,) + local.shape[1:]
    offset = process_index() * local.shape[0]

    def block(index):
        rows = index[0]
        start = (rows.start or 0) - offset
        stop = (global_shape[0] if rows.stop is None else rows.stop) - offset
        if start < 0 or stop > local.shape[0]:
            raise ValueError("a device of this process needs rows of another process: the batch axis must "
                             "be split over processes in process order")
        return local[(slice(start, stop),) + tuple(index[1:])]

    return jax.make_array_from_callback(global_shape, sharding, block)


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op in one process). Called after process 0
    writes a file that the others read next, so they never read it half written or not at all."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (unchanged in one process). For decisions read from the
    shared workdir (is this stage finished? is this cache file there?): processes that decided
    differently would run different collectives and hang."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))
