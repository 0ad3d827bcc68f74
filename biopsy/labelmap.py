"""Label maps (uint8 class indices) as pyramidal OME-TIFF carrying their mpp and class table.

The file is a plain pyramidal OME-TIFF (zlib, tiled, lower levels as SubIFDs, nearest-neighbour
downsampling so every level holds true class indices) that QuPath, napari and Bio-Formats open.
``PhysicalSizeX/Y`` give the level-0 mpp; the class table travels in the OME-XML as a
``MapAnnotation`` whose key is ``biopsy.label_map`` and whose value is JSON::

    {"format": "biopsy.label_map/1", "mpp": 2.0,
     "class_names": ["background", ...], "class_colours": {"background": [255, 255, 255], ...},
     "slide_mpp": 0.5}

``slide_mpp`` (where known) is the level-0 pixel size of the slide the map was made from, as it
was read (a searched pixel size included), so that scoring the map later places its outlines
on that slide's pixels.

The channel is named ``class`` and the image ``label map``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from biopsy.errors import AnnotationError
from biopsy.pyramid import write_pyramid

LABEL_MAP_KEY = "biopsy.label_map"
LABEL_MAP_FORMAT = "biopsy.label_map/1"


@dataclass(frozen=True)
class LabelMap:
    """A class-index map, its pixel size in µm and the class table that gives indices meaning."""

    labels: np.ndarray
    mpp: float
    class_names: tuple[str, ...]
    class_colours: dict[str, tuple[int, int, int]]
    slide_mpp: float | None = None  # level-0 µm/px of the slide it was made from, where known


def write_label_map(
    path: str | Path,
    labels_or_bands: np.ndarray | Iterable[np.ndarray],
    mpp: float,
    class_names: Sequence[str],
    class_colours: Mapping[str, Sequence[int]],
    shape_px: tuple[int, int] | None = None,
    *,
    tile_px: int = 256,
    min_level_px: int = 256,
    slide_mpp: float | None = None,
) -> None:
    """Write a label map as pyramidal OME-TIFF, atomically.

    Parameters
    ----------
    path : output file, conventionally ``*.ome.tif``.
    labels_or_bands : a 2-D uint8 array of class indices, or an iterable of consecutive full-width
        row bands of one (then ``shape_px`` is required), so a long map need not sit in memory.
    mpp : level-0 pixel size in µm per pixel.
    class_names : the name of each class index.
    class_colours : RGB colour of every class name.
    shape_px : (height, width) of the map; taken from the array when one is given.
    tile_px, min_level_px : tile side, and the smallest side a pyramid level may have.
    slide_mpp : level-0 µm/px of the slide the map was made from (None: not recorded).
    """
    class_names = tuple(class_names)
    if not class_names or len(class_names) > 256:
        raise ValueError(f"a label map needs 1 to 256 class names, got {len(class_names)}")
    missing = [name for name in class_names if name not in class_colours]
    if missing:
        raise ValueError(f"class_colours lacks a colour for {missing}")
    if isinstance(labels_or_bands, np.ndarray):
        if labels_or_bands.ndim != 2:
            raise ValueError(f"labels must be 2-D, got shape {labels_or_bands.shape}")
        shape_px = labels_or_bands.shape
        labels_or_bands = [labels_or_bands]
    elif shape_px is None:
        raise ValueError("shape_px is required when the label map is given as bands")
    table = {
        "format": LABEL_MAP_FORMAT,
        "mpp": float(mpp),
        "class_names": list(class_names),
        "class_colours": {name: [int(c) for c in class_colours[name]] for name in class_names},
    } | ({} if slide_mpp is None else {"slide_mpp": float(slide_mpp)})
    write_pyramid(
        path,
        _checked_bands(labels_or_bands, len(class_names)),
        shape_px,
        mpp,
        style="ome",
        tile_px=tile_px,
        compression="zlib",
        background=0,
        resample="nearest",
        min_level_px=min_level_px,
        description_extra={
            "Name": "label map",
            "Channel": {"Name": "class"},
            "MapAnnotation": {LABEL_MAP_KEY: json.dumps(table)},
        },
    )


def _checked_bands(bands: Iterable[np.ndarray], class_count: int) -> Iterable[np.ndarray]:
    for band in bands:
        band = np.asarray(band)
        if band.dtype != np.uint8 or band.ndim != 2:
            raise ValueError(f"label bands must be 2-D uint8, got {band.dtype} {band.shape}")
        if band.size and int(band.max()) >= class_count:
            raise ValueError(f"label {int(band.max())} has no class name ({class_count} names)")
        yield band


def read_label_map(path: str | Path, level: int = 0) -> LabelMap:
    """Read one pyramid level of a label map written by :func:`write_label_map`.

    Level ``k`` is the level-0 map sampled every ``2**k`` pixels; its mpp is ``mpp * 2**k``.
    Raises :class:`AnnotationError` for a missing file, a file that is not an OME-TIFF or one
    without a class table.
    """
    path = Path(path)
    try:
        with quiet_tifffile(), tifffile.TiffFile(path) as tif:
            table = _class_table(path, tif.ome_metadata)
            levels = tif.series[0].levels
            if not 0 <= level < len(levels):
                raise AnnotationError(f"{path}: label map has levels 0..{len(levels) - 1}, not {level}")
            labels = levels[level].asarray()
    except (OSError, tifffile.TiffFileError) as error:
        raise AnnotationError(f"{path}: cannot read a label map ({error}); give a .ome.tif "
                              "written by biopsy") from error
    if labels.dtype != np.uint8 or labels.ndim != 2:
        raise AnnotationError(f"{path}: label map must be 2-D uint8, found {labels.dtype} {labels.shape}")
    return LabelMap(
        labels=labels,
        mpp=table["mpp"] * 2**level,
        class_names=tuple(table["class_names"]),
        class_colours={name: tuple(rgb) for name, rgb in table["class_colours"].items()},
        slide_mpp=table.get("slide_mpp"),
    )


@contextlib.contextmanager
def quiet_tifffile():
    """tifffile's log kept quiet: what it logs of a damaged file is told in our error instead."""
    log = logging.getLogger("tifffile")
    previous = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(previous)


