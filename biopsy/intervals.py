"""Intervals of a difference between two biopsies, each with the p-value of "no change" that
the same method gives, and Holm's adjustment of a patient's p-values for their number.

Each method's p-value is at most 1 - CONFIDENCE where its interval excludes zero (and only there,
but for the permutation test's interval, widened to hold the observed difference). Why each metric
takes the method it does: :mod:`biopsy.compare`.
"""

import itertools
import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
ROUNDING = 1e-9  # percentage points: below it, a difference or error is float rounding


class Interval(NamedTuple):
    """A 95% interval of follow-up minus baseline, and the two-sided p-value of no change."""

    low: float
    high: float
    p_value: float


def percentile_interval(differences: np.ndarray) -> Interval:
    """The percentile interval of bootstrap replicates of the difference, its ends values the
    replicates took (an index's are whole points); p twice the share of replicates on the far
    side of zero (ties counted on both sides), or one replicate's share where none is: no finer
    than the replicates resolve."""
    differences = differences[~np.isnan(differences)]
    tail = ALPHA / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail], method="inverted_cdf")
    p_value = 2 * min((differences <= 0).mean(), (differences >= 0).mean())
    return Interval(float(low), float(high), float(min(1.0, max(p_value, 1 / len(differences)))))


def proportion_difference_interval(baseline: np.ndarray, follow_up: np.ndarray,
                                   confidence: float = CONFIDENCE) -> Interval:
    """``confidence`` interval, in percentage points, of follow-up minus baseline share of
    glomeruli with a lesion (``baseline``, ``follow_up``: bool per glomerulus): Newcombe's hybrid
    score interval (Stat Med 1998;17:873, method 10), from each share's Wilson interval. Averaged over true
    rates it holds the true difference ~95% of the time down to one glomerulus a biopsy (at worst
    83% there), where a bootstrap of 0 of 3 glomeruli is always 0 and one of one glomerulus gives
    a zero-width interval; with 1-5 glomeruli a biopsy the same rate at both biopsies still gets a
    verdict in 6-13% of patients. p: one minus the confidence at which the interval reaches zero."""
    low, high = _newcombe(baseline, follow_up, confidence)
    return Interval(low, high, _newcombe_p_value(baseline, follow_up))


def _newcombe_p_value(baseline: np.ndarray, follow_up: np.ndarray) -> float:
    """One minus the confidence at which Newcombe's interval reaches zero (it grows with the
    confidence), by bisection to 1e-15, rounded up (never 0); 1 where the shares are equal."""
    if baseline.mean() == follow_up.mean():
        return 1.0
    excluded, included = 0.0, 1.0
    for _ in range(50):
        middle = (excluded + included) / 2
        low, high = _newcombe(baseline, follow_up, middle)
        excluded, included = (middle, included) if low > 0 or high < 0 else (excluded, middle)
    return 1.0 - excluded


def _newcombe(baseline: np.ndarray, follow_up: np.ndarray, confidence: float) -> tuple[float, float]:
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    (p1, l1, u1), (p2, l2, u2) = (wilson(int(present.sum()), len(present), z)
                                  for present in (baseline, follow_up))
    low = p2 - p1 - np.hypot(p2 - l2, u1 - p1)
    high = p2 - p1 + np.hypot(u2 - p2, p1 - l1)
    return 100.0 * float(low), 100.0 * float(high)


def wilson(successes: int, total: int, z: float) -> tuple[float, float, float]:
    """The share and its Wilson score interval at normal quantile ``z`` (Wilson, JASA 1927), as
    scipy's ``binomtest(...).proportion_ci(method="wilson")`` gives it, in closed form: the
    p-value's bisection asks for ~100 of them."""
    share = successes / total
    centre = (successes + z * z / 2) / (total + z * z)
    half = z / (total + z * z) * np.sqrt(successes * (total - successes) / total + z * z / 4)
    return share, max(0.0, centre - half), min(1.0, centre + half)


