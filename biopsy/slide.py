"""One ``Slide`` over every slide format: regions at any µm/px, in level-0 pixel coordinates.

The formats are read by :mod:`biopsy.slide_readers` (OpenSlide formats, TIFF/OME-TIFF/QPTIFF through
tifffile, DICOM WSI, plain JPEG/PNG photomicrographs); this module chooses the level and resamples.

Geometry: level-0 pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``; a level with
downsample ``(dx, dy)`` has pixel ``k`` over level-0 ``[k * dx, (k + 1) * dx)``. ``read`` gives output
pixel ``j`` the exact area average of the level-0 span ``[x + j * s, x + (j + 1) * s)`` (``s`` level-0
pixels per output pixel), so adjacent reads line up exactly, whatever the scale. (OpenSlide itself
places a level's pixels at level-0 location / downsample and interpolates the fraction: on levels
with a non-integer downsample its regions can be off by up to 0.5 / downsample level pixels.)
"""

import copy
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import scipy.sparse

from biopsy.errors import MppError, SlideError
from biopsy.provenance import slide_sha256
from biopsy.slide_readers import BRIGHTFIELD_CHANNELS, open_reader

__all__ = ["BRIGHTFIELD_CHANNELS", "Level", "Slide", "open_slide"]

GIVE_MPP = ("give it with --mpp (in a batch manifest: the mpp column): ~0.25 µm/px for a 40x "
            "objective, ~0.5 for 20x; if unsure, score or segment with --mpp-search 0.71 1 "
            "1.41 as well")
# A microscope slide's pixel: ~0.06 µm (100x oil) to ~8 µm (a 1.25x overview scan); outside this,
# a pixel size is a slip or a print resolution (a 72 dpi TIFF would be 352.8 µm/px).
SLIDE_MPP_RANGE_UM = (0.05, 20.0)
# Reading scales and pixel-size search factors: multiples of a pixel size, within 4x either way.
SCALE_RANGE = (0.25, 4.0)


def is_slide_mpp(mpp: float) -> bool:
    """Whether ``mpp`` µm/px lies in :data:`SLIDE_MPP_RANGE_UM` (NaN does not)."""
    return SLIDE_MPP_RANGE_UM[0] <= mpp <= SLIDE_MPP_RANGE_UM[1]


def file_stem(path: str | Path) -> str:
    """A slide's file name without its suffix, ``.ome.tif`` / ``.ome.tiff`` counting as one:
    ``S19.0001-PAS.ome.tif`` -> ``S19.0001-PAS``."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return Path(name).stem or name


def require_square_pixels(slide: "Slide", needed_for: str) -> None:
    """Raise :class:`MppError` unless the slide's pixels are square (x and y within 0.1 %)."""
    mpp_x, mpp_y = slide.mpp
    if abs(mpp_x / mpp_y - 1) > SQUARE_TOLERANCE:
        raise MppError(f"{slide.path}: pixels are not square ({mpp_x:.4g} x {mpp_y:.4g} µm); "
                       f"{needed_for} needs square ones (give --mpp if the file's size is wrong)")


