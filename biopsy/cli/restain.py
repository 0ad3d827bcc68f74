"""``biopsy restain``: a copy of a slide with its stain shifted and turned, to check score stability."""

from __future__ import annotations

import argparse
from pathlib import Path

from biopsy.cli.batch import count, number_between, output_file, slide_mpp


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "restain", help="write a re-stained, rotated copy of a slide (score stability checks)",
        description="Write OUT, a pyramidal copy of the brightfield SLIDE turned counter-clockwise "
                    "by --turns quarter turns, with each stain's amount scaled (HED colour "
                    "deconvolution) and the hue turned. Score SLIDE and OUT with `biopsy score`: "
                    "the scores should agree. OUT's format follows its suffix: .svs, .tif or .ome.tif.")
    parser.add_argument("slide", type=Path, metavar="SLIDE", help="brightfield slide to copy")
    parser.add_argument("out", type=output_file, metavar="OUT", help="copy to write (.svs, .tif, .ome.tif)")
    parser.add_argument("--turns", type=int, default=0, metavar="K",
                        help="counter-clockwise quarter turns (default 0; -1 turns clockwise)")
    parser.add_argument("--haematoxylin", type=number_between(0), default=1.0, metavar="F",
                        help="haematoxylin amount factor (default 1; 0.8 = 20%% fainter)")
    parser.add_argument("--eosin", type=number_between(0), default=1.0, metavar="F",
                        help="eosin amount factor, also PAS magenta (default 1)")
    parser.add_argument("--dab", type=number_between(0), default=1.0, metavar="F",
                        help="DAB (third HED axis) amount factor (default 1)")
    parser.add_argument("--hue", type=number_between(-360, 360), default=0.0, metavar="DEG",
                        help="HSV hue turn in degrees, -360 to 360 (default 0)")
    parser.add_argument("--mpp", type=slide_mpp, metavar="X",
                        help="slide pixel size in µm/px, overriding (or supplying) the file's")
    parser.add_argument("--quality", type=count(1, 100), default=90, metavar="Q",
                        help="JPEG quality of the copy, 1 to 100 (default 90)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from biopsy.restain import StainShift, restain_slide

    shift = StainShift(args.haematoxylin, args.eosin, args.dab, args.hue)
    restain_slide(args.slide, args.out, shift, quarter_turns=args.turns, mpp=args.mpp,
                  quality=args.quality)
    print(args.out)
    return 0
