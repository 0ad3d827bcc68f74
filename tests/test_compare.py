import argparse
import json
import sys
import tracemalloc
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from biopsy import compare, intervals, scoring
from biopsy.cli import compare as compare_cli
from biopsy.classes import CLASS_NAMES
from biopsy.errors import BiopsyError
from biopsy.morphometry import CortexTile, GlomerulusMeasures
from biopsy.scorefolder import read_score_folder

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_scored import paint_label_map, scored_folder, write_label_map_file  # noqa: E402

CONFIG = scoring.load_score_config()


def random_slide(rng, glomeruli=30, tiles=80, deposit_rate=0.4, sclerosis_rate=0.3):
    """Random glomeruli and tiles, nuclei counted (tuft densities about the endocapillary
    threshold, interstitial counts about the inflammation threshold)."""
    measures = []
    for i in range(glomeruli):
        sclerosis = rng.choice([0.0, 0.03, 0.2, 0.7], p=[1 - sclerosis_rate, 0, sclerosis_rate / 2,
                                                         sclerosis_rate / 2])
        crescents = rng.choice([0.0, 0.05, 0.3], size=2, p=[0.6, 0.2, 0.2])
        deposit = rng.choice([0.0, 0.004, 0.05], p=[1 - deposit_rate, 0.0, deposit_rate])
        measures.append(GlomerulusMeasures(i + 1, 0.0, 0.0, 2e4, 160.0, sclerosis,
                                           crescents[0] / 3, crescents[1] / 3, crescents[0],
                                           crescents[1], deposit,
                                           tuft_nuclei_per_1000um2=float(rng.uniform(8, 20))))
    areas = [CortexTile(0, 0, 125, {n: float(rng.uniform(0, 5000) * (rng.random() < 0.8))
                                   for n in CLASS_NAMES[1:]}, int(rng.integers(0, 40)))
             for _ in range(tiles)]
    return measures, areas


def expected_from_scores(scores: dict) -> dict:
    """The comparison's metrics as score_slide reports them."""
    components = (scores["activity_index"]["components"] | scores["chronicity_index"]["components"])
    burdens = scores["burdens"]
    to_percent = lambda v: None if v is None else 100 * v  # noqa: E731
    return {name: components[name]["percent"] for name in (
        "hyaline_deposits", "cellular_crescents", "endocapillary_hypercellularity",
        "interstitial_inflammation", "glomerulosclerosis", "fibrous_crescents",
        "interstitial_fibrosis", "tubular_atrophy")} | {
        "deposit_burden": to_percent(burdens["deposit_mean_area_fraction"]),
        "sclerosis_burden": to_percent(burdens["sclerosis_mean_fraction"]),
        "activity_index": scores["activity_index"]["score"],
        "chronicity_index": scores["chronicity_index"]["score"]}


@pytest.mark.parametrize("class_names", [
    CLASS_NAMES,
    tuple(n for n in CLASS_NAMES if n not in ("fibrous_crescent", "fibrosis")),
    tuple(n for n in CLASS_NAMES if n not in ("hyaline_deposit", "atrophic_tubule", "sclerosis")),
    CLASS_NAMES[1:],  # no background: no cortex areas
])
def test_vectorised_metrics_equal_score_slide_on_original_and_resampled_rows(class_names):
    rng = np.random.default_rng(7)
    glomeruli, tiles = random_slide(rng)
    sample = compare.slide_sample(glomeruli, tiles, class_names, CONFIG)
    glomerulus_index = rng.integers(0, len(glomeruli), (6, len(glomeruli)))
    tile_index = rng.integers(0, len(tiles), (6, len(tiles)))
    glomerulus_index[0], tile_index[0] = np.arange(len(glomeruli)), np.arange(len(tiles))
    tile_weights = np.stack([np.bincount(row, minlength=len(tiles)) for row in tile_index])
    values = compare.metric_values(sample, glomerulus_index, tile_weights)
    for r in range(6):
        scores = scoring.score_slide([glomeruli[i] for i in glomerulus_index[r]],
                                     [tiles[i] for i in tile_index[r]], class_names, CONFIG)
        for name, expected in expected_from_scores(scores).items():
            if expected is None:
                assert values[name] is None, name
            else:
                assert values[name][r] == pytest.approx(expected, rel=1e-12, abs=1e-12), name


