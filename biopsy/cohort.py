"""Cohort statistics over paired comparisons: did the metric change across patients?

Per metric, over the patients whose comparison compared it (assessed at both timepoints, an index
over the same components at both; verdict not "not assessed"): n, the paired Wilcoxon
signed-rank test (two-sided, zero differences dropped as in Wilcoxon's original method), the median
change with a distribution-free 95% interval (order statistics; none under 6 patients), the
number of patients whose own verdict was improved / unchanged / worsened, and Benjamini-Hochberg
q-values across the metrics tested. ``cohort.html`` shows them with a slope chart per metric.
"""

from collections import Counter

import numpy as np
from scipy import stats

from biopsy.report import VERDICT_COLOURS, VERDICT_DASHES, e, number, page

CONFIDENCE = 0.95


def median_interval(differences: np.ndarray) -> tuple[float, float] | None:
    """Distribution-free 95% interval of the median of ``differences``: the pair of order
    statistics whose ranks the binomial distribution gives (scipy's ``quantile_test``), which
    holds the median with at least 95% probability whatever the distribution. None under 6
    patients, where no pair does (the widest, min to max, holds it with 1 - 2 / 2**n < 95%); a
    percentile bootstrap there gives intervals that hold it less often than they say."""
    result = stats.quantile_test(np.asarray(differences, float), q=0, p=0.5)
    low, high = result.confidence_interval(CONFIDENCE)
    return (float(low), float(high)) if np.isfinite([low, high]).all() else None


def wilcoxon_signed_rank(differences: np.ndarray) -> tuple[float | None, float | None]:
    """(statistic, two-sided p) of scipy's Wilcoxon signed-rank test, or (None, None) when no
    difference is non-zero (the test is undefined)."""
    if not np.any(differences != 0):
        return None, None
    result = stats.wilcoxon(differences)
    return float(result.statistic), float(result.pvalue)


def cohort_statistics(comparisons: list[dict]) -> list[dict]:
    """Per-metric statistics over comparisons of distinct patients (``comparison.json`` dicts).

    Returns one dict per metric, in the order of the first comparison, with the per-patient
    values the slope charts draw.
    """
    patients = [c["patient_id"] for c in comparisons]
    if len(set(patients)) != len(patients):
        raise ValueError("cohort statistics need one comparison per patient")
    names = list(dict.fromkeys(m["name"] for c in comparisons for m in c["metrics"]))
    results = [_metric_statistics(name, comparisons) for name in names]
    _add_q_values(results)
    return results


def _metric_statistics(name: str, comparisons: list[dict]) -> dict:
    rows = []
    for comparison in comparisons:
        metric = next((m for m in comparison["metrics"] if m["name"] == name), None)
        if metric and metric["verdict"] != "not assessed":  # e.g. an index over other components
            rows.append((comparison["patient_id"], metric))
    first = next(m for c in comparisons for m in c["metrics"] if m["name"] == name)
    rows, components, left_out = _same_components(rows)
    differences = np.array([m["follow_up"] - m["baseline"] for _, m in rows], dtype=float)
    statistic, p_value = wilcoxon_signed_rank(differences) if rows else (None, None)
    verdicts = [m["verdict"] for _, m in rows]
    return {
        "name": name,
        "label": first["label"],
        "family": first["family"],
        "unit": first["unit"],
        "favourable": first["favourable"],
        "n": len(rows),
        "n_nonzero": int(np.count_nonzero(differences)),  # what the Wilcoxon test ranks
        "components": components,
        "patients_left_out": left_out,
        "wilcoxon_statistic": statistic,
        "p_value": p_value,
        "median_change": float(np.median(differences)) if rows else None,
        "median_change_ci": list(median_interval(differences) or ()) or None,
        "patients_improved": verdicts.count("improved"),
        "patients_unchanged": verdicts.count("unchanged"),
        "patients_worsened": verdicts.count("worsened"),
        "patients": [{"patient_id": patient, "baseline": m["baseline"], "follow_up": m["follow_up"],
                      "verdict": m["verdict"]} for patient, m in rows],
    }