SQUARE_TOLERANCE = 1e-3  # relative difference of mpp x and y still taken as square pixels
_LEVEL_TOLERANCE = 0.01  # a level up to 1 % coarser than asked is used (pyramids round their sizes)
_SNAP = 1e-3
_BAND_ROWS = 512  # rows of a thumbnail read at a time, one band a thread
_MAX_READING_THREADS = 8


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels and its true downsample from level 0 per axis."""

    dimensions: tuple[int, int]
    downsample: tuple[float, float]


def open_slide(path: str | Path, mpp: float | None = None, mpp_required: bool = True) -> "Slide":
    """Open a slide file of any supported format.

    Parameters
    ----------
    path : slide file.
    mpp : pixel size in µm/px; overrides the file's metadata (needed for JPEG/PNG).
    mpp_required : raise :class:`MppError` when neither ``mpp`` nor the metadata gives the pixel size;
        with ``False`` such a slide opens with ``mpp = None`` (``biopsy info``) and cannot be read
        at a given µm/px.

    Raises
    ------
    SlideError : missing, empty, unreadable, truncated or unsupported file.
    MppError : no pixel size and ``mpp_required``.
    """
    return Slide(path, mpp=mpp, mpp_required=mpp_required)


class Slide:
    """A slide: metadata, ``read`` at any µm/px, ``thumbnail``.

    Picklable and fork-safe: a copy in another process (DataLoader worker) opens its own handle on
    its first read.
    """

    def __init__(self, path: str | Path, mpp: float | None = None, mpp_required: bool = True):
        self.path = Path(path)
        low, high = SLIDE_MPP_RANGE_UM
        if mpp is not None and not is_slide_mpp(mpp):
            raise MppError(f"{self.path}: the pixel size given (--mpp, a manifest's mpp) must be "
                           f"a slide's, {low:g} to {high:g} µm/px (a 20x scan is ~0.5), got {mpp}")
        self._reader = open_reader(self.path)
        self._reader_pid = os.getpid()
        reader = self._reader
        self.dimensions: tuple[int, int] = reader.level_dimensions[0]
        width, height = self.dimensions
        self.levels = [Level((w, h), (width / w, height / h)) for w, h in reader.level_dimensions]
        self.vendor: str = reader.vendor
        self.objective_power: float | None = reader.objective_power
        self.channel_names: list[str] = reader.channel_names
        self.is_fluorescence: bool = reader.is_fluorescence
        # whether a read decodes only the tiles under the region (tiled pyramids), so that more
        # handles (Slide copies) read in parallel at no extra cost; False where a handle decodes
        # a whole image or level first (JPEG/PNG snapshots, strip-organised TIFF)
        self.reads_regions: bool = reader.reads_regions
        self.background_value: int = 0 if reader.is_fluorescence else 255
        self.dtype = reader.dtype
        self.file_mpp: tuple[float, float] | None = reader.mpp  # as the file says, if it does
        self.mpp: tuple[float, float] | None = (mpp, mpp) if mpp is not None else reader.mpp
        self._sha256: str | None = None
        if self.mpp is not None and not all(map(is_slide_mpp, self.mpp)):
            file_mpp, self.mpp = self.mpp, None
            if mpp_required:
                self.close()
                raise MppError(f"{self.path}: the file's pixel size, {file_mpp[0]:.4g} x "
                               f"{file_mpp[1]:.4g} µm, is no slide's ({low:g} to {high:g} µm/px; "
                               f"a print resolution?); {GIVE_MPP}")
        if self.mpp is None and mpp_required:
            self.close()
            raise MppError(f"{self.path}: pixel size unknown (no µm/px in the file's metadata); "
                           f"{GIVE_MPP}")

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, {self.vendor}, {self.dimensions[0]}x{self.dimensions[1]}"
                f" px, mpp={self.mpp}, {len(self.levels)} levels, channels={self.channel_names})")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reader"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def with_mpp_scaled(self, factor: float) -> "Slide":
        """A copy of the slide (its own file handle, opened on first read) whose pixel size is
        ``factor`` times this one's (:mod:`biopsy.mppsearch`)."""
        scaled = copy.copy(self)
        scaled.mpp = (self.mpp[0] * factor, self.mpp[1] * factor)
        return scaled

    @property
    def mpp_given(self) -> bool:
        """Whether the pixel size in use was given by hand and differs from the file's own."""
        if self.mpp is None or self.file_mpp is None:
            return self.mpp is not None
        return not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(self.mpp, self.file_mpp))

    @property
    def sha256(self) -> str:
        """SHA-256 of the slide's bytes, all its files' for a MIRAX or VMS slide (computed once,
        streamed; :func:`biopsy.provenance.slide_sha256`)."""
        if self._sha256 is None:
            self._sha256 = slide_sha256(self.path)
        return self._sha256

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_level(self, level: int, col: int, row: int, width: int, height: int) -> np.ndarray:
        """Pixels ``[row, row + height) x [col, col + width)`` of ``level`` as (h, w, C).

        Only the part inside the level is decoded; the rest is the background value.
        """
        level_width, level_height = self.levels[level].dimensions
        left, top = max(col, 0), max(row, 0)
        right, bottom = min(col + width, level_width), min(row + height, level_height)
        if (left, top, right, bottom) == (col, row, col + width, row + height):
            return self._decode(level, col, row, width, height)
        region = np.full((height, width, len(self.channel_names)), self.background_value, self.dtype)
        if right > left and bottom > top:
            region[top - row:bottom - row, left - col:right - col] = self._decode(
                level, left, top, right - left, bottom - top)
        return region

    def _decode(self, level: int, col: int, row: int, width: int, height: int) -> np.ndarray:
        if self._reader is None or self._reader_pid != os.getpid():
            # first read after unpickling, or in a forked worker: never share a file handle
            self._reader, self._reader_pid = open_reader(self.path), os.getpid()
        try:
            return self._reader.read(level, col, row, width, height)
        except Exception as error:  # decoders raise many types; all mean an unreadable file
            raise SlideError(f"{self.path}: cannot decode level {level} ({error}); "
                             "the file is damaged or truncated") from error

    def verify(self) -> None:
        """Decode the whole coarsest level: raises :class:`SlideError` if the file is damaged."""
        level = len(self.levels) - 1
        width, height = self.levels[level].dimensions
        self.read_level(level, 0, 0, width, height)

    def best_level(self, scale: float) -> int:
        """The coarsest level whose downsample does not exceed ``scale`` (level-0 px per px)."""
        best = 0
        for index, level in enumerate(self.levels):
            if max(level.downsample) <= scale * (1 + _LEVEL_TOLERANCE):
                best = index
        return best

    def _level_read(self, mpp: float) -> tuple[int, tuple[float, float], tuple[float, float]]:
        """The level a read at ``mpp`` takes, its (x, y) downsample, and its pixels per output
        pixel along x and y."""
        scale_x, scale_y = self._scale(mpp)
        level = self.best_level(min(scale_x, scale_y))
        down_x, down_y = self.levels[level].downsample
        return level, (down_x, down_y), (scale_x / down_x, scale_y / down_y)

    def _scale(self, mpp: float) -> tuple[float, float]:
        if self.mpp is None:
            raise MppError(f"{self.path}: pixel size unknown; {GIVE_MPP}")
        if not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be positive, got {mpp}")
        return mpp / self.mpp[0], mpp / self.mpp[1]

    def read(self, x: int, y: int, size_px: tuple[int, int], mpp: float) -> np.ndarray:
        """The region with level-0 top-left ``(x, y)``, ``size_px = (width, height)`` at ``mpp``.

        Returns an array (height, width, channels) of the slide's dtype, read from the finest level
        not coarser than needed and area-averaged; past the slide's edge it holds the background.
        """
        level, (down_x, down_y), (step_x, step_y) = self._level_read(mpp)
        start_x, start_y = _snap(x / down_x), _snap(y / down_y)
        width, height = size_px
        n_x, n_y = math.ceil(_snap(width * step_x)) + 1, math.ceil(_snap(height * step_y)) + 1
        # OpenCV copies a region it would resize to its own size, whatever the scale asked
        copied = round(n_x / step_x) == n_x and round(n_y / step_y) == n_y
        if start_x == int(start_x) and start_y == int(start_y) and (
                step_x == step_y == 1 or not copied):
            # whole-pixel origin: OpenCV's area resize with an exact scale is the area average
            region = self.read_level(level, int(start_x), int(start_y), n_x, n_y)
            if step_x == step_y == 1:
                return np.ascontiguousarray(region[:height, :width])
            return _resize_whole_pixel_origin(region, step_x, step_y)[:height, :width]
        first_x, n_x, weights_x = _axis_weights(start_x, step_x, width)
        first_y, n_y, weights_y = _axis_weights(start_y, step_y, height)
        region = self.read_level(level, first_x, first_y, n_x, n_y)
        return _resample(region, weights_x, weights_y)

    def whole_pixel_origin(self, x: float, y: float, mpp: float) -> tuple[float, float]:
        """The level-0 point within one pixel before ``(x, y)`` (of the level that a read at
        ``mpp`` takes; or a rounding error after it) where such a read starts on a whole pixel of
        that level: :meth:`read` then resizes it (or copies, at a whole number of its pixels per
        pixel) rather than resampling between pixels, ~0.5 ms less for a 256 px patch."""
        _, (down_x, down_y), _ = self._level_read(mpp)
        return math.floor(_snap(x / down_x)) * down_x, math.floor(_snap(y / down_y)) * down_y

    def cut_offsets(self, xy: np.ndarray, mpp: float) -> np.ndarray | None:
        """(n, 2) offsets (x, y) in output pixels of reads at level-0 corners ``xy`` and ``mpp``
        from the top-left corner of their union, when each can be cut from one read of it with
        the same pixels: every read starts on a whole pixel of the level it reads, that level has
        exactly a whole number of pixels per output pixel, and the starts lie whole output pixels
        apart. None otherwise."""
        _, down, steps = self._level_read(mpp)
        down, steps = np.array(down, float), np.array(steps)
        starts = np.asarray(xy, float) / down
        whole = np.round(starts)
        if np.any(steps != np.round(steps)) or np.any(np.abs(starts - whole) >= _SNAP):
            return None
        apart = whole - whole.min(axis=0)
        if np.any(apart % steps):
            return None
        return (apart // steps).astype(np.int64)

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` µm/px, (height, width, channels).

        Read in bands of rows on threads, each through its own handle, where that gives the
        same pixels as one read: a handle decodes only what it reads, and the level read has
        a whole number of pixels per output pixel (60,000 px slide at 8 µm/px, 2 cores: 0.36
        -> 0.19 s)."""
        scale_x, scale_y = self._scale(mpp)
        width, height = self.dimensions
        size_px = (max(1, round(width / scale_x)), max(1, round(height / scale_y)))
        _, _, steps = self._level_read(mpp)
        copies = ThreadSlides(self)
        threads = copies.threads(_MAX_READING_THREADS)
        if threads == 1 or any(step != round(step) for step in steps) or size_px[1] < 2 * _BAND_ROWS:
            return self.read(0, 0, size_px, mpp)
        image = np.empty((size_px[1], size_px[0], len(self.channel_names)), self.dtype)

        def read_band(top: int) -> None:
            rows = min(_BAND_ROWS, size_px[1] - top)
            image[top:top + rows] = copies.slide().read(0, top * scale_y, (size_px[0], rows), mpp)

        with copies, ThreadPoolExecutor(threads) as pool:
            list(pool.map(read_band, range(0, size_px[1], _BAND_ROWS)))
        return image


class ThreadSlides:
    """Where a slide's handle decodes only what it reads (``reads_regions``), a copy of it per
    thread, each reading through its own handle (a handle is not safe to share between
    threads), closed on exit; else the slide itself, for one thread."""

    def __init__(self, slide: Slide):
        self._slide, self._local, self._copies = slide, threading.local(), []

    def threads(self, most: int) -> int:
        """How many threads may read: up to ``most`` and the CPU count, or 1."""
        return min(most, os.cpu_count() or 1) if self._slide.reads_regions else 1

    def slide(self) -> Slide:
        """This thread's slide."""
        if not self._slide.reads_regions:
            return self._slide
        if not hasattr(self._local, "slide"):
            self._local.slide = copy.copy(self._slide)  # opens its handle on its first read
            self._copies.append(self._local.slide)
        return self._local.slide

    def __enter__(self) -> "ThreadSlides":
        return self

    def __exit__(self, *exc) -> None:
        for each in self._copies:
            each.close()


def single_threaded_opencv(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` for workers that read tiles (resampled here with OpenCV) or
    augment them (albumentations, also OpenCV): OpenCV would otherwise start a thread per CPU
    core in every worker (albumentations' performance guide says to set this)."""
    cv2.setNumThreads(0)


def _snap(value: float) -> float:
    """``value`` rounded to an integer when within 0.001 of one (floating-point noise)."""
    return float(round(value)) if abs(value - round(value)) < _SNAP else value


def _resize_whole_pixel_origin(region: np.ndarray, step_x: float, step_y: float) -> np.ndarray:
    """Area average (linear interpolation when enlarging) with exactly ``step`` source pixels per
    output pixel, from the region's top-left corner; OpenCV, four channels at a time."""
    interpolation = cv2.INTER_AREA if min(step_x, step_y) >= 1 else cv2.INTER_LINEAR
    parts = [cv2.resize(region[..., first:first + 4], None, fx=1 / step_x, fy=1 / step_y,
                        interpolation=interpolation) for first in range(0, region.shape[2], 4)]
    return np.concatenate([part.reshape(part.shape[0], part.shape[1], -1) for part in parts], axis=2)


def _axis_weights(start: float, step: float, n_out: int):
    """Sparse (n_out, n_source) weights mapping source pixels to output pixels along one axis.

    Output pixel ``j`` averages source ``[start + j * step, start + (j + 1) * step)``; steps below 1
    (enlarging) interpolate linearly between pixel centres instead. Returns the first source pixel,
    the number of source pixels and the weights.
    """
    outputs = np.arange(n_out)
    if step >= 1:
        low = start + step * outputs
        high = low + step
        columns = np.floor(low).astype(np.int64)[:, None] + np.arange(math.ceil(step) + 1)
        weights = np.minimum(columns + 1, high[:, None]) - np.maximum(columns, low[:, None])
        weights = np.clip(weights, 0, None) / step
    else:
        centre = start + step * (outputs + 0.5) - 0.5
        left = np.floor(centre)
        fraction = (centre - left)[:, None]
        columns = left.astype(np.int64)[:, None] + np.arange(2)
        weights = np.hstack([1 - fraction, fraction])
    first = int(columns.min())
    n_source = int(columns.max()) - first + 1
    matrix = scipy.sparse.csr_matrix(
        (weights.astype(np.float32).ravel(), (columns - first).ravel(),
         np.arange(0, columns.size + 1, columns.shape[1])), shape=(n_out, n_source))
    return first, n_source, matrix


def _resample(region: np.ndarray, weights_x, weights_y) -> np.ndarray:
    """Apply sparse per-axis weights to an (h, w, C) region; same dtype out."""
    n_y, n_x, channels = region.shape
    height, width = weights_y.shape[0], weights_x.shape[0]
    rows = weights_y @ region.reshape(n_y, n_x * channels).astype(np.float32)
    columns_first = rows.reshape(height, n_x, channels).transpose(1, 0, 2).reshape(n_x, -1)
    result = (weights_x @ columns_first).reshape(width, height, channels).transpose(1, 0, 2)
    if np.issubdtype(region.dtype, np.integer):
        info = np.iinfo(region.dtype)
        result = np.clip(np.rint(result), info.min, info.max)
    return np.ascontiguousarray(result.astype(region.dtype))
