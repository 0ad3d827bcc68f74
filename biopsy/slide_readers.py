"""Slide format readers, one per library, and the choice of reader by file content.

OpenSlide reads the scanner formats (Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Ventana BIF, DICOM
WSI); tifffile the TIFF pyramids (generic tiled TIFF, OME-TIFF and PerkinElmer QPTIFF fluorescence
with channel names); Pillow plain JPEG/PNG photomicrographs (one level; their pixel size must be
given). A single DICOM WSI file OpenSlide refuses is read by :mod:`biopsy.dicom_wsi`.

Each reader exposes level_dimensions, mpp (or None), vendor, objective_power, channel_names,
is_fluorescence, dtype, and read(level, col, row, width, height) -> (h, w, C) of a region inside the
level.
"""

import math
import warnings
from pathlib import Path
from xml.etree import ElementTree

import cv2
import numpy as np
import openslide
import PIL.Image
import tifffile
import zarr

from biopsy.dicom_wsi import DicomWsiReader
from biopsy.errors import SlideError
from biopsy.labelmap import quiet_tifffile

BRIGHTFIELD_CHANNELS = ["red", "green", "blue"]
_TIFF_SIGNATURES = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
_OPENSLIDE_TIFF_FLAVOURS = ("svs", "ndpi", "scn", "bif", "philips")  # tifffile's names
_WHOLE_LEVEL_BYTES = 1 << 29  # strip-organised levels up to 512 MiB are decoded whole, once
_SUPPORTED = "OpenSlide formats, TIFF/OME-TIFF/QPTIFF, DICOM, JPEG, PNG"
ASSOCIATED_ALPHA, UNASSOCIATED_ALPHA = 1, 2  # TIFF ExtraSamples values
MAX_IMAGE_PIXELS = 1_000_000_000  # a plain image is decoded whole: 3 GB of RGB at most
# Pillow's guard against decompression bombs refused photomicrographs from 179 Mpx (twice its
# 89 Mpx default); it warns above its limit and refuses above twice it. Raised, never lowered.
if PIL.Image.MAX_IMAGE_PIXELS is not None:
    PIL.Image.MAX_IMAGE_PIXELS = max(PIL.Image.MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS)


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
    reads_regions = True  # a read decodes the tiles under it only (see Slide.reads_regions)

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
        if rgba[..., 3].min() == 255:
            return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)  # ~4x NumPy's copy of rgba[..., :3]
        # OpenSlide gives un-premultiplied RGBA, transparent outside the scanned area
        return _on_white_array(rgba, premultiplied=False)

    def close(self) -> None:
        self._slide.close()


class _TiffLevel:
    """One level of a tifffile series as a lazily read (height, width, channels) array.

    ``load_whole``: decode the level once, at its first read (for strip-organised levels, where
    any region costs whole-width strips anyway).
    """

    def __init__(self, array, axes: str, channel_axis: str | None, n_channels: int,
                 load_whole: bool, alpha: int = 0, palette: np.ndarray | None = None):
        self._array, self._axes, self._channel_axis = array, axes, channel_axis
        self._load_whole, self._alpha, self._palette = load_whole, alpha, palette
        self._channels = slice(0, n_channels + bool(alpha))
        self.shape = (array.shape[axes.index("Y")], array.shape[axes.index("X")], n_channels)
        self.dtype = array.dtype if palette is None else palette.dtype
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
        if self._alpha:
            data = _on_white_array(data, premultiplied=self._alpha == ASSOCIATED_ALPHA)
        if self._palette is not None:
            return self._palette[data]
        return np.ascontiguousarray(data if self._channel_axis else data[..., None])


