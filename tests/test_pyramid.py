"""Pyramidal TIFF writer: OpenSlide/tifffile round trips against the source pixels, bounded memory."""

import subprocess
import sys
import textwrap
import threading

import numpy as np
import openslide
import pytest
import tifffile

from biopsy.pyramid import level_shapes, write_pyramid

HEIGHT, WIDTH, MPP = 1300, 1100, 0.5


def smooth_image(height=HEIGHT, width=WIDTH) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [128 + 90 * np.sin(cols / 70), 128 + 90 * np.cos(rows / 90), 60 + (rows + cols) / 20]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def in_bands(image: np.ndarray, band_px: int = 77):
    """Bands of a height unrelated to the tile size, as a generator (never the whole image)."""
    for top in range(0, image.shape[0], band_px):
        yield image[top : top + band_px]


def area_mean(image: np.ndarray) -> np.ndarray:
    """Independent 2x2 mean (edge-replicated to even size), in float."""
    pad = ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0))
    even = np.pad(image, pad, mode="edge").astype(np.float64)
    return (even[0::2, 0::2] + even[1::2, 0::2] + even[0::2, 1::2] + even[1::2, 1::2]) / 4


def assert_close(actual: np.ndarray, expected: np.ndarray, mean_tol: float, max_tol: float):
    error = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    assert error.mean() < mean_tol and np.percentile(error, 99.9) < max_tol, (error.mean(), error.max())


def test_level_shapes_halve_rounding_up_until_min_side():
    assert level_shapes((1300, 1100), 256) == [(1300, 1100), (650, 550), (325, 275)]
    assert level_shapes((100, 5000), 512) == [(100, 5000)]


@pytest.mark.parametrize("style, vendor", [("aperio", "aperio"), ("generic", "generic-tiff")])
def test_openslide_reads_levels_mpp_and_pixels(tmp_path, style, vendor):
    image = smooth_image()
    path = tmp_path / ("slide.svs" if style == "aperio" else "slide.tif")
    write_pyramid(path, in_bands(image), image.shape[:2], MPP, style=style, min_level_px=256)

    assert openslide.OpenSlide.detect_format(str(path)) == vendor
    with openslide.OpenSlide(str(path)) as slide:
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(MPP)
        assert slide.level_dimensions == ((1100, 1300), (550, 650), (275, 325))
        level0 = np.asarray(slide.read_region((0, 0), 0, (WIDTH, HEIGHT)).convert("RGB"))
        level1 = np.asarray(slide.read_region((0, 0), 1, (550, 650)).convert("RGB"))
        if style == "aperio":
            assert slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER] == "20"
    assert_close(level0, image, mean_tol=1.5, max_tol=8)
    assert_close(level1, area_mean(image), mean_tol=1.5, max_tol=8)


def test_ome_pyramid_is_subifds_with_physical_size(tmp_path):
    image = smooth_image()
    path = tmp_path / "slide.ome.tif"
    write_pyramid(path, in_bands(image), image.shape[:2], MPP, style="ome", compression="zlib",
                  min_level_px=256)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.pages) == 1  # lower levels live in SubIFDs
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == [(1300, 1100, 3), (650, 550, 3), (325, 275, 3)]
        np.testing.assert_array_equal(levels[0].asarray(), image)  # zlib: lossless
        level1 = levels[1].asarray()
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata and 'PhysicalSizeXUnit="µm"' in tif.ome_metadata
    # integer 2x2 mean with rounding: within half a grey level of the exact mean
    assert np.abs(level1 - area_mean(image)).max() <= 0.5


def test_nearest_resampling_keeps_labels_exact_at_every_level(tmp_path):
    labels = np.random.default_rng(1).integers(0, 11, (1031, 777), dtype=np.uint8)
    path = tmp_path / "labels.tif"
    write_pyramid(path, in_bands(labels, 100), labels.shape, 2.0, style="generic",
                  compression="zlib", resample="nearest", min_level_px=128)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 3  # 1031x777, 516x389, 258x195
        for level, page in enumerate(tif.pages):
            np.testing.assert_array_equal(page.asarray(), labels[:: 2**level, :: 2**level])


