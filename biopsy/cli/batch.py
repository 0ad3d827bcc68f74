"""``biopsy batch``: score a cohort's slides once each, compare baselines with follow-ups, summarise.

Under ``torchrun --nproc-per-node=N`` the manifest is sharded across ranks, one GPU each, or
several ranks a GPU when N is larger than the GPUs (each slide's scoring on the CPU then
overlaps another's segmentation).
Exit status: 0 when every slide was scored, 1 when some failed (see ``status.csv``), 2 for a
malformed manifest or another error the user can fix.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from biopsy.slide import SCALE_RANGE, SLIDE_MPP_RANGE_UM

if TYPE_CHECKING:
    from biopsy.batch import Scorer


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch", help="score every slide of a manifest once, compare and summarise the cohort",
        description="Score every slide of MANIFEST.csv (columns patient_id, timepoint, slide; "
                    "optional stain, mpp) into OUT/slides/, skipping slides already scored the same "
                    "way (same model file, options and scoring config), then "
                    "compare each patient's baseline with each follow-up (OUT/comparisons/) and "
                    "write cohort.csv, cohort.json and cohort.html. Failures are listed in "
                    "OUT/status.csv and give exit status 1.")
    parser.add_argument("manifest", type=Path, metavar="MANIFEST.csv")
    parser.add_argument("--out", type=output_folder, required=True, metavar="DIR", help="output folder")
    add_scoring_arguments(parser, "the manifest's slide column lists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


WORKERS_DEFAULT = ("default 0 on CPU, where the model's threads take every core; up to 8 on CUDA, "
                   "where decoding is the bottleneck")
WORKERS_HELP = ("worker processes per slide reading its tiles (0: the main process reads them; "
                f"{WORKERS_DEFAULT})")


def add_model_arguments(parser: argparse.ArgumentParser, precision=None,
                        workers_help: str = WORKERS_HELP) -> None:
    """Options of segmenting slides: model checkpoint, tiles per batch, workers, --int8 (in the
    mutually exclusive group ``precision`` when given), test-time augmentation."""
    parser.add_argument("--model", type=Path, metavar="CKPT",
                        help="model checkpoint (default: the bundled model, "
                             "biopsy/models/default.safetensors)")
    parser.add_argument("--batch-size", type=count(1), default=16, metavar="N",
                        help="tiles per batch (default %(default)s)")
    parser.add_argument("--workers", type=count(0), metavar="N", help=workers_help)
    add_int8_argument(parser if precision is None else precision)
    add_test_time_arguments(parser)


def add_test_time_arguments(parser, config_key: str | None = None) -> None:
    """--tta (mirror images) and --scales (reading scales): test-time augmentation; --mpp-search
    (a slide's pixel size searched, :mod:`biopsy.mppsearch`). With ``config_key``, all default to
    None, standing for ``config_key``'s ``tta``, ``scales`` and ``mpp_search`` (--tta is then
    --tta / --no-tta)."""
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction if config_key else
                        "store_true",
                        help="test-time augmentation: average each tile's probabilities with "
                             "those of its three mirror images (4x the model time, slightly more "
                             "accurate)." + (f" Default: as {config_key}.tta says." if config_key
                                             else ""))
    parser.add_argument("--scales", type=number_between(*SCALE_RANGE), nargs="+", metavar="S",
                        action=ReadingScales, default=None if config_key else [1.0],
                        help="multi-scale test-time augmentation: average each tile's "
                             "probabilities over views of it read at S times the model's mpp and "
                             "centred on it, 0.25 <= S <= 4, one at least >= 1 (S > 1: a wider view, seen "
                             "smaller; S < 1: a closer look at the centre); e.g. --scales 1 1.41 "
                             "(2x the model time; put it after the positional arguments)." +
                             (f" Default: as {config_key}.scales says." if config_key
                              else " Default: 1."))
    parser.add_argument("--mpp-search", type=number_between(*SCALE_RANGE), nargs="+", metavar="F",
                        help="for images whose pixel size is uncertain (photomicrographs): read "
                             "each slide as if its µm/px were F times the known or given one, "
                             "for each F, and segment it at the F under which the model is most "
                             "confident; e.g. --mpp-search 0.71 1 1.41 (per F, tissue detection "
                             "and one model pass over up to 64 tissue tiles; put it after the "
                             "positional arguments). Areas are then in the chosen pixel size. "
                             "--mpp-search 1: no search." +
                             (f" Default: as {config_key}.mpp_search says." if config_key
                              else ""))


def output_folder(text: str) -> Path:
    """An argparse type: a folder to write into, not an empty path (an unset shell variable
    would write into the current folder) nor an existing file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give the folder to write into")
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder to write into")
    return Path(text)


SYNTHETIC_TRUTH_FILES = ("truth.json", "truth.geojson")  # biopsy synth writes them beside its slide


def results_folder(text: str) -> Path:
    """An argparse type: an :func:`output_folder` that is not a synthetic slide's folder
    (``biopsy synth``), whose truth labels.ome.tif segment and score would replace."""
    return _not_synthetic(output_folder(text), ".")


def segment_folder(text: str) -> Path:
    """An argparse type: a :func:`results_folder` that holds no scored slide (summary.json),
    whose label map, outlines and overview segment would replace under its scores."""
    return _not_the_other(results_folder(text), "summary.json", "a scored slide")


def score_folder(text: str) -> Path:
    """An argparse type: a :func:`results_folder` that holds no segmentation (segment.json),
    whose label map, outlines and overview score would replace under its record."""
    return _not_the_other(results_folder(text), "segment.json", "a segmentation")


def _not_the_other(path: Path, marker: str, what: str) -> Path:
    if (path / marker).is_file():
        raise argparse.ArgumentTypeError(f"{path} holds {what} ({marker}); this command would "
                                         "replace some of its files and leave them mixed; give "
                                         "another folder")
    return path


