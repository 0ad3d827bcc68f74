"""``biopsy segment``: the folder it writes against the engine's map, test-time options, the
model's stain reference, a slide without tissue, and one-line errors."""

import logging

import numpy as np
import pytest
import tifffile
import torch

from biopsy.infer import segment_slide
from inference_models import model_info, write_slide

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A small random U-Net for RGB slides and one that wants 4 channels."""
    from biopsy.model import build_model, save_checkpoint

    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for channels in (3, 4):
        torch.manual_seed(0)
        arguments = {"encoder": "resnet18", "decoder_channels": [32, 16, 16, 8, 8]}
        model = build_model("unet", 3, channels, **arguments)
        info = model_info(3, mpp=2.0, patch_px=64, in_channels=channels)
        info.architecture, info.arguments = "unet", arguments
        paths[channels] = folder / f"unet-{channels}.safetensors"
        save_checkpoint(paths[channels], model, info)
    return paths


@pytest.fixture(scope="module")
def tissue_slide(tmp_path_factory):
    """Glass with a textured pink core across the middle."""
    rng = np.random.default_rng(1)
    image = np.full((1024, 1536, 3), 240, np.uint8)
    core = rng.integers(0, 60, (224, 736, 1), dtype=np.uint8)
    image[400:624, 400:1136] = np.array([225, 150, 190], np.uint8) - core
    return write_slide(tmp_path_factory.mktemp("tissue") / "tissue.tif", image, mpp=0.5)


def test_segment_command_writes_the_folder(tissue_slide, checkpoints, tmp_path):
    import json

    from PIL import Image

    from biopsy.cli import main
    from biopsy.labelmap import read_label_map
    from biopsy.model import load_checkpoint

    out = tmp_path / "out"
    assert main(["segment", str(tissue_slide.path), "--model", str(checkpoints[3]), "--out",
                 str(out), "--workers", "0", "--probabilities"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["labels.ome.tif", "objects.geojson",
                                                     "overview.png", "probabilities.ome.tif",
                                                     "segment.json"]
    label_map = read_label_map(out / "labels.ome.tif")
    model, info = load_checkpoint(checkpoints[3])
    expected = segment_slide(tissue_slide, model, info, workers=0)
    assert label_map.mpp == 2.0 and label_map.class_names == tuple(info.class_names)
    np.testing.assert_array_equal(label_map.labels, expected.labels)
    assert expected.labels[:60].max() == 0 and expected.labels[:, :60].max() == 0  # glass
    assert 0 < expected.tile_count < 7 * 11
    collection = json.loads((out / "objects.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in collection["features"]}
    assert names and names <= set(info.class_names) - {"background"}
    summary = json.loads((out / "segment.json").read_text())
    assert summary["tile_count"] == expected.tile_count > 0
    assert summary["model"]["sha256"] == info.sha256
    assert summary["slide"]["mpp_given"] is False and summary["slide"]["file_mpp"] == [0.5, 0.5]
    assert Image.open(out / "overview.png").size == (384, 256)
    with tifffile.TiffFile(out / "probabilities.ome.tif") as tif:
        probabilities = tif.series[0].asarray()
        assert len(tif.series[0].levels) == 1 and "Name=\"class2\"" in tif.ome_metadata
    assert probabilities.shape == (3, 256, 384) and probabilities.dtype == np.uint8
    assert np.all(np.abs(probabilities.sum(0, dtype=int) - 255) <= 3)  # a distribution everywhere
    assert (probabilities[0, :60] == 255).all() and not probabilities[1:, :60].any()  # glass


def test_segment_command_with_test_time_augmentation(tissue_slide, checkpoints, tmp_path):
    import json

    from biopsy.cli import main
    from biopsy.labelmap import read_label_map
    from biopsy.model import load_checkpoint

    out = tmp_path / "out"
    assert main(["segment", str(tissue_slide.path), "--model", str(checkpoints[3]), "--out",
                 str(out), "--workers", "0", "--tta"]) == 0
    assert json.loads((out / "segment.json").read_text())["options"]["tta"] is True
    model, info = load_checkpoint(checkpoints[3])
    expected = segment_slide(tissue_slide, model, info, workers=0, tta=True).labels
    np.testing.assert_array_equal(read_label_map(out / "labels.ome.tif").labels, expected)
    assert (expected != segment_slide(tissue_slide, model, info, workers=0).labels).any()


def test_segment_command_applies_the_model_stain_reference_unless_told_not_to(tissue_slide, checkpoints,
                                                                            tmp_path):
    import json

    from biopsy.cli import main
    from biopsy.labelmap import read_label_map
    from biopsy.model import load_checkpoint, save_checkpoint

    model, info = load_checkpoint(checkpoints[3])
    info.stain_reference = [3.0, 1.5]  # far darker than the slide: every stain scaled up
    normalising = tmp_path / "normalising.safetensors"
    save_checkpoint(normalising, model, info)
    for flag, reference in (([], [3.0, 1.5]), (["--no-stain-normalisation"], None)):
        out = tmp_path / f"out{len(flag)}"
        assert main(["segment", str(tissue_slide.path), "--model", str(normalising), "--out", str(out),
                     "--workers", "0", *flag]) == 0
        options = json.loads((out / "segment.json").read_text())["options"]
        assert options["stain_reference"] == reference
        factors = options["stain_factors"]
        assert factors is None if reference is None else min(factors) > 1.2
        info.stain_reference = reference
        expected = segment_slide(tissue_slide, model, info, workers=0).labels
        np.testing.assert_array_equal(read_label_map(out / "labels.ome.tif").labels, expected)


def test_segment_command_on_a_slide_without_tissue(tmp_path, caplog, capsys):
    """Also: without --model, the bundled model segments it."""
    import json

    from biopsy.cli import main
    from biopsy.labelmap import read_label_map
    from biopsy.model import DEFAULT_CHECKPOINT, read_model_info

    slide = write_slide(tmp_path / "glass.tif", np.full((512, 512, 3), 242, np.uint8), mpp=0.5)
    with caplog.at_level(logging.WARNING):
        assert main(["segment", str(slide.path), "--out", str(tmp_path / "out")]) == 0
    assert "no tissue" in caplog.text
    model = json.loads((tmp_path / "out" / "segment.json").read_text())["model"]
    assert (model["path"], model["sha256"]) == (str(DEFAULT_CHECKPOINT),
                                                read_model_info(DEFAULT_CHECKPOINT).sha256)
    assert not read_label_map(tmp_path / "out" / "labels.ome.tif").labels.any()
    assert json.loads((tmp_path / "out" / "objects.geojson").read_text())["features"] == []


@pytest.mark.parametrize("problem, expected", [("channels", "takes 4 channels"),
                                               ("unreadable", "cannot read"),
                                               ("no mpp", "pixel size unknown")])
def test_segment_command_errors_are_one_line(tissue_slide, checkpoints, tmp_path, capsys,
                                             problem, expected):
    from PIL import Image

    from biopsy.cli import main

    slide, model = tissue_slide.path, checkpoints[4 if problem == "channels" else 3]
    if problem == "unreadable":
        slide = tmp_path / "broken.svs"
        slide.write_bytes(b"II*\0" + bytes(100))
    if problem == "no mpp":
        slide = tmp_path / "photo.png"
        Image.new("RGB", (300, 200), (200, 120, 160)).save(slide)
    assert main(["segment", str(slide), "--model", str(model), "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and str(slide) in message and expected in message
    assert not (tmp_path / "out" / "segment.json").exists()


def test_a_refused_slide_leaves_an_earlier_run_whole(tissue_slide, checkpoints, tmp_path):
    """The model's check ran after the folder was marked unfinished: an earlier, valid run's
    segment.json was gone."""
    from biopsy.cli import main

    out = tmp_path / "out"
    assert main(["segment", str(tissue_slide.path), "--model", str(checkpoints[3]), "--out",
                 str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["segment", str(tissue_slide.path), "--model", str(checkpoints[4]), "--out",
                 str(out)]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_sigterm_unwinds_like_ctrl_c_and_a_later_run_sweeps_what_kill_9_left(
        tissue_slide, checkpoints, tmp_path, monkeypatch, capsys):
    """SIGTERM (timeout, SLURM, docker stop) left the hidden temporary label map behind."""
    import os
    import signal
    import subprocess

    from biopsy import infer
    from biopsy.atomic import atomic_path
    from biopsy.cli import main

    def terminated_while_writing(*args, labels_path, **kwargs):
        with atomic_path(labels_path) as temporary:
            temporary.write_bytes(b"half a label map")
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "out"
    with monkeypatch.context() as patched:
        patched.setattr(infer, "segment_slide", terminated_while_writing)
        assert main(["segment", str(tissue_slide.path), "--model", str(checkpoints[3]),
                     "--out", str(out)]) == 128 + signal.SIGTERM
    assert "segment: terminated" in capsys.readouterr().err
    assert not out.exists()  # the folder it made, left empty
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the CLI's alone
    out.mkdir()
    ended = subprocess.Popen(["true"])
    ended.wait()  # a process id no longer running
    (out / f".labels.tmp-{ended.pid}.ome.tif").write_bytes(b"left by kill -9")
    (out / f".labels.ome.tif.spool-{ended.pid}-abc").mkdir()
    kept = [f".labels.tmp-{os.getppid()}.ome.tif",  # another writer, still running
            ".my-notes.tmp-1.txt", f".notes.ome.tif.spool-{ended.pid}-x"]  # not ours
    for name in kept:
        (out / name).write_bytes(b"")
    assert main(["segment", str(tissue_slide.path), "--model", str(checkpoints[3]), "--out",
                 str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == sorted(kept)


@pytest.mark.parametrize("command", ["segment", "score"])
def test_non_square_pixels_are_refused_where_outputs_are_in_level0_pixels(tmp_path, capsys, command):
    """0.5 x 0.6 µm pixels: the map was right, objects.geojson's y 20 % too large. --mpp, when the
    file's size is wrong, makes them square."""
    from biopsy.cli import main

    path = tmp_path / "anisotropic.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), tile=(32, 32),
                     resolution=(1e4 / 0.5, 1e4 / 0.6), resolutionunit="CENTIMETER")
    assert main([command, str(path), "--out", str(tmp_path / "out")]) == 2
    assert "pixels are not square (0.5 x 0.6 µm)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["segment", str(path), "--mpp", "0.5", "--out", str(tmp_path / "out")]) == 0
