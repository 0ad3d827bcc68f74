"""Label-map OME-TIFF: exact labels at every level, mpp and class table round trip, clear errors."""

import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
import tifffile

from biopsy.classes import CLASS_COLOURS, CLASS_NAMES
from biopsy.errors import AnnotationError
from biopsy.labelmap import colourise, read_label_map, write_label_map


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    rng = np.random.default_rng(7)
    coarse = rng.integers(0, len(CLASS_NAMES), (70, 50), dtype=np.uint8)
    noisy = np.kron(coarse, np.ones((9, 11), np.uint8))[:601, :533]  # blocks plus a ragged edge
    noisy[::17, ::13] = rng.integers(0, len(CLASS_NAMES), noisy[::17, ::13].shape)
    return noisy


def test_round_trip_exact_labels_mpp_and_class_table(tmp_path, labels):
    path = tmp_path / "labels.ome.tif"
    write_label_map(path, labels, 2.0, CLASS_NAMES, CLASS_COLOURS)

    level0 = read_label_map(path)
    np.testing.assert_array_equal(level0.labels, labels)
    assert level0.mpp == 2.0
    assert level0.class_names == CLASS_NAMES
    assert level0.class_colours == CLASS_COLOURS
    assert level0.slide_mpp is None  # not given: not recorded
    write_label_map(path, labels, 2.0, CLASS_NAMES, CLASS_COLOURS, slide_mpp=0.705)
    assert read_label_map(path).slide_mpp == 0.705

    level1 = read_label_map(path, level=1)
    np.testing.assert_array_equal(level1.labels, labels[::2, ::2])
    assert level1.mpp == 4.0 and level1.class_names == CLASS_NAMES


def test_band_stream_gives_the_same_file_content(tmp_path, labels):
    path = tmp_path / "bands.ome.tif"
    bands = (labels[top : top + 40] for top in range(0, labels.shape[0], 40))
    write_label_map(path, bands, 1.0, CLASS_NAMES, CLASS_COLOURS, shape_px=labels.shape)
    np.testing.assert_array_equal(read_label_map(path).labels, labels)


def test_file_is_a_plain_pyramidal_ome_tiff(tmp_path, labels):
    path = tmp_path / "labels.ome.tif"
    write_label_map(path, labels, 2.0, CLASS_NAMES, CLASS_COLOURS)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert [level.shape for level in series.levels] == [(601, 533), (301, 267)]
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert tif.pages[0].is_tiled
        pixels = ElementTree.fromstring(tif.ome_metadata).find(".//{*}Pixels")
    assert float(pixels.get("PhysicalSizeX")) == 2.0 and pixels.get("PhysicalSizeXUnit") == "µm"
    assert pixels.find("{*}Channel").get("Name") == "class"


def test_files_that_are_not_label_maps_raise_annotation_error(tmp_path, caplog):
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((8, 8), np.uint8))
    with pytest.raises(AnnotationError, match="plain.tif: not a biopsy label map"):
        read_label_map(plain)
    whole = tmp_path / "whole.ome.tif"
    write_label_map(whole, np.zeros((2000, 2000), np.uint8), 1.0, CLASS_NAMES, CLASS_COLOURS)
    cut = tmp_path / "cut.ome.tif"  # its OME-XML's offset now past the end
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(AnnotationError, match="cut.ome.tif: not a biopsy label map .* or cut short"):
        read_label_map(cut)
    assert not [r for r in caplog.records if r.name == "tifffile"]  # an ERROR line beside ours
    text = tmp_path / "notes.ome.tif"
    text.write_text("not a tiff")
    with pytest.raises(AnnotationError, match="notes.ome.tif: cannot read a label map"):
        read_label_map(text)
    with pytest.raises(AnnotationError, match="missing.ome.tif"):
        read_label_map(tmp_path / "missing.ome.tif")


def test_labels_without_a_class_name_are_refused(tmp_path):
    with pytest.raises(ValueError, match="label 3 has no class name"):
        write_label_map(tmp_path / "x.ome.tif", np.full((4, 4), 3, np.uint8), 1.0,
                        ("a", "b"), {"a": (0, 0, 0), "b": (1, 1, 1)})
    assert not (tmp_path / "x.ome.tif").exists()


def test_colourise_matches_a_per_class_loop(labels):
    colours = [CLASS_COLOURS[name] for name in CLASS_NAMES]
    expected = np.zeros(labels.shape + (3,), np.uint8)
    for index, colour in enumerate(colours):
        expected[labels == index] = colour
    np.testing.assert_array_equal(colourise(labels, colours), expected)
    by_index = colourise(labels, {5: (1, 2, 3)})
    assert (by_index[labels == 5] == (1, 2, 3)).all() and (by_index[labels != 5] == 0).all()
