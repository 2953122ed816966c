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


def main(argv):
    del argv
    F = flags.FLAGS
    c = F.config
    from cna_jax import distributed
    distributed.initialize_from_config(c)  # first, before any JAX work (--config.distributed or local_cluster.py)
    distributed.configure_cpu_devices(c)  # a single process on a CPU: one device per core (config.cpu_devices)
    import jax

    from cna_jax.config import validate
    validate(c, devices=len(jax.devices()))  # the whole config, mesh included, before any weights load
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("cna_jax").setLevel(logging.INFO)  # stage lines; library chatter (orbax) stays quiet
    from cna_jax.study import Study

    t = time.time()
    study = Study(c, F.workdir, progress=F.progress)
    study.run()
    report = os.path.join(F.workdir, "report", "report.md")
    if distributed.is_writer():  # one copy of the report, from the process that wrote it
        print(open(report).read())
    print(f"study finished in {time.time() - t:.0f}s; report: {report}")



if __name__ == "__main__":
    app.run(main)
