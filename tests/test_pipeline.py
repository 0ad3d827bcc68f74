"""A slide through a model checkpoint into a scored-slide folder; the ``biopsy score`` CLI."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from biopsy import compare, infer, pipeline
from biopsy.classes import CLASS_COLOURS, CLASS_NAMES
from biopsy.cli import compare as compare_cli
from biopsy.cli import main
from biopsy.labelmap import colourise, read_label_map
from biopsy.model import (DEFAULT_CHECKPOINT, IMAGENET_MEAN, IMAGENET_STD, ModelInfo, build_model,
                          read_model_info, save_checkpoint, save_int8_calibration)
from biopsy.pyramid import write_pyramid
from biopsy.scorefolder import FILES
from biopsy.scoring import load_score_config
from biopsy.slide import open_slide

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_scored import MPP, paint_label_map  # noqa: E402

TINY_ARGUMENTS = {"encoder": "resnet18", "decoder_channels": [8, 8, 8, 8, 8]}


def tiny_checkpoint(path: Path, in_channels: int = 3, input_mpp: float = MPP,
                    training_config: dict | None = None) -> Path:
    """A randomly initialised U-Net over every class (small decoder), saved as a checkpoint."""
    torch.manual_seed(0)
    model = build_model("unet", len(CLASS_NAMES), in_channels, **TINY_ARGUMENTS)
    info = ModelInfo("unet", TINY_ARGUMENTS, list(CLASS_NAMES),
                     {n: list(CLASS_COLOURS[n]) for n in CLASS_NAMES}, input_mpp, 128, in_channels,
                     {"mean": list(IMAGENET_MEAN[:in_channels]) + [0.5] * (in_channels - 3),
                      "std": list(IMAGENET_STD[:in_channels]) + [0.25] * (in_channels - 3)},
                     training_config=training_config or {})
    save_checkpoint(path, model, info)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def slide_and_model(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pipeline")
    labels = paint_label_map(["normal", "global_sclerosis", "cellular_crescent"])
    slide = folder / "slide.tif"
    write_pyramid(slide, [colourise(labels, [CLASS_COLOURS[n] for n in CLASS_NAMES])],
                  labels.shape, MPP, style="generic", compression="zlib", min_level_px=64)
    return slide, tiny_checkpoint(folder / "tiny.safetensors")


def test_slides_scored_alike_are_not_flagged_and_otherwise_are(slide_and_model, tmp_path):
    """compare.processing_differences on real folders: what the pipeline records is what it reads."""
    from biopsy.scorefolder import read_score_folder

    slide, checkpoint = slide_and_model
    model, info, model_path = pipeline.load_model(checkpoint, "cpu")
    runs = {"first": (False, None), "again": (False, None), "mirrored": (True, None),
            "file's mpp by hand": (False, MPP), "other mpp": (False, MPP * 1.05)}
    for name, (tta, mpp) in runs.items():
        options = pipeline.InferenceOptions("cpu", batch_size=4, workers=0, tta=tta)
        pipeline.score_slide_file(slide, tmp_path / name, model, info, model_path,
                                  load_score_config(), mpp=mpp, options=options)
    first, again, mirrored, same_mpp, other_mpp = (read_score_folder(tmp_path / n) for n in runs)
    assert compare.processing_differences(first, again) == []
    assert compare.processing_differences(first, mirrored) == [
        "Mirror-image test-time augmentation: off at baseline, on at follow-up."]
    assert compare.processing_differences(first, same_mpp) == []  # the file's own, typed again
    assert compare.processing_differences(first, other_mpp) == [
        "Pixel size: read from the file at baseline, given by hand at follow-up."]


def test_no_tissue_is_refused_by_the_tiles_seen_not_by_class_0(slide_and_model, tmp_path):
    """Glass alone is no slide to score; but a map all of class 0 from a model without a
    background class (real-glomeruli.yaml's: tissue, tuft, sclerosis) is all tissue, and was
    refused as "no tissue"."""
    from biopsy.errors import TissueError
    from biopsy.labelmap import write_label_map

    glass = tmp_path / "glass.tif"
    write_pyramid(glass, [np.full((256, 256, 3), 242, np.uint8)], (256, 256), MPP, style="generic",
                  compression="zlib", min_level_px=64)
    model, info, model_path = pipeline.load_model(slide_and_model[1], "cpu")
    with pytest.raises(TissueError, match="glass.tif: no tissue found"):
        pipeline.score_slide_file(glass, tmp_path / "glass", model, info, model_path,
                                  load_score_config())
    all_tissue = tmp_path / "tissue.ome.tif"
    names = ("tissue", "tuft", "sclerosis")
    write_label_map(all_tissue, np.zeros((200, 200), np.uint8), MPP, names,
                    {n: CLASS_COLOURS[n] for n in names})
    scores = pipeline.score_label_map_file(all_tissue, tmp_path / "tissue", load_score_config())
    assert scores["glomeruli"]["count"] == 0


def test_slide_is_scored_into_a_complete_folder_with_provenance(slide_and_model, tmp_path):
    slide, checkpoint = slide_and_model
    options = pipeline.InferenceOptions("cpu", batch_size=4, workers=0)
    model, info, model_path = pipeline.load_model(checkpoint, "cpu")
    assert getattr(model, infer.PREPARED)  # once for every slide it scores
    scores = pipeline.score_slide_file(slide, tmp_path / "out", model, info, model_path,
                                       load_score_config(), options=options)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["scores"] == scores
    provenance = summary["provenance"]
    assert provenance["source"] == {"kind": "slide", "path": str(slide), "sha256": sha256(slide),
                                    "size_bytes": slide.stat().st_size,
                                    "mtime_ns": slide.stat().st_mtime_ns,
                                    "mpp": [MPP, MPP], "mpp_given": False,
                                    "file_mpp": [MPP, MPP]}
    assert provenance["model"]["sha256"] == sha256(checkpoint)
    assert provenance["model"]["path"] == str(checkpoint)
    assert provenance["model"]["class_names"] == list(CLASS_NAMES)
    assert provenance["model"]["input_mpp"] == MPP
    inference = provenance["inference"]
    assert (inference["device"], inference["batch_size"], inference["workers"]) == ("cpu", 4, 0)
    assert inference["tta"] is False and inference["int8"] is False
    assert inference["tiles"] > 0 and inference["packages"]["torch"] == torch.__version__
    assert inference["packages"]["tifffile"] is not None
    assert provenance["config"] == json.loads(json.dumps(load_score_config().as_dict()))
    assert summary["label_map"]["level0_mpp"] == MPP
    label_map = read_label_map(tmp_path / "out" / "labels.ome.tif")
    assert label_map.class_names == tuple(CLASS_NAMES) and label_map.mpp == MPP


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no bundled model")
def test_a_model_trained_on_synthetic_slides_warns_on_a_slide_not_synthetic(tmp_path, caplog):
    real, synthetic = tmp_path / "real" / "B1.svs", tmp_path / "synth" / "slide.svs"
    synthetic.parent.mkdir()
    (synthetic.parent / "truth.json").write_text("{}")
    bundled = read_model_info(DEFAULT_CHECKPOINT)
    save_int8_calibration(DEFAULT_CHECKPOINT, tmp_path / "copy.safetensors", {}, {})  # a copy
    with caplog.at_level("WARNING"):
        pipeline.warn_of_the_model(bundled, synthetic)
        pipeline.warn_of_the_model(read_model_info(tiny_checkpoint(tmp_path / "mine.safetensors")),
                                   real)
        assert not caplog.text
        pipeline.warn_of_the_model(read_model_info(tmp_path / "copy.safetensors"), real)
    assert "B1.svs: the model learnt from synthetic slides only" in caplog.text


def test_the_models_caution_is_kept_in_the_outputs_and_shown_in_the_reports(
        slide_and_model, tmp_path, capsys):
    """The console warning alone was lost once the run was over: a report read later showed
    the bundled model's scores of real slides as any others."""
    from biopsy.scorefolder import read_score_folder

    slide, checkpoint = slide_and_model
    model, info, model_path = pipeline.load_model(checkpoint, "cpu")
    pipeline.score_slide_file(slide, tmp_path / "own", model, info, model_path,
                              load_score_config(), options=pipeline.InferenceOptions("cpu", 4, 0))
    assert read_score_folder(tmp_path / "own").summary["provenance"]["model"]["caution"] is None
    synthetic = tiny_checkpoint(tmp_path / "synthetic.safetensors",
                                training_config={"synth": {"slides": 24}})
    for copy in ("again.tif", "alone.tif"):
        shutil.copy(slide, tmp_path / copy)
    (tmp_path / "manifest.csv").write_text(f"patient_id,timepoint,slide\nP1,pre,{slide}\n"
                                           "P1,post,again.tif\nP2,pre,alone.tif\n")  # P2: unpaired
    assert main(["batch", str(tmp_path / "manifest.csv"), "--out", str(tmp_path / "batch"),
                 "--model", str(synthetic), "--workers", "0", "--no-progress"]) == 0
    folders = sorted((tmp_path / "batch" / "slides").iterdir())  # P1's two, then P2's
    caution = read_score_folder(folders[0]).summary["provenance"]["model"]["caution"]
    assert caution.startswith("the model learnt from synthetic slides only")
    cohort = (tmp_path / "batch" / "cohort.html").read_text()
    assert "1 of 1 comparisons rest on biopsies scored with a caution" in cohort and caution in cohort
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "own"), str(folders[0]),
                 "--out", str(tmp_path / "pair")]) == 0
    assert f"warning: follow-up: {caution}" in capsys.readouterr().err
    report = (tmp_path / "pair" / "report.html").read_text()
    warning = report.split("Read these scores with care")[1].split("</div>")[0]
    assert f"Follow-up: {caution}." in warning and "Baseline" not in warning
    assert main(["segment", str(slide), "--model", str(synthetic), "--workers", "0",
                 "--out", str(tmp_path / "segmented")]) == 0
    segmented = json.loads((tmp_path / "segmented" / "segment.json").read_text())
    assert segmented["model"]["caution"] == caution


