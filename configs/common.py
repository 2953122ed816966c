"""Config files import the study schema from the package (``cna_jax.config``)."""
from cna_jax.config import study_config  # noqa: F401
