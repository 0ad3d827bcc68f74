"""One ``Slide`` over every slide format: regions at any µm/px, in level-0 pixel coordinates.

Formats: whatever OpenSlide reads (Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Ventana BIF, DICOM
WSI), TIFF pyramids through tifffile (generic tiled TIFF, OME-TIFF and PerkinElmer QPTIFF fluorescence
with channel names), and plain JPEG/PNG photomicrographs (one level; their pixel size must be given).
A DICOM file OpenSlide refuses gets a SlideError naming the mandatory attributes it lacks.

Geometry: level-0 pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``; a level with
downsample ``(dx, dy)`` has pixel ``k`` over level-0 ``[k * dx, (k + 1) * dx)``. ``read`` gives output
pixel ``j`` the exact area average of the level-0 span ``[x + j * s, x + (j + 1) * s)`` (``s`` level-0
pixels per output pixel), so adjacent reads line up exactly, whatever the scale. (OpenSlide itself
places a level's pixels at level-0 location / downsample and interpolates the fraction: on levels
with a non-integer downsample its regions can be off by up to 0.5 / downsample level pixels.)
"""

import hashlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import cv2
import numpy as np
import openslide
import PIL.Image
import pydicom
import scipy.sparse
import tifffile
import zarr

from biopsy.errors import MppError, SlideError

BRIGHTFIELD_CHANNELS = ["red", "green", "blue"]
_LEVEL_TOLERANCE = 0.01  # a level up to 1 % coarser than asked is used (pyramids round their sizes)
_SNAP = 1e-3


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
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise MppError(f"{self.path}: --mpp must be a positive number of µm/px, got {mpp}")
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
        self.background_value: int = 0 if reader.is_fluorescence else 255
        self.dtype = reader.dtype
        self.mpp: tuple[float, float] | None = (mpp, mpp) if mpp is not None else reader.mpp
        self._sha256: str | None = None
        if self.mpp is None and mpp_required:
            self.close()
            raise MppError(f"{self.path}: pixel size unknown (no µm/px in the file's metadata); "
                           "give it with --mpp")

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, {self.vendor}, {self.dimensions[0]}x{self.dimensions[1]}"
                f" px, mpp={self.mpp}, {len(self.levels)} levels, channels={self.channel_names})")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reader"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def sha256(self) -> str:
        """SHA-256 of the file's bytes (computed once, streamed)."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as file:
                for block in iter(lambda: file.read(1 << 22), b""):
                    digest.update(block)
            self._sha256 = digest.hexdigest()
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

    def _scale(self, mpp: float) -> tuple[float, float]:
        if self.mpp is None:
            raise MppError(f"{self.path}: pixel size unknown; give it with --mpp")
        if not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be positive, got {mpp}")
        return mpp / self.mpp[0], mpp / self.mpp[1]

    def read(self, x: int, y: int, size_px: tuple[int, int], mpp: float) -> np.ndarray:
        """The region with level-0 top-left ``(x, y)``, ``size_px = (width, height)`` at ``mpp``.

        Returns an array (height, width, channels) of the slide's dtype, read from the finest level
        not coarser than needed and area-averaged; past the slide's edge it holds the background.
        """
        scale_x, scale_y = self._scale(mpp)
        level = self.best_level(min(scale_x, scale_y))
        down_x, down_y = self.levels[level].downsample
        start_x, start_y = _snap(x / down_x), _snap(y / down_y)
        step_x, step_y = scale_x / down_x, scale_y / down_y
        width, height = size_px
        if start_x == int(start_x) and start_y == int(start_y):
            # whole-pixel origin: OpenCV's area resize with an exact scale is the area average
            n_x, n_y = math.ceil(_snap(width * step_x)) + 1, math.ceil(_snap(height * step_y)) + 1
            region = self.read_level(level, int(start_x), int(start_y), n_x, n_y)
            if step_x == step_y == 1:
                return np.ascontiguousarray(region[:height, :width])
            return _resize_whole_pixel_origin(region, step_x, step_y)[:height, :width]
        first_x, n_x, weights_x = _axis_weights(start_x, step_x, width)
        first_y, n_y, weights_y = _axis_weights(start_y, step_y, height)
        region = self.read_level(level, first_x, first_y, n_x, n_y)
        return _resample(region, weights_x, weights_y)

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` µm/px, (height, width, channels)."""
        scale_x, scale_y = self._scale(mpp)
        width, height = self.dimensions
        size_px = (max(1, round(width / scale_x)), max(1, round(height / scale_y)))
        return self.read(0, 0, size_px, mpp)


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


