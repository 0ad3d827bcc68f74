"""The tile grid of stitched inference and the dataset that reads its tiles (in worker processes
or in the caller's).

The grid lives at the model's mpp: square tiles of ``patch_px`` every ``step_px`` along each axis,
the last tile of a row or column moved back so that it ends at the slide's edge (the positions of
MONAI's ``sliding_window_inference``), so no tile reads past the slide. Tiles come in row-major
order, which lets the stitcher finish rows as it goes. Only tiles nearest to some tissue are kept.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from biopsy.restain import StainShift


@dataclass(frozen=True)
class TileGrid:
    """Tiles over a slide at ``mpp``, row-major.

    ``shape_px`` is the slide's (height, width) at ``mpp``; ``origins_px`` an (n, 2) int array of
    tile top-left (row, col) at ``mpp``, sorted by row then col.
    """

    mpp: float
    shape_px: tuple[int, int]
    patch_px: int
    step_px: int
    origins_px: np.ndarray

    def __len__(self) -> int:
        return len(self.origins_px)

    def level0_xy(self, slide_mpp: tuple[float, float], scale: float = 1.0) -> np.ndarray:
        """(n, 2) float level-0 (x, y) of the top-left corner of each tile's window at ``scale``:
        the square of ``patch_px * scale`` px at the grid's mpp centred on the tile (at scale 1,
        the tile itself)."""
        level0_per_px = np.array([self.mpp / slide_mpp[0], self.mpp / slide_mpp[1]])
        return (self.origins_px[:, ::-1] + self.patch_px * (1 - scale) / 2) * level0_per_px


def axis_starts(size_px: int, patch_px: int, step_px: int) -> list[int]:
    """Tile starts along one axis: every ``step_px``, the last one ending at ``size_px``."""
    if size_px <= patch_px:
        return [0]
    return list(range(0, size_px - patch_px, step_px)) + [size_px - patch_px]


def make_grid(
    shape_px: tuple[int, int],
    mpp: float,
    patch_px: int,
    overlap: float = 0.5,
    tissue=None,
    slide_mpp: tuple[float, float] | None = None,
) -> TileGrid:
    """The row-major grid over a slide of ``shape_px`` (height, width) at ``mpp``.

    ``overlap`` is the fraction of a tile shared with its neighbour (step = patch * (1 - overlap)).
    With a ``tissue`` mask (:class:`biopsy.tissue.TissueMask`) and the slide's level-0
    ``slide_mpp``, a tile is kept only when the part of the slide that gets model labels (the
    mask dilated by one pixel, :meth:`~biopsy.tissue.TissueMask.near`) touches the tile's own
    cell: the pixels it is the nearest tile to, where its Gaussian weight is the largest. Every
    labelled pixel thus gets its nearest tile, while a tile that would reach tissue only with its
    low-weight border is not run.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    step_px = max(1, int(patch_px * (1 - overlap)))
    rows = axis_starts(shape_px[0], patch_px, step_px)
    cols = axis_starts(shape_px[1], patch_px, step_px)
    origins = np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2).astype(np.int64)
    grid = TileGrid(mpp, tuple(shape_px), patch_px, step_px, origins)
    if tissue is None:
        return grid
    near = tissue.near()
    scale_x, scale_y = mpp / slide_mpp[0], mpp / slide_mpp[1]  # level-0 px per grid px
    row_cells = nearest_cells(rows, patch_px, shape_px[0])
    col_cells = nearest_cells(cols, patch_px, shape_px[1])
    counts, areas = near.grid_counts(
        np.array([(col0 * scale_x, (col1 - col0) * scale_x) for col0, col1 in col_cells]),
        np.array([(row0 * scale_y, (row1 - row0) * scale_y) for row0, row1 in row_cells]))
    keep = ((counts > 0) & (areas > 0)).ravel()  # row-major, as the origins
    return TileGrid(mpp, tuple(shape_px), patch_px, step_px, origins[keep])


def nearest_cells(starts: list[int], patch_px: int, size_px: int) -> list[tuple[float, float]]:
    """Along one axis, the span [from, to) of pixels nearer to each tile's centre than to any
    other's (the ends of the slide go to the first and last tile)."""
    centres = [start + patch_px / 2 for start in starts]
    bounds = [0.0] + [(a + b) / 2 for a, b in zip(centres, centres[1:])] + [float(size_px)]
    return list(zip(bounds, bounds[1:]))


def cell_spans(size_px: int, patch_px: int, step_px: int) -> dict[int, tuple[int, int]]:
    """Along one axis of a grid, each tile start -> the [from, to) of pixels nearest to that
    tile's centre (:func:`nearest_cells`)."""
    starts = axis_starts(size_px, patch_px, step_px)
    return {start: (int(keep_from), int(keep_to))
            for start, (keep_from, keep_to) in zip(starts, nearest_cells(starts, patch_px, size_px))}


