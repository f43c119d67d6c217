"""Statistics of the accuracy benchmark, in pure Python (no SciPy needed at run time).

* :func:`welch`: Welch's unequal-variance t-test of ``mean(a) - mean(b)`` with its
  confidence interval (Welch-Satterthwaite degrees of freedom);
* :func:`holm`: Holm's step-down adjustment of a family of p-values (controls the
  family-wise error rate);
* :func:`spearman`: Spearman's rank correlation (ties get average ranks) with the usual
  t-approximation p-value.

The Student t distribution comes from the regularized incomplete beta function, evaluated by
its continued fraction (Numerical Recipes, 3rd ed., section 6.4); the tests check every
function against values SciPy 1.17 computes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Welch", "betainc", "holm", "spearman", "t_quantile", "t_sf", "welch"]

_EPS = 1e-15
_TINY = 1e-300


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (modified Lentz); converges for x < (a+1)/(a+b+2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(
        f"incomplete beta did not converge (a={a}, b={b}, x={x})"
    )  # pragma: no cover


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
    if not (a > 0 and b > 0):
        raise ValueError(f"a={a!r}, b={b!r} are invalid: expected both > 0")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x!r} is invalid: expected 0 <= x <= 1")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """``P(T > t)`` for Student's t with ``df > 0`` degrees of freedom (``df`` may be real)."""
    if not df > 0:
        raise ValueError(f"df={df!r} is invalid: expected > 0")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(0.5 * df, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p!r} is invalid: expected 0 < p < 1")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1.0 - p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > 1.0 - p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


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
    """Welch's two-sided t-test and confidence interval of ``mean(a) - mean(b)``.

    ``t = d / se`` with ``se^2 = s_a^2 / n_a + s_b^2 / n_b`` and
    ``df = se^4 / ((s_a^2/n_a)^2 / (n_a - 1) + (s_b^2/n_b)^2 / (n_b - 1))``; the interval is
    ``d +- t_{(1+confidence)/2, df} se``. Both samples constant: ``p`` is 1 if the means are
    equal, else 0, and the interval is the point ``d``.

    Raises:
        ValueError: fewer than two values on a side, or ``confidence`` outside (0, 1).
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch needs at least two values per sample, got {len(a)} and {len(b)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} is invalid: expected 0 < confidence < 1")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return Welch(diff, diff, diff, t, math.nan, 1.0 if diff == 0 else 0.0, len(a), len(b))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / se
    half = t_quantile(0.5 + confidence / 2, df) * se
    p = min(1.0, 2.0 * t_sf(abs(t), df))
    return Welch(diff, diff - half, diff + half, t, df, p, len(a), len(b))


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


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, int]:
    """Spearman's rho, its two-sided p-value (t-approximation, ``df = n - 2``) and ``n``.

    Pairs with a non-finite value are dropped. ``(nan, nan, n)`` when fewer than three pairs
    remain or one side is constant.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    n = len(pairs)
    if n < 3:
        return math.nan, math.nan, n
    rx, ry = _ranks([a for a, _ in pairs]), _ranks([b for _, b in pairs])
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return math.nan, math.nan, n
    rho = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    if abs(rho) == 1.0:
        return rho, 0.0, n
    t = rho * math.sqrt((n - 2) / (1.0 - rho * rho))
    return rho, min(1.0, 2.0 * t_sf(abs(t), n - 2)), n
