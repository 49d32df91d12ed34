"""Confidence intervals for the job summary, so a saving or an accuracy drop is reported with its uncertainty.

Everything here is deterministic: the summary and the report recompute the same intervals and must agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Statistic = Callable[[np.ndarray, np.ndarray], float]

_BISECTION_STEPS = 64  # halves [0, 1] below double precision


@dataclass(frozen=True)
class Estimate:
    """A statistic with its 95% interval and the number of rows it rests on."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    @property
    def half_width(self) -> float | None:
        """Half the interval's width, the "±" a reader sees; None when there is no interval."""
        if self.low is None or self.high is None:
            return None
        return (self.high - self.low) / 2


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    """mean(a) - mean(b): e.g. the accuracy a pruned run loses against the unpruned one."""
    return float(np.mean(a) - np.mean(b))


def ratio_saving(a: np.ndarray, b: np.ndarray) -> float:
    """1 - sum(a) / sum(b): the fraction of b's total that a saves; nan when b sums to zero, so it is skipped."""
    total = float(np.sum(b))
    return 1.0 - float(np.sum(a)) / total if total != 0 else math.nan


def paired_bootstrap(
    pruned: Sequence[float],
    unpruned: Sequence[float],
    statistic: Statistic,
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """`statistic` on the full data with its percentile bootstrap interval.

    Rows are resampled as pairs, keeping each row's two runs together, so the interval reflects the paired design.
    Resamples where the statistic is undefined (it returns nan or an infinity, as numpy division by zero does) are
    skipped; with none left there is no interval.
    """
    _check_level(level)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    a = np.asarray(pruned, dtype=float)
    b = np.asarray(unpruned, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"pruned and unpruned must be paired 1-d sequences, got shapes {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        return Estimate(None, None, None, 0)
    value = _finite_or_none(statistic(a, b))
    if n == 1:
        return Estimate(value, None, None, 1)
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero denominator is expected, and skipped below
        for i in range(resamples):
            rows = rng.integers(0, n, size=n)
            draws[i] = statistic(a[rows], b[rows])
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return Estimate(value, None, None, n)
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Estimate(value, float(low), float(high), n)


def clopper_pearson(successes: int, n: int, level: float = 0.95) -> Estimate:
    """The exact binomial interval for a proportion: conservative, and valid for small n and rates near 0 or 1.

    Each bound is the p whose binomial tail probability is (1 - level) / 2, found by bisection; the tails are summed
    in log space, so n in the millions neither underflows nor loses precision.
    """
    _check_level(level)
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return Estimate(None, None, None, 0)
    tail = (1 - level) / 2
    low = 0.0 if successes == 0 else _bisect(_log_tail(np.arange(successes, n + 1), n), math.log(tail), increasing=True)
    high = 1.0 if successes == n else _bisect(_log_tail(np.arange(successes + 1), n), math.log(tail), increasing=False)
    return Estimate(successes / n, low, high, n)


def _log_tail(ks: np.ndarray, n: int) -> Callable[[float], float]:
    """log P(X in ks) for X ~ Binomial(n, p), as a function of p; the binomial coefficients are computed once."""
    log_factorial = np.fromiter((math.lgamma(k + 1) for k in range(n + 1)), dtype=float, count=n + 1)
    log_choose = log_factorial[n] - log_factorial[ks] - log_factorial[n - ks]

    def at(p: float) -> float:
        terms = log_choose + ks * math.log(p) + (n - ks) * math.log1p(-p)
        peak = terms.max()
        return float(peak + math.log(np.exp(terms - peak).sum()))

    return at


def _bisect(log_probability: Callable[[float], float], target: float, *, increasing: bool) -> float:
    """The p in (0, 1) where a monotone `log_probability` crosses `target`."""
    lo, hi = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if (log_probability(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _finite_or_none(x: float) -> float | None:
    """A point estimate that is undefined on the full data is reported as unknown, not as nan."""
    x = float(x)
    return x if math.isfinite(x) else None


def _check_level(level: float) -> None:
    """A confidence level outside (0, 1) has no interval."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
