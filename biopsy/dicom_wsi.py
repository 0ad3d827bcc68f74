"""Single-file DICOM whole-slide images (VL Whole Slide Microscopy, one resolution level per file),
read frame by frame: the reader for the DICOM files OpenSlide refuses.

Frame layout, in the order of precedence:

- per-frame positions (PerFrameFunctionalGroupsSequence → PlanePositionSlideSequence →
  Column/RowPositionInTotalImagePixelMatrix, 1-based; TILED_SPARSE): grid cells without a frame are
  background (white);
- otherwise the frames fill the tile grid row by row (TILED_FULL). A file that declares neither
  (no positions, no DimensionOrganizationType) may hold its frames column by column, as some
  converters write them: the order whose edge frame has uniform encoder padding past the pixel
  matrix's edge is taken.

Pixel size: SharedFunctionalGroupsSequence → PixelMeasuresSequence → PixelSpacing (mm, row then
column); None when absent. Only the frames a read touches are decoded (imagecodecs, which
recognises the codec from the frame's bytes), and the latest ones are kept in a small cache.
"""

import math
import warnings
from collections import OrderedDict
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from pydicom.encaps import parse_basic_offsets, parse_fragments

from biopsy.errors import SlideError

WSI_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.77.1.6"
_COLOUR_MODELS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")  # decoded to RGB
_CACHE_BYTES = 64 << 20  # decoded frames kept (64 MiB: 85 frames of 512 x 512 RGB)
_PADDING_MARGIN_PX = 8  # JPEG rings up to one 8 x 8 block past the matrix edge
_PADDING_RANGE = 8  # grey levels a uniform padding may span after lossy coding
_RE_EXPORT = "re-export it as a standard DICOM WSI or as a TIFF"
_COPY_AGAIN = "copy the file again from the scanner or archive"


