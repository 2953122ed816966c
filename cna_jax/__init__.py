"""cna_jax: Contrastive Neuron Attribution and neuron dependence graphs in JAX/Flax."""

__version__ = "0.1.0"
