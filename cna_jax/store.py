"""Checkpointed study stages: arrays through Orbax, small metadata as JSON, keyed by a config hash.

A stage directory ``<workdir>/stages/<name>-<hash>/`` is complete when its ``done.json`` exists; it is
written last, after the arrays and metadata, so a run killed mid-stage leaves no half result that a
rerun would trust. Stages made of many items (one generation condition, one null subset) keep one
small JSON file per finished item, so a rerun redoes only the item that was in flight.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any

import numpy as np

from cna_jax.distributed import agree, barrier, is_writer


def config_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (ConfigDicts are converted)."""
    def plain(x):
        if hasattr(x, "to_dict"):
            return plain(x.to_dict())
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in sorted(x.items())}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, np.ndarray):
            return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
        return x
    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _atomic_write_json(path: str, obj: Any) -> None:
    if not is_writer():  # multi-host runs share one workdir
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


class Stage:
    """One stage's directory."""

    def __init__(self, workdir: str, name: str, key: str):
        self.name, self.key = name, key
        self.path = os.path.join(workdir, "stages", f"{name}-{key}")

    @property
    def done(self) -> bool:
        """Whether the stage finished (process 0's view, shared by every process: call it on all)."""
        return agree(os.path.exists(os.path.join(self.path, "done.json")))

    def seconds(self) -> float:
        """How long the finished stage took when it was computed (0 when not recorded)."""
        with open(os.path.join(self.path, "done.json")) as f:
            return json.load(f).get("seconds") or 0.0

    def save(self, arrays: dict[str, np.ndarray] | None = None, meta: dict | None = None,
             seconds: float | None = None) -> None:
        """Writes the arrays (Orbax), the metadata (JSON), then the completion marker. Multi-process:
        every process calls it (the Orbax save is collective; only process 0 writes, numpy arrays
        included), and every process returns after the marker is written."""
        if is_writer():
            os.makedirs(self.path, exist_ok=True)
        if arrays:
            import orbax.checkpoint as ocp

            target = os.path.join(self.path, "arrays")
            if is_writer() and os.path.exists(target):  # an interrupted earlier attempt
                shutil.rmtree(target)
            barrier(f"stage-clean-{self.name}-{self.key}")
            with ocp.StandardCheckpointer() as ckpt:
                ckpt.save(os.path.abspath(target), {k: np.asarray(v) for k, v in arrays.items()})
        _atomic_write_json(os.path.join(self.path, "meta.json"), meta or {})
        _atomic_write_json(os.path.join(self.path, "done.json"),
                           {"stage": self.name, "key": self.key, "seconds": seconds, "finished": time.time()})
        barrier(f"stage-saved-{self.name}-{self.key}")

    def load(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {}
        target = os.path.join(self.path, "arrays")
        if os.path.exists(target):
            import orbax.checkpoint as ocp

            with ocp.StandardCheckpointer() as ckpt:
                arrays = {k: np.asarray(v) for k, v in ckpt.restore(os.path.abspath(target)).items()}
        with open(os.path.join(self.path, "meta.json")) as f:
            return arrays, json.load(f)

    # Items: resumable pieces of a stage.
    def item_path(self, item: str) -> str:
        return os.path.join(self.path, "items", f"{item}.json")

    def has_item(self, item: str) -> bool:
        """Whether the item finished (process 0's view, shared by every process: call it on all)."""
        return agree(os.path.exists(self.item_path(item)))

    def save_item(self, item: str, obj: Any) -> None:
        """Process 0 writes; every process calls it and returns once the file is there."""
        if is_writer():
            os.makedirs(os.path.join(self.path, "items"), exist_ok=True)
        _atomic_write_json(self.item_path(item), obj)
        barrier(f"item-{self.name}-{self.key}-{item}")

    # Rows: an append-only JSON-lines log of small results (one line per finished generation).
    def append_row(self, log: str, obj: Any) -> None:
        """Appends one JSON line (process 0 only; flushed so a killed run keeps every finished row)."""
        if not is_writer():
            return
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, log), "a") as f:
            f.write(json.dumps(obj, default=_json_default) + "\n")
            f.flush()

    def read_rows(self, log: str) -> dict:
        """{(item, i): tokens} from a row log; a torn last line (a kill mid-write) is ignored."""
        path = os.path.join(self.path, log)
        out = {}
        if is_writer() and os.path.exists(path):
            with open(path, "rb+") as f:  # drop a torn last line, or the next append would join it
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        barrier(f"rows-repaired-{self.name}-{self.key}")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    out[(row["item"], int(row["i"]))] = row["tokens"]
        barrier(f"rows-read-{self.name}-{self.key}")
        return out

    def load_item(self, item: str) -> Any:
        with open(self.item_path(item)) as f:
            return json.load(f)
