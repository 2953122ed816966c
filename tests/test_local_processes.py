"""One local process per CPU device (cna_jax.distributed.local_process_plan, launch/local_cluster.py
--pin_cores): when launch/study.py splits a CPU study into pinned processes, and that each process runs on
its own cores. The study run that way is tests/test_study.py's
``test_study_launch_runs_one_process_per_cpu_device``."""
import os
import subprocess
import sys

import pytest

from cna_jax import distributed
from cna_jax.config import load_config_file, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTBED = os.path.join(ROOT, "configs", "smollm2_testbed.py")
sys.path.insert(0, os.path.join(ROOT, "launch"))
import local_cluster  # noqa: E402  (launch/local_cluster.py)


@pytest.fixture
def host(monkeypatch):
    """A CPU host with a chosen number of cores and none of the variables that fix a device count."""
    for var in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS", distributed.ENV_LOCAL_CLUSTER):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "accelerator_host", lambda: False)

    def cores(n):
        monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(n)))
    return cores


@pytest.mark.parametrize("cores, overrides, expect", [
    (2, (), (2, 1)),  # the offline default on the project's 2-core machine: 2 processes x 1 device
    (4, (), (3, 1)),  # 96 slots: at most 3 devices of 32
    (8, (), (3, 1)),
    (1, (), None),  # one device: one process
    (2, ("cpu_processes=1",), None),  # asked for one process holding both devices
    (4, ("cpu_devices=4", "cpu_processes=2"), (2, 2)),
    (2, ("cpu_devices=3",), None),  # more devices than cores: one process, as before
    (2, ("generation.batch_size=32",), None),  # one batch-32 device
    (2, ("distributed=True",), None),  # the processes are started by someone else
])
def test_local_process_plan(host, cores, overrides, expect):
    host(cores)
    c = load_config_file(TESTBED, list(overrides))
    assert distributed.local_process_plan(c) == expect


def test_no_split_when_something_else_decides(host, monkeypatch):
    host(2)
    c = load_config_file(TESTBED)
    assert distributed.local_process_plan(c) == (2, 1)
    for var, value in (("XLA_FLAGS", "--xla_force_host_platform_device_count=8"), ("JAX_NUM_CPU_DEVICES", "2"),
                       (distributed.ENV_LOCAL_CLUSTER, "1")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            assert distributed.local_process_plan(c) is None, var
    monkeypatch.setattr(distributed, "accelerator_host", lambda: True)
    assert distributed.local_process_plan(c) is None


@pytest.mark.parametrize("overrides, message", [
    (("cpu_processes=-1",), "cpu_processes must be 0"),
    (("cpu_devices=4", "cpu_processes=3"), "cpu_processes=3 does not divide the study's 4 CPU devices"),
    (("cpu_devices=4", "cpu_processes=4"), "cpu_processes=4 exceeds this machine's 2 usable cores"),
])
def test_bad_cpu_processes_fail_in_validate(host, overrides, message):
    host(2)
    with pytest.raises(ValueError, match=message):
        validate(load_config_file(TESTBED, list(overrides)))


def test_accelerator_host(monkeypatch):
    import importlib.metadata
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert distributed.accelerator_host()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not distributed.accelerator_host()
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no libtpu
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [object()] if group == "jax_plugins" else [])
    assert distributed.accelerator_host()  # a CUDA / ROCm plugin registers itself here
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    assert not distributed.accelerator_host()


@pytest.mark.parametrize("cores, n, groups", [
    ([0, 1], 2, [[0], [1]]), ([0, 1, 2, 3, 4], 2, [[0, 1, 2], [3, 4]]), ([3, 5, 7], 3, [[3], [5], [7]]),
])
def test_core_groups(monkeypatch, cores, n, groups):
    monkeypatch.setattr(local_cluster.os, "sched_getaffinity", lambda pid: set(cores))
    assert local_cluster.core_groups(n) == groups
    with pytest.raises(ValueError, match=f"{len(cores) + 1} processes but only {len(cores)} usable cores"):
        local_cluster.core_groups(len(cores) + 1)


_PRINT_CORES = ("import os; from cna_jax import distributed; distributed.pin_cores_from_env(); "
                "print('cores', os.environ['JAX_PROCESS_ID'], sorted(os.sched_getaffinity(0)))")


def test_pinned_processes_run_on_their_own_cores():
    """launch/local_cluster.py --pin_cores: each process pins itself (cna_jax.distributed.pin_cores_from_env,
    which distributed.initialize() calls first) to its own group of this machine's cores."""
    cores = sorted(os.sched_getaffinity(0))
    n = min(len(cores), 2)
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "local_cluster.py"), f"--num_processes={n}",
                          "--devices_per_process=1", "--timeout=60", "--pin_cores", "--", sys.executable, "-c",
                          _PRINT_CORES], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    got = sorted(line.split(" ", 1)[1] for line in out.stdout.splitlines() if line.split(" ")[1:2] == ["cores"])
    assert got == [f"cores {i} {g}" for i, g in enumerate(local_cluster.core_groups(n))]  # checked above
    # More processes than cores: refused before any starts.
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "local_cluster.py"),
                          f"--num_processes={len(cores) + 1}", "--pin_cores", "--", sys.executable, "-c", "pass"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "usable cores" in out.stderr
