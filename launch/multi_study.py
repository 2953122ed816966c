"""Run the study over several model pairs and write one combined report with a row per model.

    python launch/multi_study.py --configs=configs/pairs.py:llama_3_2_1b,configs/pairs.py:qwen2_5_7b \
        --workdir=workdir/all --config.generation.batch_size=64

Each model gets its own resumable workdir (<workdir>/<pair name, or config file stem>). ``--config.x=y``
overrides apply to every config (the same syntax as launch/study.py; only fields every pair has, so not
model.shape). Every config is validated, mesh included, before any model is loaded.
"""
import logging
import os

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_list("configs", None, "Config strings (file.py or file.py:pair), comma separated.", required=True)
flags.DEFINE_string("workdir", "workdir/multi", "Root workdir.")
flags.DEFINE_bool("progress", True, "Progress bars.")


def _schema():
    """A config with every field but no model, for typed --config.x=y overrides."""
    from cna_jax.config import study_config

    return study_config(name="", base="", instruct="", shape={})


config_flags.DEFINE_config_dict("config", _schema(), "Overrides applied to every config: --config.x=y.")


def main(argv):
    del argv
    F = flags.FLAGS
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("cna_jax").setLevel(logging.INFO)  # stage lines; library chatter (orbax) stays quiet
    import jax

    from cna_jax.config import load_config_file, validate

    # The typed values absl parsed, written back as Python literals for the same parser per config.
    overrides = [f"{k}={v!r}" for k, v in config_flags.get_override_values(F["config"]).items()]
    configs = [(p.split(":", 1)[1] if ":" in p else os.path.basename(p)[:-3], load_config_file(p, overrides))
               for p in F.configs]
    from cna_jax import distributed

    # One process for every config: the fewest CPU devices any of them asks for (config.cpu_devices).
    distributed.configure_cpu_devices(min((c for _, c in configs), key=distributed.cpu_device_count))
    for _, c in configs:
        validate(c, devices=len(jax.devices()))
    from cna_jax.study import run_many

    _, report = run_many(configs, F.workdir, progress=F.progress)
    print(open(report).read())


if __name__ == "__main__":
    app.run(main)
