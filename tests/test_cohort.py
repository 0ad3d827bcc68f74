import numpy as np
import pytest
from scipy import stats

from biopsy.cohort import cohort_statistics, median_interval


def comparison(patient, values):
    """A comparison.json-like dict; ``values`` maps metric name -> (baseline, follow-up, verdict)."""
    return {"patient_id": patient, "metrics": [
        {"name": name, "label": name, "family": "activity", "unit": "%", "favourable": "lower",
         "baseline": b, "follow_up": f, "verdict": v} for name, (b, f, v) in values.items()]}


def test_wilcoxon_matches_scipy_and_the_exact_null_distribution():
    rng = np.random.default_rng(3)
    baseline = rng.uniform(20, 80, 12)
    follow_up = baseline - rng.normal(8, 10, 12)
    cohort = [comparison(f"P{i}", {"deposits": (b, f, "improved"), "monotone": (10.0, 10.0 - i, "x")})
              for i, (b, f) in enumerate(zip(baseline, follow_up), start=1)]
    deposits, monotone = cohort_statistics(cohort)

    expected = stats.wilcoxon(follow_up, baseline)
    assert deposits["n"] == 12
    assert deposits["wilcoxon_statistic"] == pytest.approx(expected.statistic)
    assert deposits["p_value"] == pytest.approx(expected.pvalue)
    assert deposits["median_change"] == pytest.approx(np.median(follow_up - baseline))
    # Every one of 12 patients fell: W = 0 and the exact two-sided p is 2 / 2**12.
    assert monotone["wilcoxon_statistic"] == 0
    assert monotone["p_value"] == pytest.approx(2 / 2**12)
    # Benjamini-Hochberg over the two tests
    q = stats.false_discovery_control([deposits["p_value"], monotone["p_value"]])
    assert [deposits["q_value"], monotone["q_value"]] == pytest.approx(list(q))
    assert deposits["patients_improved"] == 12


def test_unassessed_patients_are_left_out_and_all_zero_changes_are_not_tested():
    cohort = [comparison("A", {"m": (5.0, 2.0, "improved"), "flat": (1.0, 1.0, "unchanged")}),
              comparison("B", {"m": (None, 2.0, "not assessed"), "flat": (3.0, 3.0, "unchanged")}),
              comparison("C", {"m": (4.0, 4.5, "unchanged"), "flat": (2.0, 2.0, "unchanged")})]
    m, flat = cohort_statistics(cohort)
    assert m["n"] == 2 and [p["patient_id"] for p in m["patients"]] == ["A", "C"]
    assert m["median_change"] == pytest.approx(-1.25)
    assert flat["n"] == 3 and flat["p_value"] is None and flat["q_value"] is None
    assert flat["median_change"] == 0 and flat["median_change_ci"] is None  # 3 patients: none
    assert flat["patients_unchanged"] == 3


def test_an_index_the_comparison_left_uncompared_is_left_out():
    """Both values present but over other components (nuclei counted at baseline only): the
    comparison says "not assessed", so the cohort must not count the drop as a change."""
    cohort = [comparison(p, {"activity_index": (6.0, 3.0, "not assessed")}) for p in "ABCDEFGH"]
    cohort.append(comparison("I", {"activity_index": (4.0, 1.0, "improved")}))
    (index,) = cohort_statistics(cohort)
    assert index["n"] == 1 and [p["patient_id"] for p in index["patients"]] == ["I"]


def test_an_index_is_pooled_over_patients_whose_index_sums_the_same_components():
    """Nuclei counted for some patients only: their activity index sums 4 components, the
    others' 2 (at most 15 against 9 points). Pooled, the scales mixed without a word."""
    four, two = ["endocapillary_hypercellularity", "hyaline_deposits", "cellular_crescents",
                 "interstitial_inflammation"], ["hyaline_deposits", "cellular_crescents"]
    cohort = []
    for patient, components, change in (("A", four, -5.0), ("B", four, -6.0), ("C", four, -4.0),
                                        ("D", two, -1.0), ("E", two, -2.0)):
        item = comparison(patient, {"activity_index": (10.0, 10.0 + change, "improved")})
        item["metrics"][0]["components"] = components
        cohort.append(item)
    (index,) = cohort_statistics(cohort)
    assert [p["patient_id"] for p in index["patients"]] == ["A", "B", "C"]
    assert index["components"] == four and index["patients_left_out"] == 2
    assert index["median_change"] == -5.0 and index["n"] == index["n_nonzero"] == 3
    # two sets as common and as long: the same choice whatever the patients' order
    tied = [item for item in cohort if item["patient_id"] in "AD"]
    other = ["endocapillary_hypercellularity", "interstitial_inflammation"]
    tied[0]["metrics"][0]["components"] = other
    chosen = {cohort_statistics(order)[0]["patients"][0]["patient_id"] for order in (tied, tied[::-1])}
    assert len(chosen) == 1


def test_median_interval_is_the_binomial_pair_of_order_statistics():
    """Against the textbook construction: the k-th smallest and k-th largest, k the largest
    rank with P(Binomial(n, 1/2) < k) <= 2.5%."""
    rng = np.random.default_rng(0)
    for n in range(6, 41):
        differences = rng.normal(-5, 3, n)
        k = max(k for k in range(1, n + 1) if stats.binom.cdf(k - 1, n, 0.5) <= 0.025)
        ordered = np.sort(differences)
        assert median_interval(differences) == (ordered[k - 1], ordered[n - k])
    for n in range(6):  # no pair of order statistics holds the median with 95% probability
        assert median_interval(rng.normal(0, 1, n)) is None


def test_median_interval_holds_the_median_at_least_95_percent_of_the_time():
    """8 patients drawn 500 times from a skewed distribution of median 0: the interval holds 0 in
    >= 95% of draws (1 - 2 / 2**8 = 99.2% expected; the percentile bootstrap of the median it
    replaced held the median of 8 normal draws in 92% of 1,000 simulations)."""
    rng = np.random.default_rng(1)
    draws = rng.lognormal(0, 1, (500, 8)) - 1  # median of lognormal(0, 1) is 1
    held = [low <= 0 <= high for low, high in map(median_interval, draws)]
    assert np.mean(held) >= 0.97


def test_one_comparison_per_patient():
    with pytest.raises(ValueError):
        cohort_statistics([comparison("A", {}), comparison("A", {})])
