"""cna_jax: Contrastive Neuron Attribution and neuron dependence graphs in JAX/Flax."""
import os

__version__ = "0.1.0"


def cache_root() -> str:
    """Where the package keeps what it builds (the testbed, compiled CPU kernels): ``$CNA_JAX_CACHE`` when
    set, else ``~/.cache/cna_jax``."""
    return os.path.expanduser(os.environ.get("CNA_JAX_CACHE") or os.path.join("~", ".cache", "cna_jax"))
