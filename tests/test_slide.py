"""Slide access: real scanner files, tifffile-written pyramids against an independent resize."""

import pickle

import cv2
import numpy as np
import openslide
import PIL.Image
import pytest
import tifffile

from biopsy import slide as slide_module
from biopsy.cli import main
from biopsy.errors import MppError, SlideError
from biopsy.slide import open_slide

LEVEL0_MPP = 0.25


def smooth_rgb(height: int, width: int) -> np.ndarray:
    """A smooth RGB test image (no detail finer than ~50 px), so resamplers agree closely."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 128 + 100 * np.sin(cols / 97.0) * np.cos(rows / 131.0)
    green = 128 + 90 * np.cos((cols + rows) / 151.0)
    blue = 40 + 0.1 * cols + 0.05 * rows
    return np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8)


def area_average_read(level0: np.ndarray, x: int, y: int, size_px, scale: float) -> np.ndarray:
    """Independent reference: exact area averages from the piecewise-linear integral of level 0
    (white outside), output pixel j covering level-0 [x + j * scale, x + (j + 1) * scale)."""
    width, height = size_px
    span_x, span_y = int(np.ceil(width * scale)) + 1, int(np.ceil(height * scale)) + 1
    region = np.full((span_y, span_x, 3), 255.0)
    inside = level0[max(y, 0):max(y + span_y, 0), max(x, 0):max(x + span_x, 0)]
    region[max(-y, 0):max(-y, 0) + inside.shape[0], max(-x, 0):max(-x, 0) + inside.shape[1]] = inside

    def along_first_axis(values: np.ndarray, n_out: int) -> np.ndarray:
        integral = np.concatenate([np.zeros((1,) + values.shape[1:]), np.cumsum(values, axis=0)])
        edges = scale * np.arange(n_out + 1)
        index = np.minimum(np.floor(edges).astype(int), len(values) - 1)
        fraction = (edges - index).reshape(-1, 1, 1)
        at_edges = integral[index] * (1 - fraction) + integral[index + 1] * fraction
        return np.diff(at_edges, axis=0) / scale

    rows = along_first_axis(region, height)
    return along_first_axis(rows.transpose(1, 0, 2), width).transpose(1, 0, 2)


def levels_of(image: np.ndarray, downsamples) -> list[np.ndarray]:
    height, width = image.shape[:2]
    return [cv2.resize(image, (round(width / d), round(height / d)), interpolation=cv2.INTER_AREA)
            for d in downsamples]


@pytest.fixture(scope="module")
def level0() -> np.ndarray:
    return smooth_rgb(1000, 1500)


@pytest.fixture(scope="module")
def generic_tiff(tmp_path_factory, level0):
    """Tiled TIFF, SubIFD pyramid at downsamples 1, 3 and 7.5, pixel size in resolution tags."""
    path = tmp_path_factory.mktemp("generic") / "pyramid.tif"
    pixels_per_cm = 1e4 / LEVEL0_MPP
    base, *reduced = levels_of(level0, (1, 3, 7.5))
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(base, tile=(256, 256), photometric="rgb", compression="zlib", subifds=len(reduced),
                   resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
        for level in reduced:
            tiff.write(level, tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=1)
    return path


@pytest.fixture(scope="module")
def aperio_svs(tmp_path_factory, level0):
    """Aperio-style SVS (OpenSlide's aperio reader): MPP in the description, downsamples 1, 2.5, 6."""
    path = tmp_path_factory.mktemp("aperio") / "pyramid.svs"
    with tifffile.TiffWriter(path) as tiff:
        for index, level in enumerate(levels_of(level0, (1, 2.5, 6))):
            height, width = level.shape[:2]
            description = f"Aperio Image Library v12.0.0\r\n{width}x{height} (256x256) ZLIB"
            if index == 0:
                description += f"|AppMag = 40|MPP = {LEVEL0_MPP}"
            tiff.write(level, tile=(256, 256), photometric="rgb", compression="zlib",
                       description=description, metadata=None, subfiletype=1 if index else 0)
    return path


# OpenSlide places a level's pixels at level-0 location / downsample and interpolates fractional
# positions: on levels with a non-integer downsample that blurs by up to 0.5 / downsample px, which
# shows only at a sharp edge (the slide border against the white padding).
@pytest.mark.parametrize("pyramid, max_difference", [("generic_tiff", 2), ("aperio_svs", 8)])
def test_pyramid_reads_match_reference_resize_of_level0(pyramid, max_difference, request, level0):
    slide = open_slide(request.getfixturevalue(pyramid))
    assert slide.mpp == pytest.approx((LEVEL0_MPP, LEVEL0_MPP))
    assert slide.dimensions == (1500, 1000)
    assert len(slide.levels) == 3
    for mpp in (0.25, 0.5, 0.6, 1.0, 1.6, 2.0):
        for x, y in ((333, 217), (1401, 901), (-7, -5)):
            region = slide.read(x, y, (120, 90), mpp)
            reference = area_average_read(level0, x, y, (120, 90), mpp / LEVEL0_MPP)
            assert region.shape == (90, 120, 3) and region.dtype == np.uint8
            difference = np.abs(region.astype(int) - reference)
            assert difference.mean() < 0.5, (mpp, x, y, difference.mean())
            assert difference.max() <= max_difference, (mpp, x, y, difference.max())


def test_a_scale_near_one_is_resampled_not_copied(tmp_path):
    """From a whole-pixel origin, 1.0015 source pixels per pixel over 256 px: OpenCV would copy
    the region (it rounds to its own size), drifting to 0.4 px off at the far edge."""
    stripes = np.zeros((64, 300, 3), np.uint8)
    stripes[:, ::2] = 200
    path = tmp_path / "stripes.tif"
    tifffile.imwrite(path, stripes, tile=(64, 64), photometric="rgb",
                     resolution=(1e4 / LEVEL0_MPP, 1e4 / LEVEL0_MPP), resolutionunit="CENTIMETER")
    read = open_slide(path).read(0, 0, (256, 8), LEVEL0_MPP * 1.0015)
    reference = area_average_read(stripes.astype(float), 0, 0, (256, 8), 1.0015)
    assert np.abs(read.astype(int) - reference).max() <= 1


def test_true_non_power_of_two_downsamples(generic_tiff, aperio_svs):
    generic = open_slide(generic_tiff)
    downsamples = [value for level in generic.levels for value in level.downsample]
    assert downsamples == pytest.approx([1, 1, 3, 1000 / 333, 7.5, 1000 / 133])
    assert generic.vendor == "tiff" and not generic.is_fluorescence
    aperio = open_slide(aperio_svs)
    assert aperio.vendor == "aperio" and aperio.objective_power == 40
    assert [level.dimensions for level in aperio.levels] == [(1500, 1000), (600, 400), (250, 167)]
    assert aperio.levels[2].downsample == pytest.approx((6.0, 1000 / 167))


def test_reads_use_the_finest_level_not_coarser_than_needed(generic_tiff):
    slide = open_slide(generic_tiff)
    assert [slide.best_level(scale) for scale in (1, 2.9, 3, 4, 7.4, 7.5, 20)] == [0, 0, 1, 1, 1, 2, 2]


def test_adjacent_reads_line_up_with_one_large_read(aperio_svs):
    slide = open_slide(aperio_svs)
    mpp = 0.7  # 2.8 level-0 px per output px: read from level 1 at a fractional origin
    whole = slide.read(101, 53, (200, 50), mpp)
    left = slide.read(101, 53, (100, 50), mpp)
    right = slide.read(101 + 280, 53, (100, 50), mpp)
    assert np.abs(np.hstack([left, right]).astype(int) - whole).max() <= 1


@pytest.mark.parametrize("pyramid", ["generic_tiff", "aperio_svs"])
def test_thumbnails_read_in_bands_on_threads_are_one_read(pyramid, request, monkeypatch):
    """Bands of 16 rows where the level read has a whole number of rows per thumbnail row (level
    0 at 0.25 and 0.5 µm/px; 0.75 on the generic pyramid's level 1, a downsample of 3), one read
    elsewhere: the same pixels either way."""
    monkeypatch.setattr(slide_module, "_BAND_ROWS", 16)
    slide = open_slide(request.getfixturevalue(pyramid))
    assert slide.reads_regions
    for mpp in (0.25, 0.5, 0.75, 1.1):
        thumbnail = slide.thumbnail(mpp)
        height, width = thumbnail.shape[:2]
        assert np.array_equal(thumbnail, slide.read(0, 0, (width, height), mpp)), mpp


def test_reads_from_a_whole_pixel_origin_are_the_level_pixels(aperio_svs):
    """Moved back to a whole pixel of the level read (level 1: downsample 2.5), a read at that
    level's mpp is its pixels as they are, with no resampling between them."""
    slide = open_slide(aperio_svs)
    downsample = slide.levels[1].downsample[0]
    x, y = slide.whole_pixel_origin(333, 171, LEVEL0_MPP * downsample)
    assert (x, y) == (133 * downsample, 68 * downsample)
    read = slide.read(x, y, (40, 30), LEVEL0_MPP * downsample)
    assert np.array_equal(read, slide.read_level(1, 133, 68, 40, 30))
    assert slide.whole_pixel_origin(7, 9, LEVEL0_MPP) == (7, 9)  # level 0: any whole pixel


def test_regions_past_the_edge_are_background(generic_tiff):
    slide = open_slide(generic_tiff)
    region = slide.read(-400, 900, (300, 100), 1.0)  # 4 level-0 px per output px
    assert (region[:, :100] == 255).all()  # left of the slide
    assert (region[25:, :] == 255).all()  # below the slide
    assert region[:25, 100:].mean() < 250


def test_explicit_mpp_overrides_metadata(generic_tiff):
    slide = open_slide(generic_tiff, mpp=0.5)
    assert slide.mpp == (0.5, 0.5)
    assert slide.thumbnail(1.0).shape == (500, 750, 3)


def test_slide_pickles_and_reopens_lazily(aperio_svs):
    slide = open_slide(aperio_svs)
    expected = slide.read(10, 20, (64, 64), 1.0)
    clone = pickle.loads(pickle.dumps(slide))
    assert clone._reader is None
    np.testing.assert_array_equal(clone.read(10, 20, (64, 64), 1.0), expected)
    assert clone.sha256 == slide.sha256


def test_real_svs(svs_path):
    slide = open_slide(svs_path)
    assert slide.vendor == "aperio" and slide.dimensions == (2220, 2967)
    assert slide.mpp == pytest.approx((0.499, 0.499))
    assert slide.objective_power == 20 and slide.channel_names == ["red", "green", "blue"]
    level0 = np.asarray(openslide.OpenSlide(str(svs_path)).read_region((0, 0), 0, (2220, 2967)))
    level0 = level0[..., :3]
    x, y = 700, 1300
    for mpp, size_px in ((0.5, (256, 192)), (1.0, (256, 192)), (2.0, (200, 150)), (8.0, (60, 50))):
        region = slide.read(x, y, size_px, mpp)
        assert region.shape == (size_px[1], size_px[0], 3)
        difference = np.abs(region.astype(int) - area_average_read(level0, x, y, size_px, mpp / 0.499))
        assert difference.mean() < 0.6 and difference.max() <= 2, (mpp, difference.mean())
    assert slide.thumbnail(8.0).shape == (185, 138, 3)
    assert len(slide.sha256) == 64


def test_real_qptiff_fluorescence(qptiff_path):
    slide = open_slide(qptiff_path)
    assert slide.vendor == "qptiff" and slide.is_fluorescence and slide.background_value == 0
    assert slide.channel_names == ["DAPI", "FITC", "Cy3"]
    assert slide.dimensions == (1920, 1440)
    assert slide.mpp[0] == pytest.approx(0.4965, abs=1e-3)
    channels = tifffile.imread(qptiff_path, series=0)  # (C, Y, X)
    region = slide.read(500, 400, (64, 32), slide.mpp[0])
    np.testing.assert_array_equal(region, channels[:, 400:432, 500:564].transpose(1, 2, 0))
    assert (slide.read(-50, 0, (10, 10), 2.0) == 0).all()


def test_plain_jpeg_needs_an_mpp(real_glomeruli):
    image = sorted((real_glomeruli / "images").glob("*.jpg"))[0]
    with pytest.raises(MppError, match="--mpp"):
        open_slide(image)
    assert open_slide(image, mpp_required=False).mpp is None
    slide = open_slide(image, mpp=0.5)
    assert slide.dimensions == (1360, 1024) and slide.vendor == "jpeg"
    np.testing.assert_array_equal(slide.read(0, 0, (1360, 1024), 0.5),
                                  np.asarray(PIL.Image.open(image).convert("RGB")))


@pytest.mark.parametrize("mpp", [1e-6, 0.049, 20.5, 1e9, float("nan"), float("inf"), -0.5, 0.0])
def test_a_pixel_size_no_slide_has_is_refused(svs_path, mpp):
    with pytest.raises(MppError, match="0.05 to 20 µm/px"):
        open_slide(svs_path, mpp=mpp)


def test_a_print_resolution_is_no_pixel_size(real_glomeruli, tmp_path, capsys):
    """A TIFF saved at 72 dpi would be 352.8 µm/px: tissue detection asked for 7.6 GiB."""
    image = sorted((real_glomeruli / "images").glob("*.jpg"))[0]
    path = tmp_path / "dpi72.tif"
    PIL.Image.open(image).save(path, dpi=(72, 72))
    with pytest.raises(MppError, match=r"352.8 x 352.8 µm, is no slide's .* give it with --mpp"):
        open_slide(path)
    assert open_slide(path, mpp_required=False).mpp is None
    assert open_slide(path, mpp=0.5).mpp == (0.5, 0.5)
    assert main(["info", str(path)]) == 0
    assert "unknown (give --mpp) (the file says 352.8 x 352.8 µm/px, no slide's)" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "random", "truncated_1000000",
                                  "truncated_1600000", "truncated_1900000"])
