"""The study's statistics (docs/METHOD.md §5.4): interval, paired test and null p-value.

* ``wilson_interval``: the 95% Wilson score interval of a rate k / n.
* ``mcnemar_exact``: the exact two-sided McNemar test of two conditions on the same prompts.
* ``empirical_p``: where the graph subset's effect sits among its null subsets.

numpy / scipy only, no JAX: these run on the few hundred flags a study stores.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as sp_stats

# Two reductions that are equal in exact arithmetic can differ by a few ulps once computed as
# differences of float rates (none - rate); rates are multiples of 1/n, so two *different* reductions
# differ by at least 1/n (>> 1e-12 for any prompt count a study can have). The tolerance therefore
# only merges float ties, never distinct values.
TIE_TOLERANCE = 1e-12


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    k: successes (int, 0 <= k <= n); n: trials (int >= 0); confidence in (0, 1).
    Returns (low, high), floats in [0, 1]. At k = 0 the lower bound is exactly 0 and at k = n the upper
    bound exactly 1 (the formula gives them only up to an ulp, so they are set). n == 0 returns
    (nan, nan): no data, no interval.

    With z the two-sided normal quantile and p = k / n:
    ``(p + z^2 / 2n +- z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)``.
    """
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return float("nan"), float("nan")
    z = float(sp_stats.norm.ppf(1.0 - (1.0 - confidence) / 2.0))
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


def _flags(x: Sequence, name: str) -> np.ndarray:
    """A 1-D bool array from a sequence of bool-likes (bools, or ints that are 0 / 1)."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of flags, got shape {arr.shape}")
    if arr.dtype != bool:
        if arr.size and not (np.issubdtype(arr.dtype, np.integer) and np.isin(arr, (0, 1)).all()):
            raise ValueError(f"{name} must hold booleans (or 0 / 1), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def mcnemar_exact(a: Sequence, b: Sequence) -> float:
    """Exact two-sided McNemar p-value for paired flags (a[i], b[i] on the same prompt i).

    a, b: 1-D sequences of bools (or 0 / 1) of equal length. Only the discordant pairs carry
    information: b01 = #{a false, b true}, b10 = #{a true, b false}. Under the null each discordant pair
    goes either way with probability 1/2, so with m = b01 + b10,
    ``p = min(1, 2 * P[Binomial(m, 1/2) <= min(b01, b10)])``. No discordant pairs gives 1.0.
    """
    a, b = _flags(a, "a"), _flags(b, "b")
    if len(a) != len(b):
        raise ValueError(f"mcnemar_exact needs paired flags of equal length, got {len(a)} and {len(b)}")
    b01 = int((~a & b).sum())
    b10 = int((a & ~b).sum())
    m = b01 + b10
    if m == 0:
        return 1.0
    return float(min(1.0, 2.0 * sp_stats.binom.cdf(min(b01, b10), m, 0.5)))


def empirical_p(null_values: Sequence[float], observed: float) -> float:
    """Empirical p-value of ``observed`` against ``n`` null draws: ``(1 + #{null >= observed}) / (1 + n)``.

    null_values: 1-D floats, one per null subset; observed: the graph subset's value. Larger is better:
    in the study both are refusal *reductions* (no-intervention rate minus the subset's rate), so a null
    "at least as good" as the graph is one whose reduction is >= the graph's. Ties count as at least as
    good, up to ``TIE_TOLERANCE`` (1e-12) for float rounding of equal reductions (see its comment).
    The +1 counts the observed subset itself, so p is never 0; with no nulls p = 1 (no evidence).
    """
    null = np.asarray(null_values, dtype=np.float64).reshape(-1)
    observed = float(observed)
    if not math.isfinite(observed) or not np.isfinite(null).all():
        raise ValueError("empirical_p needs finite null values and a finite observed value")
    at_least = int((null >= observed - TIE_TOLERANCE).sum())
    return (1 + at_least) / (1 + len(null))
