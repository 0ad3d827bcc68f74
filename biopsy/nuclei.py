"""Nuclei of a slide: centres found on the haematoxylin channel, region by region.

The RGB of each region is unmixed by colour deconvolution (``skimage.color.rgb2hed``, the
Ruifrok-Johnston haematoxylin / eosin / DAB vectors); nuclei are the blobs of the haematoxylin
optical density at their size: the peaks (``skimage.feature.peak_local_max``) of its scale-normalised
negative Laplacian of Gaussian at sigma ``radius / sqrt(2)``, above an absolute response, where
the pixels are dark enough to be chromatin. Sizes are in µm, so the detector reads any pixel size;
it reads at ``DETECTION_MPP`` by default, and only where ``biopsy.tissue`` finds tissue.

Counting nuclei per glomerulus and per cortex tile is :mod:`biopsy.morphometry`'s (shared with the
synthetic truth); this module only finds them.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.color import hed_from_rgb
from skimage.feature import peak_local_max

from biopsy.restain import DENSITY_OF_LEVEL
from biopsy.slide import Slide, ThreadSlides
from biopsy.tissue import TissueMask, detect_tissue

DETECTION_MPP = 0.5
NUCLEUS_RADIUS_UM = 1.8  # the LoG scale: lymphocytes and glomerular nuclei are 4-5 µm across
MIN_SEPARATION_UM = 2.0  # two peaks closer than this are one nucleus
MIN_RESPONSE = 0.025  # scale-normalised LoG of the haematoxylin optical density
# Chromatin is the darkest thing on a slide: a nucleus's optical density summed over R, G, B
# (averaged over ~1 µm). Granular red cytoplasm and dense blue collagen in trichrome also project
# onto haematoxylin but are paler (synthetic slides: nuclei >= 2.7 in every stain, >= ~2.3 with
# haematoxylin 20 % fainter; trichrome cytoplasm and collagen mostly 1.6-2.3).
MIN_OPTICAL_DENSITY = 2.3
REGION_PX = 512
MARGIN_UM = 8.0
# Nuclei 4-5 µm across need pixels of at most ~0.6 µm (20x scans and finer).
MAX_SLIDE_MPP = 0.6
_MAX_THREADS = 8


def why_not_countable(slide: Slide) -> str | None:
    """Why the nuclei of ``slide`` cannot be counted, or None when they can."""
    if slide.is_fluorescence or len(slide.channel_names) != 3 or slide.dtype != np.uint8:
        return "not an 8-bit RGB brightfield slide"
    if slide.mpp is None or slide.mpp[0] > MAX_SLIDE_MPP:
        return f"pixels coarser than {MAX_SLIDE_MPP} µm (or unknown): nuclei are not resolved"
    return None


def _haematoxylin_lookup() -> np.ndarray:
    """(3, 256) float32: each channel value's share of ``skimage.color.rgb2hed``'s haematoxylin.

    ``rgb2hed`` is linear in the log of each channel (``separate_stains``: ``log(max(v / 255,
    1e-6)) / log(1e-6)`` times ``hed_from_rgb``), then clipped at 0; per-channel tables give the
    same values on uint8 pixels for the cost of three look-ups.
    """
    values = np.arange(256) / 255.0
    log_rgb = np.log(np.maximum(values, 1e-6)) / np.log(1e-6)
    return (log_rgb[None, :] * hed_from_rgb[:, 0][:, None]).astype(np.float32)


_H_LOOKUP = _haematoxylin_lookup()


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density of an RGB uint8 region as ``skimage.color.rgb2hed`` gives it
    (float32, (rows, cols))."""
    total = _H_LOOKUP[0][rgb[..., 0]] + _H_LOOKUP[1][rgb[..., 1]] + _H_LOOKUP[2][rgb[..., 2]]
    return np.maximum(total, 0.0)


def blob_response(h_density: np.ndarray, mpp: float) -> np.ndarray:
    """Scale-normalised negative LoG of the haematoxylin density at the nucleus scale."""
    sigma_px = NUCLEUS_RADIUS_UM / np.sqrt(2) / mpp
    return -sigma_px**2 * ndimage.gaussian_laplace(h_density, sigma_px)


def optical_density_at(rgb: np.ndarray, points: np.ndarray, mpp: float) -> np.ndarray:
    """Optical density summed over R, G, B, averaged over a ~1 µm square at each (row, col)."""
    reach = max(1, int(round(0.5 / mpp)))
    total = np.zeros(len(points), np.float32)
    for d_row in range(-reach, reach + 1):
        for d_col in range(-reach, reach + 1):
            rows = np.clip(points[:, 0] + d_row, 0, rgb.shape[0] - 1)
            cols = np.clip(points[:, 1] + d_col, 0, rgb.shape[1] - 1)
            total += DENSITY_OF_LEVEL[rgb[rows, cols, :3]].sum(axis=-1)
    return total / (2 * reach + 1) ** 2


