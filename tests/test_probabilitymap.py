"""Probability maps written from bands: the same file as tifffile writes from the whole array."""

import numpy as np
import pytest
import tifffile

from biopsy.probabilitymap import probability_map_writer, write_probability_map


def write_whole(path, probabilities, mpp, class_names, levels):
    """The file written by tifffile from the whole array and its subsampled levels."""
    options = {"tile": (256, 256), "compression": "zlib", "photometric": "minisblack"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(probabilities, subifds=levels - 1, resolution=(1e4 / mpp, 1e4 / mpp),
                  resolutionunit="CENTIMETER",
                  metadata={"axes": "CYX", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                            "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm",
                            "Name": "class probabilities", "Channel": {"Name": class_names}},
                  **options)
        for level in range(1, levels):
            step = 2**level
            tif.write(probabilities[:, ::step, ::step], subfiletype=1,
                      resolution=(1e4 / (mpp * step), 1e4 / (mpp * step)),
                      resolutionunit="CENTIMETER", metadata=None, **options)


def pages(path) -> list[tuple]:
    """Each page's pixels and tags, level by level (the OME UUID left out)."""
    described = []
    with tifffile.TiffFile(path) as tif:
        for level in tif.series[0].levels:
            for page in level.pages:
                page = page.aspage()
                tags = {tag.name: tag.value for tag in page.tags
                        if tag.name not in ("TileOffsets", "SubIFDs")}
                if "ImageDescription" in tags:
                    tags["ImageDescription"] = tags["ImageDescription"].split("UUID")[0]
                described.append((page.asarray(), tags))
    return described


@pytest.mark.parametrize("shape, levels", [((3, 700, 1000), 2), ((2, 1300, 517), 2),
                                           ((2, 1100, 1030), 3), ((4, 100, 90), 1),
                                           ((1, 256, 512), 1)])
def test_bands_of_any_height_give_the_file_of_the_whole_array(tmp_path, shape, levels):
    rng = np.random.default_rng(sum(shape))
    probabilities = rng.integers(0, 256, shape, np.uint8)
    names = [f"class{index}" for index in range(shape[0])]
    with probability_map_writer(tmp_path / "bands.ome.tif", shape[1:], 0.5, names) as add:
        top = 0
        while top < shape[1]:
            rows = int(rng.integers(1, 600))
            add(probabilities[:, top : top + rows])
            top += rows
    assert_same_file(tmp_path, probabilities, names, levels)


def assert_same_file(folder, probabilities, names, levels):
    """``folder``'s bands.ome.tif is what tifffile writes from the whole array (and nothing else
    is left there)."""
    write_whole(folder / "whole.ome.tif", probabilities, 0.5, names, levels)
    expected, written = pages(folder / "whole.ome.tif"), pages(folder / "bands.ome.tif")
    assert len(written) == len(expected) == probabilities.shape[0] * levels
    for (pixels, tags), (expected_pixels, expected_tags) in zip(written, expected):
        np.testing.assert_array_equal(pixels, expected_pixels)
        assert tags == expected_tags
    assert sorted(p.name for p in folder.iterdir()) == ["bands.ome.tif", "whole.ome.tif"]


def test_rows_of_tiles_compressed_out_of_order_are_put_in_order(tmp_path, monkeypatch):
    import time

    from biopsy import probabilitymap

    rng = np.random.default_rng(5)
    compress = probabilitymap._compressed_tiles

    def slow_now_and_then(rows):
        time.sleep(float(rng.choice([0, 0.02])))
        return compress(rows)

    monkeypatch.setattr(probabilitymap, "_THREADS", 4)
    monkeypatch.setattr(probabilitymap, "_compressed_tiles", slow_now_and_then)
    probabilities = rng.integers(0, 256, (3, 1100, 1030), np.uint8)
    names = ["a", "b", "c"]
    with probability_map_writer(tmp_path / "bands.ome.tif", (1100, 1030), 0.5, names) as add:
        for top in range(0, 1100, 100):
            add(probabilities[:, top : top + 100])
    assert_same_file(tmp_path, probabilities, names, levels=3)


def test_bands_are_let_go_once_their_rows_of_tiles_are_taken(tmp_path):
    import weakref

    bands = [np.full((1, 16, 1024), index, np.uint8) for index in range(64)]  # 3 levels
    first = weakref.ref(bands[0])
    with probability_map_writer(tmp_path / "p.ome.tif", (1024, 1024), 1.0, ["a"]) as add:
        for index in range(20):  # level 0's first row of tiles is taken at the 16th band
            add(bands.pop(0))
        assert first() is None
        for band in bands:
            add(band)
    with tifffile.TiffFile(tmp_path / "p.ome.tif") as tif:
        pixels = tif.series[0].levels[2].asarray()
    np.testing.assert_array_equal(pixels[:, 0], np.arange(0, 1024, 4) // 16)  # one channel: (Y, X)


def test_the_whole_array_at_once(tmp_path):
    probabilities = np.random.default_rng(1).integers(0, 256, (2, 1100, 1030), np.uint8)
    write_probability_map(tmp_path / "bands.ome.tif", probabilities, 0.5, ["a", "b"])
    assert_same_file(tmp_path, probabilities, ["a", "b"], levels=3)


@pytest.mark.parametrize("bands, error", [
    ([np.zeros((2, 10, 300), np.float32)], "uint8"),
    ([np.zeros((3, 10, 300), np.uint8)], r"uint8 \(2, rows, 300\)"),
    ([np.zeros((2, 10, 299), np.uint8)], r"uint8 \(2, rows, 300\)"),
    ([np.zeros((2, 400, 300), np.uint8)] * 2, "more than the 600 rows"),
    ([np.zeros((2, 400, 300), np.uint8)], "held 400 rows, the map has 600"),
])
def test_wrong_bands_are_refused_and_leave_nothing(tmp_path, bands, error):
    with pytest.raises(ValueError, match=error):
        with probability_map_writer(tmp_path / "p.ome.tif", (600, 300), 2.0, ["a", "b"]) as add:
            for band in bands:
                add(band)
    assert list(tmp_path.iterdir()) == []


def test_an_error_while_writing_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with probability_map_writer(tmp_path / "p.ome.tif", (600, 300), 2.0, ["a", "b"]) as add:
            add(np.ones((2, 300, 300), np.uint8))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_the_whole_array_is_written_a_row_of_tiles_at_a_time(tmp_path):
    import tracemalloc

    probabilities = np.random.default_rng(2).integers(0, 256, (3, 4096, 1024), np.uint8)  # 12 MiB
    tracemalloc.start()
    try:
        write_probability_map(tmp_path / "p.ome.tif", probabilities, 0.5, ["a", "b", "c"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < probabilities.nbytes / 4  # never a copy of the array, nor all its tiles at once
