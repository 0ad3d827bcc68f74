"""Pixel-size search: of a few candidate pixel sizes of a slide, the one the model reads most surely.

Photomicrographs often come without a recorded pixel size, and a set of them may mix objectives
under one assumed µm/px: a glomerulus then looks twice or half its size to the model. The search
reads the slide's tissue as if its pixels were ``factor`` times their size, for each factor, and
keeps the factor under which the model's mean confidence (its largest class probability,
averaged over the central half of each tile: the part of a tile that stitching mostly keeps) is
highest. On the real photomicrographs of ``configs/train/real-glomeruli.yaml`` it raises
glomerulus detection F1 for each of three training seeds (docs/real-glomeruli.md). Areas in µm²
measured after a search are in the chosen pixel size: they lean towards the sizes the model saw
in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from biopsy.infer import tile_probabilities, tissue_tiles
from biopsy.model import ModelInfo
from biopsy.slide import Slide
from biopsy.tiling import cell_spans
from biopsy.tissue import TissueMask

MAX_TILES = 64  # tissue tiles per candidate, evenly spread: enough for a slide's mean


@dataclass(frozen=True)
class MppChoice:
    """The chosen ``factor``, the slide's pixel size under it (``mpp``, x and y µm/px) and the
    model's mean confidence under each candidate factor (None: no tissue tile)."""

    factor: float
    mpp: tuple[float, float]
    confidence: dict[float, float | None]


def check_factors(factors: tuple[float, ...]) -> None:
    """Raise ValueError unless ``factors`` are one or more finite positive numbers."""
    if not factors or not all(math.isfinite(f) and f > 0 for f in factors):
        raise ValueError(f"pixel-size search factors must be positive numbers; got {list(factors)}")


@torch.inference_mode()
def most_confident_mpp(slide: Slide, model: nn.Module, info: ModelInfo,
                       factors: tuple[float, ...], *, device: str | torch.device = "cpu",
                       batch_size: int = 16, bf16: bool = False,
                       max_tiles: int = MAX_TILES) -> MppChoice:
    """The factor of ``factors`` (the first of equals) under which ``model`` is most confident on
    ``slide``'s tissue read at the slide's pixel size times the factor; factor 1 when no
    candidate has tissue. ``model`` must be in eval mode on ``device``.

    Raises
    ------
    ValueError : a factor not positive.
    MppError, CheckpointError, SlideError : as :func:`biopsy.infer.tissue_tiles`.
    """
    check_factors(factors)
    device = torch.device(device)
    confidence = {factor: _mean_confidence(slide.with_mpp_scaled(factor), model, info, device,
                                           batch_size, bf16, max_tiles) for factor in factors}
    found = [factor for factor in factors if confidence[factor] is not None]
    factor = max(found, key=confidence.get) if found else 1.0
    return MppChoice(factor, slide.with_mpp_scaled(factor).mpp, confidence)


def _mean_confidence(slide: Slide, model, info, device, batch_size, bf16, max_tiles
                     ) -> float | None:
    """Mean largest class probability over the tissue of the cells (the pixels nearest to a
    tile's centre) of up to ``max_tiles`` tissue tiles; None without tissue there."""
    tissue, tiles = tissue_tiles(slide, info)
    grid = tiles.grid
    rows, cols = (cell_spans(length, grid.patch_px, grid.step_px) for length in grid.shape_px)
    chosen = np.unique(np.linspace(0, len(tiles) - 1, min(max_tiles, len(tiles))).round())
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
    total, weight = 0.0, 0
    for first in range(0, len(chosen) if len(tiles) else 0, batch_size):
        indices = chosen[first:first + batch_size].astype(int)
        batch = torch.stack([tiles[i][0] for i in indices])
        with autocast:
            logits = model(info.normalise(batch.to(device)))
        largest = tile_probabilities(logits, grid.patch_px).amax(dim=1).cpu().numpy()
        for tile, (top, left) in zip(largest, grid.origins_px[indices]):
            (row0, row1), (col0, col1) = rows[top], cols[left]
            inside = _tissue_in(tissue, grid.mpp, (row0, row1), (col0, col1))
            total += float(tile[row0 - top:row1 - top, col0 - left:col1 - left][inside].sum())
            weight += int(inside.sum())
    return total / weight if weight else None


def _tissue_in(tissue: TissueMask, mpp: float, rows: tuple[int, int], cols: tuple[int, int]
               ) -> np.ndarray:
    """Whether each pixel [from, to) of ``rows`` and ``cols`` of a grid at ``mpp`` lies in
    ``tissue`` (its nearest mask pixel)."""
    height, width = tissue.mask.shape
    row_index = np.minimum((np.arange(*rows) * mpp / tissue.mpp).astype(int), height - 1)
    col_index = np.minimum((np.arange(*cols) * mpp / tissue.mpp).astype(int), width - 1)
    return tissue.mask[np.ix_(row_index, col_index)]
