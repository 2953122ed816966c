"""Token batching: left padding, bucketed lengths, the shared prefix of a prompt set, padded batches."""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


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