def test_bad_files_raise_slide_error(case, tmp_path, svs_path):
    path = tmp_path / "slide.svs"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(100_000))
    elif case.startswith("truncated"):
        path.write_bytes(svs_path.read_bytes()[:int(case.split("_")[1])])
    with pytest.raises(SlideError) as error:
        slide = open_slide(path)
        slide.verify()
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_info_cli_json(qptiff_path, capsys):
    import json

    from biopsy.cli import main

    assert main(["info", str(qptiff_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dimensions"] == [1920, 1440] and info["channels"] == ["DAPI", "FITC", "Cy3"]
    assert info["levels"] == [{"dimensions": [1920, 1440], "downsample": [1.0, 1.0]}]
    assert info["mpp"][0] == pytest.approx(0.4965, abs=1e-3) and len(info["sha256"]) == 64
    assert info["vendor"] == "qptiff" and info["objective_power"] == 10


def test_ome_tiff_with_many_uint16_channels(tmp_path):
    """Six named uint16 channels, pixel size in nm, a SubIFD pyramid at downsample 2."""
    rng = np.random.default_rng(2)
    channels = [cv2.GaussianBlur(rng.integers(0, 4000, (400, 600)).astype(np.float32), (0, 0), 8)
                for _ in range(6)]
    level0 = np.stack(channels).astype(np.uint16)  # (C, Y, X)
    names = ["DAPI", "CD3", "CD20", "IgG", "C3", "Autofluorescence"]
    path = tmp_path / "multiplex.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tiff:
        tiff.write(level0, tile=(128, 128), subifds=1,
                   metadata={"axes": "CYX", "Channel": {"Name": names},
                             "PhysicalSizeX": 325.0, "PhysicalSizeXUnit": "nm",
                             "PhysicalSizeY": 325.0, "PhysicalSizeYUnit": "nm"})
        tiff.write(level0.reshape(6, 200, 2, 300, 2).mean(axis=(2, 4)).astype(np.uint16),
                   tile=(128, 128), subfiletype=1)
    slide = open_slide(path)
    assert slide.vendor == "ome-tiff" and slide.is_fluorescence and slide.channel_names == names
    assert slide.mpp == pytest.approx((0.325, 0.325)) and len(slide.levels) == 2
    region = slide.read(100, 60, (50, 40), 0.65)  # level 1, whole-pixel origin
    assert region.dtype == np.uint16 and region.shape == (40, 50, 6)
    expected = level0[:, 60:140, 100:200].reshape(6, 40, 2, 50, 2).mean(axis=(2, 4))
    assert np.abs(region.astype(float) - expected.transpose(1, 2, 0)).max() <= 1
    shifted = slide.read(101, 61, (50, 40), 1.3)  # fractional origin, sparse path
    assert shifted.shape == (40, 50, 6) and shifted.dtype == np.uint16
    assert slide.read(0, 0, (20, 10), 0.2).shape == (10, 20, 6)  # enlarging, > 4 channels


@pytest.mark.parametrize("kind", ["png", "tiff-unassociated", "tiff-associated"])
def test_transparent_pixels_are_glass(tmp_path, kind):
    """An RGBA image's transparent margin read as black was segmented as tissue (sclerosis,
    artery); shown on white, as OpenSlide composites, against Pillow's own compositing."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (120, 160, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:30, :, 3] = 0
    rgba[30:60, :, 3] = 100
    straight = PIL.Image.fromarray(rgba)
    expected = np.asarray(PIL.Image.alpha_composite(PIL.Image.new("RGBA", straight.size, "white"),
                                                    straight).convert("RGB"))
    path = tmp_path / ("slide.png" if kind == "png" else "slide.tif")
    if kind == "png":
        straight.save(path)
    else:
        stored = rgba.copy()
        if kind == "tiff-associated":  # premultiplied by alpha
            stored[..., :3] = (rgba[..., :3].astype(np.uint16) * rgba[..., 3:] + 127) // 255
        extra = "assocalpha" if kind == "tiff-associated" else "unassalpha"
        tifffile.imwrite(path, stored, photometric="rgb", extrasamples=[extra], tile=(64, 64))
    slide = open_slide(path, mpp=0.5)
    assert slide.channel_names == ["red", "green", "blue"] and not slide.is_fluorescence
    got = slide.read(0, 0, (160, 120), 0.5)
    assert (got[:30] == 255).all()
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_alpha_is_read_per_pyramid_level(tmp_path):
    """A pyramid whose level 0 is RGBA and its reduced level RGB: the level's own samples."""
    rgba = np.full((256, 256, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:64, :, 3] = 0
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgba, photometric="rgb", extrasamples=["unassalpha"], tile=(64, 64), subifds=1)
        tif.write(np.full((128, 128, 3), 100, np.uint8), photometric="rgb", tile=(64, 64),
                  subfiletype=1)
    slide = open_slide(path, mpp=0.5)
    assert (slide.read_level(0, 0, 0, 256, 64) == 255).all()
    assert (slide.read_level(0, 0, 64, 256, 192) == 200).all()
    assert (slide.read_level(1, 0, 0, 128, 128) == 100).all()


def test_a_palette_colour_tiff_is_read_as_its_colours(tmp_path):
    """It was one channel of indices, taken for fluorescence and refused by brightfield models;
    its colours against Pillow's reading of the same file."""
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    colormap = rng.integers(0, 65536, (3, 256), dtype=np.uint16)
    path = tmp_path / "palette.tif"
    tifffile.imwrite(path, indices, photometric="palette", colormap=colormap)
    slide = open_slide(path, mpp=0.5)
    assert slide.channel_names == ["red", "green", "blue"] and not slide.is_fluorescence
    np.testing.assert_array_equal(slide.read(0, 0, (64, 48), 0.5),
                                  np.asarray(PIL.Image.open(path).convert("RGB")))


def test_a_16_bit_greyscale_image_is_refused_not_read_as_glass(tmp_path):
    path = tmp_path / "grey16.png"
    PIL.Image.fromarray(np.full((50, 60), 30000, np.uint16)).save(path)
    with pytest.raises(SlideError, match="16- or 32-bit greyscale.*convert it to 8 bits"):
        open_slide(path, mpp=0.5)


def test_a_photomicrograph_too_large_to_decode_whole_says_so(tmp_path, monkeypatch):
    """Pillow's default guard refused images from 179 Mpx as damaged files; the limit is now
    1 Gpx, and above it the message says what to do."""
    from biopsy import slide_readers

    assert PIL.Image.MAX_IMAGE_PIXELS == slide_readers.MAX_IMAGE_PIXELS == 1_000_000_000
    path = tmp_path / "big.png"
    PIL.Image.new("1", (300, 200), 1).save(path)
    for limit in (50_000, 20_000):  # ours refuses above it, Pillow's above twice Pillow's
        monkeypatch.setattr(slide_readers, "MAX_IMAGE_PIXELS", limit)
        monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(SlideError, match="save it as a tiled pyramidal TIFF"):
            open_slide(path, mpp=0.5)
