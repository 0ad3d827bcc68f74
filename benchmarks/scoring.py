"""Scoring validation: the bundled model on a synthetic cohort it never saw, against exact truth.

``--slides N`` synthetic slides (``biopsy.synth``), alternating the ``active-ln`` and
``remission`` presets and cycling the PAS, H&E and trichrome stains (glomerulus count scaled to
``--core-length-mm``), with fresh seeds (2000 + i; the bundled model was trained on seeds 100-119
and 200-223), are scored with the bundled model (:func:`biopsy.pipeline.score_slide_file`) and
compared with their ``truth.json``:

- glomerulus detection: a predicted glomerulus matches a truth glomerulus when its centroid lies
  within the truth glomerulus's equivalent radius; matches are one-to-one, chosen to minimise the
  total centroid distance (``scipy.optimize.linear_sum_assignment``); precision, recall, F1;
- lesion-call accuracy: matched glomeruli whose set of lesion calls equals the truth's exactly;
- chronicity: slides whose four component bins all equal the truth's, and slides whose total is
  within +-1 of the truth's;
- nuclear activity components (endocapillary hypercellularity, interstitial inflammation, from
  nuclei detected on the slide): slides whose two bins equal the truth's;
- deposit burden: Pearson r (``scipy.stats.pearsonr``) of the mean deposit area fraction over
  glomeruli, and of the % of glomeruli with deposits, against the truth, across slides; since
  ``remission`` slides have no deposits, r mostly separates the presets, so the mean relative
  error of the deposit fraction on slides with deposits is printed beside it.

One table: a row per slide, then the cohort row with the issue's targets beside it. Slides are
made in a temporary folder, or in ``--work-dir``, where complete slides are reused on a rerun (and
scored folders too, per recipe: model, options and scoring config,
:func:`biopsy.pipeline.slide_recipe`): delete it when the generator changes.

    python benchmarks/scoring.py                                # 10 slides, 3 mm: ~5 min on 2 cores
    python benchmarks/scoring.py --slides 4 --core-length-mm 2  # quick check: ~1.5 min
    python benchmarks/scoring.py --int8                         # the int8 model (CPU)
    python benchmarks/scoring.py --tta                          # test-time augmentation (4x the model time)
    python benchmarks/scoring.py --scales 1 1.41                # two reading scales (2x model time)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import pearsonr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from biopsy.cli.batch import add_test_time_arguments  # noqa: E402
from biopsy.model import DEFAULT_CHECKPOINT, read_model_info  # noqa: E402
from biopsy.pipeline import inference_options, load_model, score_slide_file, slide_recipe  # noqa: E402
from biopsy.scorefolder import read_score_folder  # noqa: E402
from biopsy.scoring import load_score_config  # noqa: E402
from biopsy.synth import generate_slide, load_profile  # noqa: E402

PRESETS = ("active-ln", "remission")
STAINS = ("pas", "he", "trichrome")
FIRST_SEED = 2000
CHRONICITY = ("glomerulosclerosis", "fibrous_crescents", "tubular_atrophy",
              "interstitial_fibrosis")
NUCLEAR = ("endocapillary_hypercellularity", "interstitial_inflammation")
TARGETS = {"f1": 0.95, "lesion_accuracy": 0.90, "chronicity_exact": 0.90,
           "total_within_1": 0.90, "deposit_r": 0.9}


@dataclass(frozen=True)
class SlideResult:
    """One slide's comparison with its truth."""

    name: str
    truth_count: int
    predicted_count: int
    matched: int
    lesions_equal: int
    truth_bins: tuple
    predicted_bins: tuple
    truth_nuclear_bins: tuple
    predicted_nuclear_bins: tuple
    truth_total: int
    predicted_total: int
    truth_deposit_fraction: float
    predicted_deposit_fraction: float
    truth_deposit_percent: float
    predicted_deposit_percent: float

    @property
    def chronicity_exact(self) -> bool:
        return self.truth_bins == self.predicted_bins

    @property
    def nuclear_exact(self) -> bool:
        return self.truth_nuclear_bins == self.predicted_nuclear_bins

    @property
    def total_within_1(self) -> bool:
        return abs(self.truth_total - self.predicted_total) <= 1


def f1_score(matched: int, truth_count: int, predicted_count: int) -> float:
    """F1 of a detection with ``matched`` true positives (1.0 when both sides are empty)."""
    total = truth_count + predicted_count
    return 2 * matched / total if total else 1.0


def match_glomeruli(truth: list[dict], predicted: list, level0_mpp: float) -> list[tuple[int, int]]:
    """One-to-one (truth index, predicted index) pairs whose predicted centroid lies within the
    truth glomerulus's equivalent radius, minimising the summed centroid distance."""
    if not truth or not predicted:
        return []
    truth_xy = np.array([[g["centroid_x_px"], g["centroid_y_px"]] for g in truth])
    predicted_xy = np.array([[g.centroid_x_px, g.centroid_y_px] for g in predicted])
    radius_px = np.array([g["equivalent_diameter_um"] / 2 / level0_mpp for g in truth])
    distance = np.linalg.norm(truth_xy[:, None, :] - predicted_xy[None, :, :], axis=2)
    allowed = distance <= radius_px[:, None]
    cost = np.where(allowed, distance, distance.max() * 10 + 1)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if allowed[r, c]]


