"""Pixel-size search: of a few candidate pixel sizes of a slide, the one the model is surest at.

Photomicrographs often come without a recorded pixel size, and a set of them may mix objectives
under one assumed µm/px: a glomerulus then looks twice or half its size to the model. The search
reads the slide's tissue as if its pixels were ``factor`` times their size, for each factor, and
keeps the factor under which the model's mean confidence (its largest class probability,
averaged over the tissue of each tile's cell: the pixels nearer to its centre than to any other
tile's, those stitching weighs it most on) is highest. On the real photomicrographs of
``configs/train/real-glomeruli.yaml`` it raises glomerulus detection F1 for each of three
training seeds (docs/real-glomeruli.md). Areas in µm² measured after a search are in the chosen
pixel size: they lean towards the sizes the model saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from biopsy.infer import tissue_tiles
from biopsy.tile_views import tile_probabilities
from biopsy.model import ModelInfo
from biopsy.slide import SCALE_RANGE, Slide, is_slide_mpp
from biopsy.stitch import output_index
from biopsy.tiling import cell_spans

MAX_TILES = 64  # tissue tiles per candidate, evenly spread: enough for a slide's mean


@dataclass(frozen=True)
class MppChoice:
    """The chosen ``factor``, the slide's pixel size under it (``mpp``, x and y µm/px) and the
    model's mean confidence under each candidate factor (None: no tissue tile)."""

    factor: float
    mpp: tuple[float, float]
    confidence: dict[float, float | None]


def searches(factors: Sequence[float] | None) -> bool:
    """Whether ``factors`` ask for a search: None and factor 1 alone do not."""
    return factors is not None and tuple(factors) != (1.0,)


def check_factors(factors: tuple[float, ...]) -> None:
    """Raise ValueError unless ``factors`` are one or more numbers in :data:`SCALE_RANGE`."""
    low, high = SCALE_RANGE
    if not factors or not all(low <= f <= high for f in factors):
        raise ValueError(f"pixel-size search factors must be from {low:g} to {high:g}; got "
                         f"{list(factors)}")


@torch.inference_mode()
def most_confident_mpp(slide: Slide, model: nn.Module, info: ModelInfo,
                       factors: tuple[float, ...], *, device: str | torch.device = "cpu",
                       batch_size: int = 16, bf16: bool = False,
                       max_tiles: int = MAX_TILES) -> MppChoice:
    """The factor of ``factors`` (the first of equals) under which ``model`` is most confident on
    ``slide``'s tissue read at the slide's pixel size times the factor; factor 1 when no
    candidate has tissue. A factor that takes the pixel size out of
    :data:`biopsy.slide.SLIDE_MPP_RANGE_UM` is not tried (confidence None). ``model`` must be in
    eval mode on ``device``.

    Raises
    ------
    ValueError : a factor not positive.
    MppError, CheckpointError, SlideError : as :func:`biopsy.infer.tissue_tiles`.
    """
    check_factors(factors)
    device = torch.device(device)
    confidence = {factor: _mean_confidence(slide.with_mpp_scaled(factor), model, info, device,
                                           batch_size, bf16, max_tiles)
                  if all(is_slide_mpp(mpp * factor) for mpp in slide.mpp) else None
                  for factor in factors}
    found = [factor for factor in factors if confidence[factor] is not None]
    factor = max(found, key=confidence.get) if found else 1.0
    return MppChoice(factor, (slide.mpp[0] * factor, slide.mpp[1] * factor), confidence)


def _mean_confidence(slide: Slide, model, info, device, batch_size, bf16, max_tiles
                     ) -> float | None:
    """Mean largest class probability over the tissue (the mask pixel under each pixel's centre)
    of the cells (the pixels nearest to a tile's centre) of up to ``max_tiles`` tissue tiles;
    None without tissue there."""
    tissue, tiles = tissue_tiles(slide, info)
    grid = tiles.grid
    rows, cols = (cell_spans(length, grid.patch_px, grid.step_px) for length in grid.shape_px)
    mask_rows, mask_cols = (output_index(length, tissue.mpp, grid.mpp, mask_length)
                            for length, mask_length in zip(grid.shape_px, tissue.mask.shape))
    chosen = np.unique(np.linspace(0, len(tiles) - 1, min(max_tiles, len(tiles))).round())
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
    total, weight = 0.0, 0
    for first in range(0, len(chosen), batch_size):
        indices = chosen[first:first + batch_size].astype(int)
        batch = torch.stack([tiles[i][0] for i in indices])
        with autocast:
            logits = model(info.normalise(batch.to(device)))
        largest = tile_probabilities(logits, grid.patch_px).amax(dim=1).cpu().numpy()
        for tile, (top, left) in zip(largest, grid.origins_px[indices]):
            (row0, row1), (col0, col1) = rows[top], cols[left]
            inside = tissue.mask[np.ix_(mask_rows[row0:row1], mask_cols[col0:col1])]
            total += float(tile[row0 - top:row1 - top, col0 - left:col1 - left][inside].sum())
            weight += int(inside.sum())
    return total / weight if weight else None