def test_no_glomeruli_gives_not_assessed_glomerular_metrics():
    _, tiles = random_slide(np.random.default_rng(1), glomeruli=0)
    values = compare.point_values(compare.slide_sample([], tiles, CLASS_NAMES, CONFIG))
    scores = scoring.score_slide([], tiles, CLASS_NAMES, CONFIG)
    assert values == pytest.approx(expected_from_scores(scores))


def test_identical_distributions_are_unchanged():
    rng = np.random.default_rng(2)
    glomeruli, tiles = random_slide(rng, glomeruli=40, tiles=120)
    baseline = compare.slide_sample(glomeruli, tiles, CLASS_NAMES, CONFIG)
    order, tile_order = rng.permutation(len(glomeruli)), rng.permutation(len(tiles))
    follow_up = compare.slide_sample([glomeruli[i] for i in order], [tiles[i] for i in tile_order],
                                     CLASS_NAMES, CONFIG)
    for row in compare.compare_samples(baseline, follow_up):
        assert row["difference"] == pytest.approx(0, abs=1e-9), row["name"]
        assert row["ci_low"] <= 0 <= row["ci_high"] and row["verdict"] == "unchanged", row["name"]


def test_interval_width_matches_binomial_theory():
    # 100 glomeruli on each side, half with deposits: SE of the difference = sqrt(2 * .25 / 100).
    def slide(offset):
        return [GlomerulusMeasures(i, 0, 0, 2e4, 160, 0, 0, 0, 0, 0, 0.05 * ((i + offset) % 2))
                for i in range(100)]
    base = compare.slide_sample(slide(0), [], CLASS_NAMES, CONFIG)
    follow = compare.slide_sample(slide(1), [], CLASS_NAMES, CONFIG)
    row = next(r for r in compare.compare_samples(base, follow, replicates=4000)
               if r["name"] == "hyaline_deposits")
    assert (row["ci_high"] - row["ci_low"]) / 2 == pytest.approx(1.96 * np.sqrt(0.5 / 100) * 100, rel=0.1)


def test_few_glomeruli_give_wide_share_intervals_and_rarely_a_verdict_by_chance():
    """A bootstrap of one glomerulus, or of 0 of 3, is a single value: 0 of 1 against 1 of 1
    was "worsened" with [100, 100], and with one glomerulus against ten, the same lesion rate at
    both biopsies gave a verdict in ~60% of patients."""
    def crescents(present, total):
        return [GlomerulusMeasures(i, 0, 0, 2e4, 160, 0, 0.3 * (i < present), 0, 0.3 * (i < present),
                                   0, 0) for i in range(total)]
    one, none = (compare.slide_sample(crescents(k, 1), [], CLASS_NAMES, CONFIG) for k in (1, 0))
    row = next(r for r in compare.compare_samples(none, one) if r["name"] == "cellular_crescents")
    assert row["verdict"] == "unchanged" and row["ci_low"] < -10 and row["ci_high"] == 100
    assert row["interval"] == compare.NEWCOMBE and row["resampled"] == "none"
    rng = np.random.default_rng(0)
    verdicts = [compare.verdict(*intervals.proportion_difference_interval(rng.random(1) < 0.3,
                                                                        rng.random(10) < 0.3)[:2])
                for _ in range(2000)]
    assert verdicts.count("unchanged") / len(verdicts) >= 0.93


