"""CNA neuron discovery for one model: collect activations, rank neurons, write the set and a report.

    python launch/discover.py --workdir=workdir/discover          # SmolLM2-135M-Instruct, offline
    python launch/discover.py --config=configs/pairs.py:qwen2_5_7b --config.cna.positive_only=True --side=instruct

Collections are cached under <workdir>/cache, so a rerun with the same inputs does no model work.
"""
import json
import logging
import os
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/pairs.py:smollm2_135m",
                                "Model / study config (dotted overrides allowed).")
flags.DEFINE_string("workdir", "workdir/discover", "Output directory.")
flags.DEFINE_enum("side", "instruct", ["instruct", "base"], "Which model of the pair to analyse.")
flags.DEFINE_bool("progress", True, "Progress bars.")


def main(argv):
    del argv
    F = flags.FLAGS
    c = F.config
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("cna_jax").setLevel(logging.INFO)  # stage lines; library chatter (orbax) stays quiet
    import jax.numpy as jnp
    import numpy as np

    from cna_jax import config as config_lib
    from cna_jax import testbed
    from cna_jax.cna import discover
    from cna_jax.study import discover_kwargs, prepare_prompts

    config_lib.validate(c)
    prompts = prepare_prompts(c)  # fails fast on empty / missing prompt sets
    t = time.time()
    lm = testbed.load(c.model[F.side], dtype=getattr(jnp, c.model.dtype), chat=F.side == "instruct", progress=F.progress)
    os.makedirs(F.workdir, exist_ok=True)
    neurons, delta = discover(lm, prompts.train_harmful, prompts.train_harmless,
                              cache_dir=os.path.join(F.workdir, "cache"), progress=F.progress, **discover_kwargs(c))
    neurons.save(os.path.join(F.workdir, "neuron_set.json"))
    np.save(os.path.join(F.workdir, "delta.npy"), delta)
    report = (f"# CNA neurons: {c.model[F.side]}\n\n{len(prompts.train_harmful)} harmful / "
              f"{len(prompts.train_harmless)} harmless train prompts, position={c.cna.position}, "
              f"excluded layers {list(c.cna.exclude_layers)}\n\n```\n{neurons.report(top=20)}\n```\n")
    with open(os.path.join(F.workdir, "report.md"), "w") as f:
        f.write(report)
    with open(os.path.join(F.workdir, "config.json"), "w") as f:
        json.dump(json.loads(c.to_json_best_effort()), f, indent=2)
    print(report)
    print(f"done in {time.time() - t:.0f}s -> {F.workdir}")


if __name__ == "__main__":
    app.run(main)
