"""``python -m training {fit,eval,synth} CONFIG ...`` (``fit`` also under ``torchrun``), ``export``.

Errors the user can cause are printed on one line and exit with status 2.
"""

import argparse
import csv
import io
import json
import sys

from biopsy.cli.batch import add_test_time_arguments, count
from biopsy.errors import USER_ERRORS, user_message

OBJECT_COLUMNS = ["image", "case", "stain", "mpp_factor", "side", "id", "area_um2",
                  "globally_sclerotic", "matched", "best_iou", "partner_area_um2"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="train a model as CONFIG says")
    fit.add_argument("config")
    fit.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/state.pt")
    fit.add_argument("--stop-at", type=count(1), metavar="STEP",
                     help="stop after STEP (resumable; the schedule still spans train.steps)")
    fit.add_argument("--folds", type=int, metavar="N",
                     help="k-fold cross-validation by case: train fold --fold of N into "
                          "OUTPUT_DIR/fold-K, instead of the config's split")
    fit.add_argument("--fold", type=int, metavar="K", help="with --folds: 0 .. N-1")
    evaluate = commands.add_parser("eval", help="per-class Dice and detection F1 of a checkpoint")
    evaluate.add_argument("config")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint")
    source.add_argument("--folds", type=int, metavar="N",
                        help="cross-validation: every case judged by the last checkpoint of the "
                             "fold that held it out (fit --folds N), counts pooled over folds")
    evaluate.add_argument("--data", metavar="ROOT",
                          help="evaluate every annotated slide under ROOT (same layout as data.root) "
                               "instead of the config's validation cases")
    evaluate.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    evaluate.add_argument("--objects", metavar="CSV",
                          help="also write one row per true and per predicted glomerulus: image, "
                               "area, matched or not, best IoU and the area of that counterpart")
    add_test_time_arguments(evaluate, config_key="the config's evaluate")
    add_glomerulus_threshold_argument(evaluate, "instead of the checkpoint's (a sweep)")
    synth = commands.add_parser("synth", help="generate the synthetic training set into data.root")
    synth.add_argument("config")
    synth.add_argument("--root", help="write here instead of data.root (e.g. a held-out test set)")
    synth.add_argument("--first-seed", type=count(0),
                       help="seed of the first slide (default: synth.first_seed)")
    synth.add_argument("--slides", type=count(1), help="how many slides (default: synth.slides)")
    export = commands.add_parser("export", help="copy a checkpoint, e.g. as float16 for bundling")
    export.add_argument("checkpoint")
    export.add_argument("out")
    export.add_argument("--half", action="store_true", help="store convolution weights as float16")
    add_glomerulus_threshold_argument(export, "stored in the copy (chosen with eval)")
    args = parser.parse_args(argv)
    if args.command == "eval" and args.folds is not None and args.data is not None:
        parser.error("--data and --folds exclude each other")
    if args.command == "fit" and (args.folds is None) != (args.fold is None):
        parser.error("--folds and --fold go together")
    try:
        return _run(args)
    except USER_ERRORS as error:
        if (message := user_message(error)) is None:
            raise
        print(f"training {args.command}: error: {message}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "export":
        from biopsy.model import load_checkpoint, save_checkpoint, with_glomerulus_threshold

        model, info = load_checkpoint(args.checkpoint)
        info = with_glomerulus_threshold(info, args.glomerulus_threshold, args.checkpoint)
        save_checkpoint(args.out, model, info, half_precision=args.half)
        return 0
    from training.config import load_config

    config = load_config(args.config)
    if args.command == "fit":
        from training.config import with_fold
        from training.loop import fit

        if args.folds is not None:
            config = with_fold(config, args.fold, args.folds)
        metrics = fit(config, resume=args.resume, stop_at=args.stop_at)
        if metrics is not None:
            print(format_metrics(metrics))
    elif args.command == "eval":
        from biopsy.atomic import write_text_atomic
        from training.evaluate import evaluate_checkpoint, evaluate_folds

        config = with_test_time_options(config, args.tta, args.scales, args.mpp_search)
        objects: list[dict] = []
        if args.folds is not None:
            metrics = evaluate_folds(config, args.folds, objects, args.glomerulus_threshold)
        else:
            metrics = evaluate_checkpoint(config, args.checkpoint, args.data, objects,
                                          args.glomerulus_threshold)
        print(format_metrics(metrics))
        if args.json:
            write_text_atomic(args.json, json.dumps(metrics, indent=2))
        if args.objects:
            write_text_atomic(args.objects, objects_csv(objects))
    else:
        from training.synthetic import generate_training_set

        folders = generate_training_set(config, args.root, args.first_seed, args.slides)
        print(f"{len(folders)} synthetic slides in {folders[0].parent}")
    return 0


def add_glomerulus_threshold_argument(parser, what: str) -> None:
    """--glomerulus-threshold T: decide glomerulus first (biopsy.decision), ``what`` says how."""
    parser.add_argument("--glomerulus-threshold", type=probability, metavar="T",
                        help="a pixel is glomerular when its glomerular classes hold more than T "
                             f"of its probability, 0 < T < 1; {what}")


def probability(text: str) -> float:
    """A number in (0, 1) from the command line."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def with_test_time_options(config, tta: bool | None, scales: list[float] | None,
                           mpp_search: list[float] | None):
    """``config`` with its evaluation's mirror images (``tta``), reading scales and pixel-size
    search factors replaced by those given (None: the config's own)."""
    from dataclasses import replace

    evaluate = replace(config.evaluate, tta=config.evaluate.tta if tta is None else tta,
                       scales=scales or config.evaluate.scales,
                       mpp_search=mpp_search or config.evaluate.mpp_search)
    return replace(config, evaluate=evaluate)


def objects_csv(rows: list[dict]) -> str:
    """The rows of :func:`training.evaluate.object_rows` (with image, case, stain) as CSV text."""
    text = io.StringIO()
    writer = csv.DictWriter(text, OBJECT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def format_metrics(metrics: dict[str, dict]) -> str:
    """One row per metric, one column per stain (``all`` first); ``-`` where undefined."""
    stains = list(metrics)
    width = max(len(n) for n in metrics["all"]) + 2
    lines = ["metric".ljust(width) + "".join(s.rjust(10) for s in stains)]
    for name in metrics["all"]:
        cells = [metrics[s][name] for s in stains]
        lines.append(name.ljust(width) + "".join(
            ("-" if c is None else f"{c:.3f}" if isinstance(c, float) else str(c)).rjust(10) for c in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
