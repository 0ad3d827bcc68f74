"""Nuclei detection and the nuclear NIH activity components, against synthetic ground truth."""

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
from skimage.color import rgb2hed

from biopsy import nuclei, pipeline
from biopsy.errors import ConfigError
from biopsy.infer import ClassMap
from biopsy.labelmap import read_label_map
from biopsy.model import ModelInfo
from biopsy.scorefolder import read_score_folder, score_class_map
from biopsy.scoring import load_score_config, tile_is_inflamed
from biopsy.slide import open_slide
from biopsy.synth import LesionProfile, generate_slide
from biopsy.synth.layout import build_layout
from biopsy.tissue import detect_tissue

# Four glomeruli, two of them hypercellular (50 %, bin 2); infiltrates over ~40 % of the cortex.
PROFILE = LesionProfile(name="nuclei", glomeruli=4, segmental_sclerosis=0.25,
                        cellular_crescent=0.25, endocapillary_hypercellularity=0.5,
                        inflammation_percent=40.0, core_length_mm=1.0, core_width_mm=0.8, seed=21)
CONFIG = load_score_config()


@pytest.fixture(scope="module", params=["pas", "he", "trichrome"])
def stained(request, tmp_path_factory):
    """A synthetic slide in each stain, its truth, the drawn nuclei and the detected ones."""
    profile = replace(PROFILE, stain=request.param)
    folder = tmp_path_factory.mktemp(request.param)
    truth = generate_slide(profile, folder)
    with open_slide(folder / "slide.svs") as slide:
        detected = nuclei.detect_nuclei(slide)
    return folder, truth, build_layout(profile).nuclei[:, :2], detected


def test_detected_nuclei_match_the_drawn_ones(stained):
    _, _, drawn, detected = stained
    matched = nuclei.match_centres(detected, drawn, 4.0 / PROFILE.mpp)
    # Recall is capped by drawn nuclei that overlap (several light-microscopy cannot separate).
    assert matched / len(detected) > 0.95
    assert matched / len(drawn) > 0.88


def test_hypercellular_tufts_and_infiltrates_are_found(stained):
    folder, truth, _, detected = stained
    label_map = read_label_map(folder / "labels.ome.tif")
    scored = score_class_map(label_map.labels, label_map.class_names, label_map.mpp, CONFIG,
                             level0_mpp=PROFILE.mpp, nuclei_xy=detected)
    hypercellular = {g["glomerulus_id"]: "endocapillary_hypercellularity" in g["lesions"]
                     for g in truth["glomeruli"]}
    assert sorted(hypercellular.values()) == [False, False, True, True]
    centres = np.array([[g["centroid_x_px"], g["centroid_y_px"]] for g in truth["glomeruli"]])
    for g in scored.glomeruli:
        nearest = int(np.argmin(np.hypot(*(centres - (g.centroid_x_px, g.centroid_y_px)).T)))
        expected = truth["glomeruli"][nearest]
        assert ("endocapillary_hypercellularity" in g.lesions) == hypercellular[expected["glomerulus_id"]]
        assert g.tuft_nuclei_per_1000um2 == pytest.approx(expected["tuft_nuclei_per_1000um2"], rel=0.3)
    found = scored.scores["activity_index"]["components"]
    expected = truth["scores"]["activity_index"]["components"]
    for name in ("endocapillary_hypercellularity", "interstitial_inflammation"):
        assert found[name]["assessed"] and found[name]["bin"] == expected[name]["bin"]
    assert expected["interstitial_inflammation"]["bin"] >= 1
    assert any(tile_is_inflamed(t, CONFIG.cortex.interstitial_inflammation) for t in scored.cortex_tiles)
    assert found["interstitial_inflammation"]["percent"] == pytest.approx(
        expected["interstitial_inflammation"]["percent"], abs=10)


def test_without_the_lesions_nothing_is_called(tmp_path):
    profile = replace(PROFILE, endocapillary_hypercellularity=0.0, inflammation_percent=0.0,
                      core_length_mm=0.8, glomeruli=2, stain="trichrome", fibrosis_percent=30,
                      atrophy_percent=30)
    truth = generate_slide(profile, tmp_path)
    with open_slide(tmp_path / "slide.svs") as slide:
        detected = nuclei.detect_nuclei(slide)
    label_map = read_label_map(tmp_path / "labels.ome.tif")
    scored = score_class_map(label_map.labels, label_map.class_names, label_map.mpp, CONFIG,
                             level0_mpp=profile.mpp, nuclei_xy=detected)
    for scores in (truth["scores"], scored.scores):
        for name in ("endocapillary_hypercellularity", "interstitial_inflammation"):
            component = scores["activity_index"]["components"][name]
            assert component["assessed"] and component["percent"] == 0


