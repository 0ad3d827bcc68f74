"""Stain normalisation: a brightfield slide's stain amounts brought to a model's reference.

Staining runs differ in how much dye a section takes up, and a model that reads lesions from
colour reads a darker follow-up biopsy differently. A slide's stain amount is, per stain, the
99th percentile of its concentration over the tissue (the "maximum concentration" of Macenko et
al. 2009), from the full-rank colour deconvolution with scikit-image's fixed Ruifrok & Johnston
vectors (:class:`biopsy.restain.StainShift`), measured at 4 µm/px on pixels inside the tissue mask
that are not glass-pale. Scaling each stain by reference / measured (kept within 0.25-4, so a slide
nearly without one of the stains is not blown up) undoes a global change of intensity. A model
trained with normalisation
(``model.stain_normalisation`` in a training config) stores its reference, the mean amounts of
its training slides, as ``ModelInfo.stain_reference``; training and inference then scale every
slide's pixels to it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from skimage.color import hed_from_rgb

from biopsy.restain import DENSITY_OF_LEVEL, StainShift
from biopsy.slide import BRIGHTFIELD_CHANNELS, Slide, ThreadSlides
from biopsy.tissue import TissueMask, detect_tissue

log = logging.getLogger(__name__)

MEASURE_MPP = 4.0  # µm/px at which amounts are measured (fixed: peaks depend on resolution)
PERCENTILE = 99.0
TISSUE_DENSITY = 0.15  # summed optical density below which a pixel is glass-pale and not counted
FACTOR_LIMITS = (0.25, 4.0)  # a stain is never scaled beyond these (trichrome eosin: ~2.4)
_BAND_PX = 512  # rows read at a time, so memory stays bounded on any slide
_MAX_THREADS = 8  # reading and measuring threads at most (a band of a 100,000 px wide slide: 19 MB)
_BIN_OD = 0.001  # histogram bin width in optical density units, bins from 0 to 4 (dense nuclei ~2)
_BIN_COUNT = 4000
# optical densities -> (their sum, haematoxylin bin, eosin bin): skimage's deconvolution's H and E
_MEASURE_MATRIX = np.vstack([np.ones(3), hed_from_rgb[:, :2].T / _BIN_OD]).astype(np.float32)


def is_brightfield(slide: Slide) -> bool:
    """Whether the slide is 8-bit RGB, the only kind whose stains are measured."""
    return list(slide.channel_names) == list(BRIGHTFIELD_CHANNELS) and slide.dtype == np.uint8


def stain_amounts(slide: Slide, tissue: TissueMask | None = None) -> tuple[float, float] | None:
    """(haematoxylin, eosin) amounts of an 8-bit RGB slide within ``tissue`` (default: detected;
    where none is, as on a small snapshot, every pixel that is not glass-pale); None without stain.

    Bands of rows are read and measured in a pool of threads, each reading through its own
    handle on the slide where a handle decodes only what it reads (``Slide.reads_regions``):
    decoding, OpenCV and NumPy release the GIL, so no part is serial. Of each band only the box
    around its tissue is read (a 60,000 px slide, 35 % tissue: ~0.8 s on 2 cores)."""
    tissue = detect_tissue(slide) if tissue is None else tissue
    everywhere = not tissue.mask.any()
    width_px, height_px = (max(1, round(size * mpp / MEASURE_MPP))
                           for size, mpp in zip(slide.dimensions, slide.mpp))
    mask_cols = _mask_index(width_px, tissue.mask.shape[1], tissue.mpp)
    copies = ThreadSlides(slide)

    def band_counts(top: int) -> np.ndarray:
        rows = min(_BAND_PX, height_px - top)
        inside = (np.ones((rows, width_px), bool) if everywhere else tissue.mask[
            np.ix_(_mask_index(rows, tissue.mask.shape[0], tissue.mpp, top), mask_cols)])
        if not inside.any():
            return np.zeros((2, _BIN_COUNT), np.int64)
        (row0, row1), (col0, col1) = (_span(inside.any(axis=axis)) for axis in (1, 0))
        rgb = copies.slide().read(col0 * MEASURE_MPP / slide.mpp[0],
                                  (top + row0) * MEASURE_MPP / slide.mpp[1],
                                  (col1 - col0, row1 - row0), MEASURE_MPP)
        return _band_counts(rgb, inside[row0:row1, col0:col1])

    # each thread holds one band at a time: memory stays bounded on any slide
    with copies, ThreadPoolExecutor(copies.threads(_MAX_THREADS)) as pool:
        counts = sum(pool.map(band_counts, range(0, height_px, _BAND_PX)))
    if not counts[0].any():
        return None
    return tuple(_percentile(stain_counts) for stain_counts in counts)


def _span(present: np.ndarray) -> tuple[int, int]:
    """[first, last + 1) of the True entries of a 1-D array with at least one."""
    where = np.flatnonzero(present)
    return int(where[0]), int(where[-1]) + 1


def _band_counts(rgb: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """(2, bins) histogram counts of the stain concentrations of ``rgb`` pixels ``inside`` that
    are not glass-pale.

    Each 8-bit level's optical density comes from a table, and one 3 x 3 product per pixel gives
    the summed density and both concentrations in bins (OpenCV's ``LUT`` and ``transform``)."""
    measures = cv2.transform(cv2.LUT(rgb, DENSITY_OF_LEVEL), _MEASURE_MATRIX)
    counted = inside & (measures[..., 0] > TISSUE_DENSITY)
    return np.stack([np.bincount(np.clip(measures[..., stain][counted], 0, _BIN_COUNT - 1)
                                 .astype(np.intp), minlength=_BIN_COUNT)
                     for stain in (1, 2)])


def _mask_index(length_px: int, mask_length: int, mask_mpp: float, start_px: int = 0) -> np.ndarray:
    """Mask rows (or columns) under measured pixels ``start_px .. start_px + length_px``."""
    centres_um = (start_px + np.arange(length_px) + 0.5) * MEASURE_MPP
    return np.minimum((centres_um / mask_mpp).astype(np.int64), mask_length - 1)


def _percentile(counts: np.ndarray) -> float:
    """The PERCENTILE-th value of a histogram of _BIN_OD-wide bins from 0 (upper bin edge)."""
    cumulative = np.cumsum(counts)
    index = np.searchsorted(cumulative, PERCENTILE / 100 * cumulative[-1])
    return float(round((index + 1) * _BIN_OD, 6))


def normalising_shift(amounts: Sequence[float] | None, reference: Sequence[float],
                      source: str | Path = "slide") -> StainShift:
    """The shift that brings ``amounts`` (of ``source``, named in a warning) to ``reference``
    (the identity without tissue)."""
    if amounts is None:
        return StainShift()
    ratios = [r / a for r, a in zip(reference, amounts)]
    factors = [float(np.clip(ratio, *FACTOR_LIMITS)) for ratio in ratios]
    if factors != ratios:
        log.warning("%s: stain amounts (%s) are far from the model's (%s): scaled by %s, the "
                    "nearest within %s to %s (a stain the model was not trained on? "
                    "--no-stain-normalisation turns it off)", source, _amounts_text(amounts),
                    _amounts_text(reference), _amounts_text(factors), FACTOR_LIMITS[0],
                    FACTOR_LIMITS[1])
    return StainShift(haematoxylin=factors[0], eosin=factors[1])


def _amounts_text(amounts: Sequence[float]) -> str:
    """Haematoxylin and eosin amounts to three significant digits."""
    return ", ".join(f"{amount:.3g}" for amount in amounts)


def slide_stain_shift(slide: Slide, reference: Sequence[float] | None,
                      tissue: TissueMask | None = None) -> StainShift | None:
    """What a model with stain ``reference`` needs applied to this slide's pixels; None when the
    model has no reference or the slide is not 8-bit RGB."""
    if reference is None or not is_brightfield(slide):
        return None
    return normalising_shift(stain_amounts(slide, tissue), reference, slide.path)