def patchy_core(rng, length_mm=5.0, patch_um=100.0, tile_um=250.0, pixel_um=25.0):
    """Cortex tiles of a 1 mm wide core whose fibrosis comes in patches (a smoothed Gaussian
    field above its 80th percentile: ~20% of the cortex)."""
    rows, columns = int(1000 / pixel_um), int(length_mm * 1000 / pixel_um)
    field = ndimage.gaussian_filter(rng.standard_normal((rows + 80, columns + 80)),
                                    patch_um / pixel_um)[40:-40, 40:-40]
    fibrotic = field > 0.8416 * field.std()
    side = int(tile_um / pixel_um)
    tiles = []
    for y in range(0, rows, side):
        for x in range(0, columns, side):
            share = fibrotic[y:y + side, x:x + side].mean()
            tiles.append(CortexTile(x * 2.0, y * 2.0, side * 2.0,  # 2 px a pixel here: 12.5 µm/px
                                    {"fibrosis": share * tile_um ** 2,
                                     "tissue": (1 - share) * tile_um ** 2}, None))
    return tiles


def test_area_verdicts_on_patchy_fibrosis_come_by_chance_rarely():
    """Two cores of one kidney, the same patchy fibrosis: with tiles as independent units (the
    tile bootstrap this replaced, or Welch's t over tiles) 17-18% of such patients got a verdict
    in simulations like this one (patches 3x larger: 48-57%); over 1 mm blocks 4-5% (7-8%)."""
    rng = np.random.default_rng(0)
    chance = {"blocks": 0, "tiles": 0}
    for _ in range(200):
        samples = [compare.slide_sample([], patchy_core(rng), CLASS_NAMES, CONFIG) for _ in range(2)]
        parts = [compare.tile_ratio_parts(s, "interstitial_fibrosis") for s in samples]
        for units, blocks in (("blocks", [s.tile_block for s in samples]),
                              ("tiles", [np.arange(s.tile_count) for s in samples])):
            low, high, _ = intervals.ratio_difference_interval(*(p + (b,) for p, b in zip(parts, blocks)))
            chance[units] += compare.verdict(low, high) != "unchanged"
    assert samples[0].tile_block.max() + 1 == 5  # 1 x 5 mm: five blocks
    assert chance["blocks"] / 200 <= 0.09 and chance["tiles"] / 200 >= 0.14, chance


@pytest.mark.parametrize("seed", [2, 6])  # interpolated: [-3.025, 2] and [-3, 3.025]
def test_index_intervals_are_whole_points(seed):
    rng = np.random.default_rng(seed)
    base, follow = (compare.slide_sample(*random_slide(rng, glomeruli=12, tiles=40), CLASS_NAMES,
                                         CONFIG) for _ in range(2))
    for row in compare.compare_samples(base, follow):
        if row["name"].endswith("_index"):
            assert float(row["ci_low"]).is_integer() and float(row["ci_high"]).is_integer()


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """Activity falls (deposits, crescents cleared) while chronicity rises (sclerosis, fibrosis)."""
    tmp = tmp_path_factory.mktemp("shift")
    active = ["hyaline_deposits+cellular_crescent"] * 12 + ["normal"] * 8
    scarred = ["global_sclerosis"] * 12 + ["normal"] * 8
    return (scored_folder(tmp, "pre", active, fibrosis_fraction=0.1),
            scored_folder(tmp, "post", scarred, fibrosis_fraction=0.5, seed=1))


def test_clear_shift_gives_the_right_verdicts_and_keeps_activity_and_chronicity_apart(shifted):
    comparison = compare.compare_folders(*shifted, patient_id="P1")
    rows = {m["name"]: m for m in comparison["metrics"]}
    for name in ("activity_index", "hyaline_deposits", "deposit_burden", "cellular_crescents"):
        assert rows[name]["family"] == "activity"
        assert rows[name]["ci_high"] < 0 and rows[name]["verdict"] == "improved", name
    for name in ("chronicity_index", "glomerulosclerosis", "sclerosis_burden", "interstitial_fibrosis"):
        assert rows[name]["family"] == "chronicity"
        assert rows[name]["ci_low"] > 0 and rows[name]["verdict"] == "worsened", name
    assert rows["fibrous_crescents"]["verdict"] == "unchanged"  # none before, none after
    for row in rows.values():  # judged together, every one of these clear changes still holds
        assert row["verdict_holm"] == row["verdict"], row["name"]
        assert row["p_value"] is None or row["p_holm"] >= row["p_value"], row["name"]
    assert rows["hyaline_deposits"]["baseline"] == pytest.approx(60.0)
    assert rows["hyaline_deposits"]["difference"] == pytest.approx(-60.0)
    # Baseline and follow-up values are those of each folder's summary.json.
    for folder, key in zip(shifted, ("baseline", "follow_up")):
        expected = expected_from_scores(json.loads((folder / "summary.json").read_text())["scores"])
        assert {n for n, r in rows.items() if r[key] is None} == {n for n, v in expected.items()
                                                                   if v is None}
        assert ({n: r[key] for n, r in rows.items() if r[key] is not None}
                == pytest.approx({n: v for n, v in expected.items() if v is not None}, rel=1e-12))
    assert comparison["baseline"]["glomeruli"] == 20 and comparison["patient_id"] == "P1"


