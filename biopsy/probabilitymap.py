"""Class probabilities as a pyramidal OME-TIFF, written from row bands in bounded memory.

The file holds one uint8 channel per class (255 = 1), named after it, tiled and zlib-compressed,
lower levels as SubIFDs (nearest-neighbour: level k keeps every 2**k-th row and column), so
QuPath, napari and Bio-Formats open it as one multi-channel, multi-resolution image.

The channels are planes of the file, one after the other, while bands come with every channel's
rows at once. So each level's rows are gathered from the bands into rows of tiles, and each
channel's tiles compressed on threads as soon as a row of them is whole and appended to a spool
beside the output; once the last band is in, the file is assembled from the spool, plane by
plane. Memory holds a few rows of tiles per level, never a level; disk holds the compressed
tiles until the file is written.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile

from biopsy.atomic import atomic_path
from biopsy.pyramid import level_shapes

TILE_PX = 256
COMPRESSION = tifffile.COMPRESSION.ADOBE_DEFLATE  # tifffile's "zlib"
_ENCODE = tifffile.TIFF.COMPRESSORS[COMPRESSION]  # the codec tifffile itself would use
_THREADS = max(1, (os.cpu_count() or 2) // 2)  # tifffile's own number for compressing
_PENDING_PER_THREAD = 4  # rows of one channel's tiles waiting to be compressed, per thread


def write_probability_map(path: str | Path, probabilities: np.ndarray, mpp: float,
                          class_names: Sequence[str]) -> None:
    """Write (C, h, w) uint8 ``probabilities`` at ``mpp`` µm/px, atomically."""
    with probability_map_writer(path, probabilities.shape[1:], mpp, class_names) as add:
        add(probabilities)


@contextmanager
def probability_map_writer(path: str | Path, shape_px: tuple[int, int], mpp: float,
                           class_names: Sequence[str]) -> Iterator[Callable[[np.ndarray], None]]:
    """Yield ``add(band)``, to be given consecutive (C, rows, w) uint8 bands of the
    ``shape_px`` probabilities, top to bottom (a band must not change once given: it is read on
    threads); the file is written when the block ends, once every row has come. On an error
    nothing is left, neither the file nor its spool."""
    path = Path(path)
    shapes = level_shapes(tuple(shape_px), min_level_px=TILE_PX)
    with (atomic_path(path) as temporary,
          tempfile.TemporaryFile(dir=path.parent, prefix=f".{path.name}.spool-") as spool_file,
          ThreadPoolExecutor(_THREADS, thread_name_prefix="probability-tiles") as threads):
        spool = _TileSpool(spool_file, shapes, len(class_names), threads)
        try:
            yield spool.add
            spool.finish()
        finally:
            threads.shutdown(cancel_futures=True)
        _write_file(temporary, spool, mpp, class_names)


class _TileSpool:
    """Every level's tiles, compressed and appended to one file as their rows of tiles fill."""

    def __init__(self, file, shapes: list[tuple[int, int]], channels: int,
                 threads: ThreadPoolExecutor):
        self.file, self.shapes, self.channels, self.threads = file, shapes, channels, threads
        self.rows_added = 0  # level-0 rows
        self.gathered: list[list[np.ndarray]] = [[] for _ in shapes]  # (C, n, w) rows per level
        self.gathered_rows = [0] * len(shapes)  # rows of each level gathered so far, in all
        self.tile_rows = [0] * len(shapes)  # rows of tiles of each level sent to be compressed
        # (offset, length) in the file of each level's tiles, (channel, tile row, tile column)
        self.places = [np.zeros((channels, -(-height // TILE_PX), -(-width // TILE_PX), 2),
                                np.int64) for height, width in shapes]
        self.compressing: deque[tuple[int, int, int, Future]] = deque()

    def add(self, band: np.ndarray) -> None:
        """Put the (C, rows, w) ``band`` below the rows added before, at every level, a row of
        tiles at a time (a tall band is not copied whole, nor compressed at once)."""
        height, width = self.shapes[0]
        if (band.dtype != np.uint8 or band.ndim != 3 or band.shape[0] != self.channels
                or band.shape[2] != width):
            raise ValueError(f"bands must be uint8 ({self.channels}, rows, {width}) arrays, "
                             f"got {band.dtype} {band.shape}")
        if self.rows_added + band.shape[1] > height:
            raise ValueError(f"bands hold more than the {height} rows of the map")
        for top in range(0, band.shape[1], TILE_PX):
            self._add(band[:, top : top + TILE_PX])

    def _add(self, band: np.ndarray) -> None:
        """``add`` for a band of at most ``TILE_PX`` rows."""
        for level in range(len(self.shapes)):
            step = 2**level
            first = -self.rows_added % step  # the band's first row on the level's grid
            rows = band[:, first::step, ::step]
            if level:  # a copy: a view would keep the whole band until the level's row fills
                rows = rows.copy()
            if rows.shape[1]:
                self.gathered[level].append(rows)
                self.gathered_rows[level] += rows.shape[1]
                waiting = sum(part.shape[1] for part in self.gathered[level])
                if waiting >= TILE_PX or self.gathered_rows[level] == self.shapes[level][0]:
                    self._compress_whole_rows(level)
        self.rows_added += band.shape[1]
        self._store(keep=_PENDING_PER_THREAD * _THREADS)

    def finish(self) -> None:
        """Check that every row came; store the tiles still being compressed."""
        if self.rows_added != self.shapes[0][0]:
            raise ValueError(f"bands held {self.rows_added} rows, the map has {self.shapes[0][0]}")
        self._store(keep=0)

    def _compress_whole_rows(self, level: int) -> None:
        """Send each whole row of tiles gathered for ``level`` (and its last, short one) to be
        compressed, channel by channel."""
        height = self.shapes[level][0]
        parts = self.gathered[level]
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        taken = 0
        while (rows.shape[1] - taken >= TILE_PX
               or (self.gathered_rows[level] == height and taken < rows.shape[1])):
            tile_row = rows[:, taken : taken + TILE_PX]
            for channel in range(self.channels):
                self.compressing.append((level, channel, self.tile_rows[level], self.threads.submit(
                    _compressed_tiles, tile_row[channel])))
            self.tile_rows[level] += 1
            taken += tile_row.shape[1]
        self.gathered[level] = [rows[:, taken:]] if taken < rows.shape[1] else []

    def _store(self, keep: int) -> None:
        """Append compressed rows of tiles to the file, in order: those done, and more, waited
        for, until at most ``keep`` are still being compressed."""
        while self.compressing and (len(self.compressing) > keep or self.compressing[0][3].done()):
            level, channel, tile_row, compressing = self.compressing.popleft()
            for column, tile in enumerate(compressing.result()):
                self.places[level][channel, tile_row, column] = self.file.tell(), len(tile)
                self.file.write(tile)

    def tiles(self, level: int) -> Iterator[bytes]:
        """The level's compressed tiles, plane by plane, row-major."""
        self.file.flush()
        for offset, length in self.places[level].reshape(-1, 2).tolist():
            tile = os.pread(self.file.fileno(), length, offset)
            if len(tile) != length:
                raise OSError(f"{self.file.name}: read {len(tile)} of {length} bytes")
            yield tile


def _compressed_tiles(rows: np.ndarray) -> list[bytes]:
    """The tiles of one channel's (h <= TILE_PX, w) rows, zero-padded where short, compressed."""
    tiles = []
    for left in range(0, rows.shape[1], TILE_PX):
        tile = np.zeros((TILE_PX, TILE_PX), np.uint8)
        part = rows[:, left : left + TILE_PX]
        tile[: part.shape[0], : part.shape[1]] = part
        tiles.append(_ENCODE(tile))
    return tiles


def _write_file(path: Path, spool: _TileSpool, mpp: float, class_names: Sequence[str]) -> None:
    """The OME-TIFF of ``spool``'s tiles: level 0 with its channels named, the others as
    SubIFDs."""
    options = {"dtype": np.uint8, "tile": (TILE_PX, TILE_PX), "compression": COMPRESSION,
               "photometric": "minisblack"}
    shapes = spool.shapes
    with tifffile.TiffWriter(path, ome=True,
                             bigtiff=spool.channels * shapes[0][0] * shapes[0][1] > 2**31) as tif:
        for level, shape in enumerate(shapes):
            level_mpp = mpp * 2**level
            if level == 0:
                tags = {"subifds": len(shapes) - 1, "metadata": {
                    "axes": "CYX", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                    "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm",
                    "Name": "class probabilities", "Channel": {"Name": list(class_names)}}}
            else:
                tags = {"subfiletype": 1, "metadata": None}
            tif.write(spool.tiles(level), shape=(spool.channels,) + shape,
                      resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER",
                      **tags, **options)
