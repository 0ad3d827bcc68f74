"""Lesion calls, NIH bins and indices, and the scoring config, against hand-computed answers."""

import dataclasses
import json

import numpy as np
import pytest

from biopsy.classes import CLASS_NAMES
from biopsy.cli.score import headline
from biopsy.errors import ConfigError
from biopsy.morphometry import CortexTile, GlomerulusMeasures, measure_cortex_tiles
from biopsy.scoring import (DEFAULT_CONFIG_PATH, call_lesions, load_score_config, nih_bin,
                            score_config_from_dict, score_slide)

CONFIG = load_score_config()
NORMAL = GlomerulusMeasures(
    glomerulus_id=1, centroid_x_px=0.0, centroid_y_px=0.0, area_um2=30000.0,
    equivalent_diameter_um=195.4, sclerosis_fraction=0.0, cellular_crescent_fraction=0.0,
    fibrous_crescent_fraction=0.0, cellular_crescent_capsule_coverage=0.0,
    fibrous_crescent_capsule_coverage=0.0, hyaline_deposit_fraction=0.0)


def glomerulus(**changes) -> GlomerulusMeasures:
    return dataclasses.replace(NORMAL, **changes)


def tile(**area_um2) -> CortexTile:
    areas = {name: 0.0 for name in CLASS_NAMES if name != "background"} | area_um2
    return CortexTile(0.0, 0.0, 125.0, areas)


@pytest.mark.parametrize("percent, expected", [(0, 0), (0.01, 1), (24.99, 1), (25, 2), (50, 2),
                                               (50.01, 3), (100, 3)])
def test_nih_bins_at_their_boundaries(percent, expected):
    assert nih_bin(percent) == expected


