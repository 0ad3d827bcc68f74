"""``biopsy demo``: one synthetic patient end to end, from slides to the comparison report.

OUT/slides/{baseline,follow_up}/  the synthetic slides with their truth (``biopsy synth --pair``)
OUT/{baseline,follow_up}/        the scored slides (``biopsy score``)
OUT/report.html, comparison.*    the comparison (``biopsy compare``)

Each step is skipped when its outputs are complete and were made from the same inputs (the same
profiles; the same slide bytes, scored the same way: model bytes, options, config), so a rerun
only redoes what changed.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import yaml

from biopsy.cli.batch import add_device_argument, add_model_arguments, count, output_folder
from biopsy.cli.compare import glomeruli_line, metric_line

BASELINE_PRESET = "active-ln"
FOLLOW_UP_PRESET = "remission"
HEADLINE_METRICS = ("activity_index", "chronicity_index", "deposit_burden")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="synthesise one patient's baseline and follow-up biopsies, score and "
                     "compare them",
        description=f"Generate a synthetic patient (baseline {BASELINE_PRESET}, follow-up "
                    f"{FOLLOW_UP_PRESET}) into OUT/slides, score both slides with the model, "
                    "compare them and write OUT/report.html. Complete outputs of an earlier run "
                    "are reused.")
    parser.add_argument("--out", type=output_folder, default=Path("demo-output"), metavar="DIR",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=count(0), default=1,
                        help="synthetic patient seed (default %(default)s; the follow-up uses "
                             "seed + 1)")
    parser.add_argument("--core-length-mm", type=float, metavar="MM",
                        help="length of each biopsy core (default: the presets' 6 mm); "
                             "shorter is quicker")
    parser.add_argument("--glomeruli", type=int, metavar="N",
                        help="glomeruli per biopsy (default: the presets' 24)")
    add_model_arguments(parser)
    add_device_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from biopsy import compare, pipeline
    from biopsy.model import read_model_info
    from biopsy.provenance import file_sha256
    from biopsy.scorefolder import read_score_folder
    from biopsy.scoring import load_score_config
    from biopsy.synth import generate_pair, load_profile

    started = time.perf_counter()
    model_path = pipeline.checkpoint_path(args.model)
    # first: a device this machine lacks is refused before the slides are made
    options = pipeline.inference_options(args.device, args.batch_size, args.workers, args.int8,
                                         args.tta, tuple(args.scales), args.mpp_search)
    shared = {"core_length_mm": args.core_length_mm, "glomeruli": args.glomeruli}
    baseline = load_profile(None, BASELINE_PRESET, **shared, seed=args.seed)
    follow_up = replace(load_profile(None, FOLLOW_UP_PRESET, **shared), seed=args.seed + 1)
    slides = args.out / "slides"
    slide_dirs = (slides / "baseline", slides / "follow_up")
    fresh = not all(_synthesised(d, p) for d, p in zip(slide_dirs, (baseline, follow_up)))
    if fresh:
        _step(f"synthesising the patient into {slides}")
        generate_pair(baseline, follow_up, slides)

    config = load_score_config()
    recipe = pipeline.slide_recipe(read_model_info(model_path), config, options, mpp=None)
    loaded = None
    for slide_dir, name in zip(slide_dirs, ("baseline", "follow_up")):
        slide_path, folder = slide_dir / "slide.svs", args.out / name
        if _scored(folder, file_sha256(slide_path), recipe):
            continue
        if loaded is None:
            loaded = pipeline.load_model(model_path, options.device, args.int8)
        _step(f"scoring {slide_path} on {options.device}")
        pipeline.score_slide_file(slide_path, folder, *loaded, config, options=options)
        fresh = True

    scored = [read_score_folder(args.out / name) for name in ("baseline", "follow_up")]
    if fresh or not (args.out / "comparison.json").is_file():
        _step("comparing baseline with follow-up")
        comparison = compare.write_comparison(args.out, *scored, patient_id=f"demo-{args.seed}")
    else:
        comparison = json.loads((args.out / "comparison.json").read_text(encoding="utf-8"))
    print(f"report: {args.out / 'report.html'} ({time.perf_counter() - started:.0f} s)")
    for line in headline(comparison, *(s.summary["scores"] for s in scored)):
        print("  " + line)
    return 0


def headline(comparison: dict, baseline_scores: dict, follow_up_scores: dict) -> list[str]:
    """Glomeruli found, the NIH indices and the deposit burden, baseline -> follow-up."""
    metrics = {m["name"]: m for m in comparison["metrics"]}
    return [glomeruli_line(comparison)] + [
        metric_line(metrics[name], baseline_scores, follow_up_scores) for name in HEADLINE_METRICS]


def _synthesised(slide_dir: Path, profile) -> bool:
    """Whether ``slide_dir`` holds a complete synthetic slide of ``profile``."""
    if not (slide_dir / "truth.json").is_file():
        return False
    written = yaml.safe_load((slide_dir / "profile.yaml").read_text(encoding="utf-8"))
    return written == profile.to_dict()


def _scored(folder: Path, slide_sha256: str, recipe: str) -> bool:
    """Whether ``folder`` is a complete scored slide of these slide bytes, scored by ``recipe``
    (:func:`biopsy.pipeline.slide_recipe`: the same model bytes, options and config)."""
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        return False
    provenance = json.loads(summary_path.read_text(encoding="utf-8"))["provenance"]
    return (provenance["source"].get("sha256") == slide_sha256
            and provenance.get("recipe_sha256") == recipe)


def _step(text: str) -> None:
    print(f"demo: {text} ...", flush=True)