def comparison_folder(text: str) -> Path:
    """An argparse type: an :func:`output_folder` whose baseline/ and follow_up/, where compare
    scores the two slides, are not a synthetic pair's slide folders."""
    return _not_synthetic(output_folder(text), "baseline", "follow_up")


def _not_synthetic(path: Path, *folders: str) -> Path:
    for folder in folders:
        truth = next((path / folder / name for name in SYNTHETIC_TRUTH_FILES
                      if (path / folder / name).is_file()), None)
        if truth:
            raise argparse.ArgumentTypeError(
                f"{path} would replace the truth labels.ome.tif of the synthetic slide in "
                f"{(path / folder).resolve()} ({truth.name} there); give another folder")
    return path


def output_file(text: str) -> Path:
    """An argparse type: a file to write, not an empty path nor an existing folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give the file to write")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    return Path(text)


def slide_mpp(text: str) -> float:
    """An argparse type: a slide's pixel size in µm/px (:data:`biopsy.slide.SLIDE_MPP_RANGE_UM`)."""
    return number_between(*SLIDE_MPP_RANGE_UM)(text)


def count(least: int, most: int | None = None):
    """An argparse type: a whole number of at least ``least`` (and at most ``most``): tiles per
    batch, workers, a seed."""
    def whole_number(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            number = least - 1
        if number < least or (most is not None and number > most):
            within = f">= {least}" if most is None else f"from {least} to {most}"
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {within}")
        return number
    return whole_number


def number_between(least: float, most: float = math.inf):
    """An argparse type: a finite number from ``least`` to ``most`` (a resolution for tissue
    detection, an area)."""
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (least <= value <= most and math.isfinite(value)):
            within = f">= {least:g}" if most == math.inf else f"from {least:g} to {most:g}"
            raise argparse.ArgumentTypeError(f"{text!r} is not a number {within}")
        return value
    return number


class ReadingScales(argparse.Action):
    """--scales: refused unless one scale at least is >= 1 (a view that covers the whole tile)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if max(values) < 1:
            parser.error(f"{option_string}: one scale at least must be >= 1, got {values}")
        setattr(namespace, self.dest, values)


def add_int8_argument(parser) -> None:
    parser.add_argument("--int8", action="store_true",
                        help="run an int8 model on the CPU, from the checkpoint's calibration "
                             "(biopsy calibrate): ~2.5x faster than float32 on CPUs with VNNI, "
                             "~1.3x on AVX2-only ones; the map agreed with float32 on 99.5-99.8 "
                             "%% of tissue pixels of held-out synthetic slides")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", metavar="DEVICE",
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, "
                             "else cpu)")


def add_stain_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stain-normalisation", action=argparse.BooleanOptionalAction, default=True,
                        help="scale the slide's stain amounts to the model's reference when the model "
                             "has one (biopsy.stainnorm; default: on)")


def add_scoring_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """Options of scoring slides (model options) or label maps (--from-labels), and the config."""
    add_model_arguments(parser)
    parser.add_argument("--from-labels", action="store_true",
                        help=f"{what} label maps (.ome.tif written by biopsy) to score, instead "
                             "of slides to segment")
    parser.add_argument("--config", type=Path, metavar="YAML",
                        help="scoring thresholds merged over configs/score/nih-2018.yaml")
    add_stain_argument(parser)


def make_scorer(args: argparse.Namespace, device: str | None) -> Scorer:
    """The score function the options ask for; a model is loaded once, onto ``device``."""
    from biopsy import pipeline
    from biopsy.scoring import load_score_config

    config = load_score_config(args.config)
    if args.from_labels:
        return pipeline.LabelMapScorer(config)
    options, model, info, model_path = load_model_from_args(args, device)
    return pipeline.SlideScorer(model, info, model_path, config, options)


def load_model_from_args(args: argparse.Namespace, device: str | None):
    """Inference options, model, info and checkpoint path that the model options ask for (segment,
    score, compare, batch); without a stain reference under --no-stain-normalisation."""
    from biopsy import pipeline

    options = pipeline.inference_options(device, args.batch_size, args.workers, args.int8, args.tta,
                                         tuple(args.scales), args.mpp_search)
    model, info, model_path = pipeline.load_model(args.model, options.device, args.int8)
    if not args.stain_normalisation:
        info.stain_reference = None
    return options, model, info, model_path


def run(args: argparse.Namespace) -> int:
    from biopsy.batch import distributed_context, leave_process_group, run_batch
    from biopsy.manifest import read_manifest

    read_manifest(args.manifest)  # a malformed manifest is refused before a model is loaded
    context = distributed_context()
    interrupted = False
    try:
        failed = run_batch(args.manifest, args.out, make_scorer(args, context.device), context,
                           progress=not args.no_progress)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: leaving the group would wait for the others
        interrupted = True
        raise
    finally:
        if not interrupted:
            leave_process_group()
    if context.rank == 0:
        cohort = json.loads((args.out / "cohort.json").read_text(encoding="utf-8"))
        pairs = [c for c in cohort["comparisons"] if c["follow_up"] is not None]
        compared = sum(c["status"] == "compared" for c in pairs)
        different = sum(bool(c.get("processing_differences")) for c in pairs)
        unpaired = len(cohort["comparisons"]) - len(pairs)
        print(f"{args.out}: {compared} of {len(pairs)} comparisons"
              f"{f' ({different} of them processed differently)' if different else ''}, "
              f"{failed} slide(s) failed (status.csv)"
              f"{f', {unpaired} slide(s) with no other timepoint' if unpaired else ''}; cohort.html")
    return 1 if failed else 0
