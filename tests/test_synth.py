"""Synthetic slides: the truth agrees with the rendered pixels and with the profile's scores."""

import hashlib
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import openslide
import pytest
from skimage.draw import polygon as polygon_pixels

from biopsy.classes import CLASS_NAMES
from biopsy.errors import ConfigError
from biopsy.labelmap import read_label_map
from biopsy.scoring import load_score_config, score_slide
from biopsy.synth import LesionProfile, generate_pair, generate_slide, load_profile, preset_names
from biopsy.synth.layout import build_layout
from biopsy.synth.render import label_bands, render_labels
from biopsy.synth.slide import measure_truth_glomeruli

LABEL = {name: i for i, name in enumerate(CLASS_NAMES)}

# A 1 mm x 1.5 mm core with 8 glomeruli: 2 global and 1 segmental sclerosis (37.5 %, bin 2),
# 2 cellular crescents (25 %, bin 2), 1 fibrous (12.5 %, bin 1), deposits in 4 (50 %, bin 2).
SMALL = LesionProfile(name="small", glomeruli=8, global_sclerosis=0.25, segmental_sclerosis=0.125,
                      cellular_crescent=0.25, fibrous_crescent=0.125, hyaline_deposit=0.5,
                      fibrosis_percent=20.0, atrophy_percent=20.0, core_length_mm=1.5, seed=7)
TINY = replace(SMALL, name="tiny", glomeruli=2, global_sclerosis=0.5, segmental_sclerosis=0.0,
               cellular_crescent=0.5, fibrous_crescent=0.0, hyaline_deposit=0.5, core_length_mm=0.6)


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "small"
    truth = generate_slide(SMALL, folder)
    return folder, truth, build_layout(SMALL)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _level0(folder, truth, box):
    """RGB (uint8) of the level-0 box (xmin, ymin, xmax, ymax) read back through OpenSlide."""
    x0, y0, x1, y1 = (int(v) for v in box)
    with openslide.OpenSlide(folder / truth["slide"]["file"]) as slide:
        return np.asarray(slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0)).convert("RGB")), (x0, y0)


def _mask(vertices, origin, shape, erode_px=0):
    from scipy import ndimage
    rows, cols = polygon_pixels(vertices[:, 1] - origin[1] - 0.5, vertices[:, 0] - origin[0] - 0.5, shape)
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return ndimage.binary_erosion(mask, iterations=erode_px) if erode_px else mask


def test_folder_is_complete_and_label_map_matches_geometry(small_slide):
    folder, truth, layout = small_slide
    for name in ("slide.svs", "labels.ome.tif", "truth.geojson", "profile.yaml", "truth.json"):
        assert (folder / name).is_file()
    label_map = read_label_map(folder / "labels.ome.tif")
    assert label_map.mpp == pytest.approx(1.0)
    assert label_map.class_names == CLASS_NAMES
    assert list(label_map.labels.shape) == truth["label_map"]["shape_px"]
    rendered = np.vstack([labels for labels, _ in label_bands(layout, 1.0)])
    np.testing.assert_array_equal(label_map.labels, rendered)
    present = set(np.unique(label_map.labels))
    assert {LABEL[n] for n in ("background", "tissue", "tubule", "atrophic_tubule", "fibrosis", "tuft",
                               "sclerosis", "cellular_crescent", "fibrous_crescent",
                               "hyaline_deposit", "artery")} <= present
    geojson = json.loads((folder / "truth.geojson").read_text())
    glomeruli = [f for f in geojson["features"] if f["properties"].get("name", "").count(" ") == 1]
    assert len(glomeruli) == SMALL.glomeruli


@pytest.mark.parametrize("slide_format", ["aperio", "generic"])
def test_openslide_round_trip_with_mpp(tmp_path, slide_format):
    truth = generate_slide(TINY, tmp_path, slide_format=slide_format)
    with openslide.OpenSlide(tmp_path / truth["slide"]["file"]) as slide:
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
        assert slide.dimensions == tuple(truth["slide"]["shape_px"][::-1])
        assert slide.level_count >= 2
        thumbnail = np.asarray(slide.get_thumbnail((256, 256)).convert("RGB"))
    assert (thumbnail.mean(axis=2) < 220).mean() > 0.1  # tissue, not blank glass


def test_sclerosis_is_homogeneous_and_nucleus_free(small_slide):
    folder, truth, layout = small_slide
    sclerotic = [g for g in layout.glomeruli if g.sclerosis is not None]
    assert len(sclerotic) == 3
    for g in sclerotic:
        rgb, origin = _level0(folder, truth, g.bounds)
        red = rgb[..., 0].astype(float)
        scar = _mask(g.sclerosis, origin, red.shape, erode_px=6)
        assert scar.sum() > 2000
        # Nuclei are dark blue-violet (red channel far below the magenta matrix): none in the scar.
        assert np.percentile(red[scar], 0.5) > np.median(red[scar]) - 25
        assert red[scar].std() < 8
        if "global_sclerosis" not in g.lesions:  # the open tuft beside it has nuclei and lumina
            open_tuft = _mask(g.tuft, origin, red.shape, 6) & ~_mask(g.sclerosis, origin, red.shape)
            assert red[open_tuft].std() > 3 * red[scar].std()
            assert np.percentile(red[open_tuft], 2) < np.median(red[scar]) - 40


