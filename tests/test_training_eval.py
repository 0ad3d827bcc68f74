"""Training evaluation: metrics against hand-made masks, tiled prediction, stain normalisation and
test-time augmentation in evaluation, k-fold cross-validation by case."""

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage.measure import label

from biopsy.errors import ConfigError
from biopsy.classes import CLASS_NAMES, glomerular_indices
from biopsy.geojson import IGNORE_INDEX, Annotation, rasterise, read_annotations
from glomeruli_dataset import config_dict
from biopsy.model import load_checkpoint
from biopsy.restain import StainShift
from biopsy.slide import open_slide
from biopsy.stainnorm import stain_amounts
from biopsy.synth import LesionProfile, generate_slide
from biopsy.tiling import TileDataset, grid_shape_px, make_grid
from training import evaluate as evaluation
from training.annotations import LabelMapLabels, PolygonLabels
from training.__main__ import main as training_main
from training.cases import find_slides, set_stain_shifts, split_by_case
from training.config import EvaluateConfig, config_from_dict, load_config, with_fold
from training.evaluate import (count_metrics, evaluate_checkpoint, metrics_from_counts, object_rows,
                               predict_image)
from training.loop import fit, model_info

REPO = Path(__file__).resolve().parents[1]


def test_folds_hold_out_every_case_once(dataset_root, tmp_path):
    config = config_from_dict(config_dict(dataset_root, tmp_path / "run"), "test")
    slides = find_slides(config.data, config.model.classes, config.source)
    held_out = []
    for fold in range(3):
        fold_config = with_fold(config, fold, 3)
        assert fold_config.output_dir == str(tmp_path / "run" / f"fold-{fold}")
        training, validation = split_by_case(slides, fold_config.data.split)
        assert len(training) == 4 and not {s.case for s in training} & {s.case for s in validation}
        held_out += sorted({s.case for s in validation})
    assert sorted(held_out) == ["case0", "case1", "case2"]
    with pytest.raises(ConfigError, match="fold 3 of 3"):
        with_fold(config, 3, 3)
    with pytest.raises(ConfigError, match="4 folds need at least as many cases"):
        split_by_case(slides, with_fold(config, 0, 4).data.split)
    data = config_dict(dataset_root, tmp_path)
    data["data"]["split"]["folds"] = 2
    with pytest.raises(ConfigError, match="exclude each other"):
        config_from_dict(data, "test")