def test_comparison_is_deterministic_under_its_seed(shifted):
    first = compare.compare_folders(*shifted)
    assert compare.compare_folders(*shifted) == first
    sample = compare.sample_of(read_score_folder(shifted[0]))
    replicates = [compare.bootstrap_values(sample, np.random.default_rng(seed), 200)
                  for seed in (0, 0, 1)]
    assert np.array_equal(replicates[0]["interstitial_fibrosis"], replicates[1]["interstitial_fibrosis"])
    assert not np.array_equal(replicates[0]["interstitial_fibrosis"], replicates[2]["interstitial_fibrosis"])


def test_verdicts_judged_together_rarely_come_by_chance():
    """Unchanged patients (both biopsies drawn alike; tiles on a 1 x 5 mm grid): about three in
    ten got some verdict metric by metric, 3-7% judged together (Holm)."""
    rng = np.random.default_rng(7)
    some, together = 0, 0
    for patient in range(100):
        samples = []
        for _ in range(2):
            glomeruli, tiles = random_slide(rng, glomeruli=10, tiles=80)
            tiles = [replace(t, x_px=125.0 * (i // 4), y_px=125.0 * (i % 4))
                     for i, t in enumerate(tiles)]
            samples.append(compare.slide_sample(glomeruli, tiles, CLASS_NAMES, CONFIG))
        rows = compare.compare_samples(*samples, replicates=500, seed=patient)
        some += any(r["verdict"] in ("improved", "worsened") for r in rows)
        together += any(r["verdict_holm"] in ("improved", "worsened") for r in rows)
    assert some >= 15 and together <= 8, (some, together)


def test_metric_a_model_cannot_assess_is_not_assessed_and_indices_need_the_same_components():
    rng = np.random.default_rng(4)
    without_deposits = tuple(n for n in CLASS_NAMES if n != "hyaline_deposit")
    base = compare.slide_sample(*random_slide(rng), without_deposits, CONFIG)
    follow = compare.slide_sample(*random_slide(rng), CLASS_NAMES, CONFIG)
    rows = {r["name"]: r for r in compare.compare_samples(base, follow)}
    for name in ("hyaline_deposits", "deposit_burden", "activity_index"):
        assert rows[name]["verdict"] == "not assessed" and rows[name]["difference"] is None
    assert rows["activity_index"]["baseline"] is not None  # partial index, but over other components
    assert rows["chronicity_index"]["verdict"] != "not assessed"


def test_verdict_follows_the_favourable_direction():
    assert compare.verdict(-3, -1) == "improved" and compare.verdict(1, 3) == "worsened"
    assert compare.verdict(-1, 1) == "unchanged" and compare.verdict(-1, 0) == "unchanged"
    assert compare.verdict(1, 3, favourable="higher") == "improved"


def compare_args(*argv: str) -> argparse.Namespace:
    """``biopsy compare ARGV`` parsed by its own parser (the CLI maps a BiopsyError to exit 2)."""
    parser = argparse.ArgumentParser()
    compare_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["compare", *argv])


def test_compare_command_scores_label_maps_and_writes_the_outputs(tmp_path, capsys):
    pre = write_label_map_file(tmp_path / "pre.ome.tif", paint_label_map(["hyaline_deposits"] * 12))
    post = write_label_map_file(tmp_path / "post.ome.tif", paint_label_map(["normal"] * 12))
    args = compare_args(str(pre), str(post), "--from-labels", "--patient", "P7",
                        "--out", str(tmp_path / "out"))
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "Glomeruli with hyaline deposits: 100.0 -> 0.0 % of glomeruli, -100.0" in printed
    assert printed.startswith("Glomeruli: 12 -> 12\n")
    index = next(line for line in printed.splitlines() if "NIH activity index" in line)
    assert index.endswith("(partial)")  # a label map: no nuclei counted, two components of four
    for name in ("comparison.json", "comparison.csv", "report.html", "baseline/summary.json",
                 "follow_up/summary.json"):
        assert (tmp_path / "out" / name).is_file()
    # the scored folders it wrote are accepted as inputs in turn, giving the same comparison
    again = compare_args(str(tmp_path / "out" / "baseline"),
                         str(tmp_path / "out" / "follow_up"), "--patient", "P7",
                         "--out", str(tmp_path / "again"))
    assert again.func(again) == 0
    assert ((tmp_path / "again" / "comparison.json").read_text()
            == (tmp_path / "out" / "comparison.json").read_text())


def test_compare_command_says_which_biopsy_is_a_limited_sample(tmp_path, capsys):
    pre = write_label_map_file(tmp_path / "pre.ome.tif", paint_label_map(["normal"] * 12))
    post = write_label_map_file(tmp_path / "post.ome.tif", paint_label_map(["normal"] * 4))
    args = compare_args(str(pre), str(post), "--from-labels", "--out", str(tmp_path / "out"))
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith(
        "Glomeruli: 12 -> 4 (limited sample: follow-up; read the verdicts with care)\n")


def scored(model="a" * 64, config=None, mpp_given=False, file_mpp=(0.5, 0.5),
           **inference) -> SimpleNamespace:
    """A slide scored by a model, as compare reads it: its folder's provenance (``file_mpp``
    None: a folder from before it was recorded)."""
    source = {"kind": "slide", "mpp_given": mpp_given} | (
        {} if file_mpp is None else {"file_mpp": list(file_mpp)})
    return SimpleNamespace(folder=Path("scored"), summary={"provenance": {
        "source": source,
        "model": {"sha256": model}, "config": config or CONFIG.as_dict(),
        "inference": {"int8": False, "bf16": False, "tta": False, "scales": [1.0],
                      "stain_reference": [1.478, 0.7424]} | inference}})


def label_map_scored() -> SimpleNamespace:
    return SimpleNamespace(folder=Path("scored"), summary={"provenance": {
        "source": {"kind": "label_map", "mpp": 1.0}, "config": CONFIG.as_dict()}})


def test_processing_differences_name_what_was_done_differently():
    differences = compare.processing_differences
    assert differences(scored(), scored()) == []
    assert differences(label_map_scored(), label_map_scored()) == []
    # a folder from before int8, bf16, mirror images, scales, the stain reference and the
    # nuclei settings were recorded: off, one scale, stain unknown, nuclei defaults
    old = scored()
    del old.summary["provenance"]["inference"]
    old.summary["provenance"]["inference"] = {}
    for section, key in (("lesions", "endocapillary_tuft_nuclei_per_1000um2"),
                         ("cortex", "interstitial_inflammation")):
        del old.summary["provenance"]["config"][section][key]
    assert differences(old, scored(stain_reference=None)) == []
    # a search that chose factor 1 is no search; another config name alone changes no score
    renamed = CONFIG.as_dict() | {"name": "ours"}
    assert differences(scored(), scored(mpp_search={"factor": 1.0}, config=renamed)) == []

    assert differences(label_map_scored(), scored()) == [
        "Source: a label map at baseline, the slide segmented by a model at follow-up."]
    assert differences(scored(), scored(model="b" * 64)) == [
        "Model: SHA-256 aaaaaaaaaaaa at baseline, SHA-256 bbbbbbbbbbbb at follow-up."]
    config = CONFIG.as_dict()
    config["glomeruli"] = config["glomeruli"] | {"split_min_depth_um": 15.0}
    assert differences(scored(), scored(config=config)) == [
        "Scoring setting glomeruli.split_min_depth_um: 25.0 at baseline, 15.0 at follow-up."]
    assert differences(scored(), scored(tta=True, stain_reference=None)) == [
        "Mirror-image test-time augmentation: off at baseline, on at follow-up.",
        "Stain normalisation: on (reference haematoxylin 1.48, eosin 0.742) at baseline, off at "
        "follow-up."]
    assert differences(scored(mpp_search={"factor": 0.71}), scored(mpp_search={"factor": 1.41})) == [
        "Pixel-size search: read at 0.71x the pixel size at baseline, read at 1.41x the pixel size "
        "at follow-up."]
    assert differences(scored(), scored(mpp_given=True)) == [
        "Pixel size: read from the file at baseline, given by hand at follow-up."]
    # an older folder's mpp_given was set by any --mpp, the file's own too: not known to differ
    assert differences(scored(mpp_given=True, file_mpp=None), scored()) == []
    assert differences(scored(file_mpp=None), scored(mpp_given=True)) == [
        "Pixel size: read from the file at baseline, given by hand at follow-up."]
    assert len(differences(scored(int8=True, scales=[1, 1.41]), scored(bf16=True))) == 3


def test_a_pair_processed_differently_is_flagged_in_the_outputs(tmp_path, capsys):
    pre = write_label_map_file(tmp_path / "pre.ome.tif", paint_label_map(["hyaline_deposits"] * 12))
    post = write_label_map_file(tmp_path / "post.ome.tif", paint_label_map(["normal"] * 12))
    alike = compare_args(str(pre), str(post), "--from-labels", "--out",
                         str(tmp_path / "alike"))
    assert alike.func(alike) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "alike" / "comparison.json").read_text())[
        "processing_differences"] == []
    assert "processed differently" not in (tmp_path / "alike" / "report.html").read_text()

    summary_path = tmp_path / "alike" / "follow_up" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["provenance"]["config"]["glomeruli"]["min_area_um2"] = 1000.0
    summary_path.write_text(json.dumps(summary))
    args = compare_args(str(tmp_path / "alike" / "baseline"),
                        str(tmp_path / "alike" / "follow_up"), "--out", str(tmp_path / "out"))
    assert args.func(args) == 0
    expected = "Scoring setting glomeruli.min_area_um2: 1500.0 at baseline, 1000.0 at follow-up."
    assert capsys.readouterr().err.splitlines()[1:] == [f"  {expected}"]
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())[
        "processing_differences"] == [expected]
    report = (tmp_path / "out" / "report.html").read_text()
    assert "processed differently" in report and expected in report


