"""Run (or resume) the whole study for one (base, instruct) model pair.

    python launch/study.py --config=configs/smollm2_testbed.py --workdir=workdir/testbed
    python launch/study.py --config=configs/pairs.py:llama_3_1_8b --config.generation.batch_size=64 --workdir=...
    python launch/study.py --config=configs/pairs.py:qwen2_5_72b --config.mesh.preset=v5e-16 --workdir=...

Every stage is checkpointed under --workdir; rerunning the same command skips finished stages and
resumes an interrupted one. The report lands in <workdir>/report/.
"""
import logging
import os
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/smollm2_testbed.py", "Study config file (dotted overrides allowed).")
flags.DEFINE_string("workdir", "workdir/study", "Where stages, caches and the report go.")
flags.DEFINE_bool("progress", True, "Progress bars.")


# Seconds the launching process spent building (or finding) the testbed before it started the study processes.
ENV_TESTBED_S = "CNA_TESTBED_BUILD_S"


def run_as_local_processes(c, processes: int, devices: int) -> int:
    """This command again as ``processes`` local processes of ``devices`` CPU devices each, every one pinned
    to its own cores (launch/local_cluster.py; cna_jax.distributed.local_process_plan says why). Bad input
    fails here first; a testbed model is built here, on every core, before the processes start (each
    would otherwise build it on its own core)."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import local_cluster  # launch/local_cluster.py, beside this script

    from cna_jax import testbed
    from cna_jax.config import validate

    validate(c)
    t = time.time()
    for source in dict.fromkeys((c.model.base, c.model.instruct)):
        testbed.resolve(source)  # builds (or finds) the testbed; other sources are left to the processes
    built = time.time() - t
    print(f"testbed ready ({built:.0f}s); running the study as {processes} local processes x {devices} "
          f"CPU device(s), each on its own cores (config.cpu_processes=1: one process)", flush=True)
    os.environ[ENV_TESTBED_S] = f"{built:.3f}"  # the report's stage times then show the build
    # The launcher itself stops every process as soon as one dies, so JAX's heartbeat timeout only acts when
    # the whole machine pauses (a laptop's sleep, a VM snapshot): at local_cluster's 10 s it then killed a
    # study mid-generation (2026-12-05); an hour keeps such pauses harmless.
    return local_cluster.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], processes, devices,
                             timeout=float("inf"), heartbeat_s=3600, pin_cores=True)


def main(argv):
    del argv
    F = flags.FLAGS
    c = F.config
    from cna_jax import distributed
    plan = distributed.local_process_plan(c)  # a CPU host: one process per device (before any JAX work)
    if plan is not None:
        return run_as_local_processes(c, *plan)
    distributed.initialize_from_config(c)  # first, before any JAX work (--config.distributed or local_cluster.py)
    distributed.configure_cpu_devices(c)  # a single process on a CPU: one device per core (config.cpu_devices)
    import jax

    from cna_jax.config import validate
    validate(c, devices=len(jax.devices()))  # the whole config, mesh included, before any weights load
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("cna_jax").setLevel(logging.INFO)  # stage lines; library chatter (orbax) stays quiet
    from cna_jax.study import Study

    t = time.time()
    # One set of progress bars: every process runs the same stages in step.
    study = Study(c, F.workdir, progress=F.progress and distributed.is_writer())
    if float(os.environ.get(ENV_TESTBED_S, 0)) >= 1:  # built in the launching process (run_as_local_processes)
        study.timings["testbed build (before the study processes)"] = float(os.environ[ENV_TESTBED_S])
    study.run()
    report = os.path.join(F.workdir, "report", "report.md")
    if distributed.is_writer():  # one copy of the report, from the process that wrote it
        print(open(report).read())
    print(f"study finished in {time.time() - t:.0f}s; report: {report}")



if __name__ == "__main__":
    app.run(main)
