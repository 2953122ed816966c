"""Run the study over several model pairs and write one combined report with a row per model.

    python launch/multi_study.py --configs=configs/llama_3_2_1b.py,configs/qwen2_5_7b.py --workdir=workdir/all

Each model gets its own resumable workdir (<workdir>/<config file stem>); --override applies dotted
overrides to every config (e.g. --override=generation.batch_size=64).
"""
import importlib.util
import json
import logging
import os

from absl import app, flags

flags.DEFINE_list("configs", None, "Config files, comma separated.", required=True)
flags.DEFINE_string("workdir", "workdir/multi", "Root workdir.")
flags.DEFINE_multi_string("override", [], "Dotted override applied to every config, e.g. nulls.n_uniform=10.")
flags.DEFINE_bool("progress", True, "Progress bars.")


def load_config(path: str, overrides):
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for item in overrides:
        key, _, value = item.partition("=")
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        if leaf not in target:
            raise ValueError(f"unknown config field {key!r} in override {item!r}")
        target[leaf] = type(target[leaf])(json.loads(value)) if not isinstance(target[leaf], str) else value
    return c


def main(argv):
    del argv
    F = flags.FLAGS
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("cna_jax").setLevel(logging.INFO)  # stage lines; library chatter (orbax) stays quiet
    from cna_jax import config as config_lib
    from cna_jax.report import write_combined
    from cna_jax.study import Study

    configs = [load_config(p, F.override) for p in F.configs]
    for c in configs:  # fail fast, before any model is loaded
        config_lib.validate(c)
    results = []
    for path, c in zip(F.configs, configs):
        workdir = os.path.join(F.workdir, os.path.basename(path)[:-3])
        results.append(Study(c, workdir, progress=F.progress).run())
    report = write_combined(os.path.join(F.workdir, "combined"), results)
    print(open(report).read())


if __name__ == "__main__":
    app.run(main)