def test_short_or_misshapen_band_stream_fails_and_leaves_nothing(tmp_path):
    image = smooth_image(300, 200)
    path = tmp_path / "slide.tif"
    with pytest.raises(ValueError, match="shape_px says 400"):
        write_pyramid(path, in_bands(image), (400, 200), MPP, style="generic")
    with pytest.raises(ValueError, match="bands must be uint8"):
        write_pyramid(path, in_bands(image), (300, 300), MPP, style="generic")
    assert list(tmp_path.iterdir()) == []  # no partial output, no spool left behind



def test_bands_are_written_on_a_thread_of_their_own_and_either_side_stops_both(tmp_path):
    """The bands are made on the calling thread and written on another; a band stream that fails
    stops the writer (nothing left behind, even when it fails after its last band) and its error
    is raised; a writer that fails (a band of the wrong width, a band too many) stops the stream
    well before its end."""
    image = smooth_image(600, 200)
    made_on, written_on = set(), set()
    write = tifffile.TiffWriter.write

    def recorded_write(self, *args, **kwargs):
        written_on.add(threading.get_ident())
        return write(self, *args, **kwargs)

    def recorded(bands):
        for band in bands:
            made_on.add(threading.get_ident())
            yield band

    path = tmp_path / "slide.tif"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tifffile.TiffWriter, "write", recorded_write)
        write_pyramid(path, recorded(in_bands(image, 10)), image.shape[:2], MPP, style="generic",
                      compression="zlib", min_level_px=64)
    assert made_on == {threading.get_ident()} and written_on and not written_on & made_on
    np.testing.assert_array_equal(tifffile.imread(path), image)

    def failing(bands):
        for index, band in enumerate(bands):
            if index == 20:
                raise OSError("the slide went away")
            yield band

    with pytest.raises(OSError, match="went away"):
        write_pyramid(tmp_path / "failed.tif", failing(in_bands(image, 10)), image.shape[:2], MPP,
                      style="generic")

    def failing_at_the_end(bands):
        yield from bands
        raise OSError("the slide went away after its last band")

    with pytest.raises(OSError, match="after its last band"):  # the file not kept
        write_pyramid(tmp_path / "late.tif", failing_at_the_end(in_bands(image, 10)),
                      image.shape[:2], MPP, style="generic")
    with pytest.raises(ValueError, match="more than the 600 rows"):  # a band past the last row
        write_pyramid(tmp_path / "long.tif", list(in_bands(image, 10)) + [image[:10]],
                      image.shape[:2], MPP, style="generic")
    made = []

    def counted(bands):
        for band in bands:
            made.append(band)
            yield band

    misshapen = [np.zeros((10, 200, 3), np.uint8)] * 2 + [np.zeros((10, 300, 3), np.uint8)] * 58
    with pytest.raises(ValueError, match="bands must be uint8"):
        write_pyramid(tmp_path / "misshapen.tif", counted(misshapen), (600, 200), MPP, style="generic")
    assert len(made) < 20  # the stream stopped soon after the writer failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.tif"]  # nothing else left

MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from biopsy.pyramid import write_pyramid
    height, width = int(sys.argv[1]), int(sys.argv[2])
    band = np.random.default_rng(0).integers(90, 200, (250, width, 3), dtype=np.uint8)
    def bands():
        for top in range(0, height, 250):
            yield band.copy()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    write_pyramid(sys.argv[3], bands(), (height, width), 0.5, style="aperio")
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """
)


def test_memory_stays_bounded_by_a_few_tile_rows(tmp_path):
    """A 24,000 x 3,000 RGB image (206 MiB raw) must be written without holding it, or a level."""
    height, width = 24_000, 3_000
    completed = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(height), str(width), str(tmp_path / "long.svs")],
        capture_output=True, text=True, check=True,
    )
    peak_growth_mib = float(completed.stdout.strip())
    assert peak_growth_mib < 60, f"peak RSS grew {peak_growth_mib:.0f} MiB while writing"
    with openslide.OpenSlide(str(tmp_path / "long.svs")) as slide:
        assert slide.level_dimensions[0] == (width, height)
