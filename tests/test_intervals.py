import itertools
import math

import numpy as np
import pytest
from scipy import stats

from biopsy import intervals


def shares(present: int, total: int) -> np.ndarray:
    return np.arange(total) < present


def test_share_intervals_are_newcombes_published_ones():
    """Newcombe, Stat Med 1998;17:873, Table II, method 10 (56/70 - 48/80, 9/10 - 3/10,
    5/56 - 0/29), here follow-up minus baseline."""
    for (x1, n1, x2, n2), expected in (((48, 80, 56, 70), (5.24, 33.39)),
                                       ((3, 10, 9, 10), (17.05, 80.90)),
                                       ((0, 29, 5, 56), (-3.81, 19.26))):
        interval = intervals.proportion_difference_interval(shares(x1, n1), shares(x2, n2))
        assert interval[:2] == pytest.approx(expected, abs=0.006)


def kept_shifts_by_brute_force(baseline, follow_up, shifts):
    """The shifts d at which a permutation test over every split of the pooled values, follow-up
    taken down by d, rejects in neither tail at 2.5% (the test itself, at each d of
    ``shifts``), and the test's two-sided p at d = 0."""
    n1, n2 = len(baseline), len(follow_up)
    in_follow_up = np.zeros((math.comb(n1 + n2, n2), n1 + n2))
    for row, places in enumerate(itertools.combinations(range(n1 + n2), n2)):
        in_follow_up[row, list(places)] = 1
    pooled = np.concatenate([np.tile(baseline, (len(shifts), 1)),
                             follow_up[None] - shifts[:, None]], axis=1)  # one row a shift
    permuted = pooled @ in_follow_up.T / n2 - pooled @ (1 - in_follow_up).T / n1
    observed = (pooled[:, n1:].mean(axis=1) - baseline.mean())[:, None]
    upper = (permuted >= observed - 1e-9).mean(axis=1)
    lower = (permuted <= observed + 1e-9).mean(axis=1)
    at_zero = np.flatnonzero(shifts == 0)[0]
    return shifts[np.minimum(upper, lower) > 0.025], min(1.0, 2 * min(upper[at_zero], lower[at_zero]))


def burdens(rng, count, affected=0.4):
    """Per-glomerulus deposit fractions in %, zero in most glomeruli (skewed, with ties)."""
    return np.where(rng.random(count) < affected, rng.beta(2, 11.3, count), 0.0) * 100


@pytest.mark.parametrize("sizes", [(4, 5), (6, 3), (2, 9)])
def test_burden_interval_is_the_permutation_test_inverted(sizes):
    rng = np.random.default_rng(sum(sizes))
    baseline, follow_up = burdens(rng, sizes[0], 0.6), burdens(rng, sizes[1], 0.3)
    low, high, _ = intervals.mean_difference_interval(baseline, follow_up, rng, 2000, 100.0)
    kept, p_value = kept_shifts_by_brute_force(baseline, follow_up, np.arange(-10_000, 10_001) / 100)
    assert low == pytest.approx(min(kept), abs=0.011) and high == pytest.approx(max(kept), abs=0.011)
    assert intervals.mean_difference_interval(baseline, follow_up, rng, 2000, 100.0).p_value == (
        pytest.approx(p_value, rel=1e-12))


def test_burden_interval_from_random_splits_is_close_to_the_exact_one():
    rng = np.random.default_rng(1)
    baseline, follow_up = burdens(rng, 9), burdens(rng, 8)  # 24,310 splits
    exact = intervals.mean_difference_interval(baseline, follow_up, rng, 30_000, 100.0)
    sampled = intervals.mean_difference_interval(baseline, follow_up, rng, 4000, 100.0)
    assert sampled[:2] == pytest.approx(exact[:2], abs=0.15 * (exact.high - exact.low))


