"""Stain normalisation: a brightfield slide's stain amounts brought to a model's reference.

Staining runs differ in how much dye a section takes up, and a model that reads lesions from
colour reads a darker follow-up biopsy differently. A slide's stain amount is, per stain, the
99th percentile of its concentration over the tissue (the "maximum concentration" of Macenko et
al. 2009), from the full-rank colour deconvolution with scikit-image's fixed Ruifrok & Johnston
vectors (:class:`biopsy.restain.StainShift`), measured at 4 µm/px. Scaling each stain by
reference / measured undoes a global change of intensity. A model trained with normalisation
(``model.stain_normalisation`` in a training config) stores its reference, the mean amounts of
its training slides, as ``ModelInfo.stain_reference``; training and inference then scale every
slide's pixels to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.color import hed_from_rgb

from biopsy.restain import StainShift
from biopsy.slide import BRIGHTFIELD_CHANNELS, Slide

MEASURE_MPP = 4.0  # µm/px at which amounts are measured (fixed: peaks depend on resolution)
PERCENTILE = 99.0
TISSUE_DENSITY = 0.15  # summed optical density above which a pixel counts as tissue, not glass
_BAND_PX = 512  # rows read at a time, so memory stays bounded on any slide
_BINS = np.linspace(0, 4, 4001)  # concentration (optical density units) histogram; dense nuclei ~2


def stain_amounts(slide: Slide) -> tuple[float, float] | None:
    """(haematoxylin, eosin) amounts of a brightfield slide; None without tissue."""
    width_px, height_px = (max(1, round(size * mpp / MEASURE_MPP))
                           for size, mpp in zip(slide.dimensions, slide.mpp))
    counts = np.zeros((2, len(_BINS) - 1), np.int64)
    for top in range(0, height_px, _BAND_PX):
        rows = min(_BAND_PX, height_px - top)
        rgb = slide.read(0, top * MEASURE_MPP / slide.mpp[1], (width_px, rows), MEASURE_MPP)
        density = -np.log(np.maximum(rgb.reshape(-1, 3), 1).astype(np.float32) / 255)
        tissue = density[density.sum(axis=1) > TISSUE_DENSITY]
        concentrations = np.clip(tissue @ hed_from_rgb[:, :2].astype(np.float32), 0, _BINS[-1])
        for stain in range(2):
            counts[stain] += np.histogram(concentrations[:, stain], _BINS)[0]
    if not counts[0].any():
        return None
    return tuple(_percentile(stain_counts) for stain_counts in counts)


def _percentile(counts: np.ndarray) -> float:
    """The PERCENTILE-th value of a histogram over _BINS (upper bin edge)."""
    cumulative = np.cumsum(counts)
    index = np.searchsorted(cumulative, PERCENTILE / 100 * cumulative[-1])
    return float(_BINS[index + 1])


def normalising_shift(amounts: Sequence[float] | None, reference: Sequence[float]) -> StainShift:
    """The shift that brings ``amounts`` to ``reference`` (the identity without tissue)."""
    if amounts is None or min(amounts) <= 0:
        return StainShift()
    return StainShift(haematoxylin=reference[0] / amounts[0], eosin=reference[1] / amounts[1])


def slide_stain_shift(slide: Slide, reference: Sequence[float] | None) -> StainShift | None:
    """What a model with stain ``reference`` needs applied to this slide's pixels; None when the
    model has no reference or the slide is not brightfield RGB."""
    if reference is None or list(slide.channel_names) != list(BRIGHTFIELD_CHANNELS):
        return None
    return normalising_shift(stain_amounts(slide), reference)
