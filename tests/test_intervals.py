"""Confidence intervals: the exact binomial interval and the paired, seeded bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.intervals import Estimate, clopper_pearson, mean_difference, paired_bootstrap, ratio_saving


def test_half_width() -> None:
    assert Estimate(0.5, 0.4, 0.7, 10).half_width == pytest.approx(0.15)
    assert Estimate(0.5, None, None, 1).half_width is None


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (0, 10, 0.0, 0.3085),  # 1 - 0.025 ** (1/10)
        (5, 10, 0.1871, 0.8129),
        (10, 10, 0.6915, 1.0),  # 0.025 ** (1/10)
    ],
)
def test_clopper_pearson_known_values(successes: int, n: int, low: float, high: float) -> None:
    estimate = clopper_pearson(successes, n)
    assert estimate.value == successes / n
    assert estimate.n == n
    assert estimate.low == pytest.approx(low, abs=1e-4)
    assert estimate.high == pytest.approx(high, abs=1e-4)


@pytest.mark.parametrize("n", [1, 10, 1000, 1_000_000])
def test_clopper_pearson_closed_form_at_the_edges(n: int) -> None:
    # With 0 successes the upper bound solves (1 - p)^n = 0.025; with n successes the lower one solves p^n = 0.025.
    assert clopper_pearson(0, n).high == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-9)
    assert clopper_pearson(n, n).low == pytest.approx(0.025 ** (1 / n), rel=1e-9)
    assert clopper_pearson(0, n).low == 0.0
    assert clopper_pearson(n, n).high == 1.0


def test_clopper_pearson_is_symmetric() -> None:
    # Counting failures instead of successes mirrors the interval: low(x) = 1 - high(n - x).
    for successes in range(8):
        forward, mirrored = clopper_pearson(successes, 7), clopper_pearson(7 - successes, 7)
        assert forward.low == pytest.approx(1 - mirrored.high, abs=1e-12)


def test_clopper_pearson_large_n_is_close_to_the_normal_interval() -> None:
    # 500,000 of 1,000,000: 0.5 +/- 1.959964 * sqrt(0.25 / 1e6) = 0.5 +/- 0.00098
    estimate = clopper_pearson(500_000, 1_000_000)
    assert estimate.low == pytest.approx(0.5 - 1.959964 * 0.0005, abs=1e-5)
    assert estimate.high == pytest.approx(0.5 + 1.959964 * 0.0005, abs=1e-5)


def test_clopper_pearson_level_narrows_the_interval() -> None:
    wide, narrow = clopper_pearson(5, 10, level=0.99), clopper_pearson(5, 10, level=0.5)
    assert wide.low < narrow.low < 0.5 < narrow.high < wide.high


def test_clopper_pearson_no_rows() -> None:
    assert clopper_pearson(0, 0) == Estimate(None, None, None, 0)


@pytest.mark.parametrize(("successes", "n"), [(-1, 5), (6, 5)])
def test_clopper_pearson_refuses_impossible_counts(successes: int, n: int) -> None:
    with pytest.raises(ValueError):
        clopper_pearson(successes, n)


def test_mean_difference() -> None:
    # mean([1, 2, 3]) - mean([2, 4, 4]) = 2 - 10/3 = -4/3
    assert mean_difference(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 4.0])) == pytest.approx(-4 / 3)


def test_ratio_saving() -> None:
    # 1 - (1 + 2 + 3) / (2 + 4 + 4) = 1 - 6/10 = 0.4
    assert ratio_saving(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 4.0])) == pytest.approx(0.4)
    assert math.isnan(ratio_saving(np.array([1.0]), np.array([0.0])))


def _sample(n: int = 200) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(42)
    unpruned = rng.uniform(1.0, 3.0, n)
    pruned = unpruned * rng.uniform(0.3, 0.7, n)
    return pruned.tolist(), unpruned.tolist()


def test_paired_bootstrap_is_deterministic() -> None:
    pruned, unpruned = _sample()
    first = paired_bootstrap(pruned, unpruned, ratio_saving)
    assert paired_bootstrap(pruned, unpruned, ratio_saving) == first
    assert paired_bootstrap(pruned, unpruned, ratio_saving, seed=1) != first


def test_paired_bootstrap_point_estimate_is_on_the_full_data() -> None:
    pruned, unpruned = _sample()
    estimate = paired_bootstrap(pruned, unpruned, ratio_saving)
    assert estimate.n == 200
    assert estimate.value == pytest.approx(1 - sum(pruned) / sum(unpruned))
    assert estimate.low < estimate.value < estimate.high


def test_paired_bootstrap_width_matches_the_standard_error() -> None:
    # Differences ~ N(0.5, 1) over 400 rows: the 95% half-width is near 1.96 * 1 / sqrt(400) = 0.098.
    rng = np.random.default_rng(7)
    unpruned = rng.normal(0.0, 1.0, 400)
    pruned = unpruned + rng.normal(0.5, 1.0, 400)
    estimate = paired_bootstrap(pruned, unpruned, mean_difference)
    assert estimate.half_width == pytest.approx(0.098, rel=0.2)


def test_paired_bootstrap_constant_difference_has_zero_width() -> None:
    # Every row differs by exactly 0.25, so every resample's mean difference is 0.25.
    unpruned = [0.0, 1.0, 2.0, 5.0, 9.0]
    pruned = [x + 0.25 for x in unpruned]
    estimate = paired_bootstrap(pruned, unpruned, mean_difference)
    assert estimate.value == pytest.approx(0.25)
    assert estimate.low == pytest.approx(0.25, abs=1e-12)
    assert estimate.high == pytest.approx(0.25, abs=1e-12)
    assert estimate.half_width == pytest.approx(0.0, abs=1e-12)


def test_paired_bootstrap_no_rows() -> None:
    assert paired_bootstrap([], [], mean_difference) == Estimate(None, None, None, 0)


def test_paired_bootstrap_one_row_has_no_interval() -> None:
    # 1 - 1/4 = 0.75
    assert paired_bootstrap([1.0], [4.0], ratio_saving) == Estimate(0.75, None, None, 1)


def test_paired_bootstrap_skips_zero_denominators() -> None:
    # Full data: 1 - 2/4 = 0.5. Resamples: rows {0, 0} have sum(unpruned) = 0 (skipped),
    # {1, 1} give 1 - 2/8 = 0.75, one of each gives 0.5; so the interval lies in [0.5, 0.75].
    estimate = paired_bootstrap([1.0, 1.0], [0.0, 4.0], ratio_saving)
    assert estimate.value == 0.5
    assert 0.5 <= estimate.low <= estimate.high <= 0.75


def test_paired_bootstrap_undefined_everywhere() -> None:
    assert paired_bootstrap([1.0, 2.0], [0.0, 0.0], ratio_saving) == Estimate(None, None, None, 2)


def test_paired_bootstrap_refuses_unpaired_input() -> None:
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0], mean_difference)
