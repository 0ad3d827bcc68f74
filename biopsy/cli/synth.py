"""``biopsy synth``: synthetic renal biopsy slides with exact ground truth."""

import argparse
from dataclasses import replace
from pathlib import Path

from biopsy.cli.batch import count, output_folder

# CLI flag -> profile key, for the flags that override a profile value.
OVERRIDES = {
    "glomeruli": (int, "number of glomeruli over all cores"),
    "global_sclerosis": (float, "fraction of glomeruli (0..1) globally sclerosed"),
    "segmental_sclerosis": (float, "fraction of glomeruli with segmental sclerosis"),
    "cellular_crescent": (float, "fraction of glomeruli with a cellular crescent"),
    "fibrous_crescent": (float, "fraction of glomeruli with a fibrous crescent"),
    "hyaline_deposit": (float, "fraction of glomeruli with hyaline deposits (prevalence)"),
    "endocapillary_hypercellularity": (float, "fraction of glomeruli with endocapillary hypercellularity"),
    "deposit_burden": (float, "deposit area as a fraction of an affected tuft (0.02..0.4)"),
    "fibrosis_percent": (float, "interstitial fibrosis, %% of tubulointerstitial cortex"),
    "atrophy_percent": (float, "tubular atrophy, %% of tubular area"),
    "inflammation_percent": (float, "interstitial infiltrates, %% of cortex covered"),
    "cores": (int, "needle cores, 1 to 3"),
    "core_length_mm": (float, "length of the first core in mm"),
    "core_width_mm": (float, "core width in mm"),
}
# With --pair, these apply to both biopsies; the lesion flags to the baseline only.
SHARED_BY_PAIR = ("glomeruli", "cores", "core_length_mm", "core_width_mm", "stain")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth", help="write a synthetic slide (or a baseline/follow-up pair) with exact truth",
        description="Write OUT/slide.svs (or slide.tiff), labels.ome.tif, truth.geojson, "
                    "profile.yaml and truth.json (last: the folder is whole when it exists). "
                    "With --pair, OUT/baseline (active-ln) and OUT/follow_up (remission) of one "
                    "synthetic patient: different tissue, one stain drift between them.")
    parser.add_argument("--out", type=output_folder, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--preset", metavar="NAME", help="lesion profile preset, a file name "
                        "of configs/synth/ (default: active-ln, or none when --profile is given)")
    parser.add_argument("--profile", type=Path, metavar="YAML",
                        help="profile file, merged over the preset")
    parser.add_argument("--seed", type=count(0), help="layout, texture and stain seed")
    parser.add_argument("--stain", metavar="NAME", help="stain preset: pas, he or trichrome "
                        "(default: the profile's)")
    parser.add_argument("--format", dest="slide_format", choices=("aperio", "generic"),
                        default="aperio", help="Aperio SVS style (slide.svs, default) or generic "
                                               "tiled TIFF (slide.tiff)")
    parser.add_argument("--pair", action="store_true",
                        help="baseline (active-ln, or --preset/--profile) and follow-up "
                             "(remission) of one patient; lesion flags change the baseline only")
    for key, (kind, text) in OVERRIDES.items():
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, metavar="N", help=text)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from biopsy.synth import generate_pair, generate_slide, load_profile

    overrides = {key: getattr(args, key) for key in OVERRIDES} | {"stain": args.stain}
    if args.pair:
        baseline = load_profile(args.profile, args.preset or "active-ln", **overrides, seed=args.seed)
        shared = {key: overrides[key] for key in SHARED_BY_PAIR}
        followup = load_profile(None, "remission", **shared)
        followup = replace(followup, seed=baseline.seed + 1)
        generate_pair(baseline, followup, args.out, slide_format=args.slide_format)
        print(f"{args.out}/baseline and {args.out}/follow_up written")
        return 0
    preset = args.preset or (None if args.profile else "active-ln")
    profile = load_profile(args.profile, preset, **overrides, seed=args.seed)
    truth = generate_slide(profile, args.out, slide_format=args.slide_format)
    scores = truth["scores"]
    print(f"{args.out}: {truth['slide']['file']} {truth['slide']['shape_px'][1]}x"
          f"{truth['slide']['shape_px'][0]} px at {profile.mpp} µm/px, "
          f"{scores['glomeruli']['count']} glomeruli, activity index "
          f"{scores['activity_index']['score']}{' (partial)' * scores['activity_index']['partial']}, "
          f"chronicity index {scores['chronicity_index']['score']}")
    return 0
