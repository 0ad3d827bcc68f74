"""Nuclei validation: detection and the two nuclear NIH activity components, against exact truth.

Fresh-seed synthetic slides (``biopsy.synth``; seeds 3000 + i, never used for training), the
``active-ln`` and ``remission`` presets in each stain (pas, he, trichrome), cores of
``--core-length-mm`` (glomerulus count scaled from the preset's 6 mm). On each slide the nuclei
are detected (:func:`biopsy.nuclei.detect_nuclei`) and compared with the generator's:

- detection precision / recall: a detected centre matches a drawn nucleus within ``MATCH_UM``
  (one-to-one, closest pairs first: :func:`biopsy.nuclei.match_centres`); touching and
  overlapping drawn nuclei are part of the truth, so recall is capped by how many of them light
  microscopy can separate;
- hypercellularity calls: the truth label map is scored with the detected nuclei
  (:func:`biopsy.scorefolder.score_class_map`), so only the nuclei differ from the truth;
  accuracy of the per-glomerulus endocapillary-hypercellularity call against ``truth.json``
  (glomeruli matched by centroid), and the densities' mean absolute error;
- components: endocapillary hypercellularity and interstitial inflammation, percent and bin,
  detected against ``truth.json``.

One table: a row per slide, then the cohort row. Slides already complete in ``--work-dir`` are
reused on a rerun.

    python benchmarks/nuclei.py                         # 6 slides, 2 mm cores: ~2 min
    python benchmarks/nuclei.py --per-cell 2 --core-length-mm 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from biopsy.labelmap import read_label_map  # noqa: E402
from biopsy.nuclei import detect_nuclei, match_centres  # noqa: E402
from biopsy.scorefolder import score_class_map  # noqa: E402
from biopsy.scoring import load_score_config  # noqa: E402
from biopsy.slide import open_slide  # noqa: E402
from biopsy.synth import generate_slide, load_profile  # noqa: E402
from biopsy.synth.layout import build_layout  # noqa: E402
from biopsy.synth.profile import LesionProfile  # noqa: E402

PRESETS = ("active-ln", "remission")
STAINS = ("pas", "he", "trichrome")
FIRST_SEED = 3000
MATCH_UM = 4.0
COMPONENTS = ("endocapillary_hypercellularity", "interstitial_inflammation")
TARGETS = {"call_accuracy": 0.90, "bins_exact": 0.90}


@dataclass(frozen=True)
class SlideResult:
    name: str
    drawn: int
    detected: int
    matched: int
    calls_right: int
    glomeruli: int
    density_mae: float
    truth: dict  # component -> (percent, bin)
    found: dict
    seconds: float

    def bins_exact(self) -> bool:
        return all(self.truth[c][1] == self.found[c][1] for c in COMPONENTS)


def slide_profile(preset: str, stain: str, seed: int, core_length_mm: float) -> LesionProfile:
    preset_profile = load_profile(preset=preset)
    glomeruli = max(4, round(preset_profile.glomeruli * core_length_mm / preset_profile.core_length_mm))
    return load_profile(preset=preset, stain=stain, seed=seed, core_length_mm=core_length_mm,
                        glomeruli=glomeruli)


def ensure_slide(folder: Path, profile: LesionProfile) -> dict:
    truth_path = folder / "truth.json"
    if truth_path.is_file():
        truth = json.loads(truth_path.read_text())
        if truth["profile"] == profile.to_dict():
            return truth
    return generate_slide(profile, folder)


def component_values(scores: dict) -> dict:
    activity = scores["activity_index"]["components"]
    return {c: (activity[c]["percent"], activity[c]["bin"]) for c in COMPONENTS}


def evaluate(name: str, folder: Path, profile: LesionProfile, truth: dict) -> SlideResult:
    started = time.perf_counter()
    with open_slide(folder / truth["slide"]["file"]) as slide:
        detected = detect_nuclei(slide)
    seconds = time.perf_counter() - started
    drawn = build_layout(profile).nuclei[:, :2]
    matched = match_centres(detected, drawn, MATCH_UM / profile.mpp)
    label_map = read_label_map(folder / "labels.ome.tif")
    scored = score_class_map(label_map.labels, label_map.class_names, label_map.mpp,
                             load_score_config(), level0_mpp=profile.mpp, nuclei_xy=detected)
    truth_glomeruli = truth["glomeruli"]
    centres = np.array([[g["centroid_x_px"], g["centroid_y_px"]] for g in truth_glomeruli])
    right, errors = 0, []
    for g in scored.glomeruli:
        distance, k = cKDTree(centres).query([g.centroid_x_px, g.centroid_y_px])
        reference = truth_glomeruli[k]
        right += ("endocapillary_hypercellularity" in g.lesions) == \
            ("endocapillary_hypercellularity" in reference["lesions"])
        errors.append(abs(g.tuft_nuclei_per_1000um2 - reference["tuft_nuclei_per_1000um2"]))
    return SlideResult(name, len(drawn), len(detected), matched, right, len(scored.glomeruli),
                       float(np.mean(errors)) if errors else 0.0,
                       component_values(truth["scores"]), component_values(scored.scores), seconds)


def percent_bin(value: tuple) -> str:
    percent, grade = value
    return "n/a" if percent is None else f"{percent:5.1f} ({grade})"


def print_table(results: list[SlideResult]) -> None:
    header = (f"{'slide':<26} {'drawn':>6} {'found':>6} {'prec':>5} {'recall':>6} "
              f"{'calls':>7} {'dens MAE':>8} {'endocap truth':>13} {'found':>10} "
              f"{'inflam truth':>13} {'found':>10} {'s':>5}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.name:<26} {r.drawn:>6} {r.detected:>6} {r.matched / max(r.detected, 1):>5.3f} "
              f"{r.matched / max(r.drawn, 1):>6.3f} {r.calls_right:>3}/{r.glomeruli:<3} "
              f"{r.density_mae:>8.2f} "
              f"{percent_bin(r.truth['endocapillary_hypercellularity']):>13} "
              f"{percent_bin(r.found['endocapillary_hypercellularity']):>10} "
              f"{percent_bin(r.truth['interstitial_inflammation']):>13} "
              f"{percent_bin(r.found['interstitial_inflammation']):>10} {r.seconds:>5.1f}")
    matched = sum(r.matched for r in results)
    precision = matched / max(sum(r.detected for r in results), 1)
    recall = matched / max(sum(r.drawn for r in results), 1)
    accuracy = sum(r.calls_right for r in results) / max(sum(r.glomeruli for r in results), 1)
    per_component = {c: np.mean([r.truth[c][1] == r.found[c][1] for r in results]) for c in COMPONENTS}
    exact = np.mean([r.bins_exact() for r in results])
    print("-" * len(header))
    print(f"cohort: {len(results)} slides; nuclei precision {precision:.3f}, recall {recall:.3f} "
          f"(match within {MATCH_UM} um); hypercellularity call accuracy {accuracy:.3f} "
          f"(target >= {TARGETS['call_accuracy']}); bins exact: endocapillary "
          f"{per_component['endocapillary_hypercellularity']:.2f}, inflammation "
          f"{per_component['interstitial_inflammation']:.2f}, both {exact:.2f} "
          f"(target >= {TARGETS['bins_exact']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-cell", type=int, default=1,
                        help="slides per preset and stain (default 1: 6 slides)")
    parser.add_argument("--core-length-mm", type=float, default=2.0, help="core length (default 2)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/biopsy-nuclei-benchmark"),
                        help="where the synthetic slides are written (reused on a rerun)")
    args = parser.parse_args(argv)
    results = []
    seed = FIRST_SEED
    for _ in range(args.per_cell):
        for stain in STAINS:
            for preset in PRESETS:
                name = f"{preset}-{stain}-{seed}"
                profile = slide_profile(preset, stain, seed, args.core_length_mm)
                truth = ensure_slide(args.work_dir / name, profile)
                results.append(evaluate(name, args.work_dir / name, profile, truth))
                print(f"  {name}: done", file=sys.stderr, flush=True)
                seed += 1
    print_table(results)


if __name__ == "__main__":
    main()