def test_a_missing_follow_up_is_refused_before_the_baseline_is_scored(tmp_path):
    pre = write_label_map_file(tmp_path / "pre.ome.tif", paint_label_map(["normal"] * 3))
    args = compare_args(str(pre), str(tmp_path / "post.ome.tif"), "--from-labels",
                        "--out", str(tmp_path / "out"))
    with pytest.raises(BiopsyError, match="post.ome.tif: not found"):
        args.func(args)
    (tmp_path / "not-scored").mkdir()
    args = compare_args(str(pre), str(tmp_path / "not-scored"), "--from-labels",
                        "--out", str(tmp_path / "out"))
    with pytest.raises(BiopsyError, match="not-scored"):
        args.func(args)
    assert not (tmp_path / "out").exists()


def test_a_scored_folder_where_the_other_input_would_be_scored_is_refused(tmp_path):
    pre = write_label_map_file(tmp_path / "pre.ome.tif", paint_label_map(["normal"] * 3))
    first = compare_args(str(pre), str(pre), "--from-labels", "--out",
                         str(tmp_path / "out"))
    assert first.func(first) == 0
    scored = tmp_path / "out" / "baseline"
    summary = (scored / "summary.json").read_bytes()
    again = compare_args(str(pre), str(scored), "--from-labels", "--out",
                         str(tmp_path / "out"))
    with pytest.raises(BiopsyError, match="would overwrite it; give another --out"):
        again.func(again)
    assert (scored / "summary.json").read_bytes() == summary



