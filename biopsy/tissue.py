"""Tissue detection at low resolution: where on a slide there is tissue, and in how many pieces.

Brightfield: optical density (OD, the largest of the three channels) above an Otsu threshold held
between glass and the palest stain, minus pen ink (blue, green, black); fluorescence: summed channel
intensity above an Otsu threshold. Then morphology: specks opened away, gaps closed, small holes
filled, pieces smaller than ``min_area_um2`` dropped.
"""

from dataclasses import dataclass, field

import numpy as np
from skimage import measure, morphology
from skimage.filters import threshold_otsu

from biopsy.slide import Slide

# OD of clean glass is below ~0.03, pale stained tissue (collagen, cytoplasm) above ~0.08 (log10).
OD_THRESHOLD_RANGE = (0.04, 0.08)


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
    labels: np.ndarray  # int32 (rows, cols): 0 background, piece labels 1..n
    pieces: list[TissuePiece]
    _integral: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._integral = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * self.mpp**2 / 1e6

    @property
    def fraction(self) -> float:
        """Fraction of the slide's area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def tissue_fraction(self, x: int, y: int, size_px: tuple[int, int]) -> float:
        """Fraction of tissue in the level-0 rectangle ``(x, y)``, ``size_px = (width, height)``.

        Counts the mask pixels the rectangle touches (an integral image: O(1) per call);
        parts outside the slide count as background.
        """
        scale_x, scale_y = self.level0_mpp[0] / self.mpp, self.level0_mpp[1] / self.mpp
        rows, cols = self.mask.shape
        col0, row0 = int(np.floor(x * scale_x)), int(np.floor(y * scale_y))
        col1 = int(np.ceil((x + size_px[0]) * scale_x))
        row1 = int(np.ceil((y + size_px[1]) * scale_y))
        area = (col1 - col0) * (row1 - row0)
        col0, col1 = min(max(col0, 0), cols), min(max(col1, 0), cols)
        row0, row1 = min(max(row0, 0), rows), min(max(row1, 0), rows)
        integral = self._integral
        count = integral[row1, col1] - integral[row0, col1] - integral[row1, col0] + integral[row0, col0]
        return float(count) / area if area > 0 else 0.0


def detect_tissue(slide: Slide, mpp: float = 8.0, min_area_um2: float = 20_000.0) -> TissueMask:
    """Detect tissue on ``slide`` from its thumbnail at ``mpp`` µm/px.

    ``min_area_um2`` is the smallest piece kept (default 0.02 mm², about a 140 µm square).
    """
    image = slide.thumbnail(mpp)
    if slide.is_fluorescence:
        candidate = fluorescence_foreground(image)
    else:
        foreground = brightfield_foreground(image)
        candidate = foreground & ~pen_ink(image, foreground)
    mask = clean_mask(candidate, min_area_px=min_area_um2 / mpp**2)
    labels = measure.label(mask, connectivity=2).astype(np.int32)
    scale_x, scale_y = mpp / slide.mpp[0], mpp / slide.mpp[1]
    pieces = [
        TissuePiece(
            label=region.label,
            area_mm2=region.area * mpp**2 / 1e6,
            bbox_level0=(int(region.bbox[1] * scale_x), int(region.bbox[0] * scale_y),
                         int(np.ceil(region.bbox[3] * scale_x)), int(np.ceil(region.bbox[2] * scale_y))),
        )
        for region in measure.regionprops(labels)
    ]
    pieces.sort(key=lambda piece: -piece.area_mm2)
    return TissueMask(mask=mask, mpp=mpp, level0_mpp=slide.mpp, labels=labels, pieces=pieces)


def optical_density(image: np.ndarray) -> np.ndarray:
    """Largest per-channel optical density (log10) of an RGB uint8 image."""
    return -np.log10((image.astype(np.float32) + 1) / 256).max(axis=-1)


def brightfield_foreground(image: np.ndarray) -> np.ndarray:
    """Pixels darker or more coloured than glass: OD above Otsu, held in ``OD_THRESHOLD_RANGE``."""
    density = optical_density(image)
    low, high = OD_THRESHOLD_RANGE
    threshold = threshold_otsu(density) if np.ptp(density) > 0 else high
    return density > np.clip(threshold, low, high)


def pen_colours(image: np.ndarray) -> np.ndarray:
    """Pixels of marker-pen colour: saturated dark blue, saturated green, near-black grey."""
    red, green, blue = (image[..., channel].astype(np.int16) for channel in range(3))
    blue_pen = (blue - red > 90) & (blue - green > 60) & (red < 70)
    green_pen = (green - red > 40) & (green - blue > 15)
    brightest = np.maximum(np.maximum(red, green), blue)
    darkest = np.minimum(np.minimum(red, green), blue)
    black_pen = (brightest < 45) & (brightest - darkest < 20)
    return blue_pen | green_pen | black_pen


def pen_ink(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Marker pen: patches of pen colour whose surroundings are mostly glass.

    Patches of the same colours surrounded by tissue (trichrome-blue collagen, silver-black
    basement membranes in Jones/PASM stains) stay tissue.
    """
    coloured = pen_colours(image)
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


def clean_mask(candidate: np.ndarray, min_area_px: float) -> np.ndarray:
    """Open away specks, close small gaps, fill holes and drop pieces below ``min_area_px``."""
    mask = morphology.opening(candidate, morphology.disk(1))
    mask = morphology.closing(mask, morphology.disk(2))
    mask = morphology.remove_small_holes(mask, max_size=int(min_area_px))
    return morphology.remove_small_objects(mask, max_size=int(min_area_px))
