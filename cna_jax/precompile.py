"""Compiling a stage's programs once over the processes of a multi-process run.

Every process of a multi-controller run compiles the same SPMD programs. On the study's 2-core CPU run
(2 processes x 1 device) a compile (4-25 s per program for SmolLM2's 30 layers, ~250 s per process over
the study) is paid on both cores at once, each busy with the same work. :func:`spread` hands the programs
a stage knows it will run out instead: each process compiles the next program of the list that no
process has taken yet, publishes its executable (serialized) through the distributed runtime's key-value
store, and loads the others' executables from it; a later call whose arguments have the same types then
runs the loaded program (:func:`lookup`). The programs are the ones the calls would have compiled (same
function, same arguments' shapes, shardings and static values), so results are bit-identical. In one
process nothing changes: programs compile on their first call.

This module sits below ``cna_jax.sharding``; of the package it imports only ``cna_jax.cpu_kernels``.
"""
from __future__ import annotations

import itertools
import logging
import pickle
import time
from typing import Any, Callable, Hashable, Sequence

import jax

from cna_jax import cpu_kernels

log = logging.getLogger(__name__)
# (function, argument signature) -> jax.stages.Compiled
_PROGRAMS: dict[Hashable, Any] = {}
_ROUND = itertools.count()
# Programs this process compiled for the others and loaded from them, and calls that ran one (tests, logs).
stats = {"compiled": 0, "loaded": 0, "calls": 0}

# How long a process waits for another's program: a 70B program on a TPU host can compile for minutes.
TIMEOUT_MS = 60 * 60 * 1000


def _leaf(x) -> Hashable:
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # arrays and jax.ShapeDtypeStruct
        return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)))
    return ("value", x)  # static values (configs, layer numbers) by value


def signature(fn: Callable, args: Any) -> Hashable:
    """What a call's compiled program depends on: the function (its static values bound), the arguments'
    tree structure and each array argument's shape and dtype (their shardings are the function's
    ``in_shardings``)."""
    leaves, tree = jax.tree.flatten(args)
    return fn, tree, tuple(_leaf(x) for x in leaves)


def lookup(fn: Callable, args: Any):
    """The program :func:`spread` compiled or loaded for this call, or None (call ``fn`` as usual)."""
    if not _PROGRAMS:
        return None
    exe = _PROGRAMS.get(signature(fn, args))
    stats["calls"] += exe is not None
    return exe


def _client():
    from jax._src import distributed  # the runtime's client: jax.distributed has no public handle to it
    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("several JAX processes but no distributed client (jax.distributed.initialize)")
    return client


def spread(programs: Sequence[tuple[Callable, Any, Callable[[], Any]]]) -> int:
    """Compiles ``programs`` over the processes; returns how many this process compiled itself.

    programs: (fn, args, lower) per call the stage will make, ``lower()`` returning its
    ``jax.stages.Lowered`` (arguments may be ``jax.ShapeDtypeStruct``), the slowest to compile first. Every
    process must pass the same list in the same order (SPMD). Programs already spread, and repeats, are
    skipped. One process: returns 0 and compiles nothing (each program then compiles on its first call)."""
    from jax.experimental import serialize_executable

    n = jax.process_count()
    if n == 1:
        return 0
    todo, seen = [], set()
    for fn, args, lower in programs:
        key = signature(fn, args)
        if key not in _PROGRAMS and key not in seen:
            seen.add(key)
            todo.append((key, lower))
    if not todo:
        return 0
    client, r = _client(), next(_ROUND)
    t0 = time.perf_counter()
    name = lambda j: f"cna_jax/precompile/{r}/{j}"
    # Each process takes the next program nobody has taken (an atomic counter in the store): compile times
    # differ 20x between programs (a 30-layer prefill against a slot copy), so a fixed split would leave one
    # process waiting; callers list their programs slowest first.
    mine = []
    while (j := client.key_value_increment(name("next"), 1) - 1) < len(todo):
        mine.append(j)
        key, lower = todo[j]
        compiled = lower().compile()
        client.key_value_set_bytes(name(j), pickle.dumps(serialize_executable.serialize(compiled)))
        _PROGRAMS[key] = compiled
        stats["compiled"] += 1
    if jax.devices()[0].platform == "cpu":  # a loaded program may call the FFI kernels this process never traced
        cpu_kernels.register_all()
    for j in range(len(todo)):
        if j not in mine:
            data, in_tree, out_tree = pickle.loads(client.blocking_key_value_get_bytes(name(j), TIMEOUT_MS))
            _PROGRAMS[todo[j][0]] = serialize_executable.deserialize_and_load(data, in_tree, out_tree)
            stats["loaded"] += 1
    # Every process has loaded every program: each frees what it published (executables are megabytes).
    client.wait_at_barrier(f"cna_jax/precompile/{r}/loaded", TIMEOUT_MS)
    for j in mine:
        client.key_value_delete(name(j))
    if jax.process_index() == 0:
        client.key_value_delete(name("next"))
    log.info("precompile: %d programs over %d processes (%d compiled here) in %.1fs", len(todo), n, len(mine),
             time.perf_counter() - t0)
    return len(mine)

