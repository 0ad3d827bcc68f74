"""Tissue detection: a slide written with a known tissue polygon, real images, the CLI."""

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import shapely
import tifffile
from scipy import ndimage
from skimage import morphology
from skimage.draw import disk, line_aa, polygon
from skimage.filters import threshold_otsu

from biopsy.slide import open_slide
from biopsy.tissue import (GLASS_MAX_SATURATION, GLASS_MIN_GREY, TissueMask, brightfield_foreground,
                           clean_mask, detect_tissue, glass_colour, otsu_within, pen_colours,
                           pen_ink, stain_features)

SLIDE_MPP = 1.0
MASK_MPP = 8.0
TISSUE_POLYGON = [(400, 300), (2500, 500), (2700, 1800), (1500, 2200), (600, 1700)]  # level-0 (x, y)


def write_slide(path, image: np.ndarray) -> None:
    """A tiled RGB TIFF at SLIDE_MPP."""
    pixels_per_cm = 1e4 / SLIDE_MPP
    tifffile.imwrite(path, image.clip(0, 255).astype(np.uint8), photometric="rgb", tile=(256, 256),
                     resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")


@pytest.fixture(scope="module")
def polygon_slide(tmp_path_factory):
    """A 3000 x 2400 px slide at 1 µm/px: stained tissue inside TISSUE_POLYGON on noisy glass, with
    dust specks, and blue, green and black pen marks outside it."""
    rng = np.random.default_rng(1)
    height, width = 2400, 3000
    image = rng.normal(238, 4, (height, width, 3))  # glass
    rows, cols = polygon([y for _, y in TISSUE_POLYGON], [x for x, _ in TISSUE_POLYGON], (height, width))
    image[rows, cols] = rng.normal((200, 130, 185), 25, (len(rows), 3))  # H&E-like tissue
    for centre in ((100, 100), (2300, 200), (150, 2800)):  # specks, ~30 µm across
        image[disk(centre, 15, shape=(height, width))] = (90, 60, 120)
    for colour, offset in (((40, 60, 170), 0), ((40, 160, 70), 60), ((30, 30, 30), 120)):  # pens
        for thickness in range(12):
            rr, cc, _ = line_aa(2250 - offset + thickness, 200, 2000 - offset + thickness, 1200)
            image[rr, cc] = colour
    path = tmp_path_factory.mktemp("tissue") / "polygon.tif"
    write_slide(path, image)
    return path


def test_polygon_tissue_iou(polygon_slide):
    tissue = detect_tissue(open_slide(polygon_slide), mpp=MASK_MPP)
    scale = SLIDE_MPP / MASK_MPP
    truth = np.zeros(tissue.mask.shape, bool)
    # mask pixel (r, c) covers level-0 [c / scale, (c + 1) / scale): its centre is at c + 0.5
    truth[polygon([y * scale - 0.5 for _, y in TISSUE_POLYGON],
                  [x * scale - 0.5 for x, _ in TISSUE_POLYGON], truth.shape)] = True
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert iou >= 0.95, iou
    assert len(tissue.pieces) == 1  # specks and pen marks are not tissue
    polygon_area_mm2 = shapely.Polygon(TISSUE_POLYGON).area * SLIDE_MPP**2 / 1e6
    assert tissue.area_mm2 == pytest.approx(polygon_area_mm2, rel=0.05)
    x0, y0, x1, y1 = tissue.pieces[0].bbox_level0
    assert (x0, y0, x1, y1) == pytest.approx((400, 300, 2700, 2200), abs=3 / scale)


def test_a_lone_glomerulus_is_tissue_and_a_speck_is_not(tmp_path):
    """A stained disc 90 µm across alone on the glass (a small glomerulus that came loose) is kept;
    a 30 µm speck is not."""
    rng = np.random.default_rng(2)
    image = rng.normal(238, 4, (800, 800, 3))
    glomerulus = disk((300, 500), 45)
    image[glomerulus] = rng.normal((200, 130, 185), 25, (len(glomerulus[0]), 3))
    image[disk((600, 150), 15)] = (90, 60, 120)
    write_slide(tmp_path / "lone.tif", image)
    tissue = detect_tissue(open_slide(tmp_path / "lone.tif"), mpp=MASK_MPP)
    assert len(tissue.pieces) == 1
    x0, y0, x1, y1 = tissue.pieces[0].bbox_level0
    assert (x0, y0, x1, y1) == pytest.approx((455, 255, 545, 345), abs=2 * MASK_MPP)
    assert tissue.pieces[0].area_mm2 == pytest.approx(np.pi * 45**2 / 1e6, rel=0.2)


DARK_TISSUE = [(300, 300), (1200, 300), (1200, 1700), (300, 1700)]  # level-0 (x, y)
PALE_STROMA = [(1200, 300), (2100, 500), (2000, 1600), (1200, 1700)]  # beside it
LUMEN_CENTRE, LUMEN_RADIUS = (1000, 750), 120  # (row, col), px: a vessel lumen inside the tissue


@pytest.fixture(scope="module")
def pale_stroma_slide(tmp_path_factory):
    """A 2400 x 2000 px slide at 1 µm/px: H&E-like tissue with a glass-white lumen, beside pale eosin
    stroma whose OD is glass-like (darkest channel ~208 on glass ~240) but saturation ~0.12."""
    rng = np.random.default_rng(2)
    height, width = 2000, 2400
    image = rng.normal(240, 4, (height, width, 3))
    for corners, colour, spread in ((DARK_TISSUE, (200, 130, 185), 25), (PALE_STROMA, (236, 208, 220), 4)):
        rows, cols = polygon([y for _, y in corners], [x for x, _ in corners], (height, width))
        image[rows, cols] = rng.normal(colour, spread, (len(rows), 3))
    image[disk(LUMEN_CENTRE, LUMEN_RADIUS, shape=(height, width))] = 240
    path = tmp_path_factory.mktemp("tissue") / "pale.tif"
    write_slide(path, image)
    return path


def polygon_mask(corners, shape, scale):
    """Mask pixels whose centres lie inside the level-0 polygon ``corners``."""
    truth = np.zeros(shape, bool)
    truth[polygon([y * scale - 0.5 for _, y in corners], [x * scale - 0.5 for x, _ in corners], shape)] = True
    return truth


def test_pale_stroma_and_lumina_are_tissue(pale_stroma_slide):
    tissue = detect_tissue(open_slide(pale_stroma_slide), mpp=MASK_MPP)
    scale = SLIDE_MPP / MASK_MPP
    pale = polygon_mask(PALE_STROMA, tissue.mask.shape, scale)
    truth = polygon_mask(DARK_TISSUE, tissue.mask.shape, scale) | pale
    assert (tissue.mask & pale).sum() / pale.sum() >= 0.95  # the pale stroma is in
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert iou >= 0.95, iou  # and no glass around it
    assert len(tissue.pieces) == 1
    row, col = (int(value * scale) for value in LUMEN_CENTRE)
    assert tissue.mask[row - 5:row + 5, col - 5:col + 5].all()  # the lumen is filled


def test_real_dicom_tissue_takes_in_pale_stroma(dicom_path):
    # Looking at the 8 µm/px thumbnail: one large H&E section, half of it pale eosin stroma, covers
    # about half the slide; green and blue pen run over and around it, specks of dust on the glass.
    tissue = detect_tissue(open_slide(dicom_path, mpp=4.6))
    assert 0.42 < tissue.fraction < 0.58, tissue.fraction  # stroma missed: 0.35
    assert tissue.pieces[0].area_mm2 > 0.95 * tissue.area_mm2  # no pen arrow, no dust
    stroma, glass = [(587, 124), (1082, 1639), (620, 320)], [(1391, 464), (1082, 1082), (155, 1700)]
    assert all(tissue.mask[point] for point in stroma)  # (row, col) at 8 µm/px
    assert not any(tissue.mask[point] for point in glass)


def test_tissue_fraction_of_level0_rectangles(polygon_slide):
    tissue = detect_tissue(open_slide(polygon_slide), mpp=MASK_MPP)
    assert tissue.tissue_fraction(1200, 900, (512, 512)) == 1.0  # inside the polygon
    assert tissue.tissue_fraction(2800, 100, (150, 150)) == 0.0  # glass
    assert tissue.tissue_fraction(-1000, -1000, (500, 500)) == 0.0  # off the slide
    whole = tissue.tissue_fraction(0, 0, (3000, 2400))
    assert whole == pytest.approx(tissue.fraction, abs=0.01)
    edge = tissue.tissue_fraction(300, 1000, (600, 64))  # straddles the left edge of the polygon
    assert 0.2 < edge < 0.9



def test_grid_counts_and_the_near_mask_match_brute_force():
    """Counts of the mask pixels that level-0 rectangles touch (an integral image, a whole grid
    at once) against summing the mask under each; the mask grown by one pixel against scipy's
    binary dilation. Random masks, pixel sizes differing by axis, rectangles off the slide."""
    rng = np.random.default_rng(5)
    for _ in range(30):
        mask = rng.random((rng.integers(1, 60), rng.integers(1, 60))) < rng.uniform(0.01, 0.5)
        mask_mpp, level0_mpp = rng.choice([4.0, 7.3, 8.0]), tuple(rng.uniform(0.2, 0.6, 2))
        tissue = TissueMask(mask, mask_mpp, level0_mpp)
        near = ndimage.binary_dilation(mask, np.ones((3, 3), bool))
        assert np.array_equal(tissue.near().mask, near) and tissue.near() is tissue.near()
        extent = np.array(mask.shape[::-1]) * mask_mpp / np.array(level0_mpp)  # level-0 (x, y)
        x_spans, y_spans = (np.column_stack([rng.uniform(-0.2, 1.1, 7), rng.uniform(0, 0.4, 7)]) * size
                            for size in extent)
        counts, areas = tissue.grid_counts(x_spans, y_spans)
        for row, (y, height) in enumerate(y_spans):
            for col, (x, width) in enumerate(x_spans):
                scale_x, scale_y = level0_mpp[0] / mask_mpp, level0_mpp[1] / mask_mpp
                col0, col1 = int(np.floor(x * scale_x)), int(np.ceil((x + width) * scale_x))
                row0, row1 = int(np.floor(y * scale_y)), int(np.ceil((y + height) * scale_y))
                assert areas[row, col] == (col1 - col0) * (row1 - row0)
                assert counts[row, col] == mask[max(row0, 0):max(row1, 0), max(col0, 0):max(col1, 0)].sum()

def test_real_glomeruli_images_are_mostly_tissue(real_glomeruli):
    images = sorted((real_glomeruli / "images").glob("*.jpg"))[::3]
    fractions = [detect_tissue(open_slide(path, mpp=0.5)).fraction for path in images]
    assert min(fractions) > 0.2  # camera snapshots framed on tissue
    assert np.median(fractions) > 0.8


@pytest.mark.parametrize("colour", [(40, 60, 170), (30, 30, 30)])  # trichrome blue, silver black
def test_pen_coloured_stain_inside_tissue_is_tissue_but_on_glass_is_pen(colour):
    image = np.full((80, 160, 3), 240, np.uint8)
    image[10:70, 10:70] = (200, 130, 185)  # tissue
    image[30:50, 30:50] = colour  # inside the tissue
    image[30:50, 110:130] = colour  # on glass
    pen = pen_ink(image, brightfield_foreground(image))
    assert not pen[30:50, 30:50].any() and pen[30:50, 110:130].all()


def test_real_stains_are_not_taken_for_pen(real_glomeruli):
    for stain in ("Masson", "PASM"):
        for path in sorted((real_glomeruli / "images").glob(f"*-{stain}.jpg"))[:8]:
            image = open_slide(path, mpp=0.5).thumbnail(8.0)
            assert pen_ink(image, brightfield_foreground(image)).mean() < 0.01, path.name



def test_pen_colours_in_bands_are_those_of_one_pass(real_glomeruli):
    """Pen colours found in row bands on threads against the same rules on the whole image at
    once, on real images and on random colours (every pen colour, the green fringe's dilation)."""
    def whole(image):
        red, green, blue = (image[..., channel].astype(np.int16) for channel in range(3))
        brightest, darkest = image.max(axis=2).astype(np.int16), image.min(axis=2).astype(np.int16)
        green_pen = (green - red > 40) & (green - blue > 15)
        if green_pen.any():
            green_pen |= ((green - red > 20) & (green - blue > -10)
                          & morphology.dilation(green_pen, morphology.disk(4)))
        return (green_pen | ((blue - red > 90) & (blue - green > 60) & (red < 70))
                | ((brightest < 45) & (brightest - darkest < 20)))

    images = [np.random.default_rng(0).integers(0, 256, (700, 333, 3), dtype=np.uint8)]
    images += [np.asarray(PIL.Image.open(path).convert("RGB"))
               for path in sorted((real_glomeruli / "images").glob("*.jpg"))[::10]]
    for image in images:
        assert np.array_equal(pen_colours(image), whole(image))

def _glass_colour_by_numpy(image: np.ndarray) -> np.ndarray:
    pixels = image.reshape(-1, 3).astype(np.float32)
    brightness = pixels.sum(axis=1)
    colour = np.median(pixels[brightness >= np.percentile(brightness, 99)], axis=0)
    if colour.min() >= GLASS_MIN_GREY and 1 - colour.min() / colour.max() <= GLASS_MAX_SATURATION:
        return colour
    return np.full(3, 255.0, np.float32)


def test_glass_colour_and_features_match_numpy_on_real_images(real_glomeruli, svs_path):
    """The histogram percentile and medians against NumPy's; the banded features against one pass."""
    distinct_greys = np.repeat(np.arange(150, 250, dtype=np.uint8).reshape(10, 10, 1), 3, axis=2)
    images = [open_slide(svs_path).thumbnail(2.0), np.full((3, 5, 3), 247, np.uint8), distinct_greys,
              np.random.default_rng(0).integers(0, 256, (301, 257, 3), dtype=np.uint8)]
    images += [np.asarray(PIL.Image.open(path).convert("RGB"))
               for path in sorted((real_glomeruli / "images").glob("*.jpg"))[::9]]
    for image in images:
        expected = _glass_colour_by_numpy(image)
        assert np.array_equal(glass_colour(image), expected) and expected.dtype == np.float32
        balanced = np.minimum(image * (255 / expected), 255)
        darkest, brightest = balanced.min(axis=2), balanced.max(axis=2)
        density, saturation = stain_features(image)
        np.testing.assert_allclose(density, -np.log10((darkest + 1) / 256), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(saturation, (brightest - darkest) / np.maximum(brightest, 1),
                                   rtol=1e-6, atol=1e-6)



def test_otsu_thresholds_match_skimage_to_the_bit(real_glomeruli, svs_path):
    """Histograms counted in row bands on threads give skimage's ``threshold_otsu``, unrounded, on
    real images' features and on arrays with many ties; a flat array gives the upper bound."""
    images = [open_slide(svs_path).thumbnail(2.0)]
    images += [np.asarray(PIL.Image.open(path).convert("RGB"))
               for path in sorted((real_glomeruli / "images").glob("*.jpg"))[::9]]
    rng = np.random.default_rng(0)
    arrays = [feature for image in images for feature in stain_features(image)]
    arrays += [rng.random((300, 7), np.float32), rng.integers(0, 3, (500, 9)).astype(np.float32)]
    for values in arrays:
        assert otsu_within(values, (-10, 10)) == float(threshold_otsu(values))
    assert otsu_within(np.full((4, 4), 0.3, np.float32), (0.1, 0.2)) == 0.2

def test_glass_colour_of_16_bit_images_matches_numpy():
    """Three 16-bit channels' sum needs more than 16 bits."""
    image = np.full((60, 80, 3), 62000, np.uint16)
    image[10:40, 10:50] = (52000, 30000, 48000)
    image[0, :5] = (65535, 65535, 65535)
    assert np.array_equal(glass_colour(image), _glass_colour_by_numpy(image))
    assert glass_colour(image)[0] == 62000


def _clean_mask_by_skimage(candidate, min_area_px, max_hole_px):
    mask = morphology.closing(morphology.opening(candidate, morphology.disk(1)), morphology.disk(2))
    mask = morphology.remove_small_objects(mask, max_size=int(min_area_px))
    holes = ndimage.binary_fill_holes(mask) & ~mask
    return mask | (holes & ~morphology.remove_small_objects(holes, max_size=int(max_hole_px)))


def test_mask_cleaning_matches_skimage_and_scipy(real_glomeruli):
    """OpenCV's opening, closing and components against skimage's and scipy's, on real
    foregrounds and random masks (pieces dropped, holes filled or left, at the border too)."""
    rng = np.random.default_rng(5)
    candidates = [rng.random(shape) < share for shape in ((1, 1), (1, 9), (60, 70), (201, 157))
                  for share in (0.3, 0.6, 0.9)]
    candidates += [brightfield_foreground(np.asarray(PIL.Image.open(path).convert("RGB")))
                   for path in sorted((real_glomeruli / "images").glob("*.jpg"))[::15]]
    for candidate in candidates:
        for min_area_px, max_hole_px in ((0, 0), (3, 10), (78.1, 7812.5), (40, candidate.size)):
            expected = _clean_mask_by_skimage(candidate, min_area_px, max_hole_px)
            assert np.array_equal(clean_mask(candidate, min_area_px, max_hole_px), expected)


def test_real_svs_tissue(svs_path):
    tissue = detect_tissue(open_slide(svs_path))
    assert 0.25 < tissue.fraction < 0.6
    assert 0.4 < tissue.pieces[0].area_mm2 < 0.9  # one section, most of the tissue
    assert tissue.pieces[0].area_mm2 > 0.9 * tissue.area_mm2


def test_real_qptiff_fluorescence_tissue(qptiff_path):
    tissue = detect_tissue(open_slide(qptiff_path))
    assert 0.1 < tissue.fraction < 0.95


def test_tissue_cli_writes_mask_overlay_and_json(polygon_slide, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "biopsy", "tissue", str(polygon_slide),
                             "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "tissue.json").read_text())
    mask = np.asarray(PIL.Image.open(out / summary["mask_png"]))
    assert mask.shape == (300, 375) and set(np.unique(mask)) == {0, 255}
    assert np.asarray(PIL.Image.open(out / "tissue_overlay.png")).shape == (300, 375, 3)
    assert summary["mask_mpp"] == MASK_MPP and len(summary["pieces"]) == 1
    assert summary["tissue_area_mm2"] == pytest.approx(summary["pieces"][0]["area_mm2"])
    assert sorted(path.name for path in out.iterdir()) == [
        "tissue.json", "tissue_mask.png", "tissue_overlay.png"]