def _class_table(path: Path, ome_xml: str | None) -> dict:
    """The class table stored in the OME-XML, validated."""
    hint = ("not a biopsy label map (no class table in its OME-XML: not written by "
            "write_label_map, or cut short)")
    if not ome_xml:
        raise AnnotationError(f"{path}: {hint}")
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError as error:
        raise AnnotationError(f"{path}: malformed OME-XML ({error})") from error
    for entry in root.iter():
        if entry.tag.endswith("}M") and entry.get("K") == LABEL_MAP_KEY:
            try:
                table = json.loads(entry.text or "")
                names, colours = table["class_names"], table["class_colours"]
                if table.get("format") != LABEL_MAP_FORMAT or float(table["mpp"]) <= 0:
                    raise ValueError(f"format {table.get('format')!r}, mpp {table['mpp']!r}")
                if set(names) - set(colours):
                    raise ValueError(f"no colour for {sorted(set(names) - set(colours))}")
            except (ValueError, KeyError, TypeError) as error:
                raise AnnotationError(f"{path}: malformed label-map class table ({error})") from error
            return table
    raise AnnotationError(f"{path}: {hint}")


def colourise(
    labels: np.ndarray, class_colours_by_index: Sequence[Sequence[int]] | Mapping[int, Sequence[int]]
) -> np.ndarray:
    """RGB uint8 image of a label map, through a 256-entry lookup table (unlisted indices black).

    ``class_colours_by_index`` is a sequence of RGB triples in class-index order, or a mapping
    from class index to RGB; e.g. ``[label_map.class_colours[n] for n in label_map.class_names]``.
    """
    items = (
        class_colours_by_index.items()
        if isinstance(class_colours_by_index, Mapping)
        else enumerate(class_colours_by_index)
    )
    lookup = np.zeros((256, 3), np.uint8)
    for index, colour in items:
        lookup[index] = colour
    return lookup[np.asarray(labels, np.uint8)]