def test_deposits_lie_on_capillary_walls_inside_glomeruli(small_slide):
    folder, truth, layout = small_slide
    label_map = read_label_map(folder / "labels.ome.tif")
    _, instances = render_labels(layout, 2.0, 0, 0, label_map.labels.shape[1], label_map.labels.shape[0])
    deposit = label_map.labels == LABEL["hyaline_deposit"]
    assert deposit.sum() > 100
    assert instances[deposit].min() > 0  # inside a glomerulus instance
    tufts = np.zeros(deposit.shape, bool)
    for g in layout.glomeruli:
        tufts |= _mask(g.tuft / 2, (0, 0), deposit.shape)
    assert (deposit & ~tufts).sum() <= 0.002 * deposit.sum()  # in tufts: none in Bowman's space
    centres, darker_walls = [], []
    for g in layout.glomeruli:
        if not len(g.wire_loops):
            continue
        rgb, origin = _level0(folder, truth, g.bounds)
        tuft = _mask(g.tuft, origin, rgb.shape[:2])
        for x, y, r, t in g.wire_loops:
            col, row = int(x - origin[0]), int(y - origin[1])
            assert tuft[row, col]  # in the tuft, not in Bowman's space
            centre, wall = rgb[row, col].mean(), rgb[row, int(col + r)].mean()
            centres.append(centre)
            darker_walls.append(wall < centre - 40)  # a glassy stained ring around a lumen
    assert np.median(centres) > 200  # the lumen inside a wire loop stays open
    assert np.mean(darker_walls) > 0.8


def test_crescents_lie_in_bowmans_space(small_slide):
    folder, truth, layout = small_slide
    with_crescent = [g for g in layout.glomeruli if g.crescent is not None]
    assert len(with_crescent) == 3
    for g in with_crescent:
        origin = (g.bounds[0] - 5, g.bounds[1] - 5)
        shape = (int(g.bounds[3] - g.bounds[1]) + 10, int(g.bounds[2] - g.bounds[0]) + 10)
        crescent = _mask(g.crescent, origin, shape)
        inside_capsule = _mask(g.capsule_inner, origin, shape)
        tuft = _mask(g.tuft, origin, shape, erode_px=3)
        assert crescent.sum() > 0
        assert (crescent & ~inside_capsule).sum() <= 0.01 * crescent.sum()
        assert not (crescent & tuft).any()
    calls = {g["glomerulus_id"]: g for g in truth["glomeruli"]}
    for g in with_crescent:
        coverage = calls[g.glomerulus_id][f"{g.crescent_kind}_capsule_coverage"]
        assert 0.2 < coverage < 0.8


def test_truth_scores_match_profile_bins(small_slide):
    _, truth, layout = small_slide
    scores = truth["scores"]
    chronicity = scores["chronicity_index"]["components"]
    activity = scores["activity_index"]["components"]
    assert chronicity["glomerulosclerosis"]["percent"] == pytest.approx(37.5)
    assert chronicity["glomerulosclerosis"]["bin"] == 2
    assert chronicity["fibrous_crescents"]["percent"] == pytest.approx(12.5)
    assert activity["cellular_crescents"]["percent"] == pytest.approx(25.0)
    assert activity["cellular_crescents"]["bin"] == 2
    assert activity["hyaline_deposits"]["percent"] == pytest.approx(50.0)
    assert chronicity["interstitial_fibrosis"]["percent"] == pytest.approx(20, abs=5)
    assert chronicity["tubular_atrophy"]["percent"] == pytest.approx(20, abs=6)
    for glomerulus in truth["glomeruli"]:
        drawn = {"hyaline_deposits" if n == "hyaline_deposit" else n for n in glomerulus["drawn_lesions"]}
        assert set(glomerulus["lesions"]) == (drawn or {"normal"})


@pytest.mark.parametrize("global_sclerosis, expected_bin", [(0.0, 0), (0.1, 1), (0.4, 2), (0.6, 3)])
def test_global_sclerosis_fraction_gives_its_bin(global_sclerosis, expected_bin):
    profile = replace(LesionProfile(), glomeruli=10, global_sclerosis=global_sclerosis,
                      core_length_mm=2.0, seed=3)
    layout = build_layout(profile)
    glomeruli = measure_truth_glomeruli(layout, profile.label_mpp)
    scores = score_slide(glomeruli, [], CLASS_NAMES, load_score_config())
    component = scores["chronicity_index"]["components"]["glomerulosclerosis"]
    assert component["percent"] == pytest.approx(100 * global_sclerosis)
    assert component["bin"] == expected_bin