def test_metrics_against_hand_made_masks():
    names = ["tissue", "tuft", "sclerosis"]
    truth = np.zeros((100, 100), np.uint8)
    truth[10:30, 10:30] = 1  # glomerulus A, found exactly
    truth[60:90, 60:90] = 2  # glomerulus B (sclerotic), found only in part
    truth[0:5, 0:5] = 255  # unlabelled
    prediction = np.zeros_like(truth)
    prediction[10:30, 10:30] = 1
    prediction[60:70, 60:90] = 2  # IoU 1/3 with B: a miss and a false positive
    prediction[40:50, 0:10] = 1  # false positive
    prediction[0:5, 0:5] = 1  # inside the unlabelled area: not counted
    settings = EvaluateConfig(min_glomerulus_area_um2=50)
    metrics = metrics_from_counts(count_metrics(truth, prediction, names, 1.0, settings), names)
    assert metrics["dice_tuft"] == pytest.approx(2 * 400 / (500 + 400))
    assert metrics["dice_sclerosis"] == pytest.approx(2 * 300 / (300 + 900))
    assert metrics["glomerulus_dice"] == pytest.approx(2 * 700 / (800 + 1300))
    assert (metrics["glomerulus_precision"], metrics["glomerulus_recall"]) == (pytest.approx(1 / 3), 0.5)
    assert metrics["glomerulus_f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))
    assert metrics["global_sclerosis_f1"] == 0.0 and metrics["global_sclerosis_count"] == 1
    prediction[60:90, 60:90] = 2
    metrics = metrics_from_counts(count_metrics(truth, prediction, names, 1.0, settings), names)
    assert metrics["global_sclerosis_f1"] == 1.0 and metrics["glomerulus_f1"] == pytest.approx(0.8)


def test_touching_annotated_glomeruli_are_two_true_glomeruli(real_glomeruli):
    """20181355-PASM.jpg: two outlines that overlap. A prediction of each, 3 µm inside its outline
    (so the two stay apart), finds both; taken from the class map, the truth was one glomerulus."""
    config = load_config(REPO / "configs" / "train" / "real-glomeruli.yaml")
    names, mpp = config.model.classes, config.model.input_mpp
    [slide] = [s for s in find_slides(config.data, names, config.source)
               if s.path.name == "20181355-PASM.jpg"]
    height, width = grid_shape_px(slide.dimensions, (slide.mpp, slide.mpp), mpp)
    truth = slide.labels.labels(0, 0, (width, height), mpp)
    instances = slide.labels.instances(0, 0, (width, height), mpp, [1, 2])
    annotations = slide.labels.annotations
    assert len(annotations) == 2 and annotations[0].geometry.intersects(annotations[1].geometry)
    assert len(np.unique(instances)) == 3 and len(np.unique(label(instances > 0))) == 2
    shrunk = [Annotation(a.geometry.buffer(-3 / slide.mpp), a.class_name) for a in annotations]
    prediction = rasterise(shrunk, names, (height, width), mpp, slide.mpp, unlabelled=0)
    tp_fp_fn = slice(3 * len(names) + 3, 3 * len(names) + 6)
    assert list(count_metrics(truth, prediction, names, mpp, config.evaluate, instances)[tp_fp_fn]) \
        == [2, 0, 0]
    assert list(count_metrics(truth, prediction, names, mpp, config.evaluate)[tp_fp_fn]) == [0, 2, 1]
    rows = object_rows(truth, prediction, names, mpp, config.evaluate, instances)
    assert [(r["side"], r["matched"]) for r in rows] == [("truth", True)] * 2 + [("predicted", True)] * 2


def test_lesions_outlined_inside_a_glomerulus_are_part_of_it(tmp_path):
    """The generator's truth.geojson outlines each glomerulus and, inside it, its sclerosis,
    crescent and deposits: one true glomerulus each, as many as the label map's regions, all
    found by a perfect prediction."""
    profile = LesionProfile(name="nested", glomeruli=6, global_sclerosis=0.3, segmental_sclerosis=0.2,
                            cellular_crescent=0.3, fibrous_crescent=0.2, hyaline_deposit=0.5,
                            core_length_mm=1.0, seed=7)
    truth = generate_slide(profile, tmp_path)
    level0_mpp, (height0, width0) = truth["slide"]["mpp"], truth["slide"]["shape_px"]
    names, mpp = list(CLASS_NAMES), 2.0
    outlines = PolygonLabels(read_annotations(tmp_path / "truth.geojson"), names, {}, "ignore",
                             level0_mpp, "truth.geojson")
    regions = LabelMapLabels(tmp_path / "labels.ome.tif", names, {}, level0_mpp)
    size = (int(width0 * level0_mpp / mpp), int(height0 * level0_mpp / mpp))
    labels = regions.labels(0, 0, size, mpp)
    glomerular = glomerular_indices(names)
    instances = outlines.instances(0, 0, size, mpp, glomerular)
    assert instances.max() == regions.instances(0, 0, size, mpp, glomerular).max() == 6
    perfect = np.where(labels == IGNORE_INDEX, 0, labels)
    tp_fp_fn = slice(3 * len(names) + 3, 3 * len(names) + 6)
    counts = count_metrics(labels, perfect, names, mpp, EvaluateConfig(), instances)
    assert list(counts[tp_fp_fn]) == [6, 0, 0]


def test_an_outline_over_no_pixel_is_no_glomerulus():
    """Id 2 drew no pixel (too small, or drawn over): with no minimum area it was a phantom miss."""
    instances = np.zeros((20, 20), np.int32)
    instances[2:8, 2:8], instances[10:18, 10:18] = 1, 3
    kept = evaluation.kept_instances(instances, min_area_px=0)
    assert kept.max() == 2 and set(np.unique(kept)) == {0, 1, 2}


def test_object_rows_say_what_each_miss_is():
    names = ["tissue", "tuft", "sclerosis"]
    truth = np.zeros((100, 100), np.uint8)
    truth[10:30, 10:30] = 1  # found exactly
    truth[10:30, 50:70] = truth[10:30, 72:92] = 1  # two touching glomeruli, found as one
    truth[60:90, 60:90] = 2  # globally sclerotic, found in part
    prediction = np.zeros_like(truth)
    prediction[10:30, 10:30] = prediction[10:30, 50:92] = 1
    prediction[40:50, 0:10] = 1  # on no glomerulus
    prediction[60:70, 60:90] = 2
    rows = object_rows(truth, prediction, names, 2.0, EvaluateConfig(min_glomerulus_area_um2=50))
    merged = 400 / 840
    expected = [("truth", 1, 1600, False, True, 1.0, 1600),
                ("truth", 2, 1600, False, False, merged, 3360),
                ("truth", 3, 1600, False, False, merged, 3360),
                ("truth", 4, 3600, True, False, 1 / 3, 1200),
                ("predicted", 1, 1600, False, True, 1.0, 1600),
                ("predicted", 2, 3360, False, False, merged, 1600),
                ("predicted", 3, 400, False, False, 0.0, None),
                ("predicted", 4, 1200, True, False, 1 / 3, 3600)]
    assert [tuple(row.values()) for row in rows] == [
        (side, i, area, sclerotic, matched, pytest.approx(iou, abs=5e-4), partner)
        for side, i, area, sclerotic, matched, iou, partner in expected]


class _RedIsClassOne(torch.nn.Module):
    """Logits from pixel values, so the exact expected class map is known."""

    def forward(self, x):
        return torch.cat([-x[:, :1], x[:, :1]], dim=1)


def test_tiled_prediction_covers_every_pixel_exactly(dataset_root, tmp_path):
    config = config_from_dict(config_dict(dataset_root, tmp_path), "test")
    info = model_info(config)
    info.normalisation = {"mean": [0.5] * 3, "std": [1.0] * 3}
    image = np.random.default_rng(0).integers(0, 256, (150, 203, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "noise.png")
    slide = open_slide(tmp_path / "noise.png", mpp=info.input_mpp)
    for patch_px in (64, 256):  # tiles overlapping, and one tile larger than the image
        info.patch_size_px = patch_px
        tiles = TileDataset(slide, make_grid((150, 203), info.input_mpp, patch_px))
        for tta in (False, True):  # mirror images flipped back: the same map
            prediction = predict_image(_RedIsClassOne(), info, tiles, torch.device("cpu"),
                                       batch_size=3, tta=tta)
            assert np.array_equal(prediction, (image[..., 0] > 127.5).astype(np.uint8))


@pytest.mark.parametrize("threshold, expected", [(None, 0), (0.5, 1), (0.7, 0)])
def test_tiled_prediction_decides_glomerulus_first_where_the_model_says(dataset_root, tmp_path,
                                                                        threshold, expected):
    """Probabilities tissue 0.4, tuft 0.3, sclerosis 0.3 everywhere: tissue by the argmax, tuft
    when glomerular classes decide first at 0.5 (they hold 0.6), tissue again at 0.7."""
    info = model_info(config_from_dict(config_dict(dataset_root, tmp_path), "test"))
    info.glomerulus_threshold = threshold
    model = torch.nn.Conv2d(3, 3, 1)
    torch.nn.init.zeros_(model.weight)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.4, 0.3, 0.3]).log())
    Image.fromarray(np.full((100, 90, 3), 200, np.uint8)).save(tmp_path / "flat.png")
    slide = open_slide(tmp_path / "flat.png", mpp=info.input_mpp)
    tiles = TileDataset(slide, make_grid((100, 90), info.input_mpp, info.patch_size_px))
    prediction = predict_image(model.eval(), info, tiles, torch.device("cpu"))
    assert prediction.shape == (100, 90) and np.all(prediction == expected)


