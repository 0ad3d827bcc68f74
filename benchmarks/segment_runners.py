"""The methods of the segmentation benchmark, each run in a fresh process by ``segment.py``.

Every runner takes ``(slide_path, checkpoint, args)`` and returns a dict: ``seconds`` (wall time
from slide opening or tissue detection to the class map, excluding interpreter start and model
loading), ``tiles`` and, where the method gives a map in memory, ``labels`` at the model's mpp.

- ``ours``: :func:`biopsy.infer.segment_slide` (``ours-bf16``: bf16 autocast on CPU too;
  ``ours-int8``: the int8 model from the checkpoint's calibration, :mod:`biopsy.quantize`;
  ``ours-compile``: ``torch.compile``);
- ``large``: ours streamed band by band into a pyramidal ``labels.ome.tif`` (the bounded-memory
  path for slides whose class map should not sit in memory);
- ``parts``: where our time goes, each stage alone over the tiles of the full run;
- ``tiatoolbox``: ``SemanticSegmentor.run(patch_mode=False)`` with its automatic tissue mask;
- ``monai``: ``SlidingWindowInferer(mode="gaussian", sigma_scale=0.125)`` over the slide read
  whole at the model's mpp;
- ``naive``: every tile read with OpenSlide ``read_region`` and box-resized, batch 1, fp32, NCHW,
  Gaussian blended into a whole-slide float array.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def run_ours(slide_path, checkpoint, args, bf16: bool | None = None, compile: bool = False,
             int8: bool = False) -> dict:
    import torch

    from biopsy.infer import prepare_model, segment_slide
    from biopsy.model import load_checkpoint, read_int8_calibration
    from biopsy.quantize import quantized_model
    from biopsy.slide import open_slide

    model, info = load_checkpoint(checkpoint, args.device)
    info.stain_reference = None  # the peers see the slide's own pixels: so does ours here
    started = time.perf_counter()
    if int8:
        model = quantized_model(model, info, read_int8_calibration(checkpoint))
    # part of loading, once per process for a cohort (as biopsy.pipeline.load_model does):
    # reported, not in the wall time
    model = prepare_model(model, torch.device(args.device))
    prepared_seconds = time.perf_counter() - started
    started = time.perf_counter()
    class_map = segment_slide(open_slide(slide_path), model, info, batch_size=args.batch_size,
                              workers=args.workers, device=args.device, bf16=bf16, compile=compile)
    return {"seconds": time.perf_counter() - started, "tiles": class_map.tile_count,
            "labels": class_map.labels, "model prepared in s": prepared_seconds}


def run_large(slide_path, checkpoint, args) -> dict:
    """Ours from slide to ``args.labels_out`` (a pyramidal OME-TIFF label map), the class map
    streamed in bands, never held whole; also the tile loop's own time (from the first band
    handed back to the last, while the label map is written on a thread of its own: without
    the set-up before the first tile, tissue detection and stain measurement), the grid's tile
    count without the tissue mask and the tissue's share of the slide area."""
    from biopsy.infer import output_shape_px, segment_slide_bands
    from biopsy.labelmap import write_label_map
    from biopsy.model import load_checkpoint
    from biopsy.slide import open_slide
    from biopsy.tiling import make_grid
    from biopsy.tissue import detect_tissue

    model, info = load_checkpoint(checkpoint, args.device)
    started = time.perf_counter()
    slide = open_slide(slide_path)
    tissue = detect_tissue(slide)
    grid, bands = segment_slide_bands(slide, model, info, batch_size=args.batch_size,
                                      workers=args.workers, device=args.device, tissue=tissue)
    handed_back = []  # when each band came

    def timed(bands):
        for band in bands:
            handed_back.append(time.perf_counter())
            yield band.labels

    write_label_map(args.labels_out, timed(bands), info.input_mpp, info.class_names,
                    info.class_colours, shape_px=output_shape_px(slide, info.input_mpp))
    seconds = time.perf_counter() - started
    all_tiles = len(make_grid(grid.shape_px, grid.mpp, grid.patch_px, 0.5))
    return {"seconds": seconds, "tile loop seconds": handed_back[-1] - handed_back[0],
            "tiles": len(grid), "grid tiles": all_tiles, "tissue fraction": tissue.fraction}