def component_bins(scores: dict, index: str, names: tuple[str, ...]) -> tuple:
    components = scores[index]["components"]
    return tuple(components[name]["bin"] for name in names)


def ensure_slide(folder: Path, preset: str, stain: str, seed: int, core_length_mm: float) -> dict:
    """The truth of the slide in ``folder``, generating it unless complete there already.

    The preset's glomerulus count is scaled to the core length (24 per 6 mm: 12 per 3 mm), so
    that short cores keep the preset's glomerular density and fit their glomeruli.
    """
    truth_path = folder / "truth.json"
    if truth_path.is_file():
        return json.loads(truth_path.read_text(encoding="utf-8"))
    preset_profile = load_profile(None, preset)
    per_mm = preset_profile.glomeruli / preset_profile.core_length_mm
    glomeruli = max(1, round(per_mm * core_length_mm))
    profile = load_profile(None, preset, seed=seed, core_length_mm=core_length_mm,
                           glomeruli=glomeruli, stain=stain)
    return generate_slide(profile, folder)


class Scorer:
    """Scores slides with the bundled model (int8, test-time augmentation when asked), loaded on
    first use."""

    def __init__(self, device: str | None, int8: bool = False, tta: bool = False,
                 scales: tuple[float, ...] = (1.0,), mpp_search: list[float] | None = None):
        self.options = inference_options(device, int8=int8, tta=tta, scales=scales,
                                         mpp_search=mpp_search)
        self.config = load_score_config()
        self.model = None

    def ensure_scored(self, slide_path: Path, out_dir: Path):
        """The scored-slide folder ``out_dir``, scoring the slide unless complete there already."""
        if not (out_dir / "summary.json").is_file():
            if self.model is None:
                self.model = load_model(None, self.options.device, self.options.int8)
            model, info, model_path = self.model
            score_slide_file(slide_path, out_dir, model, info, model_path, self.config,
                             options=self.options)
        return read_score_folder(out_dir)


def compare(name: str, truth: dict, scored) -> SlideResult:
    """Compare one scored slide with its truth."""
    pairs = match_glomeruli(truth["glomeruli"], scored.glomeruli, truth["slide"]["mpp"])
    lesions_equal = sum(set(truth["glomeruli"][t]["lesions"]) == set(scored.glomeruli[p].lesions)
                        for t, p in pairs)
    truth_scores, predicted_scores = truth["scores"], scored.summary["scores"]
    return SlideResult(
        name=name, truth_count=len(truth["glomeruli"]), predicted_count=len(scored.glomeruli),
        matched=len(pairs), lesions_equal=lesions_equal,
        truth_bins=component_bins(truth_scores, "chronicity_index", CHRONICITY),
        predicted_bins=component_bins(predicted_scores, "chronicity_index", CHRONICITY),
        truth_nuclear_bins=component_bins(truth_scores, "activity_index", NUCLEAR),
        predicted_nuclear_bins=component_bins(predicted_scores, "activity_index", NUCLEAR),
        truth_total=truth_scores["chronicity_index"]["score"],
        predicted_total=predicted_scores["chronicity_index"]["score"],
        truth_deposit_fraction=truth_scores["burdens"]["deposit_mean_area_fraction"],
        predicted_deposit_fraction=predicted_scores["burdens"]["deposit_mean_area_fraction"],
        truth_deposit_percent=truth_scores["burdens"]["deposit_glomeruli_percent"],
        predicted_deposit_percent=predicted_scores["burdens"]["deposit_glomeruli_percent"])


def pearson(truth: list[float], predicted: list[float]) -> float:
    """Pearson r, NaN when fewer than 2 slides or either side is constant."""
    if len(truth) < 2 or np.ptp(truth) == 0 or np.ptp(predicted) == 0:
        return float("nan")
    return float(pearsonr(truth, predicted).statistic)


def bins_text(bins: tuple) -> str:
    return "".join("-" if b is None else str(b) for b in bins)


