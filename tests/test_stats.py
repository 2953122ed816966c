"""Wilson interval, exact McNemar and empirical p-value against statsmodels / scipy and hand-computed cases.

Float tolerances: every reference evaluates the same closed form (or the same binomial sums) in float64
with a different order of operations, so results agree to a few ulps; 1e-12 absolute / relative leaves
three orders of magnitude of room above that and is still far below any printed digit.
"""
import math

import numpy as np
import pytest
from scipy.stats import binomtest
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from cna_jax.stats import empirical_p, mcnemar_exact, wilson_interval

Z95 = 1.959963984540054  # the 0.975 normal quantile


# --- Wilson ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (39, 48), (44, 48), (5, 7),
                                 (1, 200), (100, 200), (0, 48), (48, 48)])
@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_wilson_matches_statsmodels(k, n, confidence):
    low, high = wilson_interval(k, n, confidence)
    ref_low, ref_high = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    assert low == pytest.approx(ref_low, abs=1e-12) and high == pytest.approx(ref_high, abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_hand_computed_edges():
    # k = 0: the lower bound is exactly 0 and the upper bound simplifies to z^2 / (n + z^2).
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(Z95 ** 2 / (10 + Z95 ** 2), abs=1e-12)  # 0.2775...
    # k = n mirrors it.
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(10 / (10 + Z95 ** 2), abs=1e-12)
    # k = n / 2: symmetric about 1/2.
    low, high = wilson_interval(5, 10)
    assert low + high == pytest.approx(1.0, abs=1e-12)


def test_wilson_no_data_and_bad_input():
    low, high = wilson_interval(0, 0)
    assert math.isnan(low) and math.isnan(high)
    for k, n in ((-1, 5), (6, 5), (1, -1)):
        with pytest.raises(ValueError, match="0 <= k <= n"):
            wilson_interval(k, n)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=1.0)


# --- McNemar --------------------------------------------------------------------------------------

def _table(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]


def test_mcnemar_matches_statsmodels_and_scipy():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 60))
        a = rng.random(n) < rng.random()
        b = np.where(rng.random(n) < 0.3, ~a, a)  # paired: mostly the same flags, some flipped
        p = mcnemar_exact(a.tolist(), b.tolist())
        table = _table(a, b)
        assert p == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-12), (trial, table)
        b01, b10 = table[1][0], table[0][1]
        if b01 + b10:
            # For p = 1/2 the binomial is symmetric, so scipy's two-sided test is the doubled tail too.
            ref = binomtest(min(b01, b10), b01 + b10, 0.5, alternative="two-sided").pvalue
            assert p == pytest.approx(ref, rel=1e-12), (trial, table)


def test_mcnemar_hand_computed():
    # 3 discordant pairs, all one way: p = 2 * P[X <= 0] = 2 / 8.
    assert mcnemar_exact([1, 1, 1, 0, 1], [0, 0, 0, 0, 1]) == pytest.approx(0.25, rel=1e-12)
    # b01 = 1, b10 = 4: p = 2 * (1 + 5) / 32 = 0.375 (the concordant pairs do not matter).
    a = [True, True, True, True, False, True, False]
    b = [False, False, False, False, True, True, False]
    assert mcnemar_exact(a, b) == pytest.approx(0.375, rel=1e-12)
    # Balanced discordance: the doubled tail exceeds 1 and is capped.
    assert mcnemar_exact([1, 0], [0, 1]) == 1.0
    # Order of the two conditions does not matter.
    assert mcnemar_exact(b, a) == mcnemar_exact(a, b)


def test_mcnemar_identical_flags_and_errors():
    flags = [True, False, True, True]
    assert mcnemar_exact(flags, flags) == 1.0
    assert mcnemar_exact([], []) == 1.0
    assert mcnemar_exact(np.array([1, 0, 1]), np.array([True, False, True])) == 1.0
    with pytest.raises(ValueError, match="equal length"):
        mcnemar_exact([True, False], [True])
    with pytest.raises(ValueError, match="booleans"):
        mcnemar_exact([0.5, 1.0], [1, 0])
    with pytest.raises(ValueError, match="booleans"):
        mcnemar_exact([2, 0], [1, 0])


# --- empirical p ----------------------------------------------------------------------------------

def test_empirical_p_hand_computed():
    # 20 nulls, 2 of them at least as large as the observed 0.10: (1 + 2) / (1 + 20).
    nulls = [0.0] * 10 + [0.05] * 8 + [0.10, 0.125]
    assert empirical_p(nulls, 0.10) == pytest.approx(3 / 21, rel=1e-15)
    assert empirical_p(nulls, 0.2) == pytest.approx(1 / 21, rel=1e-15)  # none at least as good
    assert empirical_p(nulls, -1.0) == pytest.approx(21 / 21, rel=1e-15)  # all at least as good
    assert empirical_p([], 0.3) == 1.0  # no nulls: no evidence


def test_empirical_p_float_ties_count():
    # 0.3 - 0.2 is 0.09999999999999998 in float64: an equal reduction computed another way still ties.
    assert 0.3 - 0.2 < 0.1
    assert empirical_p([0.3 - 0.2], 0.1) == 1.0
    # A reduction one prompt (1/48) smaller is not a tie.
    assert empirical_p([0.1 - 1 / 48], 0.1) == 0.5
    with pytest.raises(ValueError, match="finite"):
        empirical_p([0.1, float("nan")], 0.1)
