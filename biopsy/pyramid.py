"""Pyramidal tiled TIFF written from horizontal bands, in bounded memory.

A 100,000 px long slide never sits in memory whole. Level 0 is tiled straight from the band stream;
while it is written, its 2x downsample is spooled raw (uncompressed) to a temporary file beside the
output. Level 1 is then tiled from that spool while level 2 is spooled, and so on. Memory holds a
few tile rows (``tile_px`` x width x channels) and the bands waiting for the writing thread (at
most four), never a level; disk holds at most two spools (a quarter and a sixteenth of level 0).
Every level derives from the source pixels, never from decoded JPEG, so no level pays twice for
compression.

Styles
------
``aperio``
    SVS-like: ``ImageDescription`` starts ``Aperio Image Library`` and carries ``|AppMag = ..|MPP =
    ..``; levels are pages of the main IFD chain. OpenSlide detects it as ``aperio`` (first page
    tiled, description starting ``Aperio``) and reports ``openslide.mpp-x``.
``generic``
    Tiled TIFF, levels as pages, ``XResolution``/``YResolution`` in pixels per centimetre; OpenSlide
    opens it as ``generic-tiff`` with its mpp.
``ome``
    Pyramidal OME-TIFF: lower levels are SubIFDs of level 0, ``PhysicalSizeX/Y`` in µm; QuPath,
    napari and Bio-Formats read it as one multi-resolution image.

Level ``k`` has shape ``ceil(h / 2**k), ceil(w / 2**k)``; a level exists while its smaller side is
at least ``min_level_px`` (level 0 always exists).
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import tifffile

from biopsy.atomic import atomic_path

Style = Literal["aperio", "generic", "ome"]
Resample = Literal["area", "nearest"]

APERIO_SOFTWARE = "Aperio Image Library v12.0.15"  # format marker read by OpenSlide and QuPath


def level_shapes(shape_px: tuple[int, int], min_level_px: int = 512) -> list[tuple[int, int]]:
    """(height, width) of each pyramid level: halved (rounding up) while the smaller side >= min."""
    shapes = [tuple(int(s) for s in shape_px)]
    while True:
        height, width = shapes[-1]
        smaller = ((height + 1) // 2, (width + 1) // 2)
        if min(smaller) < min_level_px:
            return shapes
        shapes.append(smaller)


def write_pyramid(
    path: str | Path,
    bands: Iterable[np.ndarray],
    shape_px: tuple[int, int],
    mpp: float,
    *,
    style: Style,
    tile_px: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    background: int = 255,
    resample: Resample = "area",
    description_extra: dict | None = None,
    min_level_px: int = 512,
) -> None:
    """Write a pyramidal tiled TIFF from consecutive row bands, atomically.

    Parameters
    ----------
    path : output file; written to a temporary name beside it and renamed when complete.
    bands : row bands, top to bottom, of any height and the full width: ``(h, w, C)`` uint8 images
        or ``(h, w)`` uint8 label maps. Their heights must sum to ``shape_px[0]``. They are made
        on the calling thread and written on another (:func:`_write_beside`): a band must not
        change once handed over.
    shape_px : (height, width) of level 0 in pixels.
    mpp : level-0 pixel size in µm per pixel.
    style : ``"aperio"``, ``"generic"`` or ``"ome"`` (see module docstring).
    tile_px : tile side, a multiple of 16.
    compression : tifffile compression name (``"jpeg"``, ``"zlib"``, ``"zstd"``, ...).
    quality : JPEG quality (ignored by lossless codecs).
    background : value that fills edge tiles beyond the image (past a 16 px margin of repeated
        edge pixels that keeps JPEG blocks at the border free of ringing).
    resample : ``"area"`` (2x2 mean, for images) or ``"nearest"`` (top-left pixel of each 2x2
        block, for label maps, so that level k is exactly ``labels[::2**k, ::2**k]``).
    description_extra : extra metadata in the style's own form: ``key = value`` pairs in the Aperio
        description, keys of the JSON description of a generic TIFF, or tifffile OME metadata
        (e.g. ``{"Name": ..., "Channel": {"Name": ...}, "MapAnnotation": {...}}``) for OME.
    min_level_px : stop adding levels once the smaller side would fall below this.
    """
    if tile_px % 16:
        raise ValueError(f"tile_px must be a multiple of 16, got {tile_px}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if style not in ("aperio", "generic", "ome"):
        raise ValueError(f"style must be 'aperio', 'generic' or 'ome', got {style!r}")
    if resample not in ("area", "nearest"):
        raise ValueError(f"resample must be 'area' or 'nearest', got {resample!r}")
    shapes = level_shapes(shape_px, min_level_px)
    path = Path(path)

    def write(bands: Iterator[np.ndarray]) -> None:
        _write_levels(path, bands, shapes, mpp, style, tile_px, compression, quality, background,
                      resample, description_extra)

    _write_beside(write, bands)


def _write_beside(write: Callable[[Iterator[np.ndarray]], None], bands: Iterable[np.ndarray]) -> None:
    """Run ``write`` on a thread of its own, handing it ``bands`` as this thread makes them (a
    band stream that drives a GPU keeps it fed while the writer pads, downsamples and
    compresses); at most ``_HANDOFF_BANDS`` wait between the two. An error (or an interrupt) on
    either side stops both, the writer leaving nothing, and is raised here."""
    handoff: queue.Queue = queue.Queue(maxsize=_HANDOFF_BANDS)
    given_up = threading.Event()  # this side stopped before the stream's end
    with ThreadPoolExecutor(1, thread_name_prefix="pyramid-writer") as pool:
        writing = pool.submit(write, _received(handoff, given_up))
        try:
            for band in bands:
                if not _handed(handoff, band, writing):
                    break
            else:
                _handed(handoff, _END, writing)
        except BaseException:
            given_up.set()
            raise
        writing.result()


_HANDOFF_BANDS = 4
_END = object()


def _handed(handoff: queue.Queue, item, writing: Future) -> bool:
    """Put ``item`` in ``handoff`` unless the writer has stopped (then False)."""
    while not writing.done():
        try:
            handoff.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _received(handoff: queue.Queue, given_up: threading.Event) -> Iterator[np.ndarray]:
    """The bands put in ``handoff`` until the end; an error once their maker has given up."""
    while True:
        if given_up.is_set():
            raise RuntimeError("the band stream stopped before its end")
        try:
            item = handoff.get(timeout=0.1)
        except queue.Empty:
            continue
        if item is _END:
            return
        yield item


def _write_levels(path: Path, bands: Iterator[np.ndarray], shapes: list[tuple[int, int]],
                  mpp: float, style: Style, tile_px: int, compression: str, quality: int,
                  background: int, resample: Resample, description_extra: dict | None) -> None:
    """Write the pyramid of ``shapes`` from ``bands`` (level 0) and its spooled downsamples."""
    with atomic_path(path) as temporary, tempfile.TemporaryDirectory(
        dir=path.parent, prefix=f".{path.name}.spool-{os.getpid()}-"  # atomic.remove_temporaries
    ) as spool_dir:
        rows = _tile_rows(bands, shapes[0], tile_px)
        first = next(rows)
        rows = _chain(first, rows)
        channels = first.shape[2] if first.ndim == 3 else None
        level_nbytes = shapes[0][0] * shapes[0][1] * (channels or 1)
        with tifffile.TiffWriter(temporary, bigtiff=level_nbytes > 2**31, ome=style == "ome") as tif:
            for level, shape in enumerate(shapes):
                spool_path = Path(spool_dir) / f"level-{level + 1}.raw"
                has_next = level + 1 < len(shapes)
                with open(spool_path, "wb") if has_next else nullcontext() as spool:
                    tiles = _tiles(rows, shape, tile_px, background, spool, resample)
                    tif.write(
                        tiles,
                        shape=shape + ((channels,) if channels else ()),
                        dtype=np.uint8,
                        tile=(tile_px, tile_px),
                        photometric="rgb" if channels == 3 else "minisblack",
                        compression=compression,
                        compressionargs=_compression_args(compression, quality),
                        buffersize=tile_px * _round_up(shape[1], tile_px) * (channels or 1),
                        **_page_tags(style, level, shapes, mpp, tile_px, compression, quality,
                                     channels, description_extra),
                    )
                if level == 0:  # the stream must end here (or fail) for the file to be whole
                    for _ in rows:  # (_tile_rows raises on a band past the last row)
                        pass
                if has_next:
                    rows = _spool_rows(spool_path, shapes[level + 1], channels, tile_px)


def _tile_rows(bands: Iterator[np.ndarray], shape: tuple[int, int], tile_px: int) -> Iterator[np.ndarray]:
    """Regroup bands into fresh arrays of ``tile_px`` rows (the last may be shorter)."""
    height, width = shape
    buffer: list[np.ndarray] = []
    buffered = 0
    seen = 0
    for band in bands:
        band = np.asarray(band)
        if band.dtype != np.uint8 or band.ndim not in (2, 3) or band.shape[1] != width:
            raise ValueError(f"bands must be uint8 (h, {width}[, C]) arrays, got {band.dtype} {band.shape}")
        seen += band.shape[0]
        if seen > height:
            raise ValueError(f"bands hold more than the {height} rows of shape_px")
        buffer.append(band)
        buffered += band.shape[0]
        while buffered >= tile_px or (seen == height and buffered):
            stacked = np.concatenate(buffer) if len(buffer) > 1 else buffer[0]
            take = min(tile_px, buffered)
            yield np.array(stacked[:take])
            buffer = [stacked[take:]] if buffered > take else []
            buffered -= take
    if seen != height:
        raise ValueError(f"bands hold {seen} rows, shape_px says {height}")


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _tiles(
    rows: Iterator[np.ndarray],
    shape: tuple[int, int],
    tile_px: int,
    background: int,
    spool: BinaryIO | None,
    resample: Resample,
) -> Iterator[np.ndarray]:
    """Yield the tiles of one level row-major, spooling each row's 2x downsample on the way."""
    height, width = shape
    for top in range(0, height, tile_px):
        row = next(rows)
        if spool is not None:
            spool.write(_downsample(row, resample).tobytes())
        for left in range(0, width, tile_px):
            tile = row[:, left : left + tile_px]
            yield _pad_tile(tile, tile_px, background)


