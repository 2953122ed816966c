"""Multi-host set-up: ``jax.distributed.initialize()`` before any JAX work, process-local inputs, and
one writer.

On a TPU pod slice every worker runs the same command (``--config.distributed=True``); JAX finds the
coordinator and the process ids from the TPU metadata. On GPU clusters (SLURM, or by hand) pass
``coordinator_address``, ``num_processes`` and ``process_id`` (or set the ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` environment variables). Every process must then run the
same jitted calls in the same order; only process 0 writes files (:func:`is_writer`).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

_INITIALIZED = False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> None:
    """Calls ``jax.distributed.initialize`` once (idempotent). Must run before any other JAX call:
    afterwards it is too late, and this raises with a readable message instead of hanging."""
    global _INITIALIZED
    if _INITIALIZED:
        return
    import jax

    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
    except RuntimeError as e:
        if "before" in str(e).lower() or "already" in str(e).lower():
            raise RuntimeError(
                "jax.distributed.initialize() must run before any JAX computation or device query; call "
                "cna_jax.distributed.initialize_from_config(config) first thing in main()") from e
        raise
    _INITIALIZED = True


def initialize_from_config(config: Any) -> bool:
    """Initializes when ``config.distributed`` is true (the ``--config.distributed`` flag); returns whether
    it did. ``config.distributed`` may also be a mapping with coordinator_address / num_processes /
    process_id."""
    flag = getattr(config, "distributed", False) if not isinstance(config, dict) else config.get("distributed", False)
    if not flag:
        return False
    if hasattr(flag, "to_dict") or isinstance(flag, dict):
        opts = flag.to_dict() if hasattr(flag, "to_dict") else dict(flag)
        initialize(**{k: v for k, v in opts.items() if v not in (None, "", -1)})
    else:
        initialize()
    return True


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def is_writer() -> bool:
    """True on process 0 only: the one process that writes files (results, checkpoints' metadata, logs)."""
    return process_index() == 0


def process_rows(n_rows: int) -> slice:
    """This process's contiguous share of ``n_rows`` global rows (for building process-local inputs)."""
    count, index = process_count(), process_index()
    if n_rows % count:
        raise ValueError(f"{n_rows} global rows do not split evenly over {count} processes")
    per = n_rows // count
    return slice(index * per, (index + 1) * per)


def global_batch(local: np.ndarray, sharding) -> "jax.Array":
    """A global array from each process's local rows (leading axis split over processes in order):
    every process passes its own ``local`` block; the result has the global shape and ``sharding``."""
    import jax

    local = np.asarray(local)
    count = process_count()
    global_shape = (local.shape[0] * count,) + local.shape[1:]
    offset = process_index() * local.shape[0]

    def block(index):
        rows = index[0]
        start = (rows.start or 0) - offset
        stop = (global_shape[0] if rows.stop is None else rows.stop) - offset
        if start < 0 or stop > local.shape[0]:
            raise ValueError("a device of this process needs rows of another process: the batch axis must "
                             "be split over processes in process order")
        return local[(slice(start, stop),) + tuple(index[1:])]

    return jax.make_array_from_callback(global_shape, sharding, block)