@pytest.mark.parametrize("mpp, seed", [(0.3114, 0), (0.3393, 0), (0.35, 4), (0.4213, 5)])
def test_an_area_share_of_exactly_25_percent_over_several_tiles_bins_as_25(mpp, seed):
    """The share is summed from per-tile areas in floating point: 24.99999999999999 at 0.35."""
    labels = np.full((1200, 1200), CLASS_NAMES.index("tubule"), np.uint8)
    atrophic = np.random.default_rng(seed).choice(labels.size, labels.size // 4, replace=False)
    labels.flat[atrophic] = CLASS_NAMES.index("atrophic_tubule")
    tiles = measure_cortex_tiles(labels, CLASS_NAMES, mpp, CONFIG.cortex.tile_um)
    assert len(tiles) > 1
    scores = score_slide([], tiles, CLASS_NAMES, CONFIG)
    atrophy = scores["chronicity_index"]["components"]["tubular_atrophy"]
    assert atrophy["percent"] == pytest.approx(25) and atrophy["bin"] == 2


@pytest.mark.parametrize("changes, lesions", [
    ({}, ["normal"]),
    ({"sclerosis_fraction": 0.05}, ["normal"]),  # at the segmental floor: not above it
    ({"sclerosis_fraction": 0.06}, ["segmental_sclerosis"]),
    ({"sclerosis_fraction": 0.5}, ["segmental_sclerosis"]),
    ({"sclerosis_fraction": 0.51}, ["global_sclerosis"]),
    # 30 % of the glomerulus, but 60 % of the tuft once the crescent (half of it) is set aside.
    ({"sclerosis_fraction": 0.3, "fibrous_crescent_fraction": 0.5,
      "fibrous_crescent_capsule_coverage": 0.6}, ["global_sclerosis", "fibrous_crescent"]),
    ({"cellular_crescent_capsule_coverage": 0.10}, ["normal"]),
    ({"cellular_crescent_capsule_coverage": 0.11}, ["cellular_crescent"]),
    ({"hyaline_deposit_fraction": 0.01}, ["normal"]),
    ({"hyaline_deposit_fraction": 0.02, "cellular_crescent_capsule_coverage": 0.3},
     ["cellular_crescent", "hyaline_deposits"]),
])
def test_lesion_calls_at_their_thresholds(changes, lesions):
    assert call_lesions(glomerulus(**changes), CONFIG.lesions) == lesions


def cohort():
    """12 glomeruli: 4 sclerosed (1 global), 3 fibrous crescents, 5 with deposits, 1 cellular."""
    return ([glomerulus(sclerosis_fraction=0.9)]
            + [glomerulus(sclerosis_fraction=0.2)] * 3
            + [glomerulus(fibrous_crescent_capsule_coverage=0.3)] * 3
            + [glomerulus(hyaline_deposit_fraction=0.04)] * 4
            + [glomerulus(hyaline_deposit_fraction=0.04, cellular_crescent_capsule_coverage=0.5)])


def test_scores_of_a_known_cohort():
    tiles = [tile(tissue=300.0, tubule=500.0, atrophic_tubule=100.0, fibrosis=100.0, tuft=999.0,
                  artery=999.0)] * 4
    scores = score_slide(cohort(), tiles, CLASS_NAMES, CONFIG)
    chronicity = scores["chronicity_index"]["components"]
    assert (chronicity["glomerulosclerosis"]["percent"], chronicity["glomerulosclerosis"]["bin"],
            chronicity["glomerulosclerosis"]["count"]) == (pytest.approx(100 * 4 / 12), 2, 4)
    assert (chronicity["fibrous_crescents"]["percent"], chronicity["fibrous_crescents"]["bin"]) \
        == (25.0, 2)
    # IF: fibrosis / (tissue + tubule + atrophic + fibrosis); glomeruli and arteries left out.
    assert chronicity["interstitial_fibrosis"]["percent"] == pytest.approx(10.0)
    # TA: atrophic / all tubules.
    assert chronicity["tubular_atrophy"]["percent"] == pytest.approx(100 * 100 / 600)
    assert scores["chronicity_index"] | {"components": None} == {
        "score": 2 + 2 + 1 + 1, "max": 12, "assessed_max": 12, "partial": False,
        "components": None}

    activity = scores["activity_index"]
    deposits, cellular = activity["components"]["hyaline_deposits"], \
        activity["components"]["cellular_crescents"]
    assert (deposits["percent"], deposits["bin"], deposits["points"]) == \
        (pytest.approx(100 * 5 / 12), 2, 2)
    assert (cellular["percent"], cellular["bin"], cellular["weight"], cellular["points"]) == \
        (pytest.approx(100 / 12), 1, 2, 2)
    assert (activity["score"], activity["max"], activity["assessed_max"], activity["partial"]) == \
        (4, 24, 9, True)
    for name in ("endocapillary_hypercellularity", "neutrophils_karyorrhexis",
                 "fibrinoid_necrosis", "interstitial_inflammation"):
        component = activity["components"][name]
        assert not component["assessed"] and component["percent"] is component["bin"] is None

    assert scores["glomeruli"]["count"] == 12 and scores["glomeruli"]["adequacy"] == "adequate"
    assert scores["glomeruli"]["lesion_counts"]["normal"] == 0
    burdens = scores["burdens"]
    assert burdens["deposit_glomeruli_percent"] == pytest.approx(100 * 5 / 12)
    assert burdens["deposit_mean_area_fraction"] == pytest.approx(5 * 0.04 / 12)
    assert burdens["sclerosis_mean_fraction"] == pytest.approx((0.9 + 3 * 0.2) / 12)
    assert burdens["interstitial_fibrosis_percent"] == pytest.approx(10.0)


def test_a_missing_class_is_not_assessed_never_zero():
    names = tuple(n for n in CLASS_NAMES if n not in ("fibrosis", "hyaline_deposit"))
    scores = score_slide(cohort(), [tile(tissue=500.0, tubule=500.0)], names, CONFIG)
    fibrosis = scores["chronicity_index"]["components"]["interstitial_fibrosis"]
    assert (fibrosis["assessed"], fibrosis["percent"], fibrosis["bin"]) == (False, None, None)
    assert "fibrosis" in fibrosis["reason"]
    assert scores["chronicity_index"]["partial"] is True
    assert scores["chronicity_index"]["assessed_max"] == 9
    assert scores["burdens"]["interstitial_fibrosis_percent"] is None
    assert scores["activity_index"]["components"]["hyaline_deposits"]["assessed"] is False
    assert scores["burdens"]["deposit_glomeruli_percent"] is None
    assert scores["burdens"]["deposit_mean_area_fraction"] is None


def test_a_model_without_background_assesses_no_cortex_area():
    """Without a background class glass is some tissue class, counted as cortex: a model trained
    on [tissue, tuft, sclerosis] called a 71 %-glass slide all tissue."""
    names = CLASS_NAMES[1:]
    scores = score_slide(cohort(), [tile(tissue=500.0, tubule=500.0, fibrosis=100.0)], names, CONFIG)
    for name in ("interstitial_fibrosis", "tubular_atrophy"):
        component = scores["chronicity_index"]["components"][name]
        assert component["assessed"] is False and component["reason"] == "model lacks class(es) background"
    assert scores["chronicity_index"]["components"]["glomerulosclerosis"]["assessed"] is True


@pytest.mark.parametrize("count, adequacy", [(9, "limited sample"), (10, "adequate")])
def test_adequacy_flag(count, adequacy):
    scores = score_slide([NORMAL] * count, [], CLASS_NAMES, CONFIG)
    assert scores["glomeruli"]["adequacy"] == adequacy
    assert scores["chronicity_index"]["components"]["glomerulosclerosis"]["bin"] == 0


def test_a_glomerulus_only_model_names_each_missing_class_once_and_assesses_no_activity():
    names = ("background", "tissue", "tuft", "sclerosis")
    scores = score_slide(cohort(), [tile(tissue=500.0)], names, CONFIG)
    atrophy = scores["chronicity_index"]["components"]["tubular_atrophy"]
    assert atrophy["reason"] == "model lacks class(es) atrophic_tubule, tubule"
    assert scores["activity_index"]["score"] is None
    assert headline(scores)["activity_index"] == "not assessed"
    assert headline(scores)["chronicity_index"] == f"{scores['chronicity_index']['score']}/12 (partial)"


def test_no_glomeruli_and_no_cortex_are_not_assessed():
    scores = score_slide([], [], CLASS_NAMES, CONFIG)
    assert scores["chronicity_index"]["score"] is None
    assert all(c["reason"] in ("no glomeruli", "no cortex in the class map")
               for c in scores["chronicity_index"]["components"].values())
    assert scores["glomeruli"]["adequacy"] == "limited sample"


def test_user_config_is_merged_over_the_default(tmp_path):
    path = tmp_path / "strict.yaml"
    path.write_text("lesions:\n  crescent_capsule_coverage: 0.25\n")
    config = load_score_config(path)
    assert config.lesions.crescent_capsule_coverage == 0.25
    assert dataclasses.replace(config.lesions, crescent_capsule_coverage=0.1) == CONFIG.lesions
    assert config.cortex == CONFIG.cortex
    assert load_score_config(DEFAULT_CONFIG_PATH) == CONFIG


@pytest.mark.parametrize("text, message", [
    ("lesions:\n  crescent_coverage: 0.2\n", "unknown setting 'lesions.crescent_coverage'"),
    ("lesions:\n  crescent_capsule_coverage: 2\n", "give 0..1"),
    ("glomeruli:\n  min_area_um2: big\n", "give a number"),
    ("cortex:\n  tubular_atrophy:\n    numerator: []\n", "non-empty list"),
    ("lesions: [1, 2\n", "not valid YAML"),
    ("cortex:\n  tubular_atrophy: 5\n", "malformed scoring config"),
    ("cortex:\n  tile_um: .nan\n", "cortex.tile_um = nan; give a number >= 0"),
    ("cortex:\n  interstitial_fibrosis:\n    numerator: [fibroses]\n",
     "cortex.interstitial_fibrosis.numerator names 'fibroses', not a class of"),
    ("glomeruli:\n  adequate_min_count: 2.5\n", "adequate_min_count = 2.5; give a whole number"),
])
def test_bad_configs_raise_config_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_score_config(path)


def test_config_recorded_in_a_summary_reads_back():
    recorded = json.loads(json.dumps(CONFIG.as_dict()))
    assert score_config_from_dict(recorded, "summary.json") == CONFIG
    recorded["lesions"]["global_sclerosis_tuft_fraction"] = 0.01
    with pytest.raises(ConfigError, match="summary.json: lesions.segmental"):
        score_config_from_dict(recorded, "summary.json")


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_score_config(tmp_path / "nowhere.yaml")