def _pad_tile(tile: np.ndarray, tile_px: int, background: int) -> np.ndarray:
    """A full tile: edge pixels repeated to the next 16 px (no JPEG ringing at the image border
    from a sharp step inside a compression block), ``background`` beyond."""
    height, width = tile.shape[:2]
    if (height, width) == (tile_px, tile_px):
        return np.ascontiguousarray(tile)
    padded = np.full((tile_px, tile_px) + tile.shape[2:], background, np.uint8)
    block_height = min(tile_px, _round_up(height, 16))
    block_width = min(tile_px, _round_up(width, 16))
    pad = ((0, block_height - height), (0, block_width - width)) + ((0, 0),) * (tile.ndim - 2)
    padded[:block_height, :block_width] = np.pad(tile, pad, mode="edge")
    return padded


def _downsample(row: np.ndarray, resample: Resample) -> np.ndarray:
    """Halve a row of pixels (rounding the size up): 2x2 mean or top-left pixel."""
    if resample == "nearest":
        return np.ascontiguousarray(row[::2, ::2])
    pad = ((0, row.shape[0] % 2), (0, row.shape[1] % 2)) + ((0, 0),) * (row.ndim - 2)
    even = np.pad(row, pad, mode="edge").astype(np.uint16)
    total = even[0::2, 0::2] + even[1::2, 0::2] + even[0::2, 1::2] + even[1::2, 1::2]
    return ((total + 2) >> 2).astype(np.uint8)


