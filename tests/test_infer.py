"""Stitched whole-slide inference: against MONAI, seam-free, band-streamed, clear errors."""

import copy
import logging
import os
import platform
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import biopsy.infer
from biopsy.errors import CheckpointError
from biopsy.infer import (default_workers, emulates_bf16, prepare_model, segment_slide,
                          segment_slide_bands)
from biopsy.model import build_model
from biopsy.pipeline import InferenceOptions, inference_options
from biopsy.slide import open_slide
from biopsy.stitch import BandStitcher
from biopsy.subpixel import inference_unet
from biopsy.tile_views import batch_probabilities
from cuda_syncs import cuda_syncs
from inference_models import (all_tissue, check_positions, constant_model, model_info,
                              position_image, random_cnn, tissue_mask, write_slide)


@pytest.fixture(scope="module")
def noise_slide(tmp_path_factory):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    return write_slide(tmp_path_factory.mktemp("noise") / "noise.tif", image, mpp=1.0)


@pytest.fixture(scope="module")
def position_slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("position") / "position.tif",
                       position_image(1000, 1280), mpp=0.5)


def test_matches_monai_gaussian_sliding_window(noise_slide):
    from monai.inferers import sliding_window_inference

    model, info = random_cnn(5), model_info(5, mpp=1.0, patch_px=64)
    ours = segment_slide(noise_slide, model, info, workers=0, batch_size=8,
                         tissue=all_tissue(noise_slide),
                         return_probabilities=True)
    image = torch.from_numpy(noise_slide.read(0, 0, (420, 300), 1.0))[None]
    with torch.no_grad():
        theirs = sliding_window_inference(info.normalise(image), (64, 64), 8,
                                          lambda x: model(x).softmax(1), overlap=0.5,
                                          mode="gaussian", sigma_scale=0.125)[0].numpy()
    assert ours.labels.shape == (300, 420) and ours.tile_count == 9 * 13
    assert (ours.labels == theirs.argmax(0)).mean() >= 0.999
    assert np.abs(ours.probabilities - theirs * 255).max() <= 1


def test_tiles_nearest_to_tissue_give_monais_map_on_tissue(noise_slide):
    """Only the tiles nearest to some tissue run (about half here), yet the labelled pixels (the
    tissue mask dilated by one pixel) get MONAI's map over the whole image."""
    from monai.inferers import sliding_window_inference

    model, info = random_cnn(5), model_info(5, mpp=1.0, patch_px=64)
    rows, cols = np.ogrid[:30, :42]
    tissue = tissue_mask(((rows - 15) / 9) ** 2 + ((cols - 21) / 14) ** 2 < 1, 10.0, noise_slide)
    ours = segment_slide(noise_slide, model, info, workers=0, tissue=tissue)
    image = torch.from_numpy(noise_slide.read(0, 0, (420, 300), 1.0))[None]
    with torch.no_grad():
        theirs = sliding_window_inference(info.normalise(image), (64, 64), 8,
                                          lambda x: model(x).softmax(1), overlap=0.5,
                                          mode="gaussian", sigma_scale=0.125)[0].argmax(0).numpy()
    labelled = np.kron(tissue.near().mask, np.ones((10, 10), bool))[:300, :420]
    assert ours.tile_count < 0.6 * 9 * 13
    assert (ours.labels == theirs)[labelled].mean() >= 0.9999
    assert (ours.labels[~labelled] == 0).all()