def grid_shape_px(dimensions: tuple[int, int], slide_mpp: tuple[float, float],
                  mpp: float) -> tuple[int, int]:
    """(height, width) at ``mpp`` of a slide of level-0 ``dimensions`` (width, height)."""
    width, height = dimensions
    return (max(1, math.floor(height * slide_mpp[1] / mpp + 0.5)),
            max(1, math.floor(width * slide_mpp[0] / mpp + 0.5)))


class TileDataset(Dataset):
    """The grid's tiles as uint8 (scales, patch, patch, C) tensors: for each of ``scales``, the
    tile's window at that scale (:meth:`TileGrid.level0_xy`) read from the slide at the grid's mpp
    times the scale, so every view has ``patch`` px (with ``stain`` applied:
    :mod:`biopsy.stainnorm`). Past the slide's edge a view holds the slide's background.

    Holds a fresh copy of the slide (file not yet open), so that each DataLoader worker opens its
    own handle after the fork instead of sharing the parent's file offset.
    """

    def __init__(self, slide, grid: TileGrid, stain: StainShift | None = None,
                 scales: tuple[float, ...] = (1.0,)):
        self.slide = copy.copy(slide)
        self.grid = grid
        self.stain = stain
        self.scales = tuple(scales)
        self.patch_px = grid.patch_px
        self.level0_xy = [grid.level0_xy(slide.mpp, scale) for scale in self.scales]
        self.origins_px = grid.origins_px

    def __len__(self) -> int:
        return len(self.origins_px)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._read(xy[index], scale)
                                          for xy, scale in zip(self.level0_xy, self.scales)]))

    def _read(self, level0_xy: np.ndarray, scale: float) -> np.ndarray:
        x, y = level0_xy
        tile = self.slide.read(float(x), float(y), (self.patch_px, self.patch_px),
                               self.grid.mpp * scale)
        return tile if self.stain is None else self.stain.apply(tile)


class TileBlocks(Dataset):
    """A :class:`TileDataset`'s tiles in blocks of up to ``rows`` tile rows by ``cols`` tile
    columns: ``blocks[k]`` is ``(indices, views)``, the block's tile indices (ascending: row-major)
    and their views as the dataset gives them, (n, scales, patch, patch, C) uint8.

    Where a block's views can be cut from one read of its window with the same pixels
    (:meth:`~biopsy.slide.Slide.cut_offsets`: a level with an exact whole number of pixels per
    view pixel, as for 0.25 or 0.5 µm/px scans read at 1 µm/px) they are, so that the slide's
    pixels under overlapping tiles are decoded once per block rather than once per tile (4 x 16
    tiles at half overlap: 0.75 ms a tile against 1.49 ms one by one on a 2-core CPU); else
    they are read one by one, as they are when the block's window holds more pixels than its
    tiles' windows together (a sparse block at the tissue's edge). Blocks come band by band
    (``band_of[k]``: ``rows`` tile rows each), left to right within a band.
    """

    def __init__(self, tiles: TileDataset, rows: int = 4, cols: int = 16):
        self.tiles = tiles
        origins = tiles.origins_px
        row_band = np.unique(origins[:, 0], return_inverse=True)[1].reshape(-1) // rows
        col_chunk = np.unique(origins[:, 1], return_inverse=True)[1].reshape(-1) // cols
        order = np.lexsort((np.arange(len(origins)), col_chunk, row_band))
        keys = np.stack([row_band, col_chunk], axis=1)[order]
        cuts = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
        self.blocks = np.split(order, cuts) if len(order) else []
        self.band_of = [int(row_band[block[0]]) for block in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.blocks[index]
        views = [self._views(xy[indices], scale)
                 for xy, scale in zip(self.tiles.level0_xy, self.tiles.scales)]
        return torch.from_numpy(indices), torch.from_numpy(np.stack(views, axis=1))

    def _views(self, level0_xy: np.ndarray, scale: float) -> np.ndarray:
        """(n, patch, patch, C): the windows at ``level0_xy`` at ``scale``, cut from one read
        when that gives the same pixels, else read one by one."""
        tiles, patch = self.tiles, self.tiles.patch_px
        mpp = tiles.grid.mpp * scale
        offsets = tiles.slide.cut_offsets(level0_xy, mpp)  # (x, y) in view px
        width, height = (0, 0) if offsets is None else offsets.max(axis=0) + patch
        # a sparse block (tissue's edge) would decode more of the slide at once than tile by tile
        if offsets is None or width * height > len(level0_xy) * patch**2:
            return np.stack([tiles._read(xy, scale) for xy in level0_xy])
        first = level0_xy.min(axis=0)
        region = tiles.slide.read(float(first[0]), float(first[1]), (int(width), int(height)), mpp)
        if tiles.stain is not None:
            region = tiles.stain.apply(region)
        return np.stack([region[y:y + patch, x:x + patch] for x, y in offsets])
