"""The segmentation benchmark's large-slide path: the mosaic slide and ours streamed on it."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch

from biopsy.classes import CLASS_COLOURS, CLASS_NAMES
from biopsy.infer import segment_slide
from biopsy.labelmap import read_label_map
from biopsy.model import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, build_model, load_checkpoint, save_checkpoint
from biopsy.pyramid import write_pyramid
from biopsy.slide import open_slide

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from segment_inputs import make_large_slide, mosaic_bands  # noqa: E402
from segment_runners import run_parts  # noqa: E402

SOURCE_SHAPE_PX = (700, 1000)  # (height, width) at 0.5 µm/px: a 350 x 500 µm piece of glass
LARGE_PX = 1600


def core_image(seed: int = 0) -> np.ndarray:
    """White glass with a textured pink ellipse of tissue (~300 x 450 µm)."""
    height, width = SOURCE_SHAPE_PX
    rows, cols = np.ogrid[:height, :width]
    inside = ((rows - height / 2) / 300) ** 2 + ((cols - width / 2) / 450) ** 2 < 1
    noise = np.random.default_rng(seed).integers(-25, 25, (height, width, 1))
    tissue = np.clip(np.array([205, 120, 175]) + noise, 0, 255)
    return np.where(inside[..., None], tissue, 245).astype(np.uint8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a CPU shared with other jobs, two spinning threads run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def large_slide(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mosaic")
    source = folder / "source.svs"
    write_pyramid(source, [core_image()], SOURCE_SHAPE_PX, 0.5, style="aperio", min_level_px=64)
    return make_large_slide(folder / "large" / "slide.svs", LARGE_PX, source)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small random U-Net on 64 px tiles at 2 µm/px (a 12 x 12 tile grid on the large slide)."""
    path = tmp_path_factory.mktemp("model") / "toy.safetensors"
    arguments = {"encoder": "resnet18", "decoder_channels": [16, 8, 8, 8, 8]}
    model = build_model("unet", len(CLASS_NAMES), 3, **arguments)
    info = ModelInfo("unet", arguments, list(CLASS_NAMES),
                     {name: list(colour) for name, colour in CLASS_COLOURS.items()}, 2.0, 64, 3,
                     {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    save_checkpoint(path, model, info)
    return path


@pytest.fixture(scope="module")
def reference(large_slide, checkpoint):
    """Ours on the large slide, the map in memory."""
    model, info = load_checkpoint(checkpoint)
    return segment_slide(open_slide(large_slide), model, info, workers=0)


def test_mosaic_bands_tile_the_source_from_the_top_left():
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    bands = list(mosaic_bands(image, 600))
    assert [len(band) for band in bands] == [256, 256, 88]
    np.testing.assert_array_equal(np.concatenate(bands), np.tile(image, (120, 86, 1))[:600, :600])


def test_large_slide_is_an_aperio_pyramid_of_source_copies(large_slide):
    slide = openslide.OpenSlide(str(large_slide))
    assert slide.properties["openslide.vendor"] == "aperio"
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
    assert slide.dimensions == (LARGE_PX, LARGE_PX)
    assert len(slide.level_dimensions) >= 2
    region = np.asarray(slide.read_region((0, 0), 0, (LARGE_PX, LARGE_PX)).convert("RGB"))
    expected = np.tile(core_image(), (3, 2, 1))[:LARGE_PX, :LARGE_PX]
    assert np.abs(region.astype(int) - expected).mean() < 6  # JPEG q90 on noisy tissue
    written = large_slide.stat().st_mtime_ns
    make_large_slide(large_slide, LARGE_PX, large_slide)  # cached: not rebuilt
    assert large_slide.stat().st_mtime_ns == written


def test_large_run_streams_the_map_segment_slide_makes(large_slide, checkpoint, reference,
                                                         tmp_path):
    """The ``large`` runner, through the benchmark's child entry point, writes to labels.ome.tif
    the very map that segment_slide returns in memory."""
    labels_out = tmp_path / "labels.ome.tif"
    command = [sys.executable, str(BENCHMARKS / "segment.py"), "--child", "large",
               "--slide", str(large_slide), "--model", str(checkpoint),
               "--labels-out", str(labels_out), "--device", "cpu", "--batch-size", "16",
               "--workers", "0", "--work-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["tiles"] == reference.tile_count
    assert 0 < result["tiles"] < result["grid tiles"] == 12**2  # 400 px at 2 µm/px, step 32
    assert 0.2 < result["tissue fraction"] < 0.8
    assert 0 < result["tile loop seconds"] < result["seconds"]
    np.testing.assert_array_equal(read_label_map(labels_out).labels, reference.labels)


@pytest.mark.parametrize("large_px", [None, LARGE_PX])
def test_parts_time_every_stage_over_the_tissue_tiles(large_slide, checkpoint, reference,
                                                      tmp_path, large_px):
    arguments = Namespace(device="cpu", batch_size=16, workers=0, large_px=large_px,
                          labels_out=tmp_path / "none.npy")
    parts = run_parts(large_slide, checkpoint, arguments)
    assert parts["tiles"] == reference.tile_count
    stages = ["tissue detection", "tile reading", "transfer",
              "model (pre-decoded tiles on device)", "stitching", "label map writing"]
    stages += ["stain measurement"] if large_px else []  # what the --large-px run does too
    assert sorted(parts) == sorted(stages + ["tiles"])
    assert all(parts[stage] >= 0 for stage in stages)
    assert parts["model (pre-decoded tiles on device)"] > parts["transfer"]
    written = read_label_map(tmp_path / "none.ome.tif")
    assert written.labels.shape == reference.labels.shape and written.mpp == reference.mpp


def test_table_compares_each_method_with_ours_and_projects_only_when_asked(tmp_path, capsys):
    from segment import print_table
    from segment_inputs import make_slide

    slide = make_slide(tmp_path / "synth", 1, 0.6, 0.4)
    truth = read_label_map(slide.parent / "labels.ome.tif")
    wrong = np.where(truth.labels == 0, 1, 0).astype(np.uint8)  # every pixel's class changed
    results = {"ours": {"seconds": 2.0, "tiles": 10, "peak_mib": 100.0},
               "naive": {"seconds": 8.0, "tiles": 40, "peak_mib": 50.0},
               "monai": {"error": "exit 1: no monai"}}
    labels = {"ours": truth.labels, "naive": wrong}
    print_table(results, labels, slide, truth.mpp, 256)
    table = capsys.readouterr().out
    assert "| ours | 2.0 | 10 | 5.00 | 100 | 1.0000 | 1.000 | 1.00x |" in table
    assert "| naive | 8.0 | 40 | 5.00 | 50 | 0.0000 | 0.000 | 4.00x |" in table
    assert "| monai | failed: exit 1: no monai |" in table
    assert "projected for a 60,000 x 60,000 px slide" in table
    print_table(results, labels, slide, truth.mpp, 256, project=False)
    assert "projected" not in capsys.readouterr().out