def test_batchnorm_folding_keeps_the_unet_outputs():
    torch.manual_seed(0)
    model = build_model("unet", 4, 3, encoder="resnet18", decoder_channels=[32, 16, 16, 8, 8]).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # trained-like statistics, not the identity
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    image = torch.rand(2, 3, 96, 128)
    folded = prepare_model(model, torch.device("cpu"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the caller's model is kept
    with torch.inference_mode():
        expected, got = model(image), folded(image.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_prepared_model_is_prepared_once_and_the_callers_model_each_time(noise_slide,
                                                                          monkeypatch):
    model = build_model("unet", 4, 3, encoder="resnet18", decoder_channels=[32, 16, 16, 8, 8])
    prepared = prepare_model(model, torch.device("cpu"))
    copies = []
    monkeypatch.setattr(biopsy.infer, "inference_unet",
                        lambda unet: copies.append(unet) or inference_unet(unet))
    assert prepare_model(prepared, torch.device("cpu")) is prepared
    copied = copy.deepcopy(prepared)  # a copy of a prepared model is prepared too
    assert prepare_model(copied, torch.device("cpu")) is copied
    assert prepare_model(model, torch.device("cpu")) is not prepared  # the caller's: copied again
    assert copies == [model]
    # a model that torch.fx cannot fold is the caller's own: put in eval mode each time
    untraceable = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout())
    monkeypatch.setattr(biopsy.infer, "fuse", lambda module: 1 / 0)
    assert prepare_model(untraceable, torch.device("cpu")) is untraceable
    untraceable.train()
    assert not prepare_model(untraceable, torch.device("cpu")).training
    # a prepared model gives the map of the model it was made from
    info = model_info(4, mpp=1.0, patch_px=64)
    options = {"workers": 0, "tissue": all_tissue(noise_slide)}
    np.testing.assert_array_equal(segment_slide(noise_slide, prepared, info, **options).labels,
                                  segment_slide(noise_slide, model, info, **options).labels)


def test_worker_processes_give_the_same_map(noise_slide):
    model, info = random_cnn(5), model_info(5, mpp=1.0, patch_px=64)
    in_process = segment_slide(noise_slide, model, info, workers=0, tissue=all_tissue(noise_slide))
    in_workers = segment_slide(noise_slide, model, info, workers=2, tissue=all_tissue(noise_slide))
    np.testing.assert_array_equal(in_process.labels, in_workers.labels)


def test_tiles_are_read_in_process_on_a_cpu_and_by_workers_on_cuda(noise_slide, monkeypatch):
    """On a CPU the model's threads take every core: by default no reading workers beside them."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert (default_workers("cpu"), default_workers("cuda"), default_workers("cuda:1")) == (0, 8, 8)
    assert inference_options("cpu").workers == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert inference_options("cuda").workers == inference_options().workers == 8
    assert (InferenceOptions("cuda").workers, InferenceOptions().workers) == (8, 0)
    started = []
    monkeypatch.setattr(biopsy.infer, "_start_reading",
                        lambda blocks, workers, device: started.append(workers) or iter(blocks))
    segment_slide(noise_slide, random_cnn(5), model_info(5, mpp=1.0, patch_px=64),
                  tissue=all_tissue(noise_slide))
    assert started == [0]


def test_compiled_model_gives_the_same_map_on_cpu(noise_slide):
    """``--compile`` (torch.compile, inductor on the CPU) changes the speed, not the map."""
    model, info = random_cnn(5), model_info(5, mpp=1.0, patch_px=64)
    plain = segment_slide(noise_slide, model, info, workers=0, tissue=all_tissue(noise_slide))
    compiled = segment_slide(noise_slide, model, info, workers=0, tissue=all_tissue(noise_slide),
                             compile=True)
    assert (compiled.labels == plain.labels).mean() > 0.999


def test_constant_model_gives_a_constant_map(noise_slide):
    info = model_info(4, mpp=1.5, patch_px=48)
    result = segment_slide(noise_slide, constant_model(4, 2), info, workers=0,
                           tissue=all_tissue(noise_slide))
    assert result.labels.shape == (200, 280) and result.mpp == 1.5
    assert np.all(result.labels == 2)


@pytest.mark.parametrize("threshold, expected", [(None, 0), (0.5, 1), (0.7, 0)])
def test_the_stitched_map_decides_glomerulus_first_where_the_model_says(noise_slide, threshold,
                                                                         expected):
    """Probabilities tissue 0.4, tuft 0.3, sclerosis 0.3 everywhere: the argmax is tissue, but
    the glomerular classes together hold 0.6."""
    info = model_info(3, mpp=1.5, patch_px=48)
    info.class_names, info.glomerulus_threshold = ["tissue", "tuft", "sclerosis"], threshold
    model = nn.Conv2d(3, 3, 1)
    nn.init.zeros_(model.weight)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([0.4, 0.3, 0.3]).log())
    result = segment_slide(noise_slide, model.eval(), info, workers=0,
                           tissue=all_tissue(noise_slide))
    assert np.all(result.labels == expected)


@pytest.mark.parametrize("model_mpp, output_mpp", [(1.0, None), (1.5, None), (1.0, 2.5)])
def test_positions_are_right_across_tiles_and_pyramid_levels(position_slide, model_mpp, output_mpp):
    """Model mpp 1.0 reads pyramid level 1 as is, 1.5 resamples it; 2.5 is a coarser output."""
    check_positions(position_slide, model_mpp, output_mpp, workers=0, batch_size=4)


@pytest.mark.gpu
def test_positions_on_cuda_with_bf16_pinned_workers_and_compile(position_slide):
    check_positions(position_slide, 1.5, None, workers=2, batch_size=16, device="cuda",
                    compile=True)
    check_positions(position_slide, 1.5, None, workers=2, batch_size=16, device="cuda",
                    scales=(1.0, 1.5), tta=True)


@pytest.mark.gpu
def test_the_tile_loop_never_waits_for_the_gpu(position_slide):
    """On CUDA the host queues tiles without waiting for the device: four times the tissue (the
    tile rows, batches and bands) calls no more synchronising operations (the set-up's only)."""
    info = model_info(4, mpp=1.0, patch_px=32)

    def run(tissue_rows: int) -> int:
        mask = np.zeros((50, 64), bool)  # 10 µm/px over the 500 x 640 µm slide
        mask[:tissue_rows] = True
        return cuda_syncs(segment_slide, position_slide, random_cnn(4), info, batch_size=8,
                          workers=0, device="cuda", tissue=tissue_mask(mask, 10.0, position_slide))

    run(50)  # once-only set-up (cached constants, cuDNN's choices)
    assert run(12) == run(48)


def test_test_time_augmentation_keeps_positions_across_tiles(position_slide):
    """A 1x1 convolution commutes with mirroring: with every mirror image flipped back, the map
    is the right one (a tile left mirrored would put the stripes in the wrong order)."""
    check_positions(position_slide, 1.5, None, workers=0, batch_size=4, tta=True)


def test_test_time_augmentation_makes_a_model_mirror_equivariant():
    """Averaged over the tile and its mirror images, a model's probabilities of a mirrored tile are
    the mirrored probabilities of the tile, though the model's own are not."""
    model, autocast = random_cnn(3), torch.autocast("cpu", enabled=False)
    batch = torch.randn(2, 3, 32, 32)
    for dims in ((3,), (2,), (2, 3)):
        mirrored = batch_probabilities(model, [batch.flip(dims)], (1.0,), autocast, 32, tta=True)
        expected = batch_probabilities(model, [batch], (1.0,), autocast, 32, tta=True).flip(dims)
        torch.testing.assert_close(mirrored, expected)
        plain = batch_probabilities(model, [batch.flip(dims)], (1.0,), autocast, 32, tta=False)
        unmirrored = batch_probabilities(model, [batch], (1.0,), autocast, 32, tta=False)
        assert (plain - unmirrored.flip(dims)).abs().max() > 0.01
    single = batch_probabilities(model, [batch], (1.0,), autocast, 32, tta=True)
    torch.testing.assert_close(single.sum(dim=1), torch.ones(2, 32, 32))


def test_only_tissue_tiles_are_read_and_glass_is_background(position_slide, monkeypatch):
    reads = []
    read = position_slide.read
    monkeypatch.setattr(position_slide, "read", lambda *a, **k: reads.append(a) or read(*a, **k))
    mask = np.zeros((100, 128), bool)  # 5 µm/px over the 500 x 640 µm slide
    mask[10:20, 30:40] = True  # level-0 x 300..400, y 100..200
    info = model_info(4, mpp=1.0, patch_px=64)
    result = segment_slide(position_slide, constant_model(4, 3), info, workers=0,
                           tissue=tissue_mask(mask, 5.0, position_slide))
    # the tissue dilated by one 5 µm mask pixel is y 45..105, x 145..205 at 1 µm/px; a tile's own
    # cell is its central [start + 16, start + 48) (from 0 for the first tile): 3 x 2 cells touch it
    assert result.tile_count == 3 * 2
    read_px, tiles_px = np.zeros((2, 500, 640), bool)  # the slide at 1 µm/px
    for x, y, (width, height), _ in reads:  # level-0 at 0.5 µm/px
        read_px[round(y / 2) : round(y / 2) + height, round(x / 2) : round(x / 2) + width] = True
    for row in (0, 32, 64):
        for col in (128, 160):
            tiles_px[row : row + 64, col : col + 64] = True
    np.testing.assert_array_equal(read_px, tiles_px)  # those tiles' pixels and no others
    near_tissue = np.zeros_like(result.labels, bool)
    near_tissue[45:105, 145:205] = True
    np.testing.assert_array_equal(result.labels, np.where(near_tissue, 3, 0))


def test_stitcher_finishes_rows_as_tiles_arrive_in_bounded_memory():
    """On a tall grid the buffer holds one patch of rows; rows come back as soon as no tile
    can touch them, and the blend of constant tiles is exact."""
    patch, step, height, width = 32, 16, 400, 80
    stitcher = BandStitcher(["a", "b", "c"], (height, width), 1.0, (height, width), 1.0, patch, 0)
    done = 0
    for row in list(range(0, height - patch, step)) + [height - patch]:
        probabilities = torch.zeros(4, 3, patch, patch)
        probabilities[:, 1] = 1
        origins = np.array([[row, col] for col in (0, 16, 32, 48)])
        bands = stitcher.add(probabilities, origins)
        done += sum(len(band.labels) for band in bands)
        assert done == row  # every row above the new tile row is finished
        assert stitcher.sums.shape == (4, patch, width)
    done += sum(len(band.labels) for band in stitcher.finish())
    assert done == height


def test_stitcher_sets_pixels_outside_tissue_to_background():
    """Output pixels whose nearest tissue-mask pixel is off are background, with probability 1
    for it and 0 for the rest (mask, grid and output at three pixel sizes); the rest keep the
    blend."""
    patch, height, width = 32, 96, 128  # grid at 1 µm/px; output at 1.5, mask at 8
    mask = np.zeros((12, 16), bool)
    mask[2:9, 3:11] = True
    stitcher = BandStitcher(["background", "a", "b"], (height, width), 1.0, (64, 85), 1.5, patch,
                            0, keep_probabilities=True, tissue_mask=mask, tissue_mpp=8.0)
    probabilities = torch.zeros(1, 3, patch, patch)
    probabilities[:, 2] = 1
    bands = []
    for row in range(0, height - patch + 1, patch):
        origins = np.array([[row, col] for col in range(0, width - patch + 1, patch)])
        bands += stitcher.add(probabilities.expand(len(origins), -1, -1, -1), origins)
    bands += stitcher.finish()
    labels = np.concatenate([band.labels for band in bands])
    kept = np.concatenate([band.probabilities for band in bands], axis=1)
    centres_row = ((np.arange(64) + 0.5) * 1.5 / 8).astype(int)  # the mask pixel under each
    centres_col = ((np.arange(85) + 0.5) * 1.5 / 8).astype(int)
    inside = mask[np.ix_(centres_row, centres_col)]
    np.testing.assert_array_equal(labels, np.where(inside, 2, 0))
    np.testing.assert_array_equal(kept[2], np.where(inside, 255, 0))
    np.testing.assert_array_equal(kept[0], np.where(inside, 0, 255))
    assert not kept[1].any()


class _CopyInFlight:
    """Stands in for a CUDA event: its copy completes when the test says."""

    def __init__(self):
        self.done = False
        self.waited = False

    def query(self):
        return self.done

    def synchronize(self):
        self.waited, self.done = True, True


def test_stitcher_hands_bands_back_in_order_once_copied(monkeypatch):
    """A band comes back only when it and every band before it have reached the host; at most
    MAX_PENDING_BANDS wait, beyond that the oldest is waited for; finish waits for all. Copied
    bands come back in memory of their own (not the pinned buffers the copies went to)."""
    import biopsy.stitch as stitch

    monkeypatch.setattr(stitch, "MAX_PENDING_BANDS", 2)
    stitcher = BandStitcher(["a", "b"], (64, 32), 1.0, (64, 32), 1.0, 32, 0)
    events = [_CopyInFlight() for _ in range(4)]
    bands = [stitch.Band(np.full((1, 32), k, np.uint8), None) for k in range(5)]
    def handed_back(**options):  # the numbers of the bands handed back
        return [int(band.labels[0, 0]) for band in stitcher._copied_bands(**options)]

    stitcher.pending.extend([(events[0], bands[0]), (None, bands[1])])
    assert handed_back() == []  # the first copy still runs: nothing, not band 1 either
    events[0].done = True
    assert handed_back() == [0, 1]
    stitcher.pending.extend([(events[1], bands[2]), (events[2], bands[3]), (events[3], bands[4])])
    assert handed_back() == [2]  # three held: the oldest is waited for
    assert events[1].waited and not events[2].waited
    assert handed_back(wait=True) == [3, 4] and not stitcher.pending
    assert events[3].waited and not events[0].waited  # waited for only when not yet done
    stitcher.pending.append((events[0], bands[0]))
    copy = stitcher._copied_bands()[0]  # in memory of its own, not the pinned buffer
    assert np.array_equal(copy.labels, bands[0].labels)
    assert not np.shares_memory(copy.labels, bands[0].labels)


def test_bands_stream_top_to_bottom(position_slide):
    info = model_info(4, mpp=2.0, patch_px=32)
    grid, bands = segment_slide_bands(position_slide, constant_model(4, 1), info, workers=0,
                                      tissue=all_tissue(position_slide), output_mpp=4.0)
    heights = [len(band.labels) for band in bands]
    assert len(heights) > 5 and sum(heights) == 125 and len(grid) == 15 * 19


def test_slide_without_tissue_gives_background_and_a_warning(noise_slide, caplog):
    empty = tissue_mask(np.zeros((30, 42), bool), 10.0, noise_slide)
    with caplog.at_level(logging.WARNING):
        result = segment_slide(noise_slide, random_cnn(3), model_info(3, 1.0, 64), workers=0,
                               tissue=empty, return_probabilities=True)
    assert "no tissue" in caplog.text
    assert result.tile_count == 0 and result.labels.shape == (300, 420)
    assert not result.labels.any() and (result.probabilities[0] == 255).all()
    assert not result.probabilities[1:].any()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or platform.machine() != "x86_64",
                    reason="reads the x86 CPU flags of Linux")
def test_bf16_counts_as_emulated_where_the_cpu_flags_lack_bf16_instructions():
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[1].split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert emulates_bf16("cpu") is not native and emulates_bf16(torch.device("cpu")) is not native
    assert not emulates_bf16("cuda")


def test_bf16_on_a_cpu_that_emulates_it_is_a_warning(noise_slide, caplog, monkeypatch):
    monkeypatch.setattr(biopsy.infer, "emulates_bf16", lambda device: True)
    empty = tissue_mask(np.zeros((30, 42), bool), 10.0, noise_slide)
    with caplog.at_level(logging.WARNING):
        segment_slide(noise_slide, random_cnn(3), model_info(3, 1.0, 64), workers=0, tissue=empty)
        assert "bf16" not in caplog.text
        segment_slide(noise_slide, random_cnn(3), model_info(3, 1.0, 64), workers=0, tissue=empty,
                      bf16=True)
    assert "no bfloat16 instructions" in caplog.text and "10x slower" in caplog.text


def test_channel_mismatch_is_a_clear_error(noise_slide):
    with pytest.raises(CheckpointError, match="takes 4 channels, the slide has 3"):
        segment_slide(noise_slide, random_cnn(3), model_info(3, 1.0, 64, in_channels=4),
                      tissue=all_tissue(noise_slide))


def test_a_brightfield_slide_and_a_fluorescence_model_are_refused(noise_slide):
    info = replace(model_info(3, 1.0, 64), fluorescence=True)
    with pytest.raises(CheckpointError, match="a brightfield slide, and the model was trained on "
                                              "fluorescence slides"):
        segment_slide(noise_slide, random_cnn(3), info, tissue=all_tissue(noise_slide))


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "batch_size must be a whole number >= 1"),  # divided by zero
    ({"batch_size": 2.5}, "batch_size must be a whole number >= 1"),
    ({"output_mpp": -1.0}, "output_mpp must be from 0.05 to 20"),  # a 1 x 1 map at -1 µm/px
    ({"output_mpp": float("nan")}, "output_mpp must be from 0.05 to 20"),
    ({"output_mpp": 0.0}, "output_mpp must be from 0.05 to 20"),  # quietly the model's
])
def test_options_out_of_range_are_refused(noise_slide, options, message):
    with pytest.raises(ValueError, match=message):
        segment_slide(noise_slide, random_cnn(3), model_info(3, 1.0, 64), **options)


