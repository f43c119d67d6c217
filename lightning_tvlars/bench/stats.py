"""Statistics of the accuracy benchmark, on SciPy's tests.

* :func:`welch`: Welch's unequal-variance t-test of ``mean(a) - mean(b)`` with its
  confidence interval (Welch-Satterthwaite degrees of freedom);
* :func:`paired`: the paired tests of per-seed differences (runs of two arms with the same
  seed share their initial weights and batch order): Wilcoxon's signed-rank test (exact) and
  the sign test;
* :func:`holm`: Holm's step-down adjustment of a family of p-values (controls the
  family-wise error rate);
* :func:`spearman`: Spearman's rank correlation with its p-value.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

__all__ = ["Paired", "Welch", "holm", "paired", "spearman", "t_quantile", "welch"]


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    return float(scipy_stats.t.ppf(p, df))


@dataclass(frozen=True)
class Welch:
    """Result of :func:`welch` for ``mean(a) - mean(b)``.

    Attributes:
        diff: ``mean(a) - mean(b)``.
        low, high: the confidence interval of ``diff``.
        t: the t statistic (``inf`` / ``-inf`` / 0 when both samples are constant).
        df: Welch-Satterthwaite degrees of freedom (``nan`` when both samples are constant).
        p: two-sided p-value.
        n_a, n_b: sample sizes.
    """

    diff: float
    low: float
    high: float
    t: float
    df: float
    p: float
    n_a: int
    n_b: int


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Welch:
    """Welch's two-sided t-test and confidence interval of ``mean(a) - mean(b)``
    (:func:`scipy.stats.ttest_ind` with ``equal_var=False``).

    Both samples constant: ``p`` is 1 if the means are equal, else 0, and the interval is the
    point ``d``.

    Raises:
        ValueError: fewer than two values on a side, or ``confidence`` outside (0, 1).
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch needs at least two values per sample, got {len(a)} and {len(b)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} is invalid: expected 0 < confidence < 1")
    diff = statistics.fmean(a) - statistics.fmean(b)
    if statistics.variance(a) == 0.0 and statistics.variance(b) == 0.0:
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return Welch(diff, diff, diff, t, math.nan, 1.0 if diff == 0 else 0.0, len(a), len(b))
    with warnings.catch_warnings():  # near-equal samples: SciPy warns, the result stands
        warnings.simplefilter("ignore", RuntimeWarning)
        result = scipy_stats.ttest_ind(a, b, equal_var=False)
    interval = result.confidence_interval(confidence)
    return Welch(
        diff,
        float(interval.low),
        float(interval.high),
        float(result.statistic),
        float(result.df),
        float(result.pvalue),
        len(a),
        len(b),
    )


@dataclass(frozen=True)
class Paired:
    """Result of :func:`paired` for the per-pair differences ``a_i - b_i``.

    Attributes:
        n: pairs with both values finite.
        median: the median difference.
        below: pairs with ``a_i < b_i`` (ties, ``a_i == b_i``, are in neither count).
        above: pairs with ``a_i > b_i``.
        p_wilcoxon: Wilcoxon's signed-rank test, two-sided (exact without ties or zeros).
        p_sign: the sign test, two-sided (exact binomial over ``below + above`` pairs).
    """

    n: int
    median: float
    below: int
    above: int
    p_wilcoxon: float
    p_sign: float


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Paired tests of ``a_i - b_i`` over the pairs with both values finite.

    With fewer than two non-zero differences the p-values are 1 (nothing to test).
    """
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same length, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
    below = sum(d < 0 for d in diffs)
    above = sum(d > 0 for d in diffs)
    median = statistics.median(diffs) if diffs else math.nan
    if below + above < 2:
        return Paired(len(diffs), median, below, above, 1.0, 1.0)
    p_wilcoxon = float(scipy_stats.wilcoxon(diffs, zero_method="wilcox").pvalue)
    p_sign = float(scipy_stats.binomtest(above, below + above).pvalue)
    return Paired(len(diffs), median, below, above, p_wilcoxon, p_sign)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    With ``p_(1) <= ... <= p_(m)`` sorted, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``.
    Rejecting where ``adj < alpha`` controls the family-wise error rate at ``alpha``.
    """
    m = len(p_values)
    for p in p_values:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value {p!r} is invalid: expected 0 <= p <= 1")
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, int]:
    """Spearman's rho, its two-sided p-value (:func:`scipy.stats.spearmanr`) and ``n``.

    Pairs with a non-finite value are dropped. ``(nan, nan, n)`` when fewer than three pairs
    remain or one side is constant.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    n = len(pairs)
    xs, ys = [a for a, _ in pairs], [b for _, b in pairs]
    if n < 3 or len(set(xs)) == 1 or len(set(ys)) == 1:
        return math.nan, math.nan, n
    result = scipy_stats.spearmanr(xs, ys)
    return float(result.statistic), float(result.pvalue), n
