"""``biopsy calibrate``: store an int8 calibration in a checkpoint, for ``--int8`` on the CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from biopsy.cli.batch import count, output_file, slide_mpp


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="calibrate a model for int8 inference on the CPU (--int8)",
        description="Run tissue tiles of SLIDE... through the model, record the range of every "
                    "layer's activations, and write the checkpoint with that calibration to "
                    "--out, so that segment, score and batch can run it in int8 (--int8). Give "
                    "slides like those the model will segment (their stains and scanners).")
    parser.add_argument("slides", type=Path, nargs="+", metavar="SLIDE", help="slide files")
    parser.add_argument("--model", type=Path, metavar="CKPT",
                        help="model checkpoint (default: the bundled model)")
    parser.add_argument("--out", type=output_file, required=True, metavar="CKPT",
                        help="checkpoint to write (may be --model itself)")
    parser.add_argument("--mpp", type=slide_mpp, metavar="X",
                        help="pixel size in µm/px of every SLIDE, overriding their files' "
                             "(needed for images that do not record one)")
    parser.add_argument("--tiles-per-slide", type=count(1), default=32, metavar="N",
                        help="tissue tiles read from each slide, spread over it (default "
                             "%(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from biopsy.model import load_checkpoint, save_int8_calibration
    from biopsy.pipeline import checkpoint_path
    from biopsy.quantize import calibrate
    from biopsy.slide import open_slide

    model_path = checkpoint_path(args.model)
    model, info = load_checkpoint(model_path)
    slides = [open_slide(path, mpp=args.mpp) for path in args.slides]
    calibration, provenance = calibrate(model, info, slides, args.tiles_per_slide)
    save_int8_calibration(model_path, args.out, calibration, provenance)
    print(json.dumps({"out": str(args.out), **provenance}))
    return 0