def test_evaluation_normalises_stains_and_augments_as_configured(dataset_root, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(dataset_root, root)
    for path in (root / "images").glob("case2-*.png"):  # the validation case, paler in eosin
        image = np.asarray(Image.open(path).convert("RGB"))
        Image.fromarray(StainShift(eosin=0.6).apply(image)).save(path)
    settings = config_dict(root, tmp_path / "run", steps=2, validate_every=2)
    settings["model"]["stain_normalisation"] = True
    settings["evaluate"] = {"scales": [1.0, 1.5], "tta": True}  # validation as scoring will
    config = config_from_dict(settings, "test")
    augmentations = []  # (scales, tta) of each batch
    run_batch = evaluation.batch_probabilities
    monkeypatch.setattr(evaluation, "batch_probabilities",
                        lambda *args: augmentations.append((args[2], args[-1])) or run_batch(*args))
    metrics = fit(config)
    assert augmentations and set(augmentations) == {((1.0, 1.5), True)}
    _, info = load_checkpoint(tmp_path / "run" / "last.safetensors")
    training, validation = split_by_case(find_slides(config.data, info.class_names, "test"), config.data.split)
    expected = np.mean([stain_amounts(slide.slide()) for slide in training], axis=0)
    assert info.stain_reference == pytest.approx(expected)
    set_stain_shifts(validation, info.stain_reference)
    assert all(slide.stain_shift.eosin > 1.3 for slide in validation)  # brought back up
    assert evaluate_checkpoint(config, tmp_path / "run" / "last.safetensors") == metrics
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    augmentations.clear()
    checkpoint = str(tmp_path / "run" / "last.safetensors")
    assert training_main(["eval", str(path), "--checkpoint", checkpoint, "--no-tta"]) == 0
    assert set(augmentations) == {((1.0, 1.5), False)}  # the config's scales, no mirror images
    augmentations.clear()
    assert training_main(["eval", str(path), "--checkpoint", checkpoint, "--scales", "1", "1.41",
                          "--json", str(tmp_path / "tta.json"),
                          "--objects", str(tmp_path / "o.csv")]) == 0
    assert set(augmentations) == {((1.0, 1.41), True)}  # the command line's scales, the config's tta
    with_tta = json.loads((tmp_path / "tta.json").read_text())
    assert with_tta["all"]["glomerulus_count"] == metrics["all"]["glomerulus_count"]
    with open(tmp_path / "o.csv", newline="") as file:
        objects = list(csv.DictReader(file))
    truth = [row for row in objects if row["side"] == "truth"]
    assert {row["image"] for row in objects} <= {str(s.path) for s in validation}
    assert len(truth) == with_tta["all"]["glomerulus_count"]
    predicted = [row for row in objects if row["side"] == "predicted"]
    hits = sum(row["matched"] == "True" for row in predicted)
    assert hits == sum(row["matched"] == "True" for row in truth)
    assert with_tta["all"]["glomerulus_recall"] == pytest.approx(hits / len(truth))
    assert with_tta["all"]["glomerulus_precision"] == (pytest.approx(hits / len(predicted))
                                                       if predicted else None)


def test_a_slide_taken_at_another_pixel_size_keeps_its_outlines_in_place(dataset_root, tmp_path):
    config = config_from_dict(config_dict(dataset_root, tmp_path), "test")
    slide = find_slides(config.data, config.model.classes, "test")[0]
    scaled = slide.with_mpp_scaled(1.5)
    assert scaled.mpp == scaled.labels.level0_mpp == scaled.slide().mpp[0] == 1.5 * slide.mpp
    assert slide.labels.level0_mpp == slide.mpp  # the original is left as it was
    width, height = slide.dimensions
    truth = slide.labels.labels(0, 0, (width, height), slide.mpp)
    # read at 1.5x the µm/px of the scaled slide: level-0 pixel for level-0 pixel
    np.testing.assert_array_equal(scaled.labels.labels(0, 0, (width, height), scaled.mpp), truth)


def test_evaluation_reads_each_slide_at_the_searched_pixel_size(dataset_root, tmp_path, monkeypatch):
    settings = config_dict(dataset_root, tmp_path / "run", steps=2)
    config = config_from_dict(settings, "test")
    fit(config)
    checkpoint = tmp_path / "run" / "last.safetensors"
    model, info = load_checkpoint(checkpoint)
    slides = split_by_case(find_slides(config.data, info.class_names, "test"), config.data.split)[1]
    cpu = torch.device("cpu")
    searched = evaluation.slide_counts(model, info, slides, replace(config.evaluate, mpp_search=[1.5]),
                                       cpu)
    scaled = evaluation.slide_counts(model, info, [s.with_mpp_scaled(1.5) for s in slides],
                                     config.evaluate, cpu)
    plain = evaluation.slide_counts(model, info, slides, config.evaluate, cpu)
    assert searched.keys() == scaled.keys() == plain.keys()
    assert all(np.array_equal(searched[s], scaled[s]) for s in searched)
    assert not all(np.array_equal(searched[s], plain[s]) for s in searched)
    factors = []  # what each search was given
    search = evaluation.most_confident_mpp
    monkeypatch.setattr(evaluation, "most_confident_mpp",
                        lambda *args, **kwargs: factors.append(args[3]) or search(*args, **kwargs))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    assert training_main(["eval", str(path), "--checkpoint", str(checkpoint),
                          "--mpp-search", "0.71", "1", "1.41"]) == 0
    assert factors == [(0.71, 1.0, 1.41)] * len(slides)


def test_cross_validation_trains_each_fold_and_pools_their_counts(dataset_root, tmp_path, capsys):
    data = config_dict(dataset_root, tmp_path / "cv", steps=2, validate_every=2)
    path = tmp_path / "cv.yaml"
    path.write_text(yaml.safe_dump(data))
    assert training_main(["eval", str(path), "--folds", "3"]) == 2
    assert "fold 0 is not trained" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        training_main(["fit", str(path), "--fold", "1"])  # without --folds
    assert "--folds and --fold go together" in capsys.readouterr().err
    for fold in range(3):
        assert training_main(["fit", str(path), "--folds", "3", "--fold", str(fold)]) == 0
        _, info = load_checkpoint(tmp_path / "cv" / f"fold-{fold}" / "best.safetensors")
        assert info.validation_metrics["metrics"]["all"]["glomerulus_count"] == 4  # one case
    assert training_main(["eval", str(path), "--folds", "3", "--json", str(tmp_path / "cv.json")]) == 0
    pooled = json.loads((tmp_path / "cv.json").read_text())
    assert pooled["all"]["glomerulus_count"] == 12 and pooled["PAS"]["glomerulus_count"] == 6
    capsys.readouterr()
    assert training_main(["eval", str(path), "--folds", "2"]) == 2  # fold-0 of 3 held out one case
    assert "holding out other cases than fold 0 of 2" in capsys.readouterr().err


def test_eval_judges_a_checkpoint_on_the_cases_it_was_validated_on(dataset_root, caplog):
    """A split made again over data that grew since held out cases the model trained on."""
    from biopsy.model import ModelInfo
    from training.cases import find_slides
    from training.config import config_from_dict
    from training.evaluate import validation_slides

    config = config_from_dict(config_dict(dataset_root, dataset_root / "out"), "test")
    config.data.split = replace(config.data.split, validation_cases=None, validation_fraction=0.4)
    slides = find_slides(config.data, ["tissue", "tuft", "sclerosis"], "test")
    info = ModelInfo("unet", {}, ["tissue"], {}, 1.0, 64, 3, {"mean": [0.5] * 3, "std": [0.2] * 3})
    info.validation_metrics = {"validation_cases": ["case0"]}
    with caplog.at_level("WARNING"):
        chosen = validation_slides(slides, config, info, "model.safetensors")
    assert {s.case for s in chosen} == {"case0"} and len(chosen) == 2
    assert "evaluated on the 1 cases it was validated on" in caplog.text
    # one of its cases gone from the data: judged on the other, not on a new split's (which
    # held out cases it trained on)
    info.validation_metrics = {"validation_cases": ["case0", "case9"]}
    with caplog.at_level("WARNING"):
        chosen = validation_slides(slides, config, info, "model.safetensors")
    assert {s.case for s in chosen} == {"case0"}
    assert "evaluated on the 1 of the 2 cases it was validated on that the data still holds " \
           "(missing: case9)" in caplog.text
    info.validation_metrics = {"validation_cases": ["synth-7"]}  # trained on other data: the split
    assert {s.case for s in validation_slides(slides, config, info, "m")} != {"case0"}
    info.validation_metrics = {"validation_cases": []}  # held out nothing: judged on training cases
    with caplog.at_level("WARNING"):
        validation_slides(slides, config, info, "all.safetensors")
    assert "all.safetensors: validated on no case, so it may have trained on every one" in caplog.text