def test_burden_verdicts_come_by_chance_at_most_one_time_in_20_on_few_glomeruli():
    """In simulations like this one, the percentile bootstrap this replaced gave a verdict by
    chance to 8-14% of unchanged patients at 5 glomeruli a biopsy, 28-32% at 3 against 20 and
    65% at one against one."""
    rng = np.random.default_rng(0)
    for sizes in ((5, 5), (3, 20), (20, 3)):
        verdicts = [intervals.verdict(*intervals.mean_difference_interval(
            burdens(rng, sizes[0]), burdens(rng, sizes[1]), rng, 2000, 100.0)[:2])
            for _ in range(400)]
        assert verdicts.count("unchanged") / len(verdicts) >= 0.94, sizes
    for sizes in ((1, 1), (3, 4), (1, 38)):  # fewer than 40 splits: no verdict can be had
        assert intervals.mean_difference_interval(np.full(sizes[0], 30.0), np.zeros(sizes[1]), rng,
                                                  2000, 100.0)[:2] == (-100.0, 100.0)


def test_area_interval_is_welchs_on_block_percents_where_blocks_hold_equal_cortex():
    """With equal cortex in every block, the ratio estimator's variance over blocks is the
    variance of the block percents over their number: the interval is scipy's Welch interval."""
    rng = np.random.default_rng(3)
    sides = []
    for blocks, mean in ((7, 0.2), (12, 0.35)):
        percent = rng.beta(2, 2 / mean - 2, blocks) * 100
        tiles_per_block = 16
        numerator = np.repeat(percent, tiles_per_block) / 100 * 5e4 / tiles_per_block
        denominator = np.full(blocks * tiles_per_block, 5e4 / tiles_per_block)
        sides.append((percent, (numerator, denominator,
                                np.repeat(np.arange(blocks), tiles_per_block))))
    expected = stats.ttest_ind(sides[1][0], sides[0][0], equal_var=False).confidence_interval(0.95)
    result = stats.ttest_ind(sides[1][0], sides[0][0], equal_var=False)
    interval = intervals.ratio_difference_interval(sides[0][1], sides[1][1])
    assert interval == pytest.approx((expected.low, expected.high, result.pvalue), rel=1e-9)


def test_wilson_intervals_are_scipys():
    for successes, total in ((0, 1), (1, 1), (0, 29), (3, 10), (48, 80), (70, 70)):
        for confidence in (0.5, 0.95, 0.999):
            expected = stats.binomtest(successes, total).proportion_ci(confidence, method="wilson")
            z = stats.norm.ppf((1 + confidence) / 2)
            assert intervals.wilson(successes, total, z)[1:] == pytest.approx(
                (expected.low, expected.high), abs=1e-12)


def test_burden_interval_ends_on_zero_where_the_test_keeps_zero_by_a_tie():
    """Each split's shift was the difference of two rounded sums: a swap of equal values (zeros,
    or one burden at both biopsies) gave +-1e-15 for 0, and "worsened" where the exact test
    keeps 0 (p = 15/495)."""
    rng = np.random.default_rng(0)
    follow_up = np.array([0, 0, 15.6, 28.5, 4.8, 28.5, 9.7, 13.0])
    low, high, p_value = intervals.mean_difference_interval(np.zeros(4), follow_up, rng, 2000, 100)
    assert low == 0.0 and p_value == pytest.approx(2 * 15 / 495)
    constant = intervals.mean_difference_interval(np.full(4, 100 / 3), np.full(9, 100 / 3), rng,
                                                  2000, 100)
    assert constant == (0.0, 0.0, 1.0)


def test_burden_interval_holds_the_observed_difference():
    """Equal means, different shapes: the shift model kept only -1 ("improved")."""
    rng = np.random.default_rng(0)
    low, high, _ = intervals.mean_difference_interval(np.array([1.0]), np.r_[100.0, np.zeros(99)],
                                                      rng, 2000, 100)
    assert low <= 0 <= high


def test_random_splits_count_the_observed_one():
    """With 38 random splits and the observed one, no p can reach 2.5% in a tail."""
    rng = np.random.default_rng(0)
    assert intervals.mean_difference_interval(np.full(10, 50.0), np.zeros(10), rng, 38,
                                              100)[:2] == (-100.0, 100.0)


