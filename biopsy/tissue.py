"""Tissue detection at low resolution: where on a slide there is tissue, and in how many pieces.

Brightfield: the image is white-balanced on its glass (the brightest, near-grey pixels); a pixel is
tissue when its optical density (OD, of the darkest channel) or its saturation is above an Otsu
threshold held between glass and the palest stain: OD finds haematoxylin and dark stains,
saturation the pale eosin stroma. Marker pen (blue, green, black) on glass is removed.
Fluorescence: summed channel intensity above an Otsu threshold. Then morphology: specks opened
away, gaps closed, pieces smaller than ``min_area_um2`` dropped, holes inside tissue up to
``MAX_HOLE_AREA_UM2`` (vessel and tubule lumina) filled.
"""

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from skimage import measure, morphology
from skimage.filters import threshold_otsu

from biopsy.slide import Slide

# After white balance on the glass: glass has OD (log10, darkest channel) below ~0.04 and saturation
# below ~0.03; haematoxylin and eosin above OD ~0.2; pale eosin stroma has OD ~0.05-0.1 but
# saturation 0.1-0.15, so saturation finds it.
OD_THRESHOLD_RANGE = (0.1, 0.2)
SATURATION_THRESHOLD_RANGE = (0.05, 0.08)
GLASS_MIN_GREY = 180  # the glass's darkest channel is at least this bright (0-255) ...
GLASS_MAX_SATURATION = 0.12  # ... and it is at most this tinted
PEN_FRINGE_PX = 4  # paler pen fringe beside the saturated stroke, in mask pixels
# The smallest piece kept: a glomerulus lying alone on the glass (a small or tangentially cut one is
# ~80 µm across) is tissue to score, while dust and debris specks are opened away at 8 µm/px.
MIN_PIECE_AREA_UM2 = 5_000.0
MAX_HOLE_AREA_UM2 = 500_000.0  # holes inside tissue up to this size (vessel, tubule lumina) are tissue
_MAX_THREADS = 8  # for pixel-by-pixel steps
_OTSU_BINS = 256  # skimage's threshold_otsu default


@dataclass(frozen=True)
class TissuePiece:
    """One connected piece of tissue (a core or section)."""

    label: int  # its value in ``TissueMask.labels``
    area_mm2: float
    bbox_level0: tuple[int, int, int, int]  # (x0, y0, x1, y1) level-0 pixels, x1/y1 exclusive