def test_a_failed_comparison_leaves_no_earlier_one_beside_it(tmp_path, svs_path):
    """A second compare into the same --out that fails: an earlier run's follow-up, comparison
    and report stood beside the new baseline."""
    pre = write_label_map_file(tmp_path / "pre.ome.tif", paint_label_map(["normal"] * 3))
    first = compare_args(str(pre), str(pre), "--from-labels", "--out", str(tmp_path / "out"))
    assert first.func(first) == 0
    (tmp_path / "broken.ome.tif").write_bytes(b"not a tiff")
    again = compare_args(str(pre), str(tmp_path / "broken.ome.tif"), "--from-labels", "--out",
                         str(tmp_path / "out"))
    with pytest.raises(BiopsyError, match="broken.ome.tif"):
        again.func(again)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["baseline"]
    # A bad option is refused before the earlier comparison is removed.
    assert first.func(first) == 0
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir())
    (tmp_path / "bad.yaml").write_text("glomeruli: {min_area_um2: -1}\n")
    bad = compare_args(str(pre), str(pre), "--from-labels", "--config", str(tmp_path / "bad.yaml"),
                       "--out", str(tmp_path / "out"))
    with pytest.raises(BiopsyError, match="bad.yaml"):
        bad.func(bad)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == outputs
    # A slide that cannot be opened is refused before the other is scored.
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(svs_path.read_bytes()[:4096])
    slides = compare_args(str(svs_path), str(truncated), "--out", str(tmp_path / "slides"))
    with pytest.raises(BiopsyError, match="truncated.svs"):
        slides.func(slides)
    assert not (tmp_path / "slides").exists()