# Readers: one per library. Each exposes level_dimensions, mpp (or None), vendor, objective_power,
# channel_names, is_fluorescence, dtype, and read(level, col, row, width, height) -> (h, w, C) of a
# region inside the level.

_TIFF_SIGNATURES = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
_OPENSLIDE_TIFF_FLAVOURS = ("svs", "ndpi", "scn", "bif", "philips")  # tifffile's names
_WHOLE_LEVEL_BYTES = 1 << 29  # strip-organised levels up to 512 MiB are decoded whole, once
_SUPPORTED = "OpenSlide formats, TIFF/OME-TIFF/QPTIFF, DICOM, JPEG, PNG"


def open_reader(path: Path):
    """The reader for ``path``, chosen by content; :class:`SlideError` when none can read it."""
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a directory; give the slide file itself")
    try:
        with open(path, "rb") as file:
            head = file.read(132)
        vendor = openslide.OpenSlide.detect_format(str(path))
    except OSError as error:
        raise SlideError(f"{path}: cannot read file ({error.strerror or error})") from error
    if not head:
        raise SlideError(f"{path}: file is empty")
    if vendor == "dicom" or head[128:132] == b"DICM":
        return _open_dicom(path)
    if head[:4] in _TIFF_SIGNATURES and vendor in (None, "generic-tiff"):
        return _TiffReader(path)
    if vendor is not None:
        return _OpenSlideReader(path, vendor)
    return _ImageReader(path)


def _positive_float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