@dataclass
class TissueMask:
    """Tissue mask at ``mpp`` µm/px, with labelled pieces and O(1) tissue fraction of rectangles."""

    mask: np.ndarray  # bool (rows, cols) at mpp
    mpp: float
    level0_mpp: tuple[float, float]  # the slide's level-0 (x, y) µm/px, to map level-0 coordinates

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """int32 (rows, cols): 0 background, piece labels 1..n (8-connected), made when first
        asked for (inference never asks)."""
        return measure.label(self.mask, connectivity=2).astype(np.int32)

    @functools.cached_property
    def pieces(self) -> list[TissuePiece]:
        """The connected pieces of tissue, largest first."""
        scale_x, scale_y = self.mpp / self.level0_mpp[0], self.mpp / self.level0_mpp[1]
        pieces = [
            TissuePiece(label=region.label, area_mm2=region.area * self.mpp**2 / 1e6,
                        bbox_level0=(int(min_col * scale_x), int(min_row * scale_y),
                                     int(np.ceil(max_col * scale_x)), int(np.ceil(max_row * scale_y))))
            for region in measure.regionprops(self.labels)
            for min_row, min_col, max_row, max_col in [region.bbox]
        ]
        pieces.sort(key=lambda piece: -piece.area_mm2)
        return pieces

    @functools.cached_property
    def _integral(self) -> np.ndarray:
        """The integral image (rows + 1, cols + 1) of the mask, made when first counted in."""
        counts = np.int32 if self.mask.size < 2**31 else np.int64  # int32: ~4x faster
        return np.pad(self.mask.cumsum(0, dtype=counts).cumsum(1, dtype=counts), ((1, 0), (1, 0)))

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * self.mpp**2 / 1e6

    @property
    def fraction(self) -> float:
        """Fraction of the slide's area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def near(self) -> "TissueMask":
        """The mask dilated by one pixel: the part of the slide that stitched inference labels
        (the model draws the tissue border within it)."""
        return self._near

    @functools.cached_property
    def _near(self) -> "TissueMask":
        # OpenCV's dilation is scipy's binary_dilation (border 0) here, ~50x faster
        grown = cv2.dilate(self.mask.astype(np.uint8), np.ones((3, 3), np.uint8))
        return dataclasses.replace(self, mask=grown.view(bool))

    def tissue_fraction(self, x: int, y: int, size_px: tuple[int, int]) -> float:
        """Fraction of tissue in the level-0 rectangle ``(x, y)``, ``size_px = (width, height)``.

        Counts the mask pixels the rectangle touches (an integral image: O(1) per call);
        parts outside the slide count as background.
        """
        counts, areas = self.grid_counts(np.array([[x, size_px[0]]], float),
                                         np.array([[y, size_px[1]]], float))
        return float(counts[0, 0] / areas[0, 0]) if areas[0, 0] > 0 else 0.0

    def grid_counts(self, x_spans: np.ndarray, y_spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tissue mask pixels touched by each rectangle of a grid, and each one's area in mask
        pixels: columns ``x_spans``, rows ``y_spans``, each an (n, 2) array of level-0 (start,
        size); both (len(y_spans), len(x_spans)). Parts outside the slide count as background."""
        (rows0, rows1), (cols0, cols1) = (
            _mask_spans(spans, level0_mpp / self.mpp)
            for spans, level0_mpp in ((y_spans, self.level0_mpp[1]), (x_spans, self.level0_mpp[0])))
        areas = np.outer(rows1 - rows0, cols1 - cols0)
        rows0, rows1, cols0, cols1 = (np.clip(edge, 0, length) for edge, length in (
            (rows0, self.mask.shape[0]), (rows1, self.mask.shape[0]),
            (cols0, self.mask.shape[1]), (cols1, self.mask.shape[1])))
        integral = self._integral
        counts = (integral[np.ix_(rows1, cols1)] - integral[np.ix_(rows0, cols1)]
                  - integral[np.ix_(rows1, cols0)] + integral[np.ix_(rows0, cols0)])
        return counts, areas