def test_score_cli_takes_a_slide_and_a_given_mpp(slide_and_model, tmp_path, capsys, monkeypatch,
                                                 caplog):
    slide, checkpoint = slide_and_model
    out = tmp_path / "out"
    augmentations = []  # (scales, tta) of each batch
    run_batch = infer.batch_probabilities
    monkeypatch.setattr(infer, "batch_probabilities",
                        lambda *args: augmentations.append((args[2], args[-1])) or run_batch(*args))
    assert main(["score", str(slide), "--model", str(checkpoint), "--out", str(out),
                 "--mpp", str(MPP), "--device", "cpu", "--workers", "0", "--tta",
                 "--scales", "1", "1.5", "--mpp-search", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert printed["glomeruli"] == summary["scores"]["glomeruli"]["count"]
    assert summary["provenance"]["source"]["mpp_given"] is False  # the file's own
    assert summary["provenance"]["inference"]["tta"] is True
    assert summary["provenance"]["inference"]["scales"] == [1.0, 1.5]
    # the slide was scored at twice its pixel size, the one factor searched, and says so
    search = summary["provenance"]["inference"]["mpp_search"]
    assert search["factors"] == [2.0] and search["factor"] == 2.0
    assert summary["provenance"]["source"]["mpp"] == [2 * MPP, 2 * MPP]
    label_map = read_label_map(out / "labels.ome.tif")
    assert summary["label_map"]["level0_mpp"] == 2 * MPP and label_map.mpp == MPP
    with open_slide(slide) as opened:  # twice the µm/px: twice the model pixels a side
        width, height = opened.dimensions
    assert label_map.labels.shape == (2 * height, 2 * width)
    # the map keeps the slide's searched pixel size, so that scoring it again places the
    # outlines on the slide (given the file's, they lay twice as far out, past its edges)
    assert label_map.slide_mpp == 2 * MPP
    again = tmp_path / "again"
    assert main(["score", "--from-labels", str(out / "labels.ome.tif"), "--out", str(again)]) == 0
    assert json.loads((again / "summary.json").read_text())["label_map"]["level0_mpp"] == 2 * MPP
    with caplog.at_level("WARNING"):
        assert main(["score", "--from-labels", str(out / "labels.ome.tif"), "--out",
                     str(tmp_path / "given"), "--mpp", str(MPP)]) == 0
    assert f"made from a slide read at {2 * MPP:.4g} µm/px; --mpp {MPP:.4g} places its " \
           "outlines and positions 2.00x as far" in caplog.text
    # the model ran with test-time augmentation: mirror images, two reading scales
    assert augmentations and set(augmentations) == {((1.0, 1.5), True)}


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    return error


def test_missing_bundled_model_says_how_to_get_one(slide_and_model, tmp_path, monkeypatch,
                                                    capsys):
    monkeypatch.setattr(pipeline, "DEFAULT_CHECKPOINT", tmp_path / "models" / "default.safetensors")
    slide, _ = slide_and_model
    assert main(["score", str(slide), "--out", str(tmp_path / "out")]) == 2
    error = one_line_error(capsys)
    assert "default.safetensors" in error and "--model" in error and "training fit" in error
    assert not (tmp_path / "out").exists()


def test_missing_model_file_is_a_one_line_error(slide_and_model, tmp_path, capsys):
    slide, _ = slide_and_model
    missing = tmp_path / "nowhere.safetensors"
    assert main(["score", str(slide), "--model", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in one_line_error(capsys)


@pytest.mark.parametrize("scales, message", [
    (["1", "0"], "--scales: '0' is not a number from 0.25 to 4"),
    (["1", "inf"], "--scales: 'inf' is not a number from 0.25 to 4"),
    (["x"], "--scales: 'x' is not a number from 0.25 to 4"),
    (["0.5", "0.7"], "--scales: one scale at least must be >= 1, got [0.5, 0.7]"),
])
def test_bad_reading_scales_are_a_usage_error(slide_and_model, tmp_path, capsys, scales, message):
    slide, checkpoint = slide_and_model
    with pytest.raises(SystemExit) as exit_status:
        main(["score", str(slide), "--model", str(checkpoint), "--out", str(tmp_path / "out"),
              "--scales", *scales])
    assert exit_status.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_model_of_other_channels_is_a_one_line_error(slide_and_model, tmp_path, capsys):
    slide, _ = slide_and_model
    checkpoint = tiny_checkpoint(tmp_path / "four.safetensors", in_channels=4)
    assert main(["score", str(slide), "--model", str(checkpoint), "--out",
                 str(tmp_path / "out"), "--workers", "0"]) == 2
    error = one_line_error(capsys)
    assert "4 channels" in error and str(slide) in error
    assert not (tmp_path / "out" / "summary.json").exists()


def test_score_needs_exactly_one_input(slide_and_model, tmp_path, capsys):
    slide, _ = slide_and_model
    assert main(["score", "--out", str(tmp_path)]) == 2
    assert "SLIDE or --from-labels" in one_line_error(capsys)
    assert main(["score", str(slide), "--from-labels", str(slide), "--out", str(tmp_path)]) == 2
    one_line_error(capsys)


def test_cli_defaults_match_the_library():
    assert compare_cli.BOOTSTRAP_REPLICATES == compare.BOOTSTRAP_REPLICATES
    assert compare_cli.BOOTSTRAP_SEED == compare.BOOTSTRAP_SEED


HEAVY_MODULES = ("torch", "biopsy.infer", "biopsy.model", "biopsy.synth.slide", "biopsy.compare",
                 "skimage")
PARSER_IMPORTS = """
import argparse, importlib, json, sys
import biopsy.cli
subparsers = argparse.ArgumentParser().add_subparsers()
heavy = {}
for name in biopsy.cli.COMMAND_MODULES:
    importlib.import_module(f"biopsy.cli.{name}").add_parser(subparsers)
    heavy[name] = [m for m in HEAVY if m in sys.modules and m not in sum(heavy.values(), [])]
biopsy.cli.build_parser()
print(json.dumps({name: modules for name, modules in heavy.items() if modules}))
"""


def test_building_the_parser_imports_no_heavy_module():
    """`biopsy --help` and `biopsy info` start fast: no command imports torch (2-8 s) up front."""
    code = f"HEAVY = {HEAVY_MODULES!r}" + PARSER_IMPORTS
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == {}, "commands that import heavy modules at import time"