def mean_difference_interval(baseline: np.ndarray, follow_up: np.ndarray,
                             rng: np.random.Generator, permutations: int, bound: float
                             ) -> Interval:
    """95% interval of ``follow_up.mean() - baseline.mean()`` (one value a glomerulus): the shifts
    d that a permutation test of the difference of means does not reject at 2.5% in either tail
    when d is taken from every follow-up value (Lehmann's shift model), widened to hold the
    observed difference, its ends within +-``bound``. Every split of the pooled glomeruli into
    two biopsies of their sizes where there are no more than ``permutations`` of them, else
    ``permutations`` random ones (with the observed split counted among them). p is that test's
    at d = 0, and zero leaves the interval only where it rejects, so an unchanged kidney gets a
    verdict at most 5% of the time whatever the number of glomeruli; where there are fewer than
    40 splits (3 glomeruli against 4, 2 against 7, 1 against 38) never: the interval is then the
    whole range. A split that swaps m >= 1 follow-up glomeruli for m baseline ones is at or above
    the observed difference exactly for shifts d >= t, t = (sum of the m follow-up values - sum of
    the m baseline values) / m (computed so, a swap of equal values ties at exactly 0), so the
    interval's ends are order statistics of those t."""
    n1, n2 = len(baseline), len(follow_up)
    if math.comb(n1 + n2, n2) <= permutations:  # exact: the observed split is one of them
        follow_places = np.array(list(itertools.combinations(range(n1 + n2), n2)))
        extra = 0
    else:
        follow_places = rng.random((permutations, n1 + n2)).argsort(axis=1)[:, :n2]
        extra = 1
    in_follow_up = np.zeros((len(follow_places), n1 + n2), bool)
    np.put_along_axis(in_follow_up, follow_places, True, axis=1)
    swapped = in_follow_up[:, :n1].sum(axis=1)
    swapped_sum_difference = (np.where(in_follow_up[:, n1:], 0.0, follow_up).sum(axis=1)
                              - np.where(in_follow_up[:, :n1], baseline, 0.0).sum(axis=1))
    moved = swapped > 0  # a split that keeps the follow-up's glomeruli goes with every shift
    shifts = np.sort(swapped_sum_difference[moved] / swapped[moved])
    splits, always = len(follow_places) + extra, extra + int((~moved).sum())
    # the test at shift d: (always + splits whose t is at or past d on that side) / splits
    p_value = min(1.0, 2 * (always + min((shifts <= 0).sum(), (shifts >= 0).sum())) / splits)
    needed = math.floor(ALPHA / 2 * splits) + 1 - always  # a shift is kept while p > ALPHA / 2
    if needed <= 0:
        return Interval(-bound, bound, p_value)
    observed = follow_up.mean() - baseline.mean()
    low = min(shifts[needed - 1], observed)  # the shift model can keep shifts away from it
    high = max(shifts[len(shifts) - needed], observed)
    return Interval(float(max(low, -bound)), float(min(high, bound)), p_value)


def ratio_difference_interval(baseline: tuple[np.ndarray, np.ndarray, np.ndarray],
                              follow_up: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Interval:
    """95% interval, in percentage points, of follow-up minus baseline area percent (sum of
    numerators over sum of denominators), each given per tile as (numerator, denominator,
    block). Cortex changes over distances of a tile or more (fibrosis comes in patches), so
    neighbouring tiles are not independent draws: each biopsy's blocks are its units. Its
    standard error is the ratio estimator's over blocks (Cochran, Sampling Techniques, 6.9:
    residuals of each block's numerator from the ratio times its denominator), and the interval
    and p Welch's t with Satterthwaite's degrees of freedom. Under two blocks on a side the
    interval is the whole range, [-100, 100]."""
    estimates, variances, counts = [], [], []
    for numerator, denominator, block in (baseline, follow_up):
        numerator, denominator = (np.bincount(block, weights=w) for w in (numerator, denominator))
        kept = denominator > 0
        numerator, denominator, count = numerator[kept], denominator[kept], int(kept.sum())
        if count < 2:
            return Interval(-100.0, 100.0, 1.0)
        ratio = numerator.sum() / denominator.sum()
        residuals = numerator - ratio * denominator
        estimates.append(100.0 * ratio)
        variances.append(1e4 * count / (count - 1) * (residuals ** 2).sum() / denominator.sum() ** 2)
        counts.append(count)
    difference, variance = estimates[1] - estimates[0], sum(variances)
    if variance <= ROUNDING ** 2:  # every block's ratio alike at both biopsies (float rounding)
        if abs(difference) <= ROUNDING:
            return Interval(0.0, 0.0, 1.0)
        return Interval(float(difference), float(difference), 0.0)
    freedom = variance ** 2 / sum(v ** 2 / (n - 1) for v, n in zip(variances, counts))
    error = np.sqrt(variance)
    half = stats.t.ppf(1 - ALPHA / 2, freedom) * error
    return Interval(float(max(difference - half, -100.0)), float(min(difference + half, 100.0)),
                    float(2 * stats.t.sf(abs(difference) / error, freedom)))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (Scand J Stat 1979): each p-value as adjusted for the number
    of them, in the order given. Rejecting where it is at most ALPHA gives no false verdict in
    the whole set with probability 1 - ALPHA, whatever their dependence."""
    order = np.argsort(p_values, kind="stable")
    count = len(p_values)
    ranked = np.asarray(p_values, dtype=float)[order] * (count - np.arange(count))
    adjusted = np.empty(count)
    adjusted[order] = np.minimum(np.maximum.accumulate(ranked), 1.0)
    return adjusted.tolist()


def verdict(ci_low: float, ci_high: float, favourable: str = "lower") -> str:
    """``improved`` / ``worsened`` when the interval excludes zero in the favourable / other
    direction, else ``unchanged``."""
    if ci_high < 0:
        return "improved" if favourable == "lower" else "worsened"
    if ci_low > 0:
        return "worsened" if favourable == "lower" else "improved"
    return "unchanged"