def print_table(results: list[SlideResult]) -> None:
    """A row per slide, the cohort row, and the targets row."""
    header = (f"{'slide':<28}{'glom t/p/m':>12}{'F1':>7}{'lesion acc':>11}{'CI bins t/p':>13}"
              f"{'CI t/p':>8}{'nuc bins t/p':>14}{'dep frac t/p':>15}{'dep % t/p':>13}")
    print(header)
    print("-" * len(header))
    for r in results:
        accuracy = r.lesions_equal / r.matched if r.matched else float("nan")
        print(f"{r.name:<28}{f'{r.truth_count}/{r.predicted_count}/{r.matched}':>12}"
              f"{f1_score(r.matched, r.truth_count, r.predicted_count):>7.3f}{accuracy:>11.3f}"
              f"{bins_text(r.truth_bins) + '/' + bins_text(r.predicted_bins):>13}"
              f"{f'{r.truth_total}/{r.predicted_total}':>8}"
              f"{bins_text(r.truth_nuclear_bins) + '/' + bins_text(r.predicted_nuclear_bins):>14}"
              f"{f'{r.truth_deposit_fraction:.3f}/{r.predicted_deposit_fraction:.3f}':>15}"
              f"{f'{r.truth_deposit_percent:.0f}/{r.predicted_deposit_percent:.0f}':>13}")
    matched = sum(r.matched for r in results)
    cohort = {
        "f1": f1_score(matched, sum(r.truth_count for r in results),
                       sum(r.predicted_count for r in results)),
        "lesion_accuracy": sum(r.lesions_equal for r in results) / matched if matched else
        float("nan"),
        "chronicity_exact": float(np.mean([r.chronicity_exact for r in results])),
        "total_within_1": float(np.mean([r.total_within_1 for r in results])),
        "deposit_r": pearson([r.truth_deposit_fraction for r in results],
                             [r.predicted_deposit_fraction for r in results]),
    }
    deposit_percent_r = pearson([r.truth_deposit_percent for r in results],
                                [r.predicted_deposit_percent for r in results])
    with_deposits = [r for r in results if r.truth_deposit_fraction > 0]
    deposit_relative_error = float(np.mean(
        [abs(r.predicted_deposit_fraction / r.truth_deposit_fraction - 1) for r in with_deposits]
    )) if with_deposits else float("nan")
    print("-" * len(header))
    print(f"{f'cohort ({len(results)} slides)':<28}{'F1':>8} {cohort['f1']:.3f}"
          f"  lesion acc {cohort['lesion_accuracy']:.3f}"
          f"  CI exact {cohort['chronicity_exact']:.0%}"
          f"  CI total +-1 {cohort['total_within_1']:.0%}"
          f"  nuclear bins exact {np.mean([r.nuclear_exact for r in results]):.0%}"
          f"  deposit r (frac) {cohort['deposit_r']:.3f}  (% glom) {deposit_percent_r:.3f}"
          f"  deposit frac mean |rel err| {deposit_relative_error:.0%}"
          f" ({len(with_deposits)} slides)")
    print(f"{'target':<28}{'F1':>8} >={TARGETS['f1']:.2f}"
          f"  lesion acc >={TARGETS['lesion_accuracy']:.2f}"
          f"  CI exact >={TARGETS['chronicity_exact']:.0%}"
          f"  CI total +-1 >={TARGETS['total_within_1']:.0%}"
          f"  deposit r (frac) >={TARGETS['deposit_r']:.1f}")
    verdict = {k: "met" if cohort[k] >= TARGETS[k] else "NOT met" for k in TARGETS}
    print("targets: " + ", ".join(f"{k} {v}" for k, v in verdict.items()))
    print("columns: glom truth/predicted/matched; CI bins = chronicity component bins "
          "(glomerulosclerosis, fibrous crescents, tubular atrophy, interstitial fibrosis); "
          "nuc bins = endocapillary hypercellularity, interstitial inflammation; "
          "dep frac = mean deposit area fraction; dep % = % glomeruli with deposits")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=10, help="cohort size (default 10)")
    parser.add_argument("--core-length-mm", type=float, default=3.0,
                        help="biopsy core length in mm (default 3)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="slides and scored folders, complete ones reused (default: a "
                             "temporary folder)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--int8", action="store_true",
                        help="score with the int8 model on the CPU (biopsy.quantize)")
    add_test_time_arguments(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        run(args, args.work_dir or Path(temporary))


def run(args: argparse.Namespace, work_dir: Path) -> None:
    scorer = Scorer(args.device, args.int8, args.tta, tuple(args.scales), args.mpp_search)
    recipe = slide_recipe(read_model_info(DEFAULT_CHECKPOINT), scorer.config, scorer.options, None)
    results = []
    for index in range(args.slides):
        preset, stain = PRESETS[index % len(PRESETS)], STAINS[index % len(STAINS)]
        seed = FIRST_SEED + index
        name = f"{preset}-{stain}-{seed}"
        folder = work_dir / f"{name}-{args.core_length_mm:g}mm"
        truth = ensure_slide(folder / "synth", preset, stain, seed, args.core_length_mm)
        scored = scorer.ensure_scored(folder / "synth" / truth["slide"]["file"],
                                      folder / f"scored-{recipe[:12]}")
        results.append(compare(name, truth, scored))
        print(f"scored {name}", file=sys.stderr, flush=True)
    print_table(results)


if __name__ == "__main__":
    main()