def test_indices_bootstrap_resamples_whole_blocks_of_tiles():
    """Five 1 mm blocks whose tiles differ but whose sums are alike: a resample of blocks keeps
    the fibrosis share, a resample of tiles (as if independent) would not."""
    rng = np.random.default_rng(4)
    shares = rng.uniform(0, 0.6, 16)
    tiles = [CortexTile(125.0 * (4 * block + i % 4), 125.0 * (i // 4), 125.0,
                        {"fibrosis": float(share) * 1e4, "tissue": (1 - float(share)) * 1e4}, None)
             for block in range(5) for i, share in enumerate(rng.permutation(shares))]
    sample = compare.slide_sample([], tiles, CLASS_NAMES, CONFIG)
    assert np.bincount(sample.tile_block).tolist() == [16] * 5
    replicates = compare.bootstrap_values(sample, np.random.default_rng(0), 300)
    fibrosis = replicates["interstitial_fibrosis"]
    assert np.ptp(fibrosis) < 1e-9 and fibrosis[0] == pytest.approx(100 * shares.mean())


def test_blocks_of_a_large_section_take_little_memory():
    """A full SVD of a piece's tile centres made an n x n matrix: 800 MB for the 10,000 tiles of
    a 25 x 25 mm section."""
    tiles = [CortexTile(250.0 * x, 250.0 * y, 250.0, {}, None) for x in range(100) for y in range(100)]
    tracemalloc.start()
    blocks = compare.tile_blocks(tiles, 250.0)
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert blocks.max() + 1 == 625 and peak_bytes < 50e6  # 1 mm blocks of a 25 mm square


@pytest.mark.parametrize("offset", [(0, 0), (1, 0), (2, 1), (3, 3)])
def test_blocks_do_not_depend_on_where_the_core_lies(offset):
    """A fixed 1 mm grid cut a 1 mm wide core that straddled a grid line into half-width blocks
    side by side (chance verdicts on patchy fibrosis 6-8% -> 8-21% in simulation)."""
    tiles = [replace(t, x_px=t.x_px + offset[0] * t.size_px, y_px=t.y_px + offset[1] * t.size_px)
             for t in patchy_core(np.random.default_rng(0))]
    blocks = compare.tile_blocks(tiles, CONFIG.cortex.tile_um)
    assert np.bincount(blocks).tolist() == [16] * 5