def test_holm_adjusts_as_the_textbook_does():
    """p (0.01, 0.04, 0.03, 0.005): sorted times 4, 3, 2, 1 is 0.02, 0.03, 0.06, 0.04, and never
    below an earlier one: 0.02, 0.03, 0.06, 0.06."""
    assert intervals.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert intervals.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_each_p_value_is_at_most_alpha_where_its_interval_excludes_zero():
    rng = np.random.default_rng(5)
    for _ in range(300):
        sizes = rng.integers(1, 25, 2)
        shares = [rng.random(n) < rng.uniform(0.05, 0.6) for n in sizes]
        tiles = [(rng.random(n * 16), rng.random(n * 16) + 0.5, np.repeat(np.arange(n), 16))
                 for n in sizes]
        replicates = rng.normal(rng.normal(0, 2), 1, 500).round()
        for interval in (intervals.proportion_difference_interval(*shares),
                         intervals.mean_difference_interval(*(burdens(rng, n) for n in sizes),
                                                            rng, 500, 100.0),
                         intervals.ratio_difference_interval(*tiles),
                         intervals.percentile_interval(replicates)):
            excludes = intervals.verdict(interval.low, interval.high) != "unchanged"
            assert excludes == (interval.p_value <= intervals.ALPHA), interval


def test_newcombe_p_is_where_the_interval_reaches_zero():
    for counts in ((3, 10, 9, 10), (0, 29, 5, 56), (2, 6, 0, 7)):
        baseline, follow_up = shares(*counts[:2]), shares(*counts[2:])
        p_value = intervals.proportion_difference_interval(baseline, follow_up).p_value
        low, high, _ = intervals.proportion_difference_interval(baseline, follow_up, 1 - p_value)
        assert min(abs(low), abs(high)) == pytest.approx(0, abs=1e-6)


def cochran_interval(*sides):
    """Welch's interval on two ratio estimators, each from its block sums (Cochran 6.9), here
    written out from the textbook; blocks without denominator left out."""
    estimates, variances, counts = [], [], []
    for numerator, denominator, block in sides:
        y, x = (np.array([v[block == b].sum() for b in np.unique(block)])
                for v in (numerator, denominator))
        y, x = y[x > 0], x[x > 0]
        n, ratio = len(x), y.sum() / x.sum()
        estimates.append(100 * ratio)
        variances.append(1e4 * ((y - ratio * x) ** 2).sum() / (n - 1) / (n * x.mean() ** 2))
        counts.append(n)
    freedom = sum(variances) ** 2 / sum(v ** 2 / (n - 1) for v, n in zip(variances, counts))
    half = stats.t.ppf(0.975, freedom) * np.sqrt(sum(variances))
    return estimates[1] - estimates[0] - half, estimates[1] - estimates[0] + half


def test_area_interval_weighs_blocks_by_their_cortex_and_leaves_out_blocks_without_any():
    rng = np.random.default_rng(8)
    sides = []
    for blocks in (6, 9):
        block = np.repeat(np.arange(blocks), 16)
        denominator = rng.uniform(0, 6e4, block.size) * rng.uniform(0.05, 1, blocks)[block]
        denominator[block == 2] = 0  # a block of glass and glomeruli only
        sides.append((denominator * rng.beta(2, 6, blocks)[block], denominator, block))
    interval = intervals.ratio_difference_interval(*sides)
    assert interval[:2] == pytest.approx(cochran_interval(*sides), rel=1e-9)


def test_blocks_of_one_ratio_at_both_biopsies_are_unchanged_despite_float_rounding():
    """Every block at 15% at both biopsies: rounding gave errors of 1e-15 and 'worsened' at
    random (87 of 2000 such patients)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        sides = []
        for blocks in (4, 5):
            denominator = rng.uniform(1e3, 6e4, blocks * 16)
            sides.append((denominator * 0.15, denominator, np.repeat(np.arange(blocks), 16)))
        assert intervals.ratio_difference_interval(*sides) == (0.0, 0.0, 1.0)


def test_a_p_value_is_never_zero_but_as_small_as_the_method_resolves():
    """No replicate past zero is p < 2 / B, not p = 0; Newcombe's bisection stops at 1e-15."""
    assert intervals.percentile_interval(np.arange(1, 2001.0)).p_value == 1 / 2000
    p_value = intervals.proportion_difference_interval(shares(0, 60), shares(60, 60)).p_value
    assert 0 < p_value < 1e-14
