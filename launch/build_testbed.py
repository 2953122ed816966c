"""Build (or reuse) the offline refusal testbed and print its refusal rates on held-out eval prompts.

    python launch/build_testbed.py                       # build into ~/.cache/cna_jax/testbed/<hash>, evaluate
    python launch/build_testbed.py --steps=60 --force    # another recipe / rebuild
    python launch/build_testbed.py --eval_n=0            # build only

The tuned model is then available as ``cna_jax.testbed.load("testbed")`` (default recipe) or by its printed path.
"""
import json
import os
import time

from absl import app, flags

flags.DEFINE_string("cache_dir", None, "Directory holding testbed builds (default $CNA_JAX_CACHE/testbed or "
                    "~/.cache/cna_jax/testbed).")
flags.DEFINE_bool("force", False, "Rebuild even when the cache already holds this recipe.")
flags.DEFINE_integer("steps", None, "Optimizer steps (default: the Recipe default).")
flags.DEFINE_integer("batch_size", None, "Training batch size.")
flags.DEFINE_float("learning_rate", None, "Peak learning rate.")
flags.DEFINE_integer("n_train", None, "Train prompts per side (-1: the whole train split).")
flags.DEFINE_integer("answer_tokens", None, "Length cap of the original model's answers used as targets.")
flags.DEFINE_enum("train", None, ["mlp", "all"], "Which weights to train.")
flags.DEFINE_integer("eval_n", -1, "Held-out prompts per side to evaluate (-1: the whole eval split, 0: skip).")
flags.DEFINE_integer("eval_max_new_tokens", 64, "Generation length for the evaluation.")
flags.DEFINE_integer("eval_batch_size", 32, "Generation batch size for the evaluation.")
flags.DEFINE_string("out", None, "Write the evaluation (rates, quality, generations) to this JSON file.")


def main(argv):
    del argv
    from cna_jax import testbed

    F = flags.FLAGS
    overrides = {k: getattr(F, k) for k in ("steps", "batch_size", "learning_rate", "n_train", "answer_tokens",
                                            "train") if getattr(F, k) is not None}
    recipe = testbed.Recipe(**overrides)
    path = testbed.testbed_path(recipe, F.cache_dir)
    cached = testbed.is_complete(path) and not F.force
    t0 = time.time()
    path = testbed.ensure_testbed(recipe, cache_dir=F.cache_dir, force=F.force)
    wall = time.time() - t0
    with open(os.path.join(path, "testbed.json")) as f:
        info = json.load(f)
    print(f"testbed: {path}")
    if cached:
        print(f"reused from the cache (built {info['created']} in {info['seconds']['total']:.0f} s)")
    else:
        print(f"built in {wall:.0f} s wall ({info['seconds']}); {info['trainable_params'] / 1e6:.1f}M trainable "
              f"params; loss {info['losses'][0]:.3f} -> {sum(info['losses'][-10:]) / len(info['losses'][-10:]):.3f}")
    if F.eval_n == 0:
        return
    harmful, harmless = testbed.eval_prompts(recipe, F.eval_n)
    results = {}
    for name, source in (("original", recipe.base), ("testbed", path)):
        t1 = time.time()
        results[name] = testbed.evaluate(source, harmful, harmless, max_new_tokens=F.eval_max_new_tokens,
                                         batch_size=F.eval_batch_size)
        results[name]["seconds"] = time.time() - t1
    print(f"\nheld-out eval prompts: {len(harmful)} harmful, {len(harmless)} harmless; regex detector; "
          f"greedy, {F.eval_max_new_tokens} new tokens")
    print(f"{'model':<10} {'refusal harmful':>16} {'refusal harmless':>17} {'quality harmless':>17}")
    for name, r in results.items():
        print(f"{name:<10} {r['harmful'].rate:>16.1%} {r['harmless'].rate:>17.1%} "
              f"{r['harmless'].mean_quality:>17.3f}")
    if F.out:
        dump = {"testbed": path, "build": {k: v for k, v in info.items() if k != "losses"},
                "eval": {name: {"seconds": r["seconds"],
                                **{side: json.loads(r[side].to_json()) for side in ("harmful", "harmless")}}
                         for name, r in results.items()}}
        with open(F.out, "w") as f:
            json.dump(dump, f, indent=2)
        print(f"wrote {F.out}")


if __name__ == "__main__":
    app.run(main)
