"""A GGUF file's metadata and tensors, read directly (format: llama.cpp's ``docs/gguf.md``, versions 2 and 3).

``gguf.GGUFReader`` builds a NumPy view per value: SmolLM2's 49k tokens and 48k merges take it 4-6 s per
file, paid on every build of the testbed and every load of the base model. Here each string array is read
in one pass over the file's bytes (~0.2 s); tensors are the same memory-mapped arrays the ``gguf`` package's
``dequantize`` takes (tests/test_load.py compares every value and tensor with ``GGUFReader``'s).
"""
from __future__ import annotations

import dataclasses
import struct
from typing import Any

import numpy as np

MAGIC = b"GGUF"
# GGUF value types -> struct format of a scalar (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# ggml tensor types stored as plain NumPy arrays (others: bytes, shaped by gguf.quants.quant_shape_to_byte_shape)
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # GGUF order (fastest dimension first), as GGUFReader's ``shape``
    data: np.ndarray  # memory-mapped, as GGUFReader's ``data`` (what gguf.quants.dequantize takes)


class GGUFFile:
    """``metadata``: {key: str, number, bool, or a list of them}; ``tensors``: [Tensor] in file order."""

    def __init__(self, path: str):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        self.path = path
        self._map = np.memmap(path, np.uint8, mode="r")
        self._buf = memoryview(self._map)
        if bytes(self._buf[:4]) != MAGIC:
            raise ValueError(f"{path}: not a GGUF file (magic {bytes(self._buf[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", self._buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2, 3)")
        self._pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.metadata:
                raise ValueError(f"{path}: duplicate metadata key {key!r}")
            self.metadata[key] = self._value(self._unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = struct.unpack_from(f"<{self._unpack('I')}Q", self._buf, self._pos)
            self._pos += 8 * len(dims)
            if any(name == info[0] for info in infos):
                raise ValueError(f"{path}: duplicate tensor {name!r}")
            infos.append((name, dims, self._unpack("I"), self._unpack("Q")))
        align = int(self.metadata.get("general.alignment", 32))
        if align <= 0 or align & (align - 1):
            raise ValueError(f"{path}: alignment {align} is not a power of two")
        start = -(-self._pos // align) * align
        self.tensors: list[Tensor] = []
        for name, dims, kind, offset in infos:
            qtype = GGMLQuantizationType(kind)
            count = int(np.prod(dims, dtype=np.int64))
            np_shape = tuple(reversed(dims))
            if kind in _PLAIN:
                dtype, nbytes = np.dtype(_PLAIN[kind]), count * np.dtype(_PLAIN[kind]).itemsize
            else:
                block, size = GGML_QUANT_SIZES[qtype]
                dtype, nbytes, np_shape = np.dtype(np.uint8), count * size // block, quant_shape_to_byte_shape(
                    np_shape, qtype)
            at = start + offset
            if at + nbytes > len(self._map):
                raise ValueError(f"{path}: tensor {name!r} runs past the end of the file")
            data = self._map[at:at + nbytes].view(dtype).reshape(np_shape)
            self.tensors.append(Tensor(name, qtype, tuple(int(d) for d in dims), data))

    def _unpack(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("Q")
        s = str(self._buf[self._pos:self._pos + n], "utf-8")
        self._pos += n
        return s

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])
        if kind != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF value type {kind} at byte {self._pos}")
        item, n = self._unpack("I"), self._unpack("Q")
        if item in _SCALARS:  # one read for the whole array
            fmt = f"<{n}{_SCALARS[item]}"
            values = list(struct.unpack_from(fmt, self._buf, self._pos))
            self._pos += struct.calcsize(fmt)
            return values
        return [self._value(item) for _ in range(n)]  # strings (token lists) or nested arrays