def _same_components(rows: list[tuple[str, dict]]) -> tuple[list, list[str] | None, int]:
    """For an index, the patients whose index sums the components most of them share (ties: the
    most components, then by name, whatever the patients' order), those components, and how
    many patients were left out; other metrics as they are. An index over 2 components pooled
    with one over 4 would mix scales."""
    if not any("components" in m for _, m in rows):
        return rows, None, 0
    counts = Counter(tuple(m.get("components") or ()) for _, m in rows)
    chosen = max(counts, key=lambda components: (counts[components], len(components), components))
    kept = [(patient, m) for patient, m in rows if tuple(m.get("components") or ()) == chosen]
    return kept, list(chosen), len(rows) - len(kept)


def _add_q_values(results: list[dict]) -> None:
    tested = [r for r in results if r["p_value"] is not None]
    q_values = stats.false_discovery_control([r["p_value"] for r in tested]) if tested else []
    for result in results:
        result["q_value"] = None
    for result, q_value in zip(tested, q_values):
        result["q_value"] = float(q_value)


# --- cohort.html -------------------------------------------------------------------------------

def render_cohort(cohort: dict) -> str:
    """The HTML of ``cohort.html``: per group and metric, statistics and a slope chart."""
    sections = ["<h1>Cohort: baseline against follow-up</h1>",
                "<p>Per metric over the patients whose comparison compared it: paired Wilcoxon "
                "signed-rank test (two-sided), Benjamini-Hochberg q-value across the metrics of a "
                "group, median change (follow-up − baseline) with its distribution-free 95% interval "
                "(order statistics; none under 6 patients). "
                "Thin lines: one patient each, by that patient's own verdict (improved: solid "
                "blue, worsened: dashed orange, unchanged: dotted grey); thick black line: the "
                "medians. Lower is better for every metric. An index is pooled over the patients "
                "whose index sums the same components.</p>", _cautions(cohort["comparisons"])]
    for group in cohort["groups"]:
        stain = f", stain {e(group['stain'])}" if group["stain"] else ""
        sections.append(f"<h2>Follow-up {group['follow_up_number']}{stain}: "
                        f"{group['patients']} patients</h2>")
        for family in ("activity", "chronicity"):
            charts = "".join(_slope_chart(m) for m in group["metrics"] if m["family"] == family)
            sections.append(f"<h3>{family.capitalize()}</h3><div class=\"pair\">{charts}</div>")
    sections.append("<h2>Comparisons</h2>" + _comparison_list(cohort["comparisons"]))
    return page("Cohort comparison", "\n".join(sections))


def _cautions(comparisons: list[dict]) -> str:
    """A warning when some comparisons rest on a biopsy whose scoring recorded a caution."""
    compared = [c for c in comparisons if c["status"] == "compared"]
    cautioned = [c for c in compared if c.get("cautions")]
    if not cautioned:
        return ""
    texts = "".join(f"<li>{e(text)}.</li>" for text in sorted({t for c in cautioned
                                                                for t in c["cautions"]}))
    return (f"<div class='warning'><p><b>Read these scores with care</b>: {len(cautioned)} of "
            f"{len(compared)} comparisons rest on biopsies scored with a caution (each "
            f"patient's report says which):</p><ul>{texts}</ul></div>")


