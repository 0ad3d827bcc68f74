"""``biopsy info SLIDE``: what a slide file holds, after proving that it decodes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from biopsy.cli.batch import slide_mpp

if TYPE_CHECKING:
    from biopsy.slide import Slide


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "info", help="show a slide's size, pixel size, levels, channels and hash",
        description="Open a slide, decode its coarsest level (so a damaged file is reported now) "
                    "and print its metadata.")
    parser.add_argument("slide", type=Path, help="slide file (SVS, NDPI, MRXS, TIFF, QPTIFF, JPEG, ...)")
    parser.add_argument("--mpp", type=slide_mpp, help="pixel size in µm/px, overriding the file's")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def slide_info(slide: Slide) -> dict:
    """The slide's metadata as a JSON-ready dict (``mpp`` is null when unknown; ``file_mpp`` is
    the file's own, null when it records none)."""
    return {
        "path": str(slide.path),
        "vendor": slide.vendor,
        "dimensions": list(slide.dimensions),
        "mpp": list(slide.mpp) if slide.mpp else None,
        "file_mpp": list(slide.file_mpp) if slide.file_mpp else None,
        "objective_power": slide.objective_power,
        "levels": [{"dimensions": list(level.dimensions), "downsample": list(level.downsample)}
                   for level in slide.levels],
        "channels": slide.channel_names,
        "fluorescence": slide.is_fluorescence,
        "dtype": str(slide.dtype),
        "size_bytes": slide.path.stat().st_size,
        "sha256": slide.sha256,
    }


def run(args: argparse.Namespace) -> int:
    from biopsy.slide import open_slide

    with open_slide(args.slide, mpp=args.mpp, mpp_required=False) as slide:
        slide.verify()
        info = slide_info(slide)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width, height = info["dimensions"]
    mpp = "{:.4g} x {:.4g} µm/px".format(*info["mpp"]) if info["mpp"] else "unknown (give --mpp)"
    if info["mpp"] is None and info["file_mpp"]:
        mpp += " (the file says {:.4g} x {:.4g} µm/px, no slide's)".format(*info["file_mpp"])
    print(f"{info['path']}")
    print(f"  format      {info['vendor']}")
    print(f"  size        {width} x {height} px")
    print(f"  pixel size  {mpp}")
    print(f"  objective   {info['objective_power'] or 'unknown'}")
    print(f"  channels    {', '.join(info['channels'])} ({info['dtype']})")
    for index, level in enumerate(info["levels"]):
        level_width, level_height = level["dimensions"]
        print(f"  level {index:<5} {level_width} x {level_height} px, "
              f"downsample {level['downsample'][0]:.4g}")
    print(f"  sha256      {info['sha256']}")
    return 0
