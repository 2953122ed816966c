"""Run the study over several model pairs and write one combined report with a row per model.

    python launch/multi_study.py --configs=configs/llama_3_2_1b.py,configs/qwen2_5_7b.py --workdir=workdir/all

Each model gets its own resumable workdir (<workdir>/<config file stem>); --override applies dotted
overrides to every config (e.g. --override=generation.batch_size=64). Every config is validated before
any model is loaded.
"""
import logging
import os

from absl import app, flags

flags.DEFINE_list("configs", None, "Config files, comma separated.", required=True)
flags.DEFINE_string("workdir", "workdir/multi", "Root workdir.")
flags.DEFINE_multi_string("override", [], "Dotted override applied to every config, e.g. nulls.n_uniform=10.")
flags.DEFINE_bool("progress", True, "Progress bars.")


def main(argv):
    del argv
    F = flags.FLAGS
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("cna_jax").setLevel(logging.INFO)  # stage lines; library chatter (orbax) stays quiet
    from cna_jax.config import load_config_file
    from cna_jax.study import run_many

    configs = [(os.path.basename(p)[:-3], load_config_file(p, F.override)) for p in F.configs]
    _, report = run_many(configs, F.workdir, progress=F.progress)
    print(open(report).read())


if __name__ == "__main__":
    app.run(main)