def _discs(mpp: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """A pink field with dark violet discs 5 µm across at random places >= 8 µm apart."""
    size_px = int(round(200 / mpp))
    rgb = np.full((size_px, size_px, 3), (225, 170, 200), np.uint8)
    centres = np.array([[x, y] for x in range(20, 190, 12) for y in range(20, 190, 12)], float)
    centres += rng.uniform(-2, 2, centres.shape)
    for x, y in centres / mpp:
        cv2.circle(rgb, (int(round(x * 16)), int(round(y * 16))), int(2.5 / mpp * 16), (70, 55, 130),
                   -1, cv2.LINE_AA, 4)
    return cv2.GaussianBlur(rgb, (0, 0), 0.4 / mpp), centres


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_region_detector_finds_every_drawn_disc_at_any_pixel_size(mpp):
    rgb, centres_um = _discs(mpp, np.random.default_rng(0))
    peaks = nuclei.detect_in_region(rgb, mpp)
    assert len(peaks) == len(centres_um)
    found_um = (peaks[:, ::-1] + 0.5) * mpp
    error = np.hypot(*(found_um[:, None] - centres_um[None]).transpose(2, 0, 1)).min(axis=0)
    assert error.max() < 1.0


def test_regions_join_without_seams_and_coarse_slides_are_refused(stained, tmp_path):
    folder, _, _, detected = stained
    with open_slide(folder / "slide.svs") as slide:
        small_regions = nuclei.detect_nuclei(slide, region_px=300)
        assert nuclei.why_not_countable(slide) is None
    assert len(small_regions) == len(detected)
    assert nuclei.match_centres(small_regions, detected, 0.5) == len(detected)
    with open_slide(folder / "slide.svs", mpp=1.0) as coarse:
        assert "coarser" in nuclei.why_not_countable(coarse)


def test_regions_searched_on_threads_find_what_one_thread_does(stained, monkeypatch):
    folder, _, _, detected = stained
    monkeypatch.setattr(nuclei, "_MAX_THREADS", 1)
    with open_slide(folder / "slide.svs") as slide:
        one_thread = nuclei.detect_nuclei(slide, region_px=200, tissue=detect_tissue(slide))
    monkeypatch.setattr(nuclei, "_MAX_THREADS", 4)
    with open_slide(folder / "slide.svs") as slide:
        assert np.array_equal(nuclei.detect_nuclei(slide, region_px=200), one_thread)  # in order



@pytest.mark.parametrize("region_px", [97, 300])
def test_regions_read_are_those_that_touch_tissue(stained, region_px):
    """The regions searched, in raster order, are those of the grid whose square touches a mask
    pixel, looked at one by one on the mask."""
    with open_slide(stained[0] / "slide.svs") as slide:
        tissue = detect_tissue(slide)
        windows = list(nuclei._tissue_windows(slide, 0.5, region_px, tissue))
        step = region_px * 0.5 / slide.mpp[0]  # level-0 px
        width, height = slide.dimensions
        per_px = slide.mpp[0] / tissue.mpp  # mask pixels per level-0 pixel (square pixels here)
    grid = [(round(x), round(y)) for y in np.arange(0, height, step) for x in np.arange(0, width, step)]

    def touches(x: int, y: int) -> bool:
        rows = slice(int(np.floor(y * per_px)), int(np.ceil((y + np.ceil(step)) * per_px)))
        cols = slice(int(np.floor(x * per_px)), int(np.ceil((x + np.ceil(step)) * per_px)))
        return tissue.mask[rows, cols].any()

    expected = [xy for xy in grid if touches(*xy)]
    assert windows == expected and 0 < len(expected) < len(grid)

def test_score_slide_counts_nuclei_and_from_labels_does_not(stained, tmp_path, monkeypatch):
    folder, truth, _, detected = stained
    if truth["stain"]["name"] != "pas":
        pytest.skip("one stain is enough for the pipeline")
    # The model's part is tested in test_pipeline; here it "segments" the truth exactly.
    label_map = read_label_map(folder / "labels.ome.tif")
    truth_map = ClassMap(label_map.labels, label_map.mpp, tuple(label_map.class_names),
                         label_map.class_colours, tile_count=1)  # as a model over tissue tiles
    monkeypatch.setattr(pipeline, "segment_slide", lambda *args, **kwargs: truth_map)
    info = ModelInfo("unet", {}, list(label_map.class_names), {}, 1.0, 128, 3, {})
    scores = pipeline.score_slide_file(folder / "slide.svs", tmp_path / "out", None, info,
                                       "model", CONFIG)
    assert scores["chronicity_index"] == truth["scores"]["chronicity_index"]
    for name in ("endocapillary_hypercellularity", "interstitial_inflammation"):
        found = scores["activity_index"]["components"][name]
        assert found["bin"] == truth["scores"]["activity_index"]["components"][name]["bin"]
    scored = read_score_folder(tmp_path / "out")
    assert scored.summary["provenance"]["nuclei"]["count"] == len(detected)
    assert scored.summary["scores"] == scores  # read back from the folder's tables, too
    assert all(t.interstitial_nuclei is not None for t in scored.cortex_tiles)
    assert all(g.tuft_nuclei_per_1000um2 is not None for g in scored.glomeruli)
    header = (tmp_path / "out" / "glomeruli.csv").read_text().splitlines()[0]
    assert "tuft_nuclei_per_1000um2" in header.split(",")
    pipeline.score_label_map_file(folder / "labels.ome.tif", tmp_path / "labels", CONFIG)
    summary = json.loads((tmp_path / "labels" / "summary.json").read_text())
    for name in ("endocapillary_hypercellularity", "interstitial_inflammation"):
        assert not summary["scores"]["activity_index"]["components"][name]["assessed"]
    assert summary["scores"]["activity_index"]["partial"]


def test_profile_refuses_hypercellular_globally_sclerosed_glomeruli():
    with pytest.raises(ConfigError, match="endocapillary_hypercellularity"):
        LesionProfile(global_sclerosis=0.6, endocapillary_hypercellularity=0.5)
    with pytest.raises(ConfigError, match="inflammation_percent"):
        LesionProfile(inflammation_percent=90.0)


def test_haematoxylin_is_skimage_colour_deconvolution():
    rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    np.testing.assert_allclose(nuclei.haematoxylin(rgb), rgb2hed(rgb)[..., 0], atol=1e-6)
