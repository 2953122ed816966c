"""HF checkpoints (safetensors, single or sharded; GGUF) -> the Flax parameter tree, one tensor at a time.

No torch on this path: safetensors headers are parsed here and tensors are memory-mapped one at a time
(bf16 through ml_dtypes), transformed to the Flax layout, cast, and placed on the device(s) before the
next is read. With shardings, each device receives only its slice (``jax.make_array_from_callback``).
Every parameter leaf must be filled exactly once with the right shape and every checkpoint key must be
used or explicitly ignored; anything else raises ``ConversionError``.
"""
from __future__ import annotations

import functools
import json
import os
import re
import struct
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from cna_jax.gguf_file import GGUFFile
from cna_jax.models import abstract_params  # noqa: F401  (part of this module's interface)
from cna_jax.models.config import ConfigError, ModelConfig, from_hf_config_file, from_hf_dict


class ConversionError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""


# ---------------------------------------------------------------------------------------------------
# Readers: ``keys()``, ``shape(key)``, ``get(key) -> np.ndarray`` in HF layout ([out, in] for linears).

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """A lazily read ``.safetensors`` file (8-byte header length, JSON header, raw little-endian data)."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise FileNotFoundError(f"safetensors file not found: {path}")
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self._header = header
        self._offset = 8 + n

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        info = self._header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._offset + start, shape=(end - start,))
        return mm.view(dtype).reshape(info["shape"])


class SafetensorsCheckpoint:
    """All tensors of a HF model directory: ``model.safetensors`` or an index + shards."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            for key, fname in weight_map.items():
                if fname not in self._files:
                    self._files[fname] = SafetensorsFile(os.path.join(directory, fname))
                self._where[key] = fname
        elif os.path.exists(single):
            self._files["model.safetensors"] = SafetensorsFile(single)
            self._where = {k: "model.safetensors" for k in self._files["model.safetensors"].keys()}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {directory}")

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[self._where[key]].shape(key)

    def get(self, key: str) -> np.ndarray:
        return self._files[self._where[key]].get(key)


# GGUF tensor names -> HF names (llama.cpp's convert_hf_to_gguf naming).
_GGUF_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]


def _gguf_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (interleaved rotary pairs) back to HF's rotate-half rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_reader(path: str) -> GGUFFile:
    """The :class:`cna_jax.gguf_file.GGUFFile` of ``path``, shared by the weights and the tokenizer of one file."""
    return _gguf_reader(os.path.abspath(path), os.path.getmtime(path), os.path.getsize(path))


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: str, mtime: float, size: int) -> GGUFFile:  # mtime, size: a rewritten file is read again
    return GGUFFile(path)