def _spool_rows(
    path: Path, shape: tuple[int, int], channels: int | None, tile_px: int
) -> Iterator[np.ndarray]:
    """Read a raw spool back as rows of ``tile_px`` (the last may be shorter)."""
    height, width = shape
    pixel_shape = (width, channels) if channels else (width,)
    with open(path, "rb") as spool:
        for top in range(0, height, tile_px):
            rows = min(tile_px, height - top)
            count = rows * int(np.prod(pixel_shape))
            yield np.fromfile(spool, np.uint8, count=count).reshape((rows,) + pixel_shape)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _compression_args(name: str, quality: int) -> dict:
    return {"level": quality} if name.lower() in ("jpeg", "webp", "jpegxl", "avif") else {}


def _page_tags(
    style: Style,
    level: int,
    shapes: list[tuple[int, int]],
    mpp: float,
    tile_px: int,
    compression: str,
    quality: int,
    channels: int | None,
    extra: dict | None,
) -> dict:
    """tifffile ``write`` arguments that carry the style's metadata for one level."""
    downsample = 2**level  # a level-k pixel is the 2**k x 2**k block at its top-left corner
    level_mpp = mpp * downsample
    pixels_per_cm = 1e4 / level_mpp
    resolution = {"resolution": (pixels_per_cm, pixels_per_cm), "resolutionunit": "CENTIMETER"}
    if style == "aperio":
        return {"description": _aperio_description(level, shapes, mpp, tile_px, compression,
                                                   quality, channels, extra),
                "metadata": None, **resolution}
    if style == "generic":
        description = {"mpp": level_mpp, "downsample": downsample, **((extra or {}) if level == 0 else {})}
        return {"description": json.dumps(description), "metadata": None,
                "subfiletype": 1 if level else 0, **resolution}
    if style == "ome":
        if level:
            return {"subfiletype": 1, "metadata": None, **resolution}
        metadata = {
            "axes": "YXS" if channels else "YX",
            "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm",
            **(extra or {}),
        }
        return {"subifds": len(shapes) - 1, "metadata": metadata, **resolution}
    raise AssertionError(style)


def _aperio_description(
    level: int,
    shapes: list[tuple[int, int]],
    mpp: float,
    tile_px: int,
    compression: str,
    quality: int,
    channels: int | None,
    extra: dict | None,
) -> str:
    """Aperio ImageDescription; AppMag is the nominal objective of the mpp (0.5 µm/px = 20x)."""
    height, width = shapes[0]
    codec = f"{compression.upper()}/{'RGB' if channels == 3 else 'GRAY'}"
    if level:
        level_height, level_width = shapes[level]
        return f"{APERIO_SOFTWARE}\r\n{width}x{height} -> {level_width}x{level_height} {codec} Q={quality}"
    fields = {"AppMag": f"{10 / mpp:.3g}", "MPP": f"{mpp:.6g}", **(extra or {})}
    pairs = "".join(f"|{key} = {value}" for key, value in fields.items())
    layout = f"{width}x{height} [0,0 {width}x{height}] ({tile_px}x{tile_px})"
    return f"{APERIO_SOFTWARE}\r\n{layout} {codec} Q={quality}{pairs}"
