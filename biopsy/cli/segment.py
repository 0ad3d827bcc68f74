"""``biopsy segment``: a slide through a model into a class map and its outputs."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from biopsy.cli.batch import (WORKERS_DEFAULT, add_device_argument, add_model_arguments,
                              add_stain_argument, load_model_from_args, segment_folder, slide_mpp)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="segment a whole slide with a model checkpoint",
        description="Segment the tissue of a whole slide with a model checkpoint (default: the "
                    "bundled model; Gaussian-blended overlapping tiles). Writes labels.ome.tif, "
                    "objects.geojson, overview.png, optionally probabilities.ome.tif, and "
                    "segment.json last to --out.")
    parser.add_argument("slide", type=Path, metavar="SLIDE", help="slide file")
    parser.add_argument("--out", type=segment_folder, required=True, metavar="DIR",
                        help="output folder (segment.json is written last)")
    parser.add_argument("--mpp", type=slide_mpp, metavar="X",
                        help="slide pixel size in µm/px, overriding (or supplying) the file's")
    precision = parser.add_mutually_exclusive_group()
    add_model_arguments(parser, precision, workers_help=(
        "worker processes per slide reading its tiles, then tracing the outlines of "
        f"objects.geojson (0: the main process does it; {WORKERS_DEFAULT})"))
    precision.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                           help="bfloat16 autocast (default: on CUDA only; on CPUs with bfloat16 "
                                "instructions, AVX-512 BF16 or AMX, --bf16 is ~2x faster, a few "
                                "border pixels may change; elsewhere it is emulated, ~10x slower)")
    add_device_argument(parser)
    parser.add_argument("--output-mpp", type=slide_mpp, metavar="X",
                        help="µm/px of the class map (default: the model's input mpp)")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write probabilities.ome.tif (one channel per class, 255 = 1; "
                             "outside the tissue 1 for the background class, as the labels)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first")
    add_stain_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from biopsy.infer import check_slide_for_model, segment_slide
    from biopsy.pipeline import search_mpp, warn_of_the_model
    from biopsy.segment_outputs import (PROBABILITIES_FILE, begin_segmentation,
                                         write_segmentation)
    from biopsy.slide import open_slide, require_square_pixels

    slide = open_slide(args.slide, mpp=args.mpp)
    options, model, info, model_path = load_model_from_args(args, args.device)
    args.device, args.workers = options.device, options.workers
    check_slide_for_model(slide, info)  # before an earlier run's outputs are touched
    require_square_pixels(slide, "objects.geojson (outlines in level-0 pixels)")
    caution = warn_of_the_model(info, args.slide)
    labels_path = begin_segmentation(args.out)
    probabilities_path = args.out / PROBABILITIES_FILE if args.probabilities else None
    started = time.perf_counter()
    mpp_given = slide.mpp_given  # before the search sets another
    searched = search_mpp(slide, model, info, options, args.bf16)
    class_map = segment_slide(slide, model, info, batch_size=args.batch_size,
                              workers=args.workers, device=args.device,
                              output_mpp=args.output_mpp,
                              probabilities_path=probabilities_path, bf16=args.bf16,
                              compile=args.compile, tta=args.tta, scales=tuple(args.scales),
                              progress=args.verbose, labels_path=labels_path)
    seconds = time.perf_counter() - started
    provenance = {
        "slide": {"path": str(args.slide), "sha256": slide.sha256, "mpp": list(slide.mpp),
                  "mpp_given": mpp_given,
                  "file_mpp": list(slide.file_mpp) if slide.file_mpp else None},
        "model": {"path": str(model_path), "sha256": info.sha256, "input_mpp": info.input_mpp,
                  "patch_size_px": info.patch_size_px,
                  "glomerulus_threshold": info.glomerulus_threshold,
                  "caution": caution},
        "options": {"batch_size": args.batch_size, "workers": args.workers,
                    "device": str(args.device),
                    "bf16": args.bf16 if args.bf16 is not None else "cuda" in str(args.device),
                    "int8": args.int8, "tta": args.tta, "scales": args.scales, **searched,
                    "output_mpp": class_map.mpp,
                    "overlap": 0.5,
                    "stain_reference": info.stain_reference,
                    "stain_factors": class_map.stain_factors},
        "seconds": round(seconds, 3),
    }
    write_segmentation(args.out, class_map, slide, provenance, workers=args.workers,
                       labels_written=True)
    print(json.dumps({"out": str(args.out), "tiles": class_map.tile_count,
                      "shape_px": list(class_map.labels.shape), "mpp": class_map.mpp,
                      "seconds": round(seconds, 1)}))
    return 0