class DicomWsiReader:
    """One level of brightfield RGB tiles from a single DICOM WSI file (the slide readers'
    interface: ``level_dimensions``, ``mpp``, ``read(level, col, row, width, height)``, ...)."""

    vendor = "dicom"
    channel_names = ["red", "green", "blue"]
    is_fluorescence = False
    dtype = np.dtype(np.uint8)
    reads_regions = True  # frames decoded as reads need them

    def __init__(self, path: Path):
        self._path = path
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        try:
            self._file = open(path, "rb")
        except OSError as error:
            raise SlideError(f"{path}: cannot read file ({error.strerror or error})") from error
        try:
            self._open()
        except SlideError:
            self._file.close()
            raise
        except Exception as error:  # pydicom raises many types for damaged files
            self._file.close()
            raise _dicom_error(path, f"damaged or truncated file: {error}", _COPY_AGAIN) from error

    def _open(self) -> None:
        with warnings.catch_warnings():  # pydicom warns about every non-conformant value
            warnings.simplefilter("ignore")
            header = pydicom.dcmread(self._file, stop_before_pixels=True)
        _check_header(self._path, header, ended=self._file.tell() >= self._path.stat().st_size)
        self.level_dimensions = [(int(header.TotalPixelMatrixColumns),
                                  int(header.TotalPixelMatrixRows))]
        self.mpp = _pixel_spacing_mpp(header)
        self.objective_power = _objective_power(header)
        self._tile_shape = (int(header.Rows), int(header.Columns))
        n_frames = int(header.get("NumberOfFrames", 1))
        self._frames = _frame_extents(self._path, self._file, header, n_frames)
        self._is_encapsulated = header.file_meta.TransferSyntaxUID.is_encapsulated
        self._cache_size = max(4, _CACHE_BYTES // (3 * math.prod(self._tile_shape)))
        positions = _frame_positions(header)
        if positions is not None:
            self._frame_at = self._sparse_grid(positions)
        else:
            declared = header.get("DimensionOrganizationType") == "TILED_FULL"
            self._frame_at = self._full_grid(n_frames, column_major=False)
            if not declared and self._padding_says_column_major():
                self._frame_at = self._full_grid(n_frames, column_major=True)

    def _grid_shape(self) -> tuple[int, int]:
        (width, height), (tile_height, tile_width) = self.level_dimensions[0], self._tile_shape
        return -(-height // tile_height), -(-width // tile_width)

    def _full_grid(self, n_frames: int, column_major: bool) -> np.ndarray:
        """Frame number per (tile row, tile column) when the frames fill the grid in order."""
        n_rows, n_cols = self._grid_shape()
        if n_frames < n_rows * n_cols:
            raise _dicom_error(self._path, f"{n_frames} frames without positions cannot fill its "
                                           f"{n_cols} x {n_rows} tile grid")
        if column_major:
            return np.arange(n_rows * n_cols).reshape(n_cols, n_rows).T
        return np.arange(n_rows * n_cols).reshape(n_rows, n_cols)

    def _sparse_grid(self, positions: np.ndarray) -> np.ndarray:
        """Frame number per tile from 0-based (col, row) pixel positions; -1 where none; the first
        frame at a position wins (others are further focal planes or optical paths)."""
        if len(positions) != len(self._frames):
            raise _dicom_error(self._path, f"positions for {len(positions)} frames, "
                                           f"{len(self._frames)} frames")
        tile_size = np.array(self._tile_shape[::-1])
        if (positions % tile_size).any() or (positions < 0).any():
            raise _dicom_error(self._path, "frame positions off the tile grid")
        frame_at = np.full(self._grid_shape(), -1)
        cols, rows = (positions // tile_size).T
        inside = (rows < frame_at.shape[0]) & (cols < frame_at.shape[1])
        for index in np.flatnonzero(inside)[::-1]:
            frame_at[rows[index], cols[index]] = index
        return frame_at

    def _padding_says_column_major(self) -> bool:
        """Whether the frames run column by column: row by row, frame ``n_cols - 1`` ends the first
        tile row and reaches past the right edge; column by column, frame ``n_rows - 1`` ends the
        first tile column and reaches past the bottom edge. Encoders pad past the edge uniformly."""
        n_rows, n_cols = self._grid_shape()
        (width, height), (tile_height, tile_width) = self.level_dimensions[0], self._tile_shape
        last_width = width - (n_cols - 1) * tile_width
        last_height = height - (n_rows - 1) * tile_height
        margin = _PADDING_MARGIN_PX
        if n_rows < 2 or n_cols < 2 or last_width + 2 * margin > tile_width or \
                last_height + 2 * margin > tile_height:
            return False
        right_padding = self._frame(n_cols - 1)[:, last_width + margin:]
        bottom_padding = self._frame(n_rows - 1)[last_height + margin:]
        return _is_uniform(bottom_padding) and not _is_uniform(right_padding)

    def read(self, level: int, col: int, row: int, width: int, height: int) -> np.ndarray:
        """Pixels ``[row, row + height) x [col, col + width)`` (inside the matrix) as (h, w, 3)."""
        tile_height, tile_width = self._tile_shape
        region = np.full((height, width, 3), 255, np.uint8)
        for tile_row in range(row // tile_height, (row + height - 1) // tile_height + 1):
            for tile_col in range(col // tile_width, (col + width - 1) // tile_width + 1):
                index = self._frame_at[tile_row, tile_col]
                if index < 0:
                    continue
                top, left = tile_row * tile_height, tile_col * tile_width
                rows = slice(max(row, top), min(row + height, top + tile_height))
                cols = slice(max(col, left), min(col + width, left + tile_width))
                region[rows.start - row:rows.stop - row, cols.start - col:cols.stop - col] = \
                    self._frame(index)[rows.start - top:rows.stop - top,
                                       cols.start - left:cols.stop - left]
        return region

    def _frame(self, index: int) -> np.ndarray:
        """Decoded frame ``index`` (tile_height, tile_width, 3), through the cache."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        chunks = []
        for offset, length in self._frames[index]:
            self._file.seek(offset)
            chunks.append(self._file.read(length))
        data = b"".join(chunks)
        if self._is_encapsulated:
            frame = imagecodecs.imread(data)
        else:
            frame = np.frombuffer(data, np.uint8).reshape(*self._tile_shape, 3)
        if frame.shape != (*self._tile_shape, 3) or frame.dtype != np.uint8:
            raise ValueError(f"frame {index} decodes to {frame.shape} {frame.dtype}, expected "
                             f"{(*self._tile_shape, 3)} uint8")
        self._cache[index] = frame
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return frame

    def close(self) -> None:
        self._file.close()
        self._cache.clear()


def _dicom_error(path: Path, reason: str, fix: str = _RE_EXPORT) -> SlideError:
    return SlideError(f"{path}: cannot read this DICOM whole-slide image ({reason}); {fix}")


def _check_header(path: Path, header, ended: bool) -> None:
    """Raise :class:`SlideError` unless ``header`` is an 8-bit RGB tiled whole-slide image
    (``ended``: the file ends with the header, before any pixel data)."""
    sop_class = header.get("SOPClassUID", header.file_meta.get("MediaStorageSOPClassUID"))
    if sop_class != WSI_SOP_CLASS_UID:
        name = getattr(sop_class, "name", None) or "no SOP class"
        raise _dicom_error(path, f"not a whole-slide image: {name}")
    if ended:
        raise _dicom_error(path, "truncated: the file ends before its pixel data", _COPY_AGAIN)
    required = ("TotalPixelMatrixColumns", "TotalPixelMatrixRows", "Rows", "Columns",
                "SamplesPerPixel", "BitsAllocated")
    missing = [name for name in required if name not in header]
    if missing:
        raise _dicom_error(path, f"it lacks the mandatory attribute(s) {', '.join(missing)}")
    photometric = header.get("PhotometricInterpretation", "")
    encapsulated = header.file_meta.TransferSyntaxUID.is_encapsulated
    if header.SamplesPerPixel != 3 or header.BitsAllocated != 8 or \
            photometric not in (_COLOUR_MODELS if encapsulated else ("RGB",)):
        raise _dicom_error(path, f"{header.SamplesPerPixel} sample(s) of {header.BitsAllocated} "
                                 f"bits per pixel, {photometric or 'no colour model'}; only 8-bit "
                                 "RGB brightfield is read")


def _frame_extents(path: Path, file, header, n_frames: int) -> list[list[tuple[int, int]]]:
    """Per frame, its (file offset, length) byte runs; ``file`` stands at the Pixel Data element."""
    syntax = header.file_meta.TransferSyntaxUID
    if not syntax.is_little_endian:
        raise _dicom_error(path, "big-endian transfer syntax")
    if file.read(4) != b"\xe0\x7f\x10\x00":  # the (7FE0,0010) Pixel Data tag
        raise _dicom_error(path, "no pixel data: damaged or truncated file", _COPY_AGAIN)
    file.read(4 if syntax.is_implicit_VR else 8)  # (VR, reserved and) value length
    if syntax.is_encapsulated:
        offsets_in_table = parse_basic_offsets(file)
        first_fragment = file.tell()
        fragments = []
        for offset in parse_fragments(file)[1]:
            file.seek(offset + 4)
            fragments.append((offset + 8, int.from_bytes(file.read(4), "little")))
        extents = _group_fragments(path, fragments, offsets_in_table, first_fragment, n_frames)
    else:
        frame_bytes, start = 3 * int(header.Rows) * int(header.Columns), file.tell()
        extents = [[(start + index * frame_bytes, frame_bytes)] for index in range(n_frames)]
    file_size = path.stat().st_size
    end = max((offset + length for runs in extents for offset, length in runs), default=0)
    if len(extents) < n_frames or end > file_size:
        raise _dicom_error(path, f"truncated: the pixel data of its {n_frames} frames runs past "
                                 f"the end of the file ({file_size} bytes)", _COPY_AGAIN)
    return extents


def _group_fragments(path: Path, fragments: list[tuple[int, int]], offsets_in_table: list[int],
                     first_fragment: int, n_frames: int) -> list[list[tuple[int, int]]]:
    """Fragments per frame: one each (fewer than frames: a truncated file, for the caller to
    report), or as the Basic Offset Table groups them."""
    if len(fragments) <= n_frames:
        return [[fragment] for fragment in fragments]
    if len(offsets_in_table) != n_frames:
        raise _dicom_error(path, "frames split into fragments without a Basic Offset Table")
    starts = [first_fragment + offset for offset in offsets_in_table]
    frame_of = np.searchsorted(starts, [offset - 8 for offset, _ in fragments], side="right") - 1
    return [[fragment for fragment, frame in zip(fragments, frame_of, strict=True)
             if frame == index] for index in range(n_frames)]


def _frame_positions(header) -> np.ndarray | None:
    """0-based (col, row) pixel position of each frame, or None when the file gives none."""
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or "PlanePositionSlideSequence" not in per_frame[0]:
        return None
    positions = [(int(item.PlanePositionSlideSequence[0].ColumnPositionInTotalImagePixelMatrix),
                  int(item.PlanePositionSlideSequence[0].RowPositionInTotalImagePixelMatrix))
                 for item in per_frame]
    return np.array(positions) - 1


def _pixel_spacing_mpp(header) -> tuple[float, float] | None:
    """(x, y) µm/px from the shared PixelSpacing (mm, row spacing first), or None."""
    try:
        spacing = header.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        row_mm, col_mm = float(spacing[0]), float(spacing[1])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    if not (math.isfinite(row_mm) and math.isfinite(col_mm) and row_mm > 0 and col_mm > 0):
        return None
    return col_mm * 1000, row_mm * 1000


def _objective_power(header) -> float | None:
    try:
        power = float(header.OpticalPathSequence[0].ObjectiveLensPower)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return power if math.isfinite(power) and power > 0 else None


def _is_uniform(pixels: np.ndarray) -> bool:
    return pixels.size > 0 and int(np.ptp(pixels, axis=(0, 1)).max()) <= _PADDING_RANGE