def _slope_chart(m: dict, width: int = 250, height: int = 210) -> str:
    values = [v for p in m["patients"] for v in (p["baseline"], p["follow_up"])]
    top = max(values + [1e-9]) * 1.1
    y = lambda v: height - 30 - v / top * (height - 50)  # noqa: E731
    lines = "".join(
        f'<line x1="60" y1="{y(p["baseline"]):.1f}" x2="{width - 60}" y2="{y(p["follow_up"]):.1f}" '
        f'stroke="{VERDICT_COLOURS[p["verdict"]]}" stroke-width="1.5" opacity="0.8" '
        f'stroke-dasharray="{VERDICT_DASHES[p["verdict"]]}">'
        f'<title>{e(p["patient_id"])}: {number(p["baseline"])} → {number(p["follow_up"])} '
        f'({e(p["verdict"])})</title></line>' for p in m["patients"])
    if m["patients"]:
        medians = [float(np.median([p[k] for p in m["patients"]])) for k in ("baseline", "follow_up")]
        lines += (f'<line x1="60" y1="{y(medians[0]):.1f}" x2="{width - 60}" y2="{y(medians[1]):.1f}" '
                  f'stroke="#000" stroke-width="3"><title>median</title></line>')
    axis = (f'<line x1="60" y1="20" x2="60" y2="{height - 30}" stroke="#999"/>'
            f'<line x1="{width - 60}" y1="20" x2="{width - 60}" y2="{height - 30}" stroke="#999"/>'
            f'<text x="56" y="{y(0):.0f}" text-anchor="end" font-size="10">0</text>'
            f'<text x="56" y="{y(top / 1.1) + 4:.0f}" text-anchor="end" font-size="10">'
            f'{number(top / 1.1)}</text>'
            f'<text x="60" y="{height - 12}" text-anchor="middle" font-size="11">baseline</text>'
            f'<text x="{width - 60}" y="{height - 12}" text-anchor="middle" font-size="11">follow-up</text>')
    ci = m["median_change_ci"]
    interval = (f" [{number(ci[0])}, {number(ci[1])}]" if ci else
                " (no 95% interval under 6 patients)" if m["n"] else "")
    p_value = "—" if m["p_value"] is None else f"{m['p_value']:.3g}"
    q_value = "—" if m["q_value"] is None else f"{m['q_value']:.3g}"
    zero = m["n"] - m.get("n_nonzero", m["n"])
    ranked = f" ({zero} without change, left out of the test)" if zero else ""
    caption = (f"<b>{e(m['label'])}</b> ({e(m['unit'])})<br>n = {m['n']}{ranked}, median change "
               f"{number(m['median_change'])}{interval}<br>Wilcoxon p = {p_value}, q = {q_value}; "
               f"{m['patients_improved']} improved, {m['patients_unchanged']} unchanged, "
               f"{m['patients_worsened']} worsened{_components_note(m)}")
    return (f'<figure><svg width="{width}" height="{height}" role="img"><title>{e(m["label"])}: '
            f"each patient's baseline and follow-up</title>{axis}{lines}</svg>"
            f"<figcaption>{caption}</figcaption></figure>")


def _components_note(m: dict) -> str:
    """Which components an index sums here, and the patients left out for summing others."""
    if not m.get("components"):
        return ""
    note = f"<br>over {', '.join(c.replace('_', ' ') for c in m['components'])}"
    if m.get("patients_left_out"):
        note += f"; {m['patients_left_out']} patient(s) left out (their index sums other components)"
    return note


def _comparison_list(comparisons: list[dict]) -> str:
    rows = []
    for c in comparisons:
        link = (f'<a href="{e(c["folder"])}/report.html">report</a>' if c["folder"] else "")
        differences = "<br>".join(e(d) for d in c.get("processing_differences") or [])
        rows.append(f"<tr><td>{e(c['patient_id'])}</td><td>{e(c['stain'])}</td>"
                    f"<td>{e(c['baseline'])}</td><td>{e(c['follow_up'] or 'none')}</td>"
                    f"<td>{_glomeruli_cell(c)}</td>"
                    f"<td>{e(c['status'])}</td><td>{differences}</td><td>{link}</td></tr>")
    return ("<table><tr><th>patient</th><th>stain</th><th>baseline</th><th>follow-up</th>"
            "<th>glomeruli</th><th>status</th><th>processed differently</th><th></th></tr>"
            + "".join(rows) + "</table>")


def _glomeruli_cell(c: dict) -> str:
    """Glomeruli at baseline -> follow-up, with either biopsy's adequacy when it is not adequate."""
    if "glomeruli" not in c:
        return "—"
    flags = [f"{when}: {adequacy}" for when, adequacy in zip(("baseline", "follow-up"), c["adequacy"])
             if adequacy != "adequate"]
    return e(f"{c['glomeruli'][0]} → {c['glomeruli'][1]}" + (f" ({'; '.join(flags)})" if flags else ""))