def detect_in_region(rgb: np.ndarray, mpp: float, min_response: float = MIN_RESPONSE) -> np.ndarray:
    """Nucleus centres in an RGB region, (n, 2) float (row, col) pixel indices of the region.

    Peaks of :func:`blob_response` at least ``MIN_SEPARATION_UM`` apart, above ``min_response``,
    where the region is at least ``MIN_OPTICAL_DENSITY`` dark.
    """
    response = blob_response(haematoxylin(rgb), mpp)
    separation_px = max(1, int(round(MIN_SEPARATION_UM / mpp)))
    peaks = peak_local_max(response, min_distance=separation_px, threshold_abs=min_response,
                           exclude_border=False)
    dark = optical_density_at(rgb, peaks, mpp) >= MIN_OPTICAL_DENSITY
    return peaks[dark].astype(np.float64)


def detect_nuclei(slide: Slide, mpp: float = DETECTION_MPP, *, min_response: float = MIN_RESPONSE,
                  region_px: int = REGION_PX, tissue: TissueMask | None = None) -> np.ndarray:
    """Level-0 (x, y) centres (n, 2) of the nuclei of the whole slide, read region by region.

    Regions of ``region_px`` at ``mpp`` overlap by a margin wider than the blob filter reaches;
    each keeps the nuclei of its core, so every nucleus is found once. Regions without ``tissue``
    (default: :func:`biopsy.tissue.detect_tissue`) are not read. The regions are read and searched
    on threads, each through its own slide handle where the slide allows
    (:class:`~biopsy.slide.ThreadSlides`; SciPy's filters and decoding release the GIL), in
    raster order as one thread finds them.
    """
    tissue = detect_tissue(slide) if tissue is None else tissue
    windows = list(_tissue_windows(slide, mpp, region_px, tissue))
    copies = ThreadSlides(slide)

    def detect(window: tuple[int, int]) -> np.ndarray:
        return _detect_window(copies.slide(), *window, region_px, mpp, min_response)

    with copies, ThreadPoolExecutor(copies.threads(_MAX_THREADS)) as pool:
        found = list(pool.map(detect, windows))
    return np.vstack(found) if found else np.zeros((0, 2))


def _tissue_windows(slide: Slide, mpp: float, region_px: int,
                    tissue: TissueMask) -> Iterator[tuple[int, int]]:
    """Level-0 (x, y) of each region of a grid over the slide that holds tissue, row by row."""
    scale = mpp / slide.mpp[0]
    width, height = slide.dimensions
    step = region_px * scale
    size = int(np.ceil(step))
    xs, ys = (np.round(np.arange(0, length, step)) for length in (width, height))
    counts, _ = tissue.grid_counts(*(np.column_stack([starts, np.full(len(starts), size)])
                                     for starts in (xs, ys)))
    for row, col in zip(*np.nonzero(counts)):
        yield int(xs[col]), int(ys[row])


def _detect_window(slide: Slide, x: int, y: int, size_px: int, mpp: float,
                   min_response: float) -> np.ndarray:
    scale = mpp / slide.mpp[0]
    margin_px = int(np.ceil(MARGIN_UM / mpp))
    x0, y0 = x - margin_px * scale, y - margin_px * scale
    full = size_px + 2 * margin_px
    rgb = slide.read(int(round(x0)), int(round(y0)), (full, full), mpp)
    peaks = detect_in_region(rgb, mpp, min_response)
    core = ((peaks >= margin_px) & (peaks < margin_px + size_px)).all(axis=1)
    rows, cols = peaks[core].T
    return np.column_stack([round(x0) + (cols + 0.5) * scale, round(y0) + (rows + 0.5) * scale])


def match_centres(found: np.ndarray, reference: np.ndarray, radius_px: float) -> int:
    """How many ``found`` (x, y) centres match ``reference`` ones within ``radius_px``, one to one,
    closest pairs first (for precision and recall against annotated or drawn nuclei)."""
    if not len(found) or not len(reference):
        return 0
    pairs = cKDTree(found).sparse_distance_matrix(cKDTree(reference), radius_px, output_type="ndarray")
    used_found, used_reference = set(), set()
    order = np.argsort(pairs["v"], kind="stable")
    for i, j in zip(pairs["i"][order], pairs["j"][order]):
        if i not in used_found and j not in used_reference:
            used_found.add(i)
            used_reference.add(j)
    return len(used_found)
