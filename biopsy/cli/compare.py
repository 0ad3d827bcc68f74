"""``biopsy compare``: one patient's baseline against follow-up, per metric with a 95% interval."""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from biopsy.cli.batch import (add_device_argument, add_scoring_arguments, count, make_scorer,
                              comparison_folder, slide_mpp)
from biopsy.errors import BiopsyError

if TYPE_CHECKING:
    from biopsy.batch import Scorer
    from biopsy.scorefolder import ScoredSlide

BOOTSTRAP_REPLICATES = 2000  # biopsy.compare's defaults, repeated so that --help needs no numpy
BOOTSTRAP_SEED = 0
LEAST_REPLICATES = 1000  # fewer leave a 95% interval's ends to a handful of replicates


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare a baseline biopsy with a follow-up: per metric, difference, "
                        "95%% interval and verdict",
        description="Compare two biopsies of one patient. PRE and POST are scored-slide folders "
                    "(from biopsy score or biopsy batch), or slides (label maps with "
                    "--from-labels), which are scored into OUT/baseline and OUT/follow_up first. "
                    "Writes comparison.json, comparison.csv and report.html to --out.")
    parser.add_argument("baseline", type=Path, metavar="PRE")
    parser.add_argument("follow_up", type=Path, metavar="POST")
    parser.add_argument("--out", type=comparison_folder, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--patient", default="", metavar="ID", help="patient id for the report")
    parser.add_argument("--mpp", type=slide_mpp, metavar="X",
                        help="slide pixel size in µm/px, overriding (or standing in for) the files'")
    add_scoring_arguments(parser, "PRE and POST files are")
    add_device_argument(parser)
    parser.add_argument("--replicates", type=count(LEAST_REPLICATES), default=BOOTSTRAP_REPLICATES,
                        help="bootstrap replicates, and random splits of the burdens' permutation "
                             f"test (at least {LEAST_REPLICATES}; default %(default)s)")
    parser.add_argument("--seed", type=count(0), default=BOOTSTRAP_SEED,
                        help="seed of the bootstrap and the splits (default %(default)s)")
    parser.set_defaults(func=run)


def scored_input(path: Path, folder: Path, args: argparse.Namespace,
                 scorer: Callable[[], Scorer]) -> ScoredSlide:
    """The slide (label map) ``path`` scored into ``folder``."""
    from biopsy.manifest import ManifestEntry
    from biopsy.scorefolder import read_score_folder

    entry = ManifestEntry(row=0, patient_id=args.patient, timepoint=folder.name,
                          slide=path.resolve(), mpp=args.mpp)
    scorer()(entry, folder)
    return read_score_folder(folder)


def remove_earlier_outputs(out: Path, targets: list[Path]) -> None:
    """An earlier comparison in ``out``, and the folders about to be scored again: a run that
    fails halfway must not leave a new baseline beside an old follow-up and report."""
    for name in ("comparison.json", "comparison.csv", "report.html"):
        (out / name).unlink(missing_ok=True)
    for target in targets:
        shutil.rmtree(target, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from biopsy import compare
    from biopsy.report import model_cautions
    from biopsy.scorefolder import read_score_folder
    from biopsy.slide import open_slide

    if args.replicates < 100:
        raise BiopsyError(f"--replicates {args.replicates}: give at least 100 (default 2000)")
    sides = ((args.baseline, args.out / "baseline"), (args.follow_up, args.out / "follow_up"))
    inputs = {}
    for path, _ in sides:  # folders read, files found, before any scoring
        if path.is_dir():
            inputs[path] = read_score_folder(path)
        elif not path.is_file():
            raise BiopsyError(f"{path}: not found; give a scored-slide folder or a slide file")
    files = [(path, target) for path, target in sides if path not in inputs]
    for file, target in files:
        for folder in inputs:
            if folder.resolve() == target.resolve() or target.resolve() in folder.resolve().parents:
                raise BiopsyError(f"{folder}: scoring {file} into {target} would overwrite it; "
                                  "give another --out")
        if not args.from_labels:
            with open_slide(file, mpp=args.mpp):  # unreadable: refused before any scoring
                pass
    scorer = functools.cache(lambda: make_scorer(args, args.device))  # loads a model once, if any
    if files:
        scorer()  # a bad --config or --model is refused before an earlier comparison is removed
    remove_earlier_outputs(args.out, [target for _, target in files])
    baseline, follow_up = (inputs.get(path) or scored_input(path, target, args, scorer)
                           for path, target in sides)
    comparison = compare.write_comparison(args.out, baseline, follow_up, args.patient,
                                          args.replicates, args.seed)
    scores = [side.summary["scores"] for side in (baseline, follow_up)]
    print(glomeruli_line(comparison))
    for family in ("activity", "chronicity"):
        print(f"{family}:")
        for m in (m for m in comparison["metrics"] if m["family"] == family):
            print("  " + metric_line(m, *scores))
    print(holm_line(comparison))
    if comparison["processing_differences"]:
        print("warning: the two biopsies were processed differently; a difference may owe to "
              "that rather than to the tissue:", file=sys.stderr)
        for difference in comparison["processing_differences"]:
            print(f"  {difference}", file=sys.stderr)
    for side, caution in model_cautions(comparison).items():
        print(f"warning: {side.replace('_', '-')}: {caution}", file=sys.stderr)
    print(f"report: {args.out / 'report.html'}")
    return 0


def glomeruli_line(comparison: dict) -> str:
    """The glomeruli found at each biopsy, and which is a limited sample."""
    sides = ("baseline", "follow_up")
    limited = [side.replace("_", "-") for side in sides
               if comparison[side]["adequacy"] != "adequate"]
    return (f"Glomeruli: {comparison['baseline']['glomeruli']} -> "
            f"{comparison['follow_up']['glomeruli']}"
            + (f" (limited sample: {' and '.join(limited)}; read the verdicts with care)"
               if limited else ""))


def holm_line(comparison: dict) -> str:
    """The verdicts that hold when every compared metric is judged at once (Holm)."""
    held = {kind: [m["label"] for m in comparison["metrics"] if m["verdict_holm"] == kind]
            for kind in ("improved", "worsened")}
    compared = sum(m["p_value"] is not None for m in comparison["metrics"])
    verdicts = "; ".join(f"{kind}: {', '.join(labels)}" for kind, labels in held.items() if labels)
    return (f"Judged together (Holm, 95% for all {compared} metrics at once): "
            + (verdicts or "no verdict holds"))


def metric_line(m: dict, baseline_scores: dict, follow_up_scores: dict) -> str:
    """:func:`format_metric`, with "(partial)" after an index that either biopsy sums over only
    some of its components (``*_scores``: the two ``summary.json`` scores)."""
    partial = (m["name"] in baseline_scores and m["difference"] is not None
               and (baseline_scores[m["name"]]["partial"] or follow_up_scores[m["name"]]["partial"]))
    return format_metric(m) + (" (partial)" if partial else "")


def format_metric(m: dict) -> str:
    """One line: label, baseline -> follow-up, difference [interval], verdict."""
    if m["difference"] is None:
        return f"{m['label']}: not assessed"
    return (f"{m['label']}: {m['baseline']:.1f} -> {m['follow_up']:.1f} {m['unit']}, "
            f"{m['difference']:+.1f} [{m['ci_low']:+.1f}, {m['ci_high']:+.1f}] {m['verdict']}")
