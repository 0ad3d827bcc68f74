"""``biopsy score``: a slide (segmented with a model) or a class map into a scored-slide folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from biopsy.cli.batch import (add_device_argument, add_model_arguments, add_stain_argument,
                              load_model_from_args, score_folder, slide_mpp)
from biopsy.errors import BiopsyError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "score", help="glomeruli, lesion calls and NIH activity/chronicity scores of a slide",
        description="Segment SLIDE with a model (the bundled one by default), or take the class "
                    "map given with --from-labels, and score it: glomerulus instances and "
                    "measures, lesion calls, NIH activity and chronicity indices. Writes "
                    "summary.json (last), glomeruli.csv, cortex_tiles.csv, objects.geojson, "
                    "labels.ome.tif and overview.png to --out.")
    parser.add_argument("slide", type=Path, nargs="?", metavar="SLIDE",
                        help="slide file to segment and score")
    parser.add_argument("--from-labels", type=Path, metavar="LABELS.ome.tif",
                        help="score this label map instead of a slide (a synthetic truth map, "
                             "or a map from another tool converted with biopsy.labelmap)")
    parser.add_argument("--out", type=score_folder, required=True, metavar="DIR",
                        help="output folder (summary.json is written last)")
    parser.add_argument("--mpp", type=slide_mpp, metavar="X",
                        help="slide pixel size in µm/px, overriding (or supplying) the file's; "
                             "with --from-labels, that of the slide the map covers, so that "
                             "objects.geojson and the positions are in its pixels (default: "
                             "the one the map records, where biopsy made it from a slide)")
    add_model_arguments(parser)
    add_device_argument(parser)
    parser.add_argument("--config", type=Path, metavar="YAML",
                        help="scoring thresholds merged over configs/score/nih-2018.yaml")
    add_stain_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from biopsy.scoring import load_score_config

    if (args.slide is None) == (args.from_labels is None):
        raise BiopsyError("give either SLIDE or --from-labels LABELS.ome.tif")
    config = load_score_config(args.config)
    args.out.mkdir(parents=True, exist_ok=True)  # a --out that cannot be is found before segmenting
    if args.from_labels is not None:
        from biopsy.pipeline import score_label_map_file

        scores = score_label_map_file(args.from_labels, args.out, config, level0_mpp=args.mpp)
    else:
        from biopsy import pipeline

        options, model, info, model_path = load_model_from_args(args, args.device)
        scores = pipeline.score_slide_file(args.slide, args.out, model, info, model_path, config,
                                           mpp=args.mpp, options=options)
    print(json.dumps(headline(scores)))
    return 0


def headline(scores: dict) -> dict:
    """The numbers a reader looks for first, on one line."""
    def index(name: str) -> str:
        i = scores[name]
        if i["score"] is None:
            return "not assessed"
        return f"{i['score']}/{i['max']}" + (" (partial)" if i["partial"] else "")

    return {"glomeruli": scores["glomeruli"]["count"], "adequacy": scores["glomeruli"]["adequacy"],
            "chronicity_index": index("chronicity_index"),
            "activity_index": index("activity_index")}
