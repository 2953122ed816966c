"""Neuron sets (layer, index, delta) and the multiplier arrays ``[layers, neurons]`` that ablate them."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

import numpy as np


def multiplier(num_layers: int, intermediate_size: int, pairs: Iterable[Sequence[int]] | np.ndarray,
               value: float = 0.0, dtype=np.float32) -> np.ndarray:
    """Multiplier ``[layers, neurons]``: 1 everywhere, ``value`` at each (layer, neuron) pair
    (0 = ablate, >1 = amplify)."""
    mult = np.ones((num_layers, intermediate_size), dtype)
    pairs = np.asarray(list(pairs) if not isinstance(pairs, np.ndarray) else pairs, np.int64).reshape(-1, 2)
    if len(pairs):
        layers, idx = pairs[:, 0], pairs[:, 1]
        if layers.min() < 0 or layers.max() >= num_layers or idx.min() < 0 or idx.max() >= intermediate_size:
            raise ValueError(f"neuron pairs out of range for [{num_layers}, {intermediate_size}]")
        mult[layers, idx] = value
    return mult


@dataclasses.dataclass(frozen=True)
class NeuronSet:
    """A set of MLP neurons: ``layers`` and ``indices`` ``[n]`` int, ``deltas`` ``[n]`` float (the CNA
    attribution, or zeros), plus the model shape they belong to."""

    layers: np.ndarray
    indices: np.ndarray
    deltas: np.ndarray
    num_layers: int
    intermediate_size: int
    meta: dict = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        n = len(self.layers)
        if len(self.indices) != n or len(self.deltas) != n:
            raise ValueError("layers, indices and deltas must have the same length")
        if n:
            if self.layers.min() < 0 or self.layers.max() >= self.num_layers:
                raise ValueError(f"layer out of range [0, {self.num_layers})")
            if self.indices.min() < 0 or self.indices.max() >= self.intermediate_size:
                raise ValueError(f"neuron index out of range [0, {self.intermediate_size})")
            if len(set(self.pairs())) != n:
                raise ValueError("neuron set has duplicate (layer, index) pairs")

    @classmethod
    def from_pairs(cls, pairs, num_layers, intermediate_size, deltas=None, meta=None) -> "NeuronSet":
        arr = np.asarray(pairs, np.int64).reshape(-1, 2)
        d = np.zeros(len(arr), np.float32) if deltas is None else np.asarray(deltas, np.float32)
        return cls(arr[:, 0], arr[:, 1], d, num_layers, intermediate_size, dict(meta or {}))

    def __len__(self) -> int:
        return len(self.layers)

    def pairs(self) -> list[tuple[int, int]]:
        return [(int(l), int(i)) for l, i in zip(self.layers, self.indices)]

    def subset(self, positions: Sequence[int] | np.ndarray) -> "NeuronSet":
        """The neurons at ``positions`` of this set (e.g. a graph's connected nodes)."""
        p = np.asarray(positions, np.int64)
        return NeuronSet(self.layers[p], self.indices[p], self.deltas[p], self.num_layers,
                         self.intermediate_size, dict(self.meta))

    def layer_counts(self) -> np.ndarray:
        """``[layers]`` number of neurons per layer."""
        return np.bincount(self.layers, minlength=self.num_layers)

    def multiplier(self, value: float = 0.0, dtype=np.float32) -> np.ndarray:
        return multiplier(self.num_layers, self.intermediate_size, np.stack([self.layers, self.indices], 1),
                          value, dtype)

    def report(self, top: int = 10) -> str:
        counts = self.layer_counts()
        lines = [f"{len(self)} neurons over {int((counts > 0).sum())} of {self.num_layers} layers",
                 "per layer: " + ", ".join(f"L{l}:{c}" for l, c in enumerate(counts) if c)]
        order = np.argsort(-np.abs(self.deltas))[:top]
        lines.append("top by |delta|: " + ", ".join(
            f"L{self.layers[k]}.N{self.indices[k]} ({self.deltas[k]:+.4f})" for k in order))
        return "\n".join(lines)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"num_layers": self.num_layers, "intermediate_size": self.intermediate_size,
                       "layers": self.layers.tolist(), "indices": self.indices.tolist(),
                       "deltas": [float(x) for x in self.deltas], "meta": self.meta}, f)

    @classmethod
    def load(cls, path: str) -> "NeuronSet":
        with open(path) as f:
            d = json.load(f)
        return cls(np.asarray(d["layers"], np.int64), np.asarray(d["indices"], np.int64),
                   np.asarray(d["deltas"], np.float32), d["num_layers"], d["intermediate_size"],
                   d.get("meta", {}))
