"""``biopsy tissue SLIDE --out DIR``: tissue mask, overlay and tissue areas of a slide."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image

from biopsy.atomic import atomic_path, write_text_atomic
from biopsy.cli.batch import number_between, output_folder, slide_mpp

if TYPE_CHECKING:
    from biopsy.slide import Slide
    from biopsy.tissue import TissueMask

OVERLAY_COLOUR = np.array([0, 200, 0], np.float32)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tissue", help="detect tissue: mask PNG, overlay PNG and tissue.json (areas in mm²)",
        description="Detect tissue at low resolution and write tissue_mask.png, "
                    "tissue_overlay.png and tissue.json (written last) into --out.")
    parser.add_argument("slide", type=Path, help="slide file")
    parser.add_argument("--out", type=output_folder, required=True, help="output folder")
    parser.add_argument("--mpp", type=slide_mpp, help="pixel size in µm/px, overriding the file's")
    parser.add_argument("--tissue-mpp", type=number_between(1, 64), default=8.0,
                        help="resolution of the mask in µm/px, 1 to 64 (default 8)")
    parser.add_argument("--min-area-um2", type=number_between(0),
                        help="smallest tissue piece kept, µm² (default 5000: a small glomerulus "
                             "alone on the glass is kept)")
    parser.set_defaults(func=run)


def display_rgb(slide: Slide, image: np.ndarray) -> np.ndarray:
    """An RGB uint8 view of a thumbnail; fluorescence channels stretched to their 99.5th percentile."""
    if not slide.is_fluorescence:
        return image
    channels = image[..., :3].astype(np.float32)
    top = np.maximum(np.percentile(channels, 99.5, axis=(0, 1)), 1e-6)
    rgb = np.clip(channels / top * 255, 0, 255).astype(np.uint8)
    if rgb.shape[-1] < 3:
        rgb = np.repeat(rgb[..., :1], 3, axis=-1)
    return rgb


def overlay(image: np.ndarray, tissue: TissueMask) -> np.ndarray:
    """The thumbnail with tissue tinted green."""
    tinted = image.astype(np.float32)
    tinted[tissue.mask] = 0.6 * tinted[tissue.mask] + 0.4 * OVERLAY_COLOUR
    return tinted.astype(np.uint8)


def run(args: argparse.Namespace) -> int:
    from biopsy.slide import open_slide
    from biopsy.tissue import MIN_PIECE_AREA_UM2, detect_tissue

    min_area_um2 = MIN_PIECE_AREA_UM2 if args.min_area_um2 is None else args.min_area_um2
    with open_slide(args.slide, mpp=args.mpp) as slide:
        tissue = detect_tissue(slide, mpp=args.tissue_mpp, min_area_um2=min_area_um2)
        image = display_rgb(slide, slide.thumbnail(args.tissue_mpp))
        summary = {
            "slide": str(slide.path),
            "slide_sha256": slide.sha256,
            "slide_mpp": list(slide.mpp),
            "mask_mpp": tissue.mpp,
            "mask_png": "tissue_mask.png",
            "tissue_area_mm2": tissue.area_mm2,
            "tissue_fraction": tissue.fraction,
            "min_area_um2": min_area_um2,
            "pieces": [{"label": piece.label, "area_mm2": piece.area_mm2,
                        "bbox_level0": list(piece.bbox_level0)} for piece in tissue.pieces],
        }
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "tissue_mask.png") as path:
        PIL.Image.fromarray(tissue.mask.astype(np.uint8) * 255).save(path)
    with atomic_path(args.out / "tissue_overlay.png") as path:
        PIL.Image.fromarray(overlay(image, tissue)).save(path)
    write_text_atomic(args.out / "tissue.json", json.dumps(summary, indent=2))
    print(f"{args.slide}: {tissue.area_mm2:.3f} mm² of tissue in {len(tissue.pieces)} piece(s), "
          f"{100 * tissue.fraction:.1f} % of the slide -> {args.out}")
    return 0