@pytest.mark.parametrize("output_mpp", [1.0, 0.25])
def test_the_map_and_probabilities_are_written_as_they_are_made(noise_slide, tmp_path, output_mpp):
    import tifffile

    from biopsy.labelmap import read_label_map

    model, info = random_cnn(3), model_info(3, 1.0, 64)
    options = {"workers": 0, "batch_size": 4, "tissue": all_tissue(noise_slide),
               "output_mpp": output_mpp}
    path, probabilities_path = tmp_path / "labels.ome.tif", tmp_path / "probabilities.ome.tif"
    written = segment_slide(noise_slide, model, info, labels_path=path,
                            probabilities_path=probabilities_path, **options)
    held = segment_slide(noise_slide, model, info, return_probabilities=True, **options)
    np.testing.assert_array_equal(written.labels, held.labels)
    assert written.probabilities is None  # only written
    label_map = read_label_map(path)
    np.testing.assert_array_equal(label_map.labels, held.labels)
    assert label_map.mpp == output_mpp and label_map.class_names == tuple(info.class_names)
    with tifffile.TiffFile(probabilities_path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    assert len(levels) == (3 if output_mpp == 0.25 else 1)  # 1200 x 1680 px: 1200, 600, 300
    for level, pixels in enumerate(levels):
        np.testing.assert_array_equal(pixels, held.probabilities[:, ::2**level, ::2**level])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.ome.tif", "probabilities.ome.tif"]


@pytest.mark.parametrize("failing, error", [("model", "out of memory"), ("writer", "No space"),
                                            ("probabilities", "No space"),
                                            ("probabilities file", "No space")])
def test_nothing_is_written_when_segmenting_fails(failing, error, tmp_path, monkeypatch):
    import multiprocessing

    from biopsy import infer, probabilitymap, pyramid

    rng = np.random.default_rng(2)
    slide = write_slide(tmp_path / "tall.tif", rng.integers(0, 256, (900, 160, 3), np.uint8), 1.0)
    out = tmp_path / "out"
    out.mkdir()
    calls, files = [], []  # files: the output folder's just before the failure

    def model(*args, **kwargs):
        calls.append(1)
        if failing == "model" and len(calls) == 40:  # 80 of ~110 tiles: the file is begun
            files[:] = [path.suffix for path in out.rglob("*")]
            raise RuntimeError("out of memory")
        return batch_probabilities(*args, **kwargs)

    def writer(path, bands, *args):
        with pyramid.atomic_path(path) as temporary:
            temporary.write_bytes(b"II*")
            for written, _ in enumerate(bands):
                if written == 3:
                    files[:] = [path.suffix for path in out.rglob("*")]
                    raise OSError("No space left on device")

    def compressed_tiles(rows):  # on a thread of the probability map's writer
        calls.append(1)
        if len(calls) == 3 * 3:  # the third row of tiles' three classes: the label map's is begun
            files[:] = [path.suffix for path in out.rglob("*")]
            raise OSError("No space left on device")
        return compress(rows)

    compress = probabilitymap._compressed_tiles

    def probabilities_file(*args):
        files[:] = [path.suffix for path in out.rglob("*")]
        raise OSError("No space left on device")
    if failing == "model":
        monkeypatch.setattr(infer, "batch_probabilities", model)
    elif failing == "writer":
        monkeypatch.setattr(pyramid, "_write_levels", writer)
    elif failing == "probabilities":
        monkeypatch.setattr(probabilitymap, "_compressed_tiles", compressed_tiles)
    else:  # the probabilities' file, assembled once the label map's is in place
        monkeypatch.setattr(probabilitymap, "_write_file", probabilities_file)
    with pytest.raises((RuntimeError, OSError), match=error) as failure:
        segment_slide(slide, random_cnn(3), model_info(3, 1.0, 64), workers=2, batch_size=2,
                      tissue=all_tissue(slide), labels_path=out / "labels.ome.tif",
                      probabilities_path=out / "probabilities.ome.tif")
    assert ".tif" in files and list(out.iterdir()) == []
    # the reading workers stopped with it, though its traceback (which holds the frames) is kept
    assert failure.traceback and not multiprocessing.active_children()


def test_real_svs_in_worker_processes(svs_path):
    """An Aperio file through OpenSlide in worker processes: tissue tiles only, glass background."""
    slide = open_slide(svs_path)
    info = model_info(3, mpp=2.0, patch_px=64)
    result = segment_slide(slide, constant_model(3, 1), info, workers=2, batch_size=32)
    width, height = slide.dimensions
    assert result.labels.shape == (round(height * slide.mpp[1] / 2), round(width * slide.mpp[0] / 2))
    assert set(np.unique(result.labels)) == {0, 1}
    assert 0.2 < (result.labels == 1).mean() < 0.95