def _mask_spans(spans: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The mask pixels [from, to) (not yet clipped to the mask) that level-0 (start, size)
    ``spans`` touch, at ``scale`` mask pixels per level-0 pixel."""
    return (np.floor(spans[:, 0] * scale).astype(np.int64),
            np.ceil((spans[:, 0] + spans[:, 1]) * scale).astype(np.int64))


def detect_tissue(slide: Slide, mpp: float = 8.0, min_area_um2: float = MIN_PIECE_AREA_UM2) -> TissueMask:
    """Detect tissue on ``slide`` from its thumbnail at ``mpp`` µm/px.

    ``min_area_um2`` is the smallest piece kept (default ``MIN_PIECE_AREA_UM2``).
    """
    image = slide.thumbnail(mpp)
    if slide.is_fluorescence:
        candidate = fluorescence_foreground(image)
    else:
        foreground = brightfield_foreground(image)
        candidate = foreground & ~pen_ink(image, foreground)
    mask = clean_mask(candidate, min_area_px=min_area_um2 / mpp**2, max_hole_px=MAX_HOLE_AREA_UM2 / mpp**2)
    return TissueMask(mask=mask, mpp=mpp, level0_mpp=slide.mpp)


def glass_colour(image: np.ndarray) -> np.ndarray:
    """RGB of the glass: the median of the brightest 1 % of pixels when that is bright, near-grey
    (microscope glass may be slightly tinted) and so plausibly glass; else white (a frame of tissue).

    Brightness (R + G + B) and channels are integers, so the 99th percentile and the medians come
    from histograms: NumPy's ``percentile`` and ``median`` to the bit, ~5x faster."""
    wide = np.uint16 if image.dtype == np.uint8 else np.uint32  # holds three channels' sum
    brightness = image[..., 0].astype(wide) + image[..., 1] + image[..., 2]
    bright = brightness >= _percentile_of_integers(brightness, 99)
    colour = np.array([_median_of_integers(image[..., channel][bright]) for channel in range(3)],
                      np.float32)
    if colour.min() >= GLASS_MIN_GREY and 1 - colour.min() / colour.max() <= GLASS_MAX_SATURATION:
        return colour
    return np.full(3, 255.0, np.float32)


def _percentile_of_integers(values: np.ndarray, percent: float) -> int:
    """The smallest value v such that ``values >= v`` selects what ``values >= np.percentile(
    values, percent)`` does (linear interpolation between the two order statistics around the
    percentile's position: no value lies between them)."""
    cumulative = np.cumsum(np.bincount(values.ravel()))
    position = (cumulative[-1] - 1) * (percent / 100)
    below = int(position)
    low, high = (int(np.searchsorted(cumulative, rank + 1))  # the rank-th smallest (from 0)
                 for rank in (below, min(below + 1, cumulative[-1] - 1)))
    return low if position == below else high


def _median_of_integers(values: np.ndarray) -> np.float32:
    """``np.median`` of non-negative integers (as float32), from their histogram."""
    cumulative = np.cumsum(np.bincount(values))
    count = cumulative[-1]
    low, high = (np.searchsorted(cumulative, rank + 1) for rank in ((count - 1) // 2, count // 2))
    return (np.float32(low) + np.float32(high)) / np.float32(2)


def stain_features(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optical density (log10, of the darkest channel) and HSV saturation of ``image`` after white
    balance on its glass, so that glass is near (0, 0) whatever the scanner's light.

    Pixel by pixel, in bands of rows on threads (NumPy releases the GIL)."""
    factors = 255 / glass_colour(image)
    density = np.empty(image.shape[:2], np.float32)
    saturation = np.empty(image.shape[:2], np.float32)

    def features(rows: slice) -> None:
        # channel by channel: reductions along the last axis of (h, w, 3) are ~3x slower
        balanced = [np.minimum(image[rows, :, channel] * factor, 255)
                    for channel, factor in enumerate(factors)]
        brightest = np.maximum(np.maximum(balanced[0], balanced[1]), balanced[2])
        darkest = np.minimum(np.minimum(balanced[0], balanced[1]), balanced[2])
        density[rows] = -np.log10((darkest + 1) / 256)
        saturation[rows] = (brightest - darkest) / np.maximum(brightest, 1)

    _in_row_bands(features, image.shape[0])
    return density, saturation


def _in_row_bands(function, rows: int) -> list:
    """``function`` of each band of ``rows`` rows (slices, a few per thread), on threads."""
    threads = min(_MAX_THREADS, os.cpu_count() or 1)
    band_rows = max(64, -(-rows // (4 * threads)))
    bands = [slice(top, top + band_rows) for top in range(0, rows, band_rows)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, bands))


def otsu_within(values: np.ndarray, bounds: tuple[float, float]) -> float:
    """Otsu threshold of 2-D float ``values`` held within ``bounds`` (the upper bound when
    ``values`` is flat): skimage's ``threshold_otsu`` to the bit, from the same 256-bin histogram
    counted in bands of rows on threads (skimage bins integers otherwise)."""
    low, high = values.min(), values.max()
    if low == high:
        return bounds[1]
    counts = sum(_in_row_bands(lambda rows: np.histogram(values[rows], _OTSU_BINS, (low, high))[0],
                               values.shape[0]))
    edges = np.histogram_bin_edges(values[:1, :1], _OTSU_BINS, (low, high))  # of values' dtype
    return float(np.clip(threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2)), *bounds))


def brightfield_foreground(image: np.ndarray) -> np.ndarray:
    """Pixels darker than glass (OD) or more coloured than glass (saturation: pale eosin stroma),
    each above its Otsu threshold held in ``OD_THRESHOLD_RANGE`` / ``SATURATION_THRESHOLD_RANGE``."""
    density, saturation = stain_features(image)
    return ((density > otsu_within(density, OD_THRESHOLD_RANGE))
            | (saturation > otsu_within(saturation, SATURATION_THRESHOLD_RANGE)))


def pen_colours(image: np.ndarray) -> np.ndarray:
    """Pixels of marker-pen colour: saturated dark blue, saturated green with its paler fringe,
    near-black grey (pixel by pixel in bands of rows on threads)."""
    blue_or_black, green_pen, green_fringe = (np.empty(image.shape[:2], bool) for _ in range(3))

    def colours(rows: slice) -> None:
        red, green, blue = (image[rows, :, channel].astype(np.int16) for channel in range(3))
        brightest = np.maximum(np.maximum(red, green), blue)
        darkest = np.minimum(np.minimum(red, green), blue)
        blue_or_black[rows] = (((blue - red > 90) & (blue - green > 60) & (red < 70))
                               | ((brightest < 45) & (brightest - darkest < 20)))
        green_pen[rows] = (green - red > 40) & (green - blue > 15)
        green_fringe[rows] = (green - red > 20) & (green - blue > -10)  # blue: trichrome collagen

    _in_row_bands(colours, image.shape[0])
    if green_pen.any():  # the dilation costs as much as the rest of this function
        green_pen |= green_fringe & morphology.dilation(green_pen, morphology.disk(PEN_FRINGE_PX))
    return blue_or_black | green_pen


def pen_ink(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Marker pen: patches of pen colour (with their fringe) whose surroundings are mostly glass.

    Patches of the same colours surrounded by tissue (trichrome-blue collagen, silver-black
    basement membranes in Jones/PASM stains) stay tissue.
    """
    coloured = pen_colours(image)
    if not coloured.any():
        return coloured
    patches = measure.label(coloured, connectivity=2)
    grown = morphology.dilation(patches, morphology.disk(3))
    ring = (grown > 0) & ~coloured
    ring_size = np.bincount(grown[ring], minlength=patches.max() + 1)
    ring_on_tissue = np.bincount(grown[ring], weights=foreground[ring], minlength=patches.max() + 1)
    is_pen = ring_on_tissue < 0.5 * ring_size
    is_pen[0] = False
    return is_pen[patches]


def fluorescence_foreground(image: np.ndarray) -> np.ndarray:
    """Pixels brighter than the dark background: summed channel intensity above Otsu."""
    intensity = np.log1p(image.astype(np.float32).sum(axis=-1))
    if np.ptp(intensity) == 0:
        return np.zeros(intensity.shape, bool)
    return intensity > threshold_otsu(intensity)


def clean_mask(candidate: np.ndarray, min_area_px: float, max_hole_px: float) -> np.ndarray:
    """Open away specks, close small gaps, drop pieces of at most ``min_area_px`` and fill holes
    (background not reaching the image's edge) of at most ``max_hole_px``: lumina inside tissue.

    OpenCV's binary morphology and 4-connected components, ~10x faster than skimage's opening,
    closing and ``remove_small_objects`` with scipy's ``binary_fill_holes``, to the pixel (its
    mirrored border adds nothing a disk does not already hold)."""
    mask = cv2.morphologyEx(np.ascontiguousarray(candidate, bool).view(np.uint8), cv2.MORPH_OPEN,
                            morphology.disk(1).astype(np.uint8))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, morphology.disk(2).astype(np.uint8))
    pieces, areas = _components(mask)
    kept = areas > int(min_area_px)
    kept[0] = False  # label 0: the background
    mask = kept[pieces]
    gaps, areas = _components(~mask)
    edge = np.concatenate([gaps[0], gaps[-1], gaps[:, 0], gaps[:, -1]])
    filled = areas <= int(max_hole_px)
    filled[0] = False  # label 0: the tissue
    filled[edge] = False
    return mask | filled[gaps]


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components of a bool or 0/1 mask: their labels (0 where the mask is not) and
    the area of each label."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(mask).view(np.uint8), connectivity=4)
    return labels, stats[:, cv2.CC_STAT_AREA]