class _OpenSlideReader:
    channel_names = BRIGHTFIELD_CHANNELS
    is_fluorescence = False
    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path, vendor: str):
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as error:
            raise SlideError(f"{path}: cannot open this {vendor} file ({error}); the file is "
                             "damaged, truncated or a variant OpenSlide does not read") from error
        properties = self._slide.properties
        self.vendor = vendor
        self.level_dimensions = list(self._slide.level_dimensions)
        self._downsamples = self._slide.level_downsamples
        self.objective_power = _positive_float(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        mpp_x = _positive_float(properties.get(openslide.PROPERTY_NAME_MPP_X))
        mpp_y = _positive_float(properties.get(openslide.PROPERTY_NAME_MPP_Y))
        self.mpp = (mpp_x, mpp_y) if mpp_x and mpp_y else None

    def read(self, level: int, col: int, row: int, width: int, height: int) -> np.ndarray:
        downsample = self._downsamples[level]
        location = (round(col * downsample), round(row * downsample))
        rgba = np.asarray(self._slide.read_region(location, level, (width, height)))
        alpha = rgba[..., 3:]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        # OpenSlide gives un-premultiplied RGBA, transparent outside the scanned area: composite on white
        return (255 - ((255 - rgba[..., :3].astype(np.uint16)) * alpha + 127) // 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


class _TiffLevel:
    """One level of a tifffile series as a lazily read (height, width, channels) array.

    ``load_whole``: decode the level once, at its first read (for strip-organised levels, where
    any region costs whole-width strips anyway).
    """

    def __init__(self, array, axes: str, channel_axis: str | None, n_channels: int,
                 load_whole: bool):
        self._array, self._axes, self._channel_axis = array, axes, channel_axis
        self._load_whole = load_whole
        self._channels = slice(0, n_channels)
        self.shape = (array.shape[axes.index("Y")], array.shape[axes.index("X")], n_channels)
        self.dtype = array.dtype
        kept = [axis for axis in axes if axis in ("Y", "X", channel_axis)]
        self._order = [kept.index("Y"), kept.index("X")] + ([kept.index(channel_axis)]
                                                          if channel_axis else [])

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key
        if self._load_whole:
            self._array, self._load_whole = self._array[...], False
        index = tuple(rows if axis == "Y" else cols if axis == "X"
                      else self._channels if axis == self._channel_axis else 0 for axis in self._axes)
        data = np.transpose(self._array[index], self._order)
        return np.ascontiguousarray(data if self._channel_axis else data[..., None])


class _TiffReader:
    def __init__(self, path: Path):
        tifffile_log = logging.getLogger("tifffile")  # its warnings on damaged files become our error
        previous_level = tifffile_log.level
        tifffile_log.setLevel(logging.CRITICAL)
        try:
            self._tiff = tifffile.TiffFile(path)
            series = self._tiff.series[0]
            levels = _tiff_levels(self._tiff)
            arrays = [zarr.open(level.aszarr(level=0), mode="r") for level in levels]
            self._check_complete(path, levels)
        except SlideError:
            raise
        except Exception as error:  # tifffile raises many types for damaged files
            raise SlideError(f"{path}: cannot read this TIFF ({error}); the file is damaged, "
                             "truncated or not a TIFF image") from error
        finally:
            tifffile_log.setLevel(previous_level)
        axes = series.axes
        is_rgb = "S" in axes and series.shape[axes.index("S")] in (3, 4)
        channel_axis = next((axis for axis in "SCI" if axis in axes), None)
        n_channels = 3 if is_rgb else series.shape[axes.index(channel_axis)] if channel_axis else 1
        self._levels = [
            _TiffLevel(array, axes, channel_axis, n_channels,
                       load_whole=not level.keyframe.is_tiled and level.nbytes <= _WHOLE_LEVEL_BYTES)
            for array, level in zip(arrays, levels, strict=True)]
        self.level_dimensions = [(level.shape[1], level.shape[0]) for level in self._levels]
        self.is_fluorescence = not is_rgb
        self.dtype = series.dtype
        self.vendor = "qptiff" if self._tiff.is_qpi else "ome-tiff" if self._tiff.is_ome else "tiff"
        self.mpp, self.objective_power, names = _tiff_metadata(self._tiff, series)
        if is_rgb:
            self.channel_names = BRIGHTFIELD_CHANNELS
        elif len(names) == n_channels:
            self.channel_names = names
        else:
            self.channel_names = [f"channel {index + 1}" for index in range(n_channels)]

    def _check_complete(self, path: Path, levels: list) -> None:
        """Raise :class:`SlideError` for scanner files OpenSlide refused (damaged) and for image
        data that runs past the end of the file (truncated)."""
        vendor = next((name for name in _OPENSLIDE_TIFF_FLAVOURS
                       if getattr(self._tiff, f"is_{name}", False)), None)
        if vendor is not None:
            raise SlideError(f"{path}: damaged or truncated {vendor.upper()} file (OpenSlide cannot "
                             "open it); copy the file again from the scanner or archive")
        file_size = path.stat().st_size
        for level in levels:
            for page in level.pages:
                ends = np.add(page.dataoffsets, page.databytecounts)
                if ends.size and ends.max() > file_size:
                    raise SlideError(f"{path}: truncated: image data runs past the end of the file "
                                     f"({file_size} bytes); copy the file again")

    def read(self, level: int, col: int, row: int, width: int, height: int) -> np.ndarray:
        return self._levels[level][row:row + height, col:col + width]

    def close(self) -> None:
        self._tiff.close()


def _tiff_levels(tiff) -> list:
    """The pyramid of the main image: tifffile's levels, plus reduced-resolution images of the same
    kind that tifffile leaves as separate series (it only groups levels of one constant factor)."""
    base = tiff.series[0]
    levels = list(base.levels)
    for series in tiff.series[1:]:
        keyframe = series.keyframe
        height, width = series.shape[series.axes.index("Y")], series.shape[series.axes.index("X")]
        smallest = levels[-1].shape
        same_kind = series.axes == base.axes and series.dtype == base.dtype
        same_aspect = abs(width / height - smallest[base.axes.index("X")]
                          / smallest[base.axes.index("Y")]) < 0.02 * width / height
        if same_kind and same_aspect and (keyframe.is_reduced or keyframe.is_subifd) and \
                width < smallest[base.axes.index("X")]:
            levels.append(series)
    return levels


_LENGTH_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _tiff_metadata(tiff, series) -> tuple[tuple[float, float] | None, float | None, list[str]]:
    """(mpp, objective power, channel names) from OME-XML, QPI descriptions or resolution tags."""
    mpp = objective_power = None
    names: list[str] = []
    if tiff.is_ome:
        root = ElementTree.fromstring(tiff.ome_metadata)
        pixels = root.find("{*}Image/{*}Pixels")
        if pixels is not None:
            size_x = _positive_float(pixels.get("PhysicalSizeX"))
            size_y = _positive_float(pixels.get("PhysicalSizeY"))
            unit_x = _LENGTH_UM.get(pixels.get("PhysicalSizeXUnit", "µm"))
            unit_y = _LENGTH_UM.get(pixels.get("PhysicalSizeYUnit", "µm"))
            if size_x and size_y and unit_x and unit_y:
                mpp = (size_x * unit_x, size_y * unit_y)
            names = [channel.get("Name", "") for channel in pixels.findall("{*}Channel")]
        objective = root.find("{*}Instrument/{*}Objective")
        if objective is not None:
            objective_power = _positive_float(objective.get("NominalMagnification"))
    if tiff.is_qpi:
        descriptions = [ElementTree.fromstring(page.description) for page in series.pages]
        names = [description.findtext("Name", "") for description in descriptions]
        objective_power = _positive_float(descriptions[0].findtext("Objective", "").rstrip("xX"))
    if mpp is None:
        mpp = _resolution_mpp(series.pages[0])
    return mpp, objective_power, [name for name in names if name]


def _resolution_mpp(page) -> tuple[float, float] | None:
    """Pixel size from the TIFF XResolution/YResolution tags (pixels per inch or per cm)."""
    unit_um = {2: 25400.0, 3: 10000.0}.get(int(page.tags.valueof("ResolutionUnit", 1)))
    x_resolution, y_resolution = page.tags.valueof("XResolution"), page.tags.valueof("YResolution")
    if unit_um is None or x_resolution is None or y_resolution is None:
        return None
    pixels_per_unit_x = x_resolution[0] / x_resolution[1] if x_resolution[1] else 0
    pixels_per_unit_y = y_resolution[0] / y_resolution[1] if y_resolution[1] else 0
    if pixels_per_unit_x <= 0 or pixels_per_unit_y <= 0:
        return None
    return unit_um / pixels_per_unit_x, unit_um / pixels_per_unit_y


class _ImageReader:
    """A plain photomicrograph (JPEG, PNG, ...): one level, decoded whole, pixel size from the user."""

    mpp = None
    objective_power = None
    channel_names = BRIGHTFIELD_CHANNELS
    is_fluorescence = False
    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path):
        try:
            with PIL.Image.open(path) as image:
                self.vendor = (image.format or "image").lower()
                self._array = np.asarray(image.convert("RGB"))
        except PIL.UnidentifiedImageError as error:
            raise SlideError(f"{path}: not a slide or image format this toolkit reads "
                             f"({_SUPPORTED})") from error
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
            raise SlideError(f"{path}: cannot decode image ({error}); the file is damaged or "
                             "truncated") from error
        self.level_dimensions = [(self._array.shape[1], self._array.shape[0])]

    def read(self, level: int, col: int, row: int, width: int, height: int) -> np.ndarray:
        return self._array[row:row + height, col:col + width]

    def close(self) -> None:
        self._array = None


def _open_dicom(path: Path):
    try:
        return _OpenSlideReader(path, "dicom")
    except SlideError as openslide_error:
        reason = str(openslide_error.__cause__)
        with warnings.catch_warnings():  # pydicom warns about every over-long value
            warnings.simplefilter("ignore")
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        missing = [name for name in ("ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows")
                   if name not in header]
        if missing:
            reason = f"it lacks the mandatory attribute(s) {', '.join(missing)}"
        raise SlideError(f"{path}: cannot read this DICOM whole-slide image ({reason}); re-export "
                         "it as a standard DICOM WSI or as a TIFF") from openslide_error