class GGUFCheckpoint:
    """Tensors of a GGUF file, dequantized to float32 one at a time, under HF names and layout."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        import gguf  # optional dependency: the `gguf` extra

        self.path = path
        self._reader = gguf_reader(path)
        self._dequantize = gguf.quants.dequantize
        self._tensors = {}
        for t in self._reader.tensors:
            hf = self._hf_name(t.name)
            if hf is None:
                raise ConversionError(f"{path}: unknown GGUF tensor {t.name!r}")
            self._tensors[hf] = t
        self.metadata = self._reader.metadata
        arch = self.metadata.get("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (llama, qwen2)")
        self.arch = arch

    @staticmethod
    def _hf_name(name: str) -> str | None:
        for pattern, repl in _GGUF_NAMES:
            if re.fullmatch(pattern, name):
                return re.sub(pattern, repl, name)
        return None

    def hf_config(self) -> dict[str, Any]:
        """A HF-style config dict from the GGUF metadata."""
        m, a = self.metadata, self.arch
        heads = int(m[f"{a}.attention.head_count"])
        hidden = int(m[f"{a}.embedding_length"])
        cfg = {
            "model_type": a,
            "vocab_size": int(self._tensors["model.embed_tokens.weight"].shape[-1]),
            "hidden_size": hidden,
            "intermediate_size": int(m[f"{a}.feed_forward_length"]),
            "num_hidden_layers": int(m[f"{a}.block_count"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(m.get(f"{a}.attention.head_count_kv") or heads),
            "head_dim": int(m.get(f"{a}.rope.dimension_count") or hidden // heads),
            "rms_norm_eps": float(m[f"{a}.attention.layer_norm_rms_epsilon"]),
            "rope_theta": float(m.get(f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(m.get(f"{a}.context_length", 8192)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
        }
        if m.get(f"{a}.rope.scaling.type") not in (None, "none"):
            raise ConfigError(f"{self.path}: GGUF rope scaling {m[f'{a}.rope.scaling.type']!r} is not supported")
        return cfg

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in reversed(self._tensors[key].shape))

    def get(self, key: str) -> np.ndarray:
        t = self._tensors[key]
        w = self._dequantize(t.data, t.tensor_type).astype(np.float32).reshape(self.shape(key))
        if self.arch == "llama":  # llama.cpp permutes Llama q/k rows for its interleaved rope
            if key.endswith("self_attn.q_proj.weight"):
                w = _gguf_unpermute(w, int(self.metadata["llama.attention.head_count"]))
            elif key.endswith("self_attn.k_proj.weight"):
                heads = self.metadata.get("llama.attention.head_count_kv") or self.metadata["llama.attention.head_count"]
                w = _gguf_unpermute(w, int(heads))
        return w


# ---------------------------------------------------------------------------------------------------
# HF key -> Flax path, with the layout transform. Transforms see the ModelConfig.

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def _linear(w, cfg):  # [out, in] -> [in, out]
    return w.T


def _heads_in(n_heads_attr):
    def f(w, cfg):  # [H*D, E] -> [E, H, D]
        return w.T.reshape(w.shape[1], getattr(cfg, n_heads_attr), cfg.head_dim)
    return f


def _heads_bias(n_heads_attr):
    def f(b, cfg):  # [H*D] -> [H, D]
        return b.reshape(getattr(cfg, n_heads_attr), cfg.head_dim)
    return f


def _o_proj(w, cfg):  # [E, H*D] -> [H, D, E]
    return w.T.reshape(cfg.num_attention_heads, cfg.head_dim, w.shape[0])


def _same(w, cfg):
    return w


_KEY_TABLE: list[tuple[str, str, Transform]] = [
    (r"model\.embed_tokens\.weight", "embed_tokens/embedding", _same),
    (r"model\.norm\.weight", "norm/weight", _same),
    (r"lm_head\.weight", "lm_head/kernel", _linear),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers_\1/input_layernorm/weight", _same),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers_\1/post_attention_layernorm/weight", _same),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers_\1/self_attn/q_proj/kernel", _heads_in("num_attention_heads")),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers_\1/self_attn/k_proj/kernel", _heads_in("num_key_value_heads")),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers_\1/self_attn/v_proj/kernel", _heads_in("num_key_value_heads")),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", r"layers_\1/self_attn/q_proj/bias", _heads_bias("num_attention_heads")),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", r"layers_\1/self_attn/k_proj/bias", _heads_bias("num_key_value_heads")),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", r"layers_\1/self_attn/v_proj/bias", _heads_bias("num_key_value_heads")),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers_\1/self_attn/o_proj/kernel", _o_proj),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers_\1/mlp/gate_proj/kernel", _linear),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers_\1/mlp/up_proj/kernel", _linear),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers_\1/mlp/down_proj/kernel", _linear),
]
# Keys that are legitimately not parameters of the Flax model.
_IGNORED = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq"]


def flax_path(key: str) -> tuple[str, Transform] | None:
    for pattern, path, transform in _KEY_TABLE:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, path, key), transform
    return None


def load_params(reader, cfg: ModelConfig, dtype=jnp.float32, shardings=None, progress: bool = False) -> dict:
    """Fills the Flax parameter tree from ``reader`` (a Safetensors/GGUF checkpoint), tensor by tensor.

    ``shardings``: None (default device) or a tree of ``jax.sharding.Sharding`` matching the params;
    then every device gets only its slice.
    """
    expected = traverse_util.flatten_dict(abstract_params(cfg, dtype), sep="/")
    flat_shardings = None if shardings is None else traverse_util.flatten_dict(shardings, sep="/")
    filled: dict[str, jax.Array] = {}
    keys = reader.keys()
    unused = []
    iterator: Iterable[str] = keys
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(keys, desc="loading weights", unit="tensor")
    for key in iterator:
        mapped = flax_path(key)
        if mapped is None:
            if any(re.fullmatch(p, key) for p in _IGNORED):
                continue
            unused.append(key)
            continue
        path, transform = mapped
        if path == "lm_head/kernel" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints also store the (identical) head; the model uses the embedding
        if path not in expected:
            raise ConversionError(f"checkpoint tensor {key!r} maps to {path!r}, which the model does not have "
                                  f"(layers={cfg.num_hidden_layers}, attention_bias={cfg.attention_bias})")
        if path in filled:
            raise ConversionError(f"checkpoint tensor {key!r} fills {path!r} a second time")
        want = expected[path]
        value = transform(reader.get(key), cfg)
        if tuple(value.shape) != tuple(want.shape):
            raise ConversionError(f"checkpoint tensor {key!r} has shape {reader.shape(key)}; after the layout "
                                  f"transform {tuple(value.shape)} != expected {tuple(want.shape)} for {path!r}")
        filled[path] = _place(value, want.dtype, None if flat_shardings is None else flat_shardings[path])
    if unused:
        raise ConversionError(f"checkpoint tensors not used by the model: {unused[:10]}"
                              f"{' ...' if len(unused) > 10 else ''}")
    missing = sorted(set(expected) - set(filled))
    if missing:
        raise ConversionError(f"checkpoint is missing tensors for {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return traverse_util.unflatten_dict(filled, sep="/")


def _place(value: np.ndarray, dtype, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(np.asarray(value).astype(dtype))
    host = {}

    def slice_for(index):
        if "v" not in host:  # transform/cast once per tensor, not once per device
            host["v"] = np.asarray(value).astype(dtype)
        return host["v"][index]

    return jax.make_array_from_callback(tuple(value.shape), sharding, slice_for)


# ---------------------------------------------------------------------------------------------------
# Sources: a local directory, a hub id, or a GGUF file.

_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                 "tokenizer*", "special_tokens_map.json", "*.jinja"]


def resolve_source(source: str) -> str:
    """A local directory or GGUF file as is; otherwise a hub id resolved through the local HF cache
    (downloading when online)."""
    source = os.path.expanduser(source)
    if os.path.exists(source):
        return source
    if source.endswith(".gguf") or source.startswith((".", "/")) or source.count("/") != 1:
        raise FileNotFoundError(f"model path not found: {source}")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(source, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline, gated, or unknown id
        raise FileNotFoundError(
            f"could not get {source!r} from the hub or the local cache ({type(e).__name__}: {e}). "
            "Pass a local directory with config.json + *.safetensors instead.") from None


def open_checkpoint(source: str):
    """Returns (ModelConfig, reader) for a local dir, GGUF file or hub id."""
    path = resolve_source(source)
    if path.endswith(".gguf"):
        reader = GGUFCheckpoint(path)
        return from_hf_dict(reader.hf_config()), reader
    return from_hf_config_file(path), SafetensorsCheckpoint(path)


def load(source: str, dtype=jnp.float32, shardings=None, progress: bool = False) -> tuple[ModelConfig, dict]:
    """Loads (config, params) from a local HF dir, a hub id or a GGUF file."""
    cfg, reader = open_checkpoint(source)
    if callable(shardings):
        shardings = shardings(cfg)
    return cfg, load_params(reader, cfg, dtype, shardings=shardings, progress=progress)
