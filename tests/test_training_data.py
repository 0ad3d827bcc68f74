"""Training configs and cases: checks naming the key, splits by case, pixel sizes, patch
sampling; the loop is tested in test_training.py."""

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from biopsy.errors import ConfigError
from biopsy.model import read_model_info
from glomeruli_dataset import SIZE_PX, config_dict, make_dataset
from training.cases import find_slides, split_by_case
import training.config
from training.config import TrainConfig, config_from_dict, load_config
from training.dataset import PatchDataset
from training.augment import build_augmentation
from training import loop
from training.loop import fit

REPO = Path(__file__).resolve().parents[1]


# --- configs ---------------------------------------------------------------------------------

def test_bundled_configs_load():
    paths = sorted((REPO / "configs" / "train").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        config = load_config(path)
        assert config.model.classes and build_augmentation(config.augment, str(path)).transforms


@pytest.mark.parametrize("change,message", [
    (lambda d: d["train"].update(stepz=3), "unknown key 'train.stepz'"),
    (lambda d: d["train"].pop("steps"), "missing required key 'train.steps'"),
    (lambda d: d["optim"].update(lr="fast"), "optim.lr must be float"),
    (lambda d: d["optim"].update(optimizer="adam"), "optim.optimizer must be one of"),
    (lambda d: d["data"]["annotations"]["class_map"].update(gs="crescent"), "'crescent'.*not in model.classes"),
    (lambda d: d["data"].update(case_pattern="(case"), "data.case_pattern is not a regular expression"),
    (lambda d: d["data"].update(slide_mpp_by_path={"[": 0.25}), r"slide_mpp_by_path\['\['\] is not a regular"),
    (lambda d: d["data"].update(slide_mpp_by_path={"x": -1}), r"slide_mpp_by_path\['x'\] must be a slide's pixel size"),
    (lambda d: d["data"].update(slide_mpp=0), r"data.slide_mpp must be a slide's pixel size"),
    (lambda d: d.update(sampling={"mpp_scale": [2.0, 0.5]}), r"sampling.mpp_scale must be \[low, high\]"),
    (lambda d: d.update(evaluate={"scales": [0.9, 0.5]}), r"evaluate.scales: .* at least one >= 1"),
    (lambda d: d.update(evaluate={"scales": [1.0, float("nan")]}), r"evaluate.scales: .*from 0.25 to 4"),
    (lambda d: d.update(evaluate={"mpp_search": [1.0, 0]}), r"evaluate.mpp_search: .*from 0.25 to 4"),
    (lambda d: d.update(evaluate={"mpp_search": [1.0, 1e9]}), r"evaluate.mpp_search: .*from 0.25 to 4"),
    (lambda d: d["model"].update(glomerulus_threshold=1.5),
     r"model.glomerulus_threshold: .*probability in \(0, 1\)"),
    (lambda d: d.update(augment=[{"transform": "Rotate180"}]), r"augment\[0\].*albumentations transform"),
    (lambda d: d.update(augment=[{"transform": "GaussNoise", "sigma": 3}]), "GaussNoise has no argument 'sigma'"),
    (lambda d: d.update(augment=[{"transform": "GaussNoise", "std_range": "x"}]), "invalid arguments"),
    (lambda d: d["model"].update(arguments={"encoder": "resnet99"}), "unknown encoder 'resnet99'"),
    (lambda d: d["model"]["arguments"].update(depth=3), "unexpected keyword argument 'depth'"),
    (lambda d: d["model"]["arguments"].update(decoder_channels=[8, 8]), "decoder_channels needs 5"),
    (lambda d: d["model"].update(input_mpp=0), "model.input_mpp must be positive"),
    (lambda d: d["model"].update(patch_size_px=16), "model.patch_size_px must be from 32"),
    (lambda d: d["model"].update(patch_size_px=100_000), "model.patch_size_px must be from 32"),
    (lambda d: d["model"].update(input_mpp=1000), "model.input_mpp must be at most 64"),
    (lambda d: d["model"].update(normalisation_std=[0, 0, 0]),  # the loss NaN from step 1
     "model.normalisation_std must be positive"),
    (lambda d: d.update(synth={"slides": 0}), "synth needs slides >= 1"),  # IndexError
    (lambda d: d.update(synth={"slides": 2, "stains": []}), "synth needs"),  # ZeroDivisionError
    (lambda d: d.update(synth={"slides": 2, "profile": {"glomeruli": "many"}}),
     "synth: active-ln: glomeruli must be a whole number, got 'many'"),
    (lambda d: d.update(synth={"slides": 2, "profile": {"stain": "he"}}), "synth.profile sets the stain"),
    (lambda d: d.update(synth={"slides": 2, "profile": {"seed": 3}}), "synth.profile sets the seed"),
    (lambda d: d.update(sampling={"tissue_mpp": 0}), "sampling.tissue_mpp must be positive"),
    (lambda d: d.update(seed=-1), "seed must be 0 or more"),
    (lambda d: d["train"].update(workers=-1), "train.workers must be 0 or more"),
    (lambda d: d["optim"].update(optimizer="sgd", momentum=0), "optim.momentum must be positive"),
    (lambda d: d["train"].update(ema_decay=1.5), r"train.ema_decay must lie in \[0, 1\)"),
    (lambda d: d["model"]["arguments"].update(decoder_channels=[0, 8, 8, 8, 8]), ">= 1"),
    (lambda d: d["model"]["arguments"].update(decoder_channels=[-8, 8, 8, 8, 8]), ">= 1"),
    (lambda d: d["train"].update(best_metric="glomerulus_dice"), "'<stain or all>/<metric>'"),
    (lambda d: d["model"].update(class_colours={"tuft": [300, 0, 0]}),  # segment: OverflowError
     r"model.class_colours.tuft must be .*\[red, green, blue\] from 0 to 255"),
    (lambda d: d["model"].update(class_colours={"glomerulus": [1, 2, 3]}), "must be a class of"),
])
def test_bad_config_names_file_and_key(tmp_path, change, message):
    data = config_dict(tmp_path, tmp_path / "out")
    change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_unreadable_or_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


# --- cases -----------------------------------------------------------------------------------

def test_outlined_images_not_found_are_warned_of_and_an_unannotated_class_not_in_the_model_refused(
        tmp_path, caplog):
    """An annotated image deleted (or missed by data.slides) was left out without a word;
    eval of a checkpoint of other classes than data.unannotated raised ValueError."""
    make_dataset(tmp_path / "data")
    (tmp_path / "data" / "images" / "case1-PASM.png").unlink()
    config = config_from_dict(config_dict(tmp_path / "data", tmp_path / "out"), "test.yaml")
    with caplog.at_level("WARNING"):
        slides = find_slides(config.data, config.model.classes, config.source)
    assert len(slides) == 5 and "1 image(s) outlined in coco.json are not among the slides that " \
        "data.slides 'images/*.png' finds" in caplog.text and "images/case1-PASM.png" in caplog.text
    with pytest.raises(ConfigError, match="data.unannotated 'tissue' is not a class of "
                                          "the model \\(background, tuft\\)"):
        find_slides(config.data, ["background", "tuft"], config.source)


def test_the_checkpoint_says_fluorescence_and_mixed_kinds_are_refused(dataset_root, tmp_path):
    config = config_from_dict(config_dict(dataset_root, tmp_path, steps=1), "test")
    slides = find_slides(config.data, config.model.classes, config.source)
    assert not any(s.fluorescence for s in slides)
    fit(config)
    assert read_model_info(tmp_path / "last.safetensors").fluorescence is False
    slides[0] = replace(slides[0], fluorescence=True)
    with pytest.raises(ConfigError, match="mix brightfield and fluorescence"):
        loop._fluorescence(slides, "test")


def test_unknown_validation_cases_and_best_metrics_are_config_errors(dataset_root, tmp_path):
    data = config_dict(dataset_root, tmp_path)
    data["data"]["split"]["validation_cases"] = ["case2", "case9"]
    config = config_from_dict(data, "test")
    with pytest.raises(ConfigError, match=r"data.split.validation_cases names case\(s\) \['case9'\]"):
        fit(config)
    for best, message in (("all/glomerulus_dise", "no metric 'glomerulus_dise'"),
                          ("Masson/mean_dice", "no stain 'Masson' in the data")):
        config = config_from_dict(config_dict(dataset_root, tmp_path, best_metric=best), "test")
        with pytest.raises(ConfigError, match=message):
            fit(config)
    assert not (tmp_path / "log.csv").exists()


def test_a_best_metric_this_validation_does_not_give_is_a_warning(dataset_root, tmp_path, caplog):
    """The validation case holds both stains; one fold of another split may hold one, and then
    gives no per-stain figures: that fold keeps last.safetensors only (eval --folds uses it)."""
    data = config_dict(dataset_root, tmp_path, steps=1, best_metric="PAS/glomerulus_dice")
    data["data"]["stain_pattern"] = r"-(PAS)M?\."  # every slide "PAS": one stain, no PAS figures
    with caplog.at_level("WARNING"):
        fit(config_from_dict(data, "test"))
    assert "validation gives no PAS figures" in caplog.text
    assert (tmp_path / "last.safetensors").exists() and not (tmp_path / "best.safetensors").exists()
    settings = config_dict(dataset_root, tmp_path / "zero", steps=1, ema_decay=0)
    settings["optim"]["grad_clip_norm"] = 0  # 0 turns each off, as null does
    fit(config_from_dict(settings, "test"))


def test_auto_precision_is_bf16_where_the_device_has_bf16_instructions(monkeypatch):
    monkeypatch.setattr(training.config, "emulates_bf16", lambda device: device == "cpu")
    train = TrainConfig(steps=1)
    assert train.precision == "auto" and train.bf16("cuda") and not train.bf16("cpu")
    assert replace(train, precision="bf16").bf16("cpu")
    assert not replace(train, precision="fp32").bf16("cuda")
    monkeypatch.setattr(training.config, "emulates_bf16", lambda device: False)
    assert train.bf16("cpu")


def test_bf16_asked_on_a_cpu_that_emulates_it_is_a_warning(dataset_root, tmp_path, caplog,
                                                            monkeypatch):
    monkeypatch.setattr(loop, "emulates_bf16", lambda device: True)
    data = config_dict(dataset_root, tmp_path, steps=1)
    data["train"]["precision"] = "fp32"
    with caplog.at_level("WARNING"):
        fit(config_from_dict(data, "test"))
        assert "bfloat16" not in caplog.text
        data["train"]["precision"] = "bf16"
        fit(config_from_dict(data, "test"))
    assert "train.precision bf16 on this CPU, which has no bfloat16 instructions" in caplog.text


def test_slides_split_by_case_and_unannotated_images_left_out(dataset_root, tmp_path):
    config = config_from_dict(config_dict(dataset_root, tmp_path), "test")
    slides = find_slides(config.data, config.model.classes, config.source)
    assert len(slides) == 6 and all(s.path.name != "unannotated.png" for s in slides)
    assert {s.stain for s in slides} == {"PAS", "PASM"}
    config.data.split.validation_cases = None
    config.data.split.validation_fraction = 0.3
    training, validation = split_by_case(slides, config.data.split)
    assert len(validation) == 2 and not {s.case for s in training} & {s.case for s in validation}


def test_slides_without_a_pixel_size_name_the_config_key_that_gives_it(dataset_root, tmp_path):
    """The slide's own error told to give --mpp, which training has not."""
    config = config_dict(dataset_root, tmp_path)
    del config["data"]["slide_mpp"]  # PNG images carry none
    config = config_from_dict(config, "test")
    with pytest.raises(ConfigError, match="case0-PAS.png: pixel size unknown; give it with "
                                          "data.slide_mpp"):
        find_slides(config.data, config.model.classes, config.source)


def test_pixel_size_by_file_name_sets_each_slide_mpp_and_its_labels(dataset_root, tmp_path):
    """The first slide_mpp_by_path pattern that matches gives the slide's µm/px; the rest keep
    slide_mpp. A slide of half the µm/px has objects half as wide at the model's mpp."""
    data = config_dict(dataset_root, tmp_path)
    data["data"]["slide_mpp_by_path"] = {r"case0-PASM": 0.5, "PASM": 0.25}
    config = config_from_dict(data, "test")
    slides = {s.path.name: s for s in find_slides(config.data, config.model.classes, config.source)}
    assert {name: s.mpp for name, s in slides.items()} == {
        "case0-PAS.png": 1.0, "case0-PASM.png": 0.5, "case1-PAS.png": 1.0, "case1-PASM.png": 0.25,
        "case2-PAS.png": 1.0, "case2-PASM.png": 0.25}
    assert pickle.loads(pickle.dumps(slides["case0-PASM.png"])).slide().mpp == (0.5, 0.5)  # workers
    fine = slides["case0-PASM.png"].labels.labels(0, 0, (SIZE_PX, SIZE_PX), 0.5)
    coarse = slides["case0-PASM.png"].labels.labels(0, 0, (SIZE_PX // 2, SIZE_PX // 2), 1.0)
    assert coarse.shape == (SIZE_PX // 2, SIZE_PX // 2)
    for class_index in (1, 2):
        assert (coarse == class_index).sum() == pytest.approx((fine == class_index).sum() / 4, rel=0.1)


def test_patches_are_reproducible_and_labels_follow_the_polygons(dataset_root, tmp_path):
    config = config_from_dict(config_dict(dataset_root, tmp_path), "test")
    slides = find_slides(config.data, config.model.classes, config.source)
    none = build_augmentation([], "test")
    dataset = PatchDataset(slides, config.model, config.sampling, ["tuft", "sclerosis"], none,
                           seed=5, rank=0, length=40)
    again = PatchDataset(slides, config.model, config.sampling, ["tuft", "sclerosis"], none,
                         seed=5, rank=0, length=40)
    other_rank = PatchDataset(slides, config.model, config.sampling, ["tuft", "sclerosis"], none,
                              seed=5, rank=1, length=40)
    assert all(torch.equal(dataset[i][0], again[i][0]) for i in range(5))
    assert not all(torch.equal(dataset[i][0], other_rank[i][0]) for i in range(5))
    images, labels = zip(*(dataset[i] for i in range(40)))
    images, labels = torch.stack(images).numpy(), torch.stack(labels).numpy()
    # labels agree with the drawn colours: tuft pink, sclerosis dark, tissue pale
    assert np.median(images[labels == 1][:, 1]) > 90 and np.median(images[labels == 2][:, 1]) < 70
    assert np.median(images[labels == 0][:, 1]) > 200
    assert (labels == 2).any(axis=(1, 2)).mean() > 0.2  # object oversampling reaches the rare class


def test_magnification_jitter_reads_patches_at_the_scaled_mpp(dataset_root, tmp_path):
    """A fixed factor of 2 reads what a model at twice the mpp reads; a range gives varied sizes."""
    data = config_dict(dataset_root, tmp_path)
    data["sampling"] = {"object_fraction": 0.0, "mpp_scale": [2.0, 2.0]}
    jittered = config_from_dict(data, "test")
    data["sampling"]["mpp_scale"] = [1.0, 1.0]
    data["model"]["input_mpp"] = 2.0  # the default is 1.0
    coarser = config_from_dict(data, "test")
    slides = find_slides(coarser.data, coarser.model.classes, coarser.source)
    none = build_augmentation([], "test")
    pairs = [PatchDataset(slides, c.model, c.sampling, ["tuft"], none, seed=3, rank=0, length=8)
             for c in (jittered, coarser)]
    assert all(torch.equal(pairs[0][i][0], pairs[1][i][0]) for i in range(8))
    data["sampling"]["mpp_scale"] = [0.5, 2.0]
    data["model"]["input_mpp"] = 1.0
    varied = config_from_dict(data, "test")
    dataset = PatchDataset(slides, varied.model, varied.sampling, ["tuft"], none, seed=3, rank=0, length=64)
    scales = [dataset._scale(np.random.default_rng(i)) for i in range(2000)]
    assert 0.5 <= min(scales) < 0.55 and 1.9 < max(scales) <= 2.0
    assert abs(np.median(np.log(scales))) < 0.05  # log-uniform: as much zooming in as out
