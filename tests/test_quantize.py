"""Int8 inference (biopsy.quantize): calibrated once, stored in the checkpoint, close to float32."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from biopsy import model as model_module
from biopsy.cli import main
from biopsy.infer import segment_slide
from biopsy.labelmap import read_label_map
from biopsy.model import (DEFAULT_CHECKPOINT, load_checkpoint, read_int8_calibration,
                          save_checkpoint)
from biopsy.pyramid import write_pyramid
from biopsy.quantize import calibrate, quantized_model
from biopsy.slide import open_slide
from biopsy.synth import LesionProfile, generate_slide

PROFILE = LesionProfile(name="int8", glomeruli=4, core_length_mm=1.0, core_width_mm=0.8, seed=31)
pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="no bundled model")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The bundled model calibrated on a PAS slide by ``biopsy calibrate``, and a slide in
    another stain and layout to segment."""
    folder = tmp_path_factory.mktemp("int8")
    generate_slide(PROFILE, folder / "pas")
    generate_slide(replace(PROFILE, stain="he", seed=42), folder / "he")
    checkpoint = folder / "int8.safetensors"
    assert main(["calibrate", str(folder / "pas" / "slide.svs"), "--out", str(checkpoint),
                 "--tiles-per-slide", "16"]) == 0
    return checkpoint, folder / "he"


def test_int8_model_agrees_with_float32_on_a_slide_it_was_not_calibrated_on(calibrated):
    checkpoint, other = calibrated
    model, info = load_checkpoint(checkpoint)
    int8 = quantized_model(model, info, read_int8_calibration(checkpoint))
    truth = read_label_map(other / "labels.ome.tif").labels
    tissue = truth != 0
    float32 = segment_slide(open_slide(other / "slide.svs"), model, info).labels
    quantized = segment_slide(open_slide(other / "slide.svs"), int8, info).labels
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in int8.modules())
    # measured: 0.997 agreement; accuracy against the truth 0.979 (float32), 0.978 (int8)
    assert (quantized == float32)[tissue].mean() > 0.99
    assert (quantized == truth)[tissue].mean() > (float32 == truth)[tissue].mean() - 0.005


def test_calibration_is_stored_beside_the_weights_as_they_were(calibrated):
    checkpoint, _ = calibrated
    original, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    model, info = load_checkpoint(checkpoint)
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert info.int8_calibration["tiles"] == 16
    assert info.int8_calibration["slides"][0].endswith("slide.svs")
    assert info.sha256 != load_checkpoint(DEFAULT_CHECKPOINT)[1].sha256


def test_stored_calibration_rebuilds_the_same_int8_model(calibrated):
    checkpoint, other = calibrated
    model, info = load_checkpoint(DEFAULT_CHECKPOINT)
    slide = open_slide(other / "slide.svs")
    fresh, _ = calibrate(model, info, [open_slide(checkpoint.parent / "pas" / "slide.svs")], 16)
    tiles = torch.from_numpy(np.stack([slide.read(1000, 1000, (256, 256), 1.0)]))
    inputs = info.normalise(tiles).contiguous()
    with torch.inference_mode():
        stored = quantized_model(model, info, read_int8_calibration(checkpoint))(inputs)
        rebuilt = quantized_model(model, info, fresh)(inputs)
    assert torch.equal(stored, rebuilt)


def test_segment_command_runs_int8(calibrated, tmp_path, capsys):
    checkpoint, other = calibrated
    assert main(["segment", str(other / "slide.svs"), "--model", str(checkpoint), "--out",
                 str(tmp_path / "out"), "--int8"]) == 0
    assert (tmp_path / "out" / "labels.ome.tif").is_file()
    assert '"int8": true' in (tmp_path / "out" / "segment.json").read_text()


def test_score_command_runs_the_bundled_model_in_int8(calibrated, tmp_path):
    _, other = calibrated
    assert main(["score", str(other / "slide.svs"), "--out", str(tmp_path / "scored"),
                 "--int8"]) == 0
    summary = json.loads((tmp_path / "scored" / "summary.json").read_text())
    assert summary["provenance"]["inference"]["int8"] is True
    assert summary["provenance"]["inference"]["device"] == "cpu"
    assert summary["scores"]["glomeruli"]["count"] == 4


@pytest.mark.parametrize("extra, message", [
    ([], "no int8 calibration in this checkpoint"),
    (["--device", "cuda"], "--int8 runs on the CPU"),
])
def test_int8_errors_are_one_line(calibrated, tmp_path, capsys, extra, message):
    _, other = calibrated
    model, info = load_checkpoint(DEFAULT_CHECKPOINT)
    save_checkpoint(tmp_path / "uncalibrated.safetensors", model, info)
    assert main(["segment", str(other / "slide.svs"), "--model",
                 str(tmp_path / "uncalibrated.safetensors"), "--out", str(tmp_path / "out"),
                 "--int8"] + extra) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_calibration_without_tissue_is_an_error(tmp_path, capsys):
    glass = np.full((512, 512, 3), 242, np.uint8)
    write_pyramid(tmp_path / "glass.tif", [glass], glass.shape[:2], 0.5, style="generic",
                  compression="zlib", min_level_px=64)
    assert main(["calibrate", str(tmp_path / "glass.tif"), "--out",
                 str(tmp_path / "out.safetensors")]) == 2
    assert "no tissue" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_calibrate_takes_the_pixel_size_of_images_without_one(real_glomeruli, tmp_path, capsys):
    image = real_glomeruli / "images" / "20180023-PASM.jpg"
    out = tmp_path / "out.safetensors"
    assert main(["calibrate", str(image), "--out", str(out), "--tiles-per-slide", "2"]) == 2
    assert "give it with --mpp" in capsys.readouterr().err
    assert main(["calibrate", str(image), "--mpp", "0.5", "--out", str(out),
                 "--tiles-per-slide", "2"]) == 0
    assert read_int8_calibration(out)


def test_a_checkpoint_that_cannot_be_written_is_a_one_line_error(svs_path, tmp_path, capsys,
                                                                 monkeypatch):
    """As in a read-only folder (root, who runs the tests, may write anywhere)."""
    def refuse(*args, **kwargs):
        raise SafetensorError("Permission denied (os error 13)")

    monkeypatch.setattr(model_module, "save_file", refuse)
    out = tmp_path / "out.safetensors"
    assert main(["calibrate", str(svs_path), "--out", str(out), "--tiles-per-slide", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert f"{out}: cannot write the checkpoint (Permission denied" in error and "\n" not in error
    assert not list(tmp_path.iterdir())
