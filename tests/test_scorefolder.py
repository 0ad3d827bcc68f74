"""Scored-slide folders: written whole or not at all, read back exactly; `biopsy score`."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import shape

from biopsy.classes import CLASS_COLOURS, CLASS_NAMES
from biopsy.cli import main
from biopsy.errors import BiopsyError
from biopsy.labelmap import LabelMap, read_label_map, write_label_map
from biopsy.scorefolder import FILES, read_score_folder, score_class_map, write_score_folder
from biopsy.scoring import load_score_config

I = {name: i for i, name in enumerate(CLASS_NAMES)}
MPP = 1.0


def disc(shape_px, centre_rc, radius_px):
    rows, cols = np.mgrid[: shape_px[0], : shape_px[1]]
    return (rows - centre_rc[0]) ** 2 + (cols - centre_rc[1]) ** 2 <= radius_px**2


@pytest.fixture(scope="module")
def label_map() -> LabelMap:
    """Cortex with 3 glomeruli (one half sclerosed, one with a deposit), fibrosis, atrophy."""
    shape_px = (500, 800)
    labels = np.zeros(shape_px, np.uint8)
    labels[20:480, 20:780] = I["tubule"]
    labels[300:480, 20:300] = I["fibrosis"]
    labels[20:150, 600:780] = I["atrophic_tubule"]
    for centre in ((150, 150), (150, 400), (380, 550)):
        labels[disc(shape_px, centre, 90)] = I["tuft"]
    labels[disc(shape_px, (150, 150), 90) & (np.arange(800) < 150)] = I["sclerosis"]
    labels[disc(shape_px, (150, 400), 20)] = I["hyaline_deposit"]
    return LabelMap(labels, MPP, CLASS_NAMES, CLASS_COLOURS)


def write(folder, label_map, level0_mpp=None):
    config = load_score_config()
    scored = score_class_map(label_map.labels, label_map.class_names, label_map.mpp, config,
                             level0_mpp=level0_mpp)
    write_score_folder(folder, label_map, scored.glomeruli, scored.cortex_tiles, scored.scores,
                       {"source": {"sha256": "0" * 64}}, instances=scored.instances,
                       config=config, level0_mpp=level0_mpp)
    return scored


def test_round_trip(tmp_path, label_map):
    scored = write(tmp_path / "slide", label_map)
    assert sorted(p.name for p in (tmp_path / "slide").iterdir()) == sorted(FILES)
    back = read_score_folder(tmp_path / "slide")
    assert back.glomeruli == scored.glomeruli
    assert back.cortex_tiles == scored.cortex_tiles
    assert back.summary["scores"] == json.loads(json.dumps(scored.scores))
    assert [g.lesions for g in back.glomeruli] == [("segmental_sclerosis",), ("hyaline_deposits",),
                                                   ("normal",)]
    provenance = back.summary["provenance"]
    assert provenance["source"]["sha256"] == "0" * 64
    assert provenance["config"]["lesions"]["crescent_capsule_coverage"] == 0.1
    assert "scikit-image" in provenance["software"]
    saved = read_label_map(tmp_path / "slide" / "labels.ome.tif")
    assert np.array_equal(saved.labels, label_map.labels) and saved.mpp == MPP


def test_geojson_outlines_are_the_glomeruli_in_level0_pixels(tmp_path, label_map):
    scored = write(tmp_path / "slide", label_map, level0_mpp=0.25)  # level 0 is 4x finer
    features = json.loads((tmp_path / "slide" / "objects.geojson").read_text())["features"]
    assert [f["properties"]["name"] for f in features] == ["G1", "G2", "G3"]
    assert [f["properties"]["classification"]["name"] for f in features] == \
        ["segmental_sclerosis", "hyaline_deposits", "normal"]
    for feature, g in zip(features, scored.glomeruli):
        outline = shape(feature["geometry"])
        assert outline.area * 0.25**2 == pytest.approx(g.area_um2, rel=0.02)
        assert (outline.centroid.x, outline.centroid.y) == \
            pytest.approx((g.centroid_x_px, g.centroid_y_px), abs=2.0)
        assert feature["properties"]["measurements"]["area_um2"] == g.area_um2
    assert scored.glomeruli[0].centroid_x_px == pytest.approx((150 + 0.5) * 4, abs=4)


def test_overview_is_the_map_with_numbered_glomeruli(tmp_path, label_map):
    write(tmp_path / "slide", label_map)
    overview = np.asarray(Image.open(tmp_path / "slide" / "overview.png"))
    assert overview.shape == (*label_map.labels.shape, 3)
    black = (overview == 0).all(axis=-1)
    assert black[150, 58:63].any()  # outline of glomerulus 1, west edge at column 60
    dark = (overview < 60).all(axis=-1)
    assert dark[135:165, 140:160].any() and not dark[100:110, 100:110].any()  # its number
    assert tuple(overview[450, 700]) == CLASS_COLOURS["tubule"]


def test_a_failed_rewrite_leaves_no_summary(tmp_path, label_map, monkeypatch):
    write(tmp_path / "slide", label_map)
    import biopsy.scorefolder

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(biopsy.scorefolder, "write_feature_collection", broken)
    with pytest.raises(OSError):
        write(tmp_path / "slide", label_map)
    assert not (tmp_path / "slide" / "summary.json").exists()
    with pytest.raises(BiopsyError, match="no summary.json"):
        read_score_folder(tmp_path / "slide")


def test_reading_a_malformed_folder_is_a_clear_error(tmp_path, label_map):
    write(tmp_path / "slide", label_map)
    (tmp_path / "slide" / "glomeruli.csv").unlink()
    with pytest.raises(BiopsyError, match="malformed scored-slide folder"):
        read_score_folder(tmp_path / "slide")


def test_cli_scores_a_label_map(tmp_path, label_map, capsys):
    path = tmp_path / "truth.ome.tif"
    write_label_map(path, label_map.labels, MPP, CLASS_NAMES, CLASS_COLOURS)
    assert main(["score", "--from-labels", str(path), "--out", str(tmp_path / "out")]) == 0
    headline = json.loads(capsys.readouterr().out)
    assert headline == {"glomeruli": 3, "adequacy": "limited sample",
                        "chronicity_index": headline["chronicity_index"],
                        "activity_index": headline["activity_index"]}
    summary = read_score_folder(tmp_path / "out").summary
    assert summary["scores"]["glomeruli"]["count"] == 3
    assert summary["provenance"]["source"]["sha256"] == \
        __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    glomerulosclerosis = summary["scores"]["chronicity_index"]["components"]["glomerulosclerosis"]
    assert glomerulosclerosis["count"] == 1 and math.isclose(glomerulosclerosis["percent"], 100 / 3)


def test_cli_puts_a_label_maps_outlines_on_its_slide_given_the_slides_mpp(tmp_path, label_map,
                                                                          capsys):
    """--mpp with --from-labels: the slide's pixel size, so that objects.geojson and the
    positions are in its level-0 pixels (they were left in the map's, at half scale here)."""
    path = tmp_path / "truth.ome.tif"
    write_label_map(path, label_map.labels, MPP, CLASS_NAMES, CLASS_COLOURS)
    for name, extra in (("map", []), ("slide", ["--mpp", str(MPP / 2)])):
        assert main(["score", "--from-labels", str(path), "--out", str(tmp_path / name), *extra]) == 0
    on_map, on_slide = (read_score_folder(tmp_path / name) for name in ("map", "slide"))
    assert on_slide.summary["label_map"]["level0_mpp"] == MPP / 2
    assert on_slide.summary["scores"] == on_map.summary["scores"]
    for a, b in zip(on_map.glomeruli, on_slide.glomeruli):
        assert (2 * a.centroid_x_px, 2 * a.centroid_y_px) == pytest.approx((b.centroid_x_px, b.centroid_y_px))
    features = [json.loads((tmp_path / name / "objects.geojson").read_text())["features"]
                for name in ("map", "slide")]
    for a, b in zip(*features):
        assert shape(b["geometry"]).area == pytest.approx(4 * shape(a["geometry"]).area)
    with pytest.raises(SystemExit) as refused:
        main(["score", "--from-labels", str(path), "--out", str(tmp_path / "x"), "--mpp", "50"])
    assert refused.value.code == 2
    assert "--mpp: '50' is not a number from 0.05 to 20" in capsys.readouterr().err


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["score", "--from-labels", str(tmp_path / "none.ome.tif"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "none.ome.tif" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("lesions:\n  typo: 1\n")
    assert main(["score", "--from-labels", str(tmp_path / "none.ome.tif"), "--out",
                 str(tmp_path / "out"), "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "typo" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_scoring_a_synthetic_truth_map_reproduces_its_truth(tmp_path):
    from biopsy.scoring import NOT_COUNTED
    from biopsy.synth.layout import build_layout
    from biopsy.synth.profile import load_profile
    from biopsy.synth.slide import generate_slide

    profile = load_profile(preset="active-ln", core_length_mm=1.5, glomeruli=10, seed=11)
    truth = generate_slide(profile, tmp_path / "synthetic")
    labels_path = tmp_path / "synthetic" / "labels.ome.tif"
    assert main(["score", "--from-labels", str(labels_path), "--out", str(tmp_path / "scored")]) == 0
    scored = read_score_folder(tmp_path / "scored")
    truth_scores = truth["scores"]
    # A label map alone shows no nuclei: the nuclear components are not assessed, the rest exact.
    assert scored.summary["scores"]["chronicity_index"] == truth_scores["chronicity_index"]
    activity = scored.summary["scores"]["activity_index"]["components"]
    nuclear = ("endocapillary_hypercellularity", "interstitial_inflammation")
    for name, expected in truth_scores["activity_index"]["components"].items():
        if name in nuclear:
            assert expected["assessed"] and not activity[name]["assessed"]
            assert activity[name]["reason"] == NOT_COUNTED
        else:
            assert activity[name] == expected
    # With the drawn nuclei the truth map's scores are the truth's, nuclear components included.
    label_map = read_label_map(labels_path)
    with_nuclei = score_class_map(label_map.labels, label_map.class_names, label_map.mpp,
                                  load_score_config(), level0_mpp=profile.mpp,
                                  nuclei_xy=build_layout(profile).nuclei[:, :2])
    for key in ("chronicity_index", "activity_index", "glomeruli"):
        assert with_nuclei.scores[key] == truth_scores[key]
    assert truth_scores["activity_index"]["components"]["endocapillary_hypercellularity"]["bin"] == 2
    # Each glomerulus found is a drawn one with its lesions; the truth measures each glomerulus
    # on a window rendered apart from the label map, which can differ from it by a pixel.
    # Scored centroids are in the slide's level-0 pixels: the truth map records its pixel size.
    for expected in truth["glomeruli"]:
        found = min(scored.glomeruli, key=lambda g: math.hypot(
            g.centroid_x_px - expected["centroid_x_px"], g.centroid_y_px - expected["centroid_y_px"]))
        from_labels = tuple(l for l in expected["lesions"] if l != "endocapillary_hypercellularity")
        assert found.lesions == (from_labels or ("normal",))
        assert found.tuft_nuclei_per_1000um2 is None
        assert found.area_um2 == pytest.approx(expected["area_um2"], abs=2 * profile.label_mpp**2)
    assert scored.summary["scores"]["burdens"] == pytest.approx(truth_scores["burdens"], rel=1e-3)