def _on_white_array(rgba: np.ndarray, premultiplied: bool) -> np.ndarray:
    """uint8 RGB of uint8 RGBA shown on white (glass), as OpenSlide composites its slides."""
    if (rgba[..., 3] == 255).all():  # opaque: as it is
        return rgba[..., :3]
    rgb, alpha = rgba[..., :3].astype(np.uint16), rgba[..., 3:].astype(np.uint16)
    if premultiplied:
        return np.minimum(rgb + (255 - alpha), 255).astype(np.uint8)
    return (255 - ((255 - rgb) * alpha + 127) // 255).astype(np.uint8)


class _TiffReader:
    def __init__(self, path: Path):
        try:
            with quiet_tifffile():  # its warnings on damaged files become our error
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
        axes = series.axes
        palette = _palette(series)
        is_rgb = "S" in axes and series.shape[axes.index("S")] in (3, 4) or palette is not None
        channel_axis = next((axis for axis in "SCI" if axis in axes), None)
        n_channels = 3 if is_rgb else series.shape[axes.index(channel_axis)] if channel_axis else 1
        load_whole = [not level.keyframe.is_tiled and level.nbytes <= _WHOLE_LEVEL_BYTES
                      for level in levels]
        self._levels = [_TiffLevel(array, axes, channel_axis, n_channels, whole,
                                   _alpha_kind(level) if is_rgb else 0, palette)
                        for array, whole, level in zip(arrays, load_whole, levels, strict=True)]
        self.reads_regions = not any(load_whole)
        self.level_dimensions = [(level.shape[1], level.shape[0]) for level in self._levels]
        self.is_fluorescence = not is_rgb
        self.dtype = series.dtype if palette is None else palette.dtype
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


def _palette(series) -> np.ndarray | None:
    """The RGB (uint8) of each index of a palette-colour image, or None for any other."""
    page = series.keyframe
    if page.photometric != tifffile.PHOTOMETRIC.PALETTE or page.colormap is None or "S" in series.axes:
        return None
    return np.ascontiguousarray((np.asarray(page.colormap).T >> 8).astype(np.uint8))


def _alpha_kind(level) -> int:
    """TIFF ExtraSamples of an 8-bit RGBA level's fourth sample, when it is alpha: associated
    (premultiplied, 1) or unassociated (2); else 0. Per level: a pyramid may mix RGB and RGBA."""
    page = level.keyframe
    extra = tuple(page.extrasamples or ())
    if level.dtype != np.uint8 or page.samplesperpixel != 4 or not extra:
        return 0
    return extra[0] if extra[0] in (ASSOCIATED_ALPHA, UNASSOCIATED_ALPHA) else 0


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
    reads_regions = False

    def __init__(self, path: Path):
        try:
            with warnings.catch_warnings():  # above the limit _check_image refuses it in words
                warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
                image = PIL.Image.open(path)
            with image:
                self.vendor = (image.format or "image").lower()
                _check_image(path, image)
                self._array = np.asarray(_on_white(image))
        except PIL.UnidentifiedImageError as error:
            raise SlideError(f"{path}: not a slide or image format this toolkit reads "
                             f"({_SUPPORTED})") from error
        except PIL.Image.DecompressionBombError as error:
            raise SlideError(f"{path}: too large to decode whole ({error}); save it as a tiled "
                             "pyramidal TIFF") from error
        except (OSError, ValueError) as error:
            raise SlideError(f"{path}: cannot decode image ({error}); the file is damaged or "
                             "truncated") from error
        self.level_dimensions = [(self._array.shape[1], self._array.shape[0])]

    def read(self, level: int, col: int, row: int, width: int, height: int) -> np.ndarray:
        return self._array[row:row + height, col:col + width]

    def close(self) -> None:
        self._array = None


def _check_image(path: Path, image: PIL.Image.Image) -> None:
    """Refuse what cannot be read as 8-bit RGB: 16- or 32-bit greyscale (clipped to white),
    and an image too large to decode whole."""
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise SlideError(f"{path}: {image.mode} pixels (16- or 32-bit greyscale); the models take "
                         "8-bit images, convert it to 8 bits per channel")
    pixels = image.width * image.height
    if pixels > MAX_IMAGE_PIXELS:
        raise SlideError(f"{path}: {pixels:,} pixels, more than a plain image decoded whole may "
                         f"hold ({MAX_IMAGE_PIXELS:,}); save it as a tiled pyramidal TIFF")


def _on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB, transparent pixels shown on white (glass), as OpenSlide composites its slides."""
    if not image.has_transparency_data:
        return image.convert("RGB")
    white = PIL.Image.new("RGBA", image.size, "white")
    return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def _open_dicom(path: Path):
    """OpenSlide for DICOM WSI (it also gathers the other levels of the series from the folder);
    a file it refuses is read on its own by :class:`DicomWsiReader` or refused with the reason."""
    try:
        return _OpenSlideReader(path, "dicom")
    except SlideError:
        return DicomWsiReader(path)
