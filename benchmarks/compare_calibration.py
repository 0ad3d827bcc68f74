"""How often ``biopsy compare`` calls a change by chance: simulated patients whose kidney did not
change (both biopsies drawn alike), each interval method of :mod:`biopsy.intervals` side by side
with the percentile bootstrap that SCORING.md names (resampling glomeruli, or tiles, as if
independent). Each row: the share of patients given a verdict (improved or worsened) at 95 %;
5 % is what a 95 % interval promises.

1. Burdens (a fraction a glomerulus, zero in ~60 % of glomeruli, averaged over glomeruli), by
   glomeruli at baseline and follow-up: bootstrap against the inverted permutation test.
2. Cortex areas: interstitial fibrosis of two 1 mm wide cores with the same patchy fibrosis (a
   smoothed Gaussian field above its 80th percentile, ~20 %; patch scale = the smoothing's
   sigma), 250 µm tiles: tile bootstrap against Welch's t over 1 mm blocks.
3. A whole comparison (12 metrics, :func:`biopsy.compare.compare_samples`) of random patients:
   the share with some verdict, and with some verdict judged together (Holm).

    python benchmarks/compare_calibration.py              # ~3 CPU-minutes
    python benchmarks/compare_calibration.py --patients 1000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from biopsy import compare, intervals, scoring  # noqa: E402
from biopsy.classes import CLASS_NAMES  # noqa: E402
from biopsy.morphometry import CortexTile, GlomerulusMeasures  # noqa: E402

REPLICATES = 2000
TILE_UM = 250.0


def burdens(rng: np.random.Generator, count: int) -> np.ndarray:
    """Per-glomerulus deposit fractions in %: 40 % of glomeruli affected, mean 15 % of the tuft."""
    return np.where(rng.random(count) < 0.4, rng.beta(2, 11.3, count), 0.0) * 100


def bootstrap_of_means(baseline: np.ndarray, follow_up: np.ndarray,
                       rng: np.random.Generator) -> intervals.Interval:
    means = [values[rng.integers(0, len(values), (REPLICATES, len(values)))].mean(axis=1)
             for values in (baseline, follow_up)]
    return intervals.percentile_interval(means[1] - means[0])


def patchy_core(rng: np.random.Generator, length_mm: float, patch_um: float,
                pixel_um: float = 25.0) -> list[CortexTile]:
    """Cortex tiles of a 1 mm wide core with patchy fibrosis (positions in 1 µm pixels)."""
    rows, columns = int(1000 / pixel_um), int(length_mm * 1000 / pixel_um)
    field = ndimage.gaussian_filter(rng.standard_normal((rows + 80, columns + 80)),
                                    patch_um / pixel_um)[40:-40, 40:-40]
    fibrotic = field > 0.8416 * field.std()
    side = int(TILE_UM / pixel_um)
    return [CortexTile(x * pixel_um, y * pixel_um, TILE_UM,
                       {"fibrosis": share * TILE_UM ** 2, "tissue": (1 - share) * TILE_UM ** 2}, None)
            for y in range(0, rows, side) for x in range(0, columns, side)
            for share in [fibrotic[y:y + side, x:x + side].mean()]]


def bootstrap_of_tiles(parts: list[tuple[np.ndarray, np.ndarray]],
                       rng: np.random.Generator) -> intervals.Interval:
    ratios = []
    for numerator, denominator in parts:
        index = rng.integers(0, len(numerator), (REPLICATES, len(numerator)))
        ratios.append(100 * numerator[index].sum(axis=1) / denominator[index].sum(axis=1))
    return intervals.percentile_interval(ratios[1] - ratios[0])


def random_patient_biopsy(rng: np.random.Generator, glomeruli: int,
                          config: scoring.ScoreConfig) -> compare.SlideSample:
    """Glomeruli with random lesions and nuclei, tiles on a 1 mm wide grid with random areas."""
    measures = []
    for number in range(glomeruli):
        sclerosis = rng.choice([0.0, 0.2, 0.7], p=[0.7, 0.15, 0.15])
        crescents = rng.choice([0.0, 0.05, 0.3], size=2, p=[0.6, 0.2, 0.2])
        measures.append(GlomerulusMeasures(
            number + 1, 0.0, 0.0, 2e4, 160.0, sclerosis, crescents[0] / 3, crescents[1] / 3,
            crescents[0], crescents[1], rng.choice([0.0, 0.05], p=[0.6, 0.4]),
            tuft_nuclei_per_1000um2=float(rng.uniform(8, 20))))
    tiles = [CortexTile(TILE_UM * (i // 4), TILE_UM * (i % 4), TILE_UM,
                        {n: float(rng.uniform(0, 5000) * (rng.random() < 0.8)) for n in CLASS_NAMES[1:]},
                        int(rng.integers(0, 40)))
             for i in range(8 * glomeruli)]
    return compare.slide_sample(measures, tiles, CLASS_NAMES, config)


def verdict_share(results: list[intervals.Interval]) -> str:
    given = sum(intervals.verdict(r.low, r.high) != "unchanged" for r in results)
    return f"{100 * given / len(results):.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=400, help="simulated patients a row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{args.patients} unchanged patients a row; share given a verdict at 95 %\n")
    print("| burdens: glomeruli | percentile bootstrap | inverted permutation test |")
    print("| --- | ---: | ---: |")
    for sizes in ((1, 1), (3, 3), (5, 5), (10, 10), (3, 20), (20, 3), (30, 30)):
        pairs = [(burdens(rng, sizes[0]), burdens(rng, sizes[1])) for _ in range(args.patients)]
        print(f"| {sizes[0]} against {sizes[1]} | "
              f"{verdict_share([bootstrap_of_means(*pair, rng) for pair in pairs])} | "
              f"{verdict_share([intervals.mean_difference_interval(*pair, rng, REPLICATES, 100.0) for pair in pairs])} |")
    config = scoring.load_score_config()
    print("\n| cortex: fibrosis patches, core length | tile bootstrap | Welch t over 1 mm blocks |")
    print("| --- | ---: | ---: |")
    for patch_um, length_mm in ((100, 5), (100, 10), (300, 5), (300, 10)):
        tile_results, block_results = [], []
        for _ in range(args.patients):
            samples = [compare.slide_sample([], patchy_core(rng, length_mm, patch_um), CLASS_NAMES,
                                            config) for _ in range(2)]
            parts = [compare.tile_ratio_parts(s, "interstitial_fibrosis") for s in samples]
            tile_results.append(bootstrap_of_tiles(parts, rng))
            block_results.append(intervals.ratio_difference_interval(
                *(part + (s.tile_block,) for part, s in zip(parts, samples))))
        print(f"| {patch_um} µm, {length_mm} mm | {verdict_share(tile_results)} | "
              f"{verdict_share(block_results)} |")
    print("\n| whole comparison: glomeruli a biopsy | some verdict | some verdict judged together (Holm) |")
    print("| --- | ---: | ---: |")
    for glomeruli in (10, 30):
        some = together = 0
        for patient in range(args.patients // 2):
            rows = compare.compare_samples(random_patient_biopsy(rng, glomeruli, config),
                                           random_patient_biopsy(rng, glomeruli, config),
                                           seed=patient)
            some += any(r["verdict"] in ("improved", "worsened") for r in rows)
            together += any(r["verdict_holm"] in ("improved", "worsened") for r in rows)
        share = 100 / (args.patients // 2)
        print(f"| {glomeruli} | {some * share:.1f} % | {together * share:.1f} % |")


if __name__ == "__main__":
    main()
