"""Noise textures that any band of a slide can sample at its global coordinates without seams.

Fine textures (grain, mottle, fibrils) are periodic tiles sampled with wrap-around; slow
variations (section thickness, staining unevenness) are a coarse grid over the whole slide,
interpolated bilinearly. Both depend only on the seed and the level-0 position, never on the band.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

TILE_PX = 512
COARSE_CELL_PX = 256


class Textures:
    """The noise fields of one slide, each in 0..1 (mean ~0.5)."""

    def __init__(self, shape_px: tuple[int, int], px_per_um: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.fine = _normalised(ndimage.gaussian_filter(rng.random((TILE_PX, TILE_PX)), 0.45 * px_per_um, mode="wrap"))
        self.mottle = _normalised(ndimage.gaussian_filter(rng.random((TILE_PX, TILE_PX)), 2.5 * px_per_um, mode="wrap"))
        self.fibrils = _fibrils(rng, px_per_um)
        width = shape_px[1]
        self.fine, self.mottle, self.fibrils = (_wrap_to_width(t, width) for t in
                                                (self.fine, self.mottle, self.fibrils))
        rows, cols = (-(-s // COARSE_CELL_PX) + 2 for s in shape_px)
        self.coarse = _normalised(ndimage.gaussian_filter(rng.random((rows, cols)), 1.0, mode="nearest"))

    def rows(self, name: str, y0: int, height: int) -> np.ndarray:
        """Rows [y0, y0 + height) of a periodic texture, full slide width (float32)."""
        return np.take(getattr(self, name), np.arange(y0, y0 + height) % TILE_PX, axis=0)

    def slow(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """The coarse field over a window, bilinear between grid nodes every COARSE_CELL_PX."""
        weights_y, first_y = _interpolation(y0, height)
        weights_x, first_x = _interpolation(x0, width)
        grid = self.coarse[first_y:first_y + weights_y.shape[1], first_x:first_x + weights_x.shape[1]]
        return (weights_y @ grid @ weights_x.T).astype(np.float32)


def _wrap_to_width(tile: np.ndarray, width: int) -> np.ndarray:
    """The periodic tile repeated across ``width`` columns, so that bands only take rows."""
    return np.ascontiguousarray(np.tile(tile, (1, -(-width // TILE_PX)))[:, :width])


def _interpolation(start: int, count: int) -> tuple[np.ndarray, int]:
    """Linear interpolation matrix (count, k) from grid nodes first..first+k-1 to pixels."""
    position = (np.arange(start, start + count) + 0.5) / COARSE_CELL_PX
    first = max(int(np.floor(position[0])), 0)
    last = int(np.floor(position[-1])) + 1
    lower = np.floor(position).astype(int) - first
    fraction = position - np.floor(position)
    weights = np.zeros((count, last - first + 1))
    weights[np.arange(count), lower] = 1 - fraction
    weights[np.arange(count), lower + 1] = fraction
    return weights, first


def _fibrils(rng: np.random.Generator, px_per_um: float) -> np.ndarray:
    """Wavy collagen fibrils: white noise smeared along lines of a few orientations, sharpened."""
    total = np.zeros((TILE_PX, TILE_PX))
    length = int(16 * px_per_um) | 1
    for angle in rng.uniform(0, np.pi, 3):
        kernel = np.zeros((length, length))
        t = np.linspace(-1, 1, 4 * length)
        centre = (length - 1) / 2
        rows = np.round(centre + t * centre * np.sin(angle)).astype(int)
        cols = np.round(centre + t * centre * np.cos(angle)).astype(int)
        kernel[rows, cols] = 1
        kernel /= kernel.sum()
        noise = ndimage.gaussian_filter(rng.random((TILE_PX, TILE_PX)), 0.7 * px_per_um, mode="wrap")
        total = np.maximum(total, _normalised(ndimage.convolve(noise, kernel, mode="wrap")))
    return _normalised(total ** 3)


def _normalised(values: np.ndarray) -> np.ndarray:
    low, high = np.percentile(values, [0.5, 99.5])
    return np.clip((values - low) / max(high - low, 1e-9), 0, 1).astype(np.float32)
