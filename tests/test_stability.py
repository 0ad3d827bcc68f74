"""Re-stained and rotated slide copies (biopsy.restain), checked against numpy, scikit-image and colorsys."""

import colorsys

import numpy as np
import pytest
import tifffile
from skimage.color import hed2rgb

from biopsy.cli import main as cli_main
from biopsy.errors import MppError, SlideError
from biopsy.pyramid import write_pyramid
from biopsy.restain import StainShift, restain_slide, rotated_xy
from biopsy.slide import open_slide

MPP = 0.5
HEIGHT, WIDTH = 1100, 1040  # two pyramid levels; odd turns swap the sides


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A lossless Aperio-style slide of random pixels with white glass in its top rows."""
    pixels = np.random.default_rng(7).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[:40] = 255
    path = tmp_path_factory.mktemp("source") / "source.svs"
    write_pyramid(path, [pixels[:500], pixels[500:]], (HEIGHT, WIDTH), MPP, style="aperio",
                  compression="zlib")
    return path, pixels


@pytest.mark.parametrize("quarter_turns,name", [(0, "copy.svs"), (1, "copy.svs"), (2, "copy.tif"),
                                                (3, "copy.ome.tif"), (-1, "copy.tif")])
def test_rotation_gives_the_turned_pixels_at_the_same_mpp(source, tmp_path, quarter_turns, name):
    path, pixels = source
    expected = np.rot90(pixels, quarter_turns)
    restain_slide(path, tmp_path / name, quarter_turns=quarter_turns, band_px=96,
                  compression="zlib")
    with open_slide(tmp_path / name) as turned, open_slide(path) as original:
        assert turned.dimensions == (expected.shape[1], expected.shape[0])
        assert turned.mpp == pytest.approx((MPP, MPP))
        assert len(turned.levels) == 2
        assert np.array_equal(turned.read_level(0, 0, 0, *turned.dimensions), expected)
        # a region at 1 µm/px (level 1) is the turned region of the original
        x, y, width, height = 200, 120, 300, 160  # level-0 px of the original
        corners = [rotated_xy(cx, cy, original.dimensions, quarter_turns)
                   for cx, cy in ((x, y), (x + width - 1, y + height - 1))]
        left, top = (min(c[0] for c in corners), min(c[1] for c in corners))
        size_px = (width // 2, height // 2)[::-1] if quarter_turns % 2 else (width // 2, height // 2)
        assert np.array_equal(turned.read(left, top, size_px, 2 * MPP),
                              np.rot90(original.read(x, y, (width // 2, height // 2), 2 * MPP),
                                       quarter_turns))


def test_rotated_xy_follows_rot90():
    image = np.arange(6 * 4).reshape(6, 4)  # height 6, width 4
    for turns in range(4):
        turned = np.rot90(image, turns)
        for y, x in np.ndindex(image.shape):
            new_x, new_y = rotated_xy(x, y, (4, 6), turns)
            assert turned[new_y, new_x] == image[y, x]


def test_stain_scaling_matches_scikit_image_hed():
    concentrations = np.array([[[0.05, 0, 0], [0, 0.08, 0], [0.03, 0.04, 0], [0.02, 0.02, 0.01]]])
    factors = np.array([0.5, 1.5, 0.8])
    rgb = np.rint(hed2rgb(concentrations) * 255).astype(np.uint8)
    expected = hed2rgb(concentrations * factors) * 255
    shifted = StainShift(*factors).apply(rgb)
    assert np.abs(shifted - expected).max() <= 2.5  # uint8 rounding of the input, amplified by 1.5


def test_hue_turn_matches_colorsys():
    rgb = np.array([[[200, 40, 160], [90, 120, 220], [230, 180, 60], [128, 128, 128]]], np.uint8)
    shifted = StainShift(hue_deg=-25).apply(rgb)
    for before, after in zip(rgb[0], shifted[0]):
        h, s, v = colorsys.rgb_to_hsv(*(before / 255))
        expected = np.array(colorsys.hsv_to_rgb((h - 25 / 360) % 1, s, v)) * 255
        assert np.abs(after - expected).max() <= 1


def test_shifts_leave_glass_white_and_identity_exact():
    colours = np.random.default_rng(3).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    assert np.array_equal(StainShift().apply(colours), colours)
    glass = np.array([[[255, 255, 255], [246, 245, 247]]], np.uint8)
    for shift in (StainShift(1.25, 0.7, 1.0, -10), StainShift(0.5, 2.0, 2.0, 90)):
        shifted = shift.apply(glass).astype(int)
        assert (shifted[0, 0] == 255).all()
        assert shifted.min() >= 235 and np.ptp(shifted[0, 1]) <= 4


def test_restained_copy_changes_colours_as_specified(source, tmp_path):
    path, pixels = source
    shift = StainShift(haematoxylin=0.8, eosin=1.2, hue_deg=6)
    restain_slide(path, tmp_path / "copy.svs", shift, quarter_turns=1, compression="zlib")
    with open_slide(tmp_path / "copy.svs") as copy:
        assert np.array_equal(copy.read_level(0, 0, 0, *copy.dimensions),
                              shift.apply(np.rot90(pixels)))


def test_failed_write_leaves_nothing(source, tmp_path, monkeypatch):
    path, _ = source
    calls = []

    def failing(self, rgb):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return rgb

    monkeypatch.setattr(StainShift, "apply", failing)
    with pytest.raises(RuntimeError):
        restain_slide(path, tmp_path / "copy.svs", StainShift(eosin=0.5), band_px=64)
    assert list(tmp_path.iterdir()) == []


def test_user_errors(source, tmp_path):
    path, _ = source
    with pytest.raises(SlideError, match="another path"):
        restain_slide(path, path)
    with pytest.raises(SlideError, match=r"\.svs, \.tif or \.ome\.tif"):
        restain_slide(path, tmp_path / "copy.png")
    anisotropic = tmp_path / "anisotropic.tif"
    tifffile.imwrite(anisotropic, np.full((64, 64, 3), 200, np.uint8), tile=(32, 32),
                     resolution=(1e4 / 0.5, 1e4 / 0.6), resolutionunit="CENTIMETER")
    with pytest.raises(MppError, match="not square"):
        restain_slide(anisotropic, tmp_path / "copy.tif")
    with pytest.raises(ValueError):
        StainShift(eosin=-1)
    with pytest.raises(ValueError, match="hue_deg"):
        StainShift(hue_deg=float("nan"))  # wrote a corrupt copy
    assert not (tmp_path / "copy.tif").exists()


def test_cli_writes_a_scorable_slide(source, tmp_path, capsys):
    path, pixels = source
    out = tmp_path / "copy.svs"
    assert cli_main(["restain", str(path), str(out), "--turns", "3", "--eosin", "0.7",
                     "--hue", "-10", "--quality", "95"]) == 0
    with open_slide(out) as copy:
        assert copy.dimensions == (HEIGHT, WIDTH) and copy.mpp == pytest.approx((MPP, MPP))
        expected = StainShift(eosin=0.7, hue_deg=-10).apply(np.rot90(pixels, 3)[:256, :256])
        written = copy.read_level(0, 0, 0, 256, 256)
    # JPEG keeps the mean colour of 16 px blocks even of random pixels
    block_means = [image.reshape(16, 16, 16, 16, 3).mean(axis=(1, 3)) for image in (written, expected)]
    assert np.abs(block_means[0] - block_means[1]).max() < 4
    assert cli_main(["restain", str(path), str(path)]) == 2
