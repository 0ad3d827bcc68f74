"""Stability: a model's scores of a slide against those of the same slide re-stained and turned.

Issue target: the same slide with a stain shift (hue and intensity) and rotated 90 degrees changes
no chronicity component and deposit burden by less than 5 % relative.

Fresh synthetic slides (``biopsy.synth``; presets ``active-ln`` and ``remission`` alternated,
stains PAS, H&E and trichrome cycled, so 6 slides hold every pair; seeds 3000 + i, never used in
training) are scored with the bundled model (or ``--model``) as they are and as copies written by
:func:`biopsy.restain.restain_slide`:

- ``rot90``: one quarter turn, colours untouched (orientation and JPEG re-encoding alone);
- ``mild+rot90``: haematoxylin x0.9, eosin x1.1, hue +4 degrees (inside the training augmentation);
- ``strong+rot90``: haematoxylin x1.25, eosin x0.7, hue -10 degrees (the extremes of a years-later
  restaining, ``biopsy.synth.stain.drift_stain``, and a hue turn beyond training's +-8 degrees).

One table: a row per slide and variant, original -> copy, ``*`` marking a change. The summary
checks the target on the stain-shifted copies. Slides, copies and scored folders complete in
``--work-dir`` are reused; scored folders are kept per recipe (model SHA-256, options, scoring
config: :func:`biopsy.pipeline.slide_recipe`), so a new bundled model or config is scored afresh.

    python benchmarks/stability.py             # 6 slides of 3 mm (adequate cores), 4 scorings each
    python benchmarks/stability.py --quick     # 3 slides of 1.5 mm (one per stain): 5 CPU-minutes
    python benchmarks/stability.py --slides 6 --core-length-mm 1.5   # every preset x stain pair, short cores
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from biopsy.pipeline import inference_options, load_model, score_slide_file, slide_recipe  # noqa: E402
from biopsy.restain import StainShift, restain_slide, rotated_xy  # noqa: E402
from biopsy.scorefolder import ScoredSlide, read_score_folder  # noqa: E402
from biopsy.scoring import load_score_config  # noqa: E402
from biopsy.slide import open_slide  # noqa: E402
from scoring import bins_text, ensure_slide  # noqa: E402  (benchmarks/scoring.py, beside this file)

PRESETS = ("active-ln", "remission")
STAINS = ("pas", "he", "trichrome")
FIRST_SEED = 3000
CHRONICITY = ("glomerulosclerosis", "fibrous_crescents", "tubular_atrophy", "interstitial_fibrosis")
ACTIVITY = ("hyaline_deposits", "cellular_crescents")
VARIANTS = {  # name: (quarter turns, stain shift)
    "rot90": (1, StainShift()),
    "mild+rot90": (1, StainShift(haematoxylin=0.9, eosin=1.1, hue_deg=4)),
    "strong+rot90": (1, StainShift(haematoxylin=1.25, eosin=0.7, hue_deg=-10)),
}
TARGET_RELATIVE = 0.05


@dataclass(frozen=True)
class Scores:
    """The numbers compared between a slide and its copy."""

    glomeruli: int
    chronicity_bins: tuple
    chronicity_total: int
    activity_bins: tuple
    deposit_percent: float
    deposit_fraction: float
    sclerosis_fraction: float
    measures: tuple  # GlomerulusMeasures, for matching glomeruli
    level0_mpp: float
    dimensions: tuple[int, int]  # level-0 (width, height) px of the slide scored

    @classmethod
    def of(cls, scored: ScoredSlide, dimensions: tuple[int, int]) -> "Scores":
        scores = scored.summary["scores"]
        chronicity = scores["chronicity_index"]["components"]
        activity = scores["activity_index"]["components"]
        burdens = scores["burdens"]
        return cls(scores["glomeruli"]["count"], tuple(chronicity[c]["bin"] for c in CHRONICITY),
                   scores["chronicity_index"]["score"], tuple(activity[c]["bin"] for c in ACTIVITY),
                   burdens["deposit_glomeruli_percent"], burdens["deposit_mean_area_fraction"],
                   burdens["sclerosis_mean_fraction"], tuple(scored.glomeruli),
                   scored.summary["label_map"]["level0_mpp"], dimensions)


def relative_change(before: float, after: float) -> float:
    """|after - before| / before; 0 when both are 0, infinite when only ``before`` is."""
    if before == 0:
        return 0.0 if after == 0 else math.inf
    return abs(after - before) / abs(before)


def calls_changed(original: Scores, copy: Scores, quarter_turns: int) -> tuple[int, int]:
    """(Glomeruli of the original found in the copy, how many of those changed lesion calls).

    A copy glomerulus is the original's when its centroid lies within the original's equivalent
    radius of the original's turned centroid; pairs are one-to-one, least total distance.
    """
    if not original.measures or not copy.measures:
        return 0, 0
    turned = np.array([rotated_xy(g.centroid_x_px, g.centroid_y_px, original.dimensions, quarter_turns)
                       for g in original.measures])
    centres = np.array([(g.centroid_x_px, g.centroid_y_px) for g in copy.measures])
    radius_px = np.array([g.equivalent_diameter_um / 2 / original.level0_mpp for g in original.measures])
    distance = np.linalg.norm(turned[:, None] - centres[None], axis=2)
    inside = distance <= radius_px[:, None]
    rows, cols = linear_sum_assignment(np.where(inside, distance, distance.max() * 10 + 1))
    pairs = [(r, c) for r, c in zip(rows, cols) if inside[r, c]]
    changed = sum(set(original.measures[r].lesions) != set(copy.measures[c].lesions) for r, c in pairs)
    return len(pairs), changed


class Scorer:
    """Scores slides with a model (None: the bundled one) into folders kept per recipe."""

    def __init__(self, model_path: Path | None, device: str | None):
        self.options = inference_options(device)
        self.config = load_score_config()
        self.model, self.info, self.model_path = load_model(model_path, self.options.device)

    @property
    def model_id(self) -> str:
        return self.info.sha256[:12]

    @property
    def recipe_id(self) -> str:
        """Names the cache of scored folders: model, options and scoring config."""
        return slide_recipe(self.info, self.config, self.options, None)[:12]

    def scores(self, slide_path: Path, out_dir: Path) -> Scores:
        if not (out_dir / "summary.json").is_file():
            score_slide_file(slide_path, out_dir, self.model, self.info, self.model_path,
                             self.config, options=self.options)
        with open_slide(slide_path) as slide:
            dimensions = slide.dimensions
        return Scores.of(read_score_folder(out_dir), dimensions)


def pair(before, after, text=str, width: int = 0) -> str:
    """``before>after``, with ``*`` when they differ."""
    mark = "*" if before != after else " "
    return f"{text(before)}>{text(after)}{mark}".rjust(width)


def percent(value: float) -> str:
    """A relative change as a percentage; ``>999%`` past that."""
    return "inf" if math.isinf(value) else ">999%" if value > 9.99 else f"{value:.1%}"


def print_table(rows: list[tuple[str, str, Scores, Scores]], model: str) -> None:
    header = (f"{'slide':<26}{'variant':<14}{'glom':>9}{'same/calls':>11}{'CI bins':>12}{'CI':>8}"
              f"{'AI bins':>9}{'dep % glom':>17}{'rel':>8}{'dep frac':>15}{'rel':>8}"
              f"{'scl frac':>15}{'rel':>8}")
    print(f"model {model}")
    print(header)
    print("-" * len(header))
    for name, variant, a, b in rows:
        matched, changed = calls_changed(a, b, VARIANTS[variant][0])
        print(f"{name:<26}{variant:<14}{pair(a.glomeruli, b.glomeruli, width=9)}"
              f"{f'{matched}/{changed}':>11}"
              f"{pair(a.chronicity_bins, b.chronicity_bins, bins_text, 12)}"
              f"{pair(a.chronicity_total, b.chronicity_total, width=8)}"
              f"{pair(a.activity_bins, b.activity_bins, bins_text, 9)}"
              f"{f'{a.deposit_percent:.1f}>{b.deposit_percent:.1f}':>17}"
              f"{percent(relative_change(a.deposit_percent, b.deposit_percent)):>8}"
              f"{f'{a.deposit_fraction:.4f}>{b.deposit_fraction:.4f}':>15}"
              f"{percent(relative_change(a.deposit_fraction, b.deposit_fraction)):>8}"
              f"{f'{a.sclerosis_fraction:.4f}>{b.sclerosis_fraction:.4f}':>15}"
              f"{percent(relative_change(a.sclerosis_fraction, b.sclerosis_fraction)):>8}")
    print("-" * len(header))
    print_summary(rows)
    print("columns: original>copy, * = changed; same/calls = glomeruli of the original found in the "
          "copy / of those, how many changed lesion calls; CI bins = chronicity component bins "
          "(glomerulosclerosis, fibrous crescents, tubular atrophy, interstitial fibrosis); CI = "
          "chronicity total; AI bins = activity bins (hyaline deposits, cellular crescents); dep % "
          "glom = % glomeruli with deposits; dep frac = mean deposit area fraction; scl frac = "
          "sclerosis burden; rel = relative change")


def print_summary(rows: list[tuple[str, str, Scores, Scores]]) -> None:
    """Per variant: slides whose chronicity changed; the largest relative change of deposit burden
    on slides with deposits (relative change of a burden near 0 means nothing), and slides without
    deposits that gained deposit calls; the verdict."""
    for variant in VARIANTS:
        chosen = [(a, b) for _, v, a, b in rows if v == variant]
        if not chosen:
            continue
        flipped = sum(a.chronicity_bins != b.chronicity_bins for a, b in chosen)
        components = sum(x != y for a, b in chosen for x, y in zip(a.chronicity_bins, b.chronicity_bins))
        with_deposits = [(a, b) for a, b in chosen if a.deposit_percent > 0]
        fraction = max((relative_change(a.deposit_fraction, b.deposit_fraction) for a, b in with_deposits),
                       default=0.0)
        glomeruli = max((relative_change(a.deposit_percent, b.deposit_percent) for a, b in with_deposits),
                        default=0.0)
        gained = sum(a.deposit_percent == 0 < b.deposit_percent for a, b in chosen)
        stained = VARIANTS[variant][1] != StainShift()
        met = flipped == 0 and max(fraction, glomeruli) < TARGET_RELATIVE and gained == 0
        verdict = ("met" if met else "NOT met") if stained else "(no stain shift: reference)"
        print(f"{variant:<14} {len(chosen)} slides: chronicity changed on {flipped} ({components} "
              f"components); deposit burden max rel change on the {len(with_deposits)} slides with "
              f"deposits: mean fraction {percent(fraction)}, % glomeruli {percent(glomeruli)}; "
              f"deposits gained on {gained} slides without; target (0 components, < "
              f"{TARGET_RELATIVE:.0%}) {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=None, help="number of slides (default 6; --quick 3)")
    parser.add_argument("--core-length-mm", type=float, default=None,
                        help="biopsy core length in mm (default 3; --quick 1.5)")
    parser.add_argument("--quick", action="store_true", help="3 slides of 1.5 mm (one per stain)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/biopsy-stability-benchmark"),
                        help="slides, copies and scored folders; complete ones are reused")
    parser.add_argument("--model", type=Path, default=None, metavar="CKPT",
                        help="checkpoint to test (default: the bundled model)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    args = parser.parse_args(argv)
    slides = args.slides or (3 if args.quick else 6)
    core_length_mm = args.core_length_mm or (1.5 if args.quick else 3.0)
    scorer = Scorer(args.model, args.device)
    rows = []
    for index in range(slides):
        preset, stain, seed = PRESETS[index % 2], STAINS[index % 3], FIRST_SEED + index
        name = f"{preset}-{stain}-{seed}"
        folder = args.work_dir / f"{name}-{core_length_mm:g}mm"
        truth = ensure_slide(folder / "synth", preset, stain, seed, core_length_mm)
        slide_path = folder / "synth" / truth["slide"]["file"]
        scored = folder / f"scored-{scorer.recipe_id}"
        original = scorer.scores(slide_path, scored / "original")
        for variant, (quarter_turns, shift) in VARIANTS.items():
            copy_path = folder / f"{variant}.svs"
            if not copy_path.is_file():
                restain_slide(slide_path, copy_path, shift, quarter_turns=quarter_turns)
            rows.append((name, variant, original, scorer.scores(copy_path, scored / variant)))
        print(f"scored {name}", file=sys.stderr, flush=True)
    print_table(rows, f"{scorer.model_path} (sha256 {scorer.model_id})")


if __name__ == "__main__":
    main()