def test_same_seed_same_files_other_seed_other_slide(tmp_path):
    first = generate_slide(TINY, tmp_path / "a")
    second = generate_slide(TINY, tmp_path / "b")
    generate_slide(replace(TINY, seed=8), tmp_path / "c")
    for name in ("slide.svs", "truth.geojson", "profile.yaml", "truth.json"):
        assert _sha256(tmp_path / "a" / name) == _sha256(tmp_path / "b" / name), name
    # labels.ome.tif: the OME-XML carries a random UUID (tifffile); compare the map itself.
    maps = [read_label_map(tmp_path / folder / "labels.ome.tif") for folder in "abc"]
    np.testing.assert_array_equal(maps[0].labels, maps[1].labels)
    assert maps[0].class_names == maps[1].class_names and maps[0].mpp == maps[1].mpp
    assert first == second
    assert _sha256(tmp_path / "a" / "slide.svs") != _sha256(tmp_path / "c" / "slide.svs")
    assert maps[0].labels.shape != maps[2].labels.shape or (maps[0].labels != maps[2].labels).any()


def test_pair_is_different_tissue_with_a_stain_drift(tmp_path):
    baseline = replace(TINY, hyaline_deposit=0.5)
    followup = replace(TINY, name="followup", hyaline_deposit=0.0, cellular_crescent=0.0,
                       fibrous_crescent=0.5)
    before, after = generate_pair(baseline, followup, tmp_path)
    assert (tmp_path / "baseline" / "truth.json").is_file()
    assert (tmp_path / "follow_up" / "truth.json").is_file()
    assert before["profile"]["seed"] != after["profile"]["seed"]
    assert after["scores"]["activity_index"]["components"]["hyaline_deposits"]["percent"] == 0
    assert after["scores"]["chronicity_index"]["components"]["fibrous_crescents"]["percent"] == 50
    # The drift makes the main stain fainter: every non-nuclear colour lighter at the follow-up.
    for material in ("cytoplasm", "matrix", "collagen", "hyaline"):
        assert sum(after["stain"]["colours"][material]) > sum(before["stain"]["colours"][material])


def test_presets_and_profile_errors(tmp_path):
    assert {"active-ln", "remission"} <= set(preset_names())
    active = load_profile(preset="active-ln")
    remission = load_profile(preset="remission")
    assert active.hyaline_deposit > 0.5 and remission.hyaline_deposit == 0
    assert active.cellular_crescent > 0.25 and remission.cellular_crescent == 0
    assert remission.global_sclerosis + remission.segmental_sclerosis >= \
        active.global_sclerosis + active.segmental_sclerosis
    override = tmp_path / "p.yaml"
    override.write_text("glomeruli: 12\nstain: he\n")
    assert load_profile(override, "active-ln", seed=5) == replace(active, glomeruli=12, stain="he", seed=5)
    override.write_text("glomeruly: 12\n")
    with pytest.raises(ConfigError, match="glomeruly"):
        load_profile(override)
    with pytest.raises(ConfigError, match="global_sclerosis"):
        LesionProfile(global_sclerosis=1.5)
    with pytest.raises(ConfigError, match="no synthetic preset"):
        load_profile(preset="nonsense")
    with pytest.raises(ConfigError, match="cannot fit"):
        build_layout(LesionProfile(glomeruli=60, core_length_mm=1.0))


def test_cli_writes_a_slide_folder_and_reports_bad_profiles(tmp_path, capsys):
    from biopsy.cli import main

    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--glomeruli", "2", "--core-length-mm", "0.6",
                 "--format", "generic", "--stain", "he", "--seed", "4"]) == 0
    truth = json.loads((out / "truth.json").read_text())
    assert truth["slide"]["file"] == "slide.tiff" and truth["profile"]["stain"] == "he"
    assert truth["profile"]["name"] == "active-ln" and truth["profile"]["seed"] == 4
    assert main(["synth", "--out", str(tmp_path / "bad"), "--hyaline-deposit", "1.5"]) == 2
    assert "hyaline_deposit" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "truth.json").exists()


MEMORY_SCRIPT = """
import resource, sys
from dataclasses import replace
from biopsy.synth import LesionProfile, generate_slide
generate_slide(LesionProfile(glomeruli=int(sys.argv[2]), core_length_mm=float(sys.argv[1]),
                             core_width_mm=0.6, seed=1), sys.argv[3])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_memory_is_bounded_on_a_long_slide(tmp_path):
    def peak_kib(length_mm, glomeruli):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(length_mm), str(glomeruli),
                              str(tmp_path / f"{length_mm}")], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    short, long = peak_kib(2.0, 6), peak_kib(16.0, 48)  # 4,000 vs 33,200 rows at 0.5 µm/px
    assert long < short * 1.35 + 40_000, (short, long)