def run_parts(slide_path, checkpoint, args) -> dict:
    """Where our time goes, each stage alone over the tiles of the full run: tissue detection;
    with ``--large-px`` (whose run normalises stains), the slide's stain measurement; tile
    reading (decoding, in the DataLoader workers, pinned on CUDA; the stain shift there too on a
    CPU); the host-to-device copy of the uint8 batches; on CUDA the stain shift on the device;
    the model on normalised tiles already on the device; stitching; writing the label map. One
    real batch stands in for every batch after reading, as segment_slide runs each stage."""
    import torch
    from torch.utils.data import DataLoader

    from biopsy.infer import output_shape_px, prepare_model, shift_stains, shifts_on_device
    from biopsy.tile_views import tile_probabilities
    from biopsy.labelmap import write_label_map
    from biopsy.model import load_checkpoint
    from biopsy.slide import open_slide, single_threaded_opencv
    from biopsy.stainnorm import slide_stain_shift
    from biopsy.stitch import BandStitcher
    from biopsy.tiling import TileBlocks, TileDataset, grid_shape_px, make_grid
    from biopsy.tissue import detect_tissue

    model, info = load_checkpoint(checkpoint, args.device)
    device = torch.device(args.device)
    slide = open_slide(slide_path)
    started = time.perf_counter()
    tissue = detect_tissue(slide)
    seconds = {"tissue detection": time.perf_counter() - started}
    stain = None
    if args.large_px:
        started = time.perf_counter()
        stain = slide_stain_shift(slide, info.stain_reference, tissue)
        seconds["stain measurement"] = time.perf_counter() - started
    shape_px = grid_shape_px(slide.dimensions, slide.mpp, info.input_mpp)
    grid = make_grid(shape_px, info.input_mpp, info.patch_size_px, 0.5, tissue, slide.mpp)
    device_stain = stain if shifts_on_device(stain, device) else None
    reading = TileBlocks(TileDataset(slide, grid, None if device_stain else stain))
    loader = DataLoader(reading, batch_size=None, num_workers=args.workers,
                        pin_memory=device.type == "cuda",
                        worker_init_fn=single_threaded_opencv)  # as segment_slide reads them
    started = time.perf_counter()
    kept = []
    for _, views in loader:
        if sum(map(len, kept)) < args.batch_size:
            kept.append(views)
    seconds["tile reading"] = time.perf_counter() - started
    sample = torch.cat(kept)[: args.batch_size]
    sample = sample.pin_memory() if device.type == "cuda" else sample  # as the loader's batches
    batches = -(-len(grid) // args.batch_size)
    started = time.perf_counter()
    for _ in range(batches):
        tiles = sample[:, 0].to(device, non_blocking=True)
    _sync(device)
    seconds["transfer"] = time.perf_counter() - started
    if device_stain is not None:
        matrix = torch.tensor(device_stain.density_matrix(), dtype=torch.float32, device=device)
        started = time.perf_counter()
        with torch.inference_mode():
            for _ in range(batches):
                shift_stains(tiles, matrix)
        _sync(device)
        seconds["stain shift (device)"] = time.perf_counter() - started
    model = prepare_model(model, device)  # as segment_slide runs it: BatchNorm folded, channels_last
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        inputs = info.normalise(tiles)
        model(inputs)
        _sync(device)
        started = time.perf_counter()
        for _ in range(batches):
            probabilities = tile_probabilities(model(inputs), info.patch_size_px)
        _sync(device)
    seconds["model (pre-decoded tiles on device)"] = time.perf_counter() - started
    stitcher = BandStitcher(info.class_names, shape_px, info.input_mpp, shape_px, info.input_mpp,
                            info.patch_size_px, 0, device=device,
                            glomerulus_threshold=info.glomerulus_threshold)
    started = time.perf_counter()
    bands = []
    with torch.inference_mode():
        for first in range(0, len(grid), args.batch_size):
            origins = grid.origins_px[first : first + args.batch_size]
            bands += stitcher.add(probabilities[: len(origins)], origins)
        bands += stitcher.finish()
        _sync(device)
    seconds["stitching"] = time.perf_counter() - started
    started = time.perf_counter()
    write_label_map(Path(args.labels_out).with_suffix(".ome.tif"),
                    (band.labels for band in bands), info.input_mpp, info.class_names,
                    info.class_colours, shape_px=output_shape_px(slide, info.input_mpp))
    seconds["label map writing"] = time.perf_counter() - started
    return {"tiles": len(grid), **seconds}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_tiatoolbox(slide_path, checkpoint, args) -> dict:
    import torch
    import zarr
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
    from tiatoolbox.models.models_abc import ModelABC

    from biopsy.model import load_checkpoint

    class TiaModel(ModelABC):
        """Our network as a TIAToolbox model, written the way its own UNetModel is."""

        def __init__(self, net, info):
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(info.normalisation["mean"]) * 255)
            self.register_buffer("std", torch.tensor(info.normalisation["std"]) * 255)

        def forward(self, images):
            return self.net(images)

        @staticmethod
        def infer_batch(model, batch_data, *, device):
            model.eval()
            module = getattr(model, "module", model)
            images = batch_data.to(device).float()
            with torch.inference_mode():
                images = ((images - module.mean) / module.std).permute(0, 3, 1, 2)
                return model(images).softmax(1).permute(0, 2, 3, 1).cpu().numpy()

        @staticmethod
        def postproc(image):
            return image.argmax(axis=-1)

    net, info = load_checkpoint(checkpoint)
    resolution = {"units": "mpp", "resolution": info.input_mpp}
    patch = info.patch_size_px
    ioconfig = IOSegmentorConfig(
        input_resolutions=[resolution], output_resolutions=[resolution],
        patch_input_shape=(patch, patch), patch_output_shape=(patch, patch),
        stride_shape=(patch // 2, patch // 2), save_resolution=resolution)
    save_dir = Path(tempfile.mkdtemp(prefix="tia-", dir=args.work_dir))
    started = time.perf_counter()
    segmentor = SemanticSegmentor(model=TiaModel(net, info), batch_size=args.batch_size,
                                  num_workers=args.workers, device=args.device, verbose=False)
    outputs = segmentor.run([str(slide_path)], patch_mode=False, ioconfig=ioconfig,
                            save_dir=save_dir, overwrite=True, output_type="zarr",
                            device=args.device, auto_get_mask=True)
    seconds = time.perf_counter() - started
    store = zarr.open(str(next(iter(outputs.values()))), mode="r")
    result = {"seconds": seconds, "tiles": store["coordinates"].shape[0],
              "labels": np.asarray(store["predictions"]).astype(np.uint8)}
    shutil.rmtree(save_dir)
    return result


def run_monai(slide_path, checkpoint, args) -> dict:
    import torch
    from monai.inferers import SlidingWindowInferer

    from biopsy.model import load_checkpoint
    from biopsy.slide import open_slide
    from biopsy.tiling import grid_shape_px, make_grid

    model, info = load_checkpoint(checkpoint, args.device)
    started = time.perf_counter()
    slide = open_slide(slide_path)
    height, width = grid_shape_px(slide.dimensions, slide.mpp, info.input_mpp)
    image = torch.from_numpy(slide.read(0, 0, (width, height), info.input_mpp))[None]
    patch = info.patch_size_px
    inferer = SlidingWindowInferer((patch, patch), sw_batch_size=args.batch_size,
                                   overlap=0.5, mode="gaussian", sigma_scale=0.125,
                                   sw_device=args.device, device=args.device)
    with torch.inference_mode():
        probabilities = inferer(info.normalise(image).contiguous(),
                                lambda x: model(x).softmax(1))
        labels = probabilities[0].argmax(0).to(torch.uint8).cpu().numpy()
    tiles = len(make_grid((height, width), info.input_mpp, info.patch_size_px, 0.5))
    return {"seconds": time.perf_counter() - started, "tiles": tiles, "labels": labels}


def run_naive(slide_path, checkpoint, args) -> dict:
    import openslide
    import torch
    from PIL import Image

    from biopsy.model import load_checkpoint
    from biopsy.stitch import gaussian_weight
    from biopsy.tiling import grid_shape_px, make_grid

    model, info = load_checkpoint(checkpoint, args.device)
    patch = info.patch_size_px
    started = time.perf_counter()
    slide = openslide.OpenSlide(str(slide_path))
    slide_mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    downsample = info.input_mpp / slide_mpp
    level = slide.get_best_level_for_downsample(downsample + 1e-6)
    read_px = round(patch * downsample / slide.level_downsamples[level])
    shape_px = grid_shape_px(slide.dimensions, (slide_mpp, slide_mpp), info.input_mpp)
    grid = make_grid(shape_px, info.input_mpp, patch, 0.5)
    sums = np.zeros((len(info.class_names),) + shape_px, np.float32)  # argmax needs no weight sum
    weight = gaussian_weight(patch).numpy()
    mean = torch.tensor(info.normalisation["mean"], device=args.device)[:, None, None]
    std = torch.tensor(info.normalisation["std"], device=args.device)[:, None, None]
    for row, col in grid.origins_px:
        region = slide.read_region((round(col * downsample), round(row * downsample)), level,
                                   (read_px, read_px)).convert("RGB")
        tile = np.asarray(region.resize((patch, patch), Image.BOX))
        image = torch.from_numpy(tile).to(args.device).permute(2, 0, 1).float() / 255
        with torch.no_grad():
            probabilities = model(((image - mean) / std)[None].contiguous())[0].softmax(0)
        sums[:, row : row + patch, col : col + patch] += probabilities.cpu().numpy() * weight
    labels = sums.argmax(0).astype(np.uint8)
    return {"seconds": time.perf_counter() - started, "tiles": len(grid), "labels": labels}


RUNNERS = {"ours": run_ours, "ours-bf16": lambda *a: run_ours(*a, bf16=True),
           "ours-int8": lambda *a: run_ours(*a, int8=True),
           "ours-compile": lambda *a: run_ours(*a, compile=True), "large": run_large,
           "parts": run_parts, "tiatoolbox": run_tiatoolbox, "monai": run_monai,
           "naive": run_naive}
