"""Single-file DICOM WSI (the files OpenSlide refuses): the real sparse-tiled-wsi.dcm against
pydicom's own decoding, and DICOM files written here with pydicom (TILED_SPARSE, TILED_FULL)."""

import io
import json
import warnings

import cv2
import numpy as np
import PIL.Image
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from biopsy.cli import main
from biopsy.dicom_wsi import WSI_SOP_CLASS_UID
from biopsy.errors import MppError, SlideError
from biopsy.slide import open_slide

TILE_PX = 500  # the real file's frames


@pytest.fixture(scope="module")
def real_mosaic(dicom_path) -> np.ndarray:
    """Independent reference: every frame decoded by pydicom, placed column by column (the order
    whose frame borders are seamless, and whose edge frames carry the encoder's black padding)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'RGB' frames with a JFIF marker
        frames = pixel_array(dicom_path)
    n_rows, n_cols = 6, 7
    mosaic = np.zeros((n_rows * TILE_PX, n_cols * TILE_PX, 3), np.uint8)
    for index, frame in enumerate(frames):
        col, row = divmod(index, n_rows)
        mosaic[row * TILE_PX:(row + 1) * TILE_PX, col * TILE_PX:(col + 1) * TILE_PX] = frame
    return mosaic[:2638, :3236]


def test_real_file_opens_without_pixel_size(dicom_path):
    with pytest.raises(MppError, match="--mpp"):  # the file has no PixelSpacing
        open_slide(dicom_path)
    slide = open_slide(dicom_path, mpp_required=False)
    assert slide.vendor == "dicom" and slide.dimensions == (3236, 2638) and slide.mpp is None
    assert len(slide.levels) == 1 and slide.channel_names == ["red", "green", "blue"]


def test_real_file_reads_like_pydicom(dicom_path, real_mosaic):
    slide = open_slide(dicom_path, mpp=4.0)
    x, y = 2400, 1900  # spans four frames, a tile row and a tile column seam
    region = slide.read(x, y, (300, 250), 4.0)
    np.testing.assert_allclose(region, real_mosaic[y:y + 250, x:x + 300], atol=1)
    tissue = region.astype(float)
    assert (tissue[..., 0] - tissue[..., 1]).mean() > 30  # eosin pink: red well above green
    for scale in (2, 4):  # 8 and 16 µm/px against an area-average resize of the reference
        width, height = 3236 // scale, 2638 // scale
        reduced = slide.read(0, 0, (width, height), 4.0 * scale)
        reference = cv2.resize(real_mosaic[:height * scale, :width * scale], (width, height),
                               interpolation=cv2.INTER_AREA)
        assert np.abs(reduced.astype(int) - reference).max() <= 1
    width, height = slide.dimensions
    past_edge = slide.read(width - 10, height - 10, (20, 20), 4.0)
    assert (past_edge[10:] == 255).all() and (past_edge[:, 10:] == 255).all()


def test_real_file_tile_seams_are_continuous(dicom_path):
    """A wrong frame order scrambles the tiles: the jumps across tile borders would be ~15x the
    jumps between neighbouring pixels (the real file measures 1.1x)."""
    image = open_slide(dicom_path, mpp=1.0).read(0, 0, (3000, 2500), 1.0).astype(float)
    jumps = np.abs(np.diff(image, axis=1)).mean(axis=(0, 2))
    seams = np.arange(TILE_PX - 1, 3000 - 1, TILE_PX)
    assert jumps[seams].mean() < 2 * np.delete(jumps, seams).mean()


def test_info_cli_on_the_real_file(dicom_path, capsys):
    assert main(["info", str(dicom_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vendor"] == "dicom" and info["dimensions"] == [3236, 2638] and info["mpp"] is None


def test_truncated_copy_gives_a_one_line_error(dicom_path, tmp_path, capsys):
    path = tmp_path / "truncated.dcm"
    path.write_bytes(dicom_path.read_bytes()[:800_000])
    assert main(["info", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "truncated" in lines[0]


def test_other_dicom_images_are_refused():
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    with pytest.raises(SlideError, match="not a whole-slide image: CT Image Storage"):
        open_slide(path, mpp=1.0)


def write_wsi(path, frames: list[np.ndarray], size_px, positions=None, jpeg=True,
              pixel_spacing_mm=(0.00025, 0.0002), organization: str | None = "TILED_FULL") -> None:
    """A single-file VL WSI DICOM of RGB ``frames``: with 1-based (col, row) ``positions``
    (TILED_SPARSE) or without (``organization``; None leaves DimensionOrganizationType out)."""
    tile_height, tile_width = frames[0].shape[:2]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSI_SOP_CLASS_UID
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_SOP_CLASS_UID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "SM"
    ds.Rows, ds.Columns, ds.NumberOfFrames = tile_height, tile_width, len(frames)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = size_px
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "YBR_FULL_422" if jpeg else "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    measures = Dataset()
    measures.PixelSpacing = list(pixel_spacing_mm)
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    if positions is None:
        if organization is not None:
            ds.DimensionOrganizationType = organization
    else:
        ds.DimensionOrganizationType = "TILED_SPARSE"
        ds.PerFrameFunctionalGroupsSequence = [_position_item(col, row) for col, row in positions]
    if jpeg:
        encoded = []
        for frame in frames:
            buffer = io.BytesIO()
            PIL.Image.fromarray(frame).save(buffer, "JPEG", quality=95)
            encoded.append(buffer.getvalue())
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    else:
        ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _position_item(col: int, row: int) -> Dataset:
    position = Dataset()
    position.ColumnPositionInTotalImagePixelMatrix = col
    position.RowPositionInTotalImagePixelMatrix = row
    item = Dataset()
    item.PlanePositionSlideSequence = [position]
    return item


def smooth_tile(seed: int, size: int = 64) -> np.ndarray:
    rows, cols = np.mgrid[0:size, 0:size]
    rng = np.random.default_rng(seed)
    red, green, blue = rng.uniform(60, 200, 3)
    return np.stack([red + 0.5 * cols, green + 0.3 * rows, blue + 0.2 * (rows + cols)],
                    axis=-1).clip(0, 255).astype(np.uint8)


def test_sparse_tiles_in_any_order_and_white_gaps(tmp_path):
    """Four of six 64-px tiles of a 170 x 120 matrix, stored out of order: each lands at its
    position, the two missing tiles read white."""
    tiles = {(1, 0): smooth_tile(0), (0, 1): smooth_tile(1), (2, 1): smooth_tile(2),
             (0, 0): smooth_tile(3)}  # (tile col, tile row): pixels
    path = tmp_path / "sparse.dcm"
    write_wsi(path, list(tiles.values()), (170, 120),
              positions=[(col * 64 + 1, row * 64 + 1) for col, row in tiles])
    slide = open_slide(path)
    assert slide.dimensions == (170, 120) and slide.mpp == pytest.approx((0.2, 0.25))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoded = pixel_array(path)  # pydicom's own decoding, frames in file order
    expected = np.full((128, 192, 3), 255, np.uint8)
    for (col, row), frame in zip(tiles, decoded, strict=True):
        expected[row * 64:(row + 1) * 64, col * 64:(col + 1) * 64] = frame
    region = slide.read_level(0, 0, 0, 170, 120)
    np.testing.assert_allclose(region, expected[:120, :170], atol=2)
    assert (region[:64, 128:] == 255).all() and (region[64:, 64:128] == 255).all()
    half = slide.read(0, 0, (85, 60), 0.4)  # 2 level-0 px per output px across, 1.6 down
    assert half.shape == (60, 85, 3) and (half[:30, 66:] == 255).all()


@pytest.mark.parametrize("declared, column_major",
                         [(True, False), (False, False), (False, True)])
def test_tiled_full_uncompressed(tmp_path, declared, column_major):
    """Six 64-px frames covering a 150 x 100 matrix, zero-padded past its edge: row by row when
    TILED_FULL is declared; undeclared, row by row or column by column as the padding shows."""
    level0 = np.concatenate([np.concatenate([smooth_tile(3 * row + col) for col in range(3)], axis=1)
                             for row in range(2)])[:100, :150]
    grid = np.pad(level0, ((0, 28), (0, 42), (0, 0)))
    cells = [(row, col) for row in range(2) for col in range(3)]
    frames = [grid[row * 64:(row + 1) * 64, col * 64:(col + 1) * 64]
              for row, col in sorted(cells, key=lambda cell: cell[::-1] if column_major else cell)]
    path = tmp_path / "full.dcm"
    write_wsi(path, frames, (150, 100), jpeg=False, pixel_spacing_mm=(0.0005, 0.0005),
              organization="TILED_FULL" if declared else None)
    slide = open_slide(path)
    assert slide.mpp == pytest.approx((0.5, 0.5))
    np.testing.assert_array_equal(slide.read(0, 0, (150, 100), 0.5), level0)
    np.testing.assert_array_equal(slide.read(37, 50, (80, 30), 0.5), level0[50:80, 37:117])
