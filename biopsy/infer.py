"""Stitched whole-slide inference: a slide and a model in, a class map at a chosen mpp out.

The hot path (../shared/DESIGN.md): tissue tiles only (:mod:`biopsy.tiling`), read at the model's
mpp in blocks of 4 tile rows x 16 tiles (cut from one read where that gives the same pixels), by
DataLoader worker processes on CUDA and in this process on a CPU (:func:`default_workers`);
uint8 blocks copied pinned and non-blocking to the device, each band of 4 tile rows put in
row-major order there and normalised batch by batch; the model under
``torch.inference_mode()`` in channels_last memory (bf16 autocast on CUDA, optional on CPU;
optional ``torch.compile``); softmax probabilities (optionally averaged over test-time
augmentations: the tile's mirror images, and views of it read at other scales) Gaussian-blended
and finished band by band (:mod:`biopsy.stitch`), so memory is bounded by slide width x a few
patch heights, not slide area.

Pixels outside the tissue mask dilated by one mask pixel (8 µm by default) get the model's
``background`` class (index 0 if it has none): the model decides tissue borders at its own
resolution within that margin, while glass far from tissue, seen only near the borders of the
outermost tiles where predictions are poor, is never left to it.
"""

from __future__ import annotations

import collections
import logging
import numbers
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.utils.data import DataLoader
from tqdm import tqdm

from biopsy.classes import class_index
from biopsy.errors import CheckpointError, MppError, SlideError
from biopsy.heap import keep_freed_memory
from biopsy.labelmap import write_label_map
from biopsy.model import ModelInfo, ResNetUNet
from biopsy.probabilitymap import probability_map_writer
from biopsy.restain import StainShift
from biopsy.slide import GIVE_MPP, SLIDE_MPP_RANGE_UM, Slide, is_slide_mpp, single_threaded_opencv
from biopsy.stainnorm import slide_stain_shift
from biopsy.stitch import Band, BandStitcher
from biopsy.subpixel import inference_unet
from biopsy.tile_views import batch_probabilities, check_scales
from biopsy.tiling import TileBlocks, TileDataset, TileGrid, grid_shape_px, make_grid
from biopsy.tissue import TissueMask, detect_tissue

log = logging.getLogger(__name__)

PREPARED = "prepared_for_inference"  # attribute marking the copies prepare_model folded


@dataclass(frozen=True)
class ClassMap:
    """A slide's predicted class map.

    ``labels`` (h, w) uint8 class indices at ``mpp`` µm/px, covering the whole slide (pixel
    (row, col) covers level-0 ``[col * s, (col + 1) * s)`` with ``s = mpp / slide mpp``);
    ``probabilities`` (C, h, w) uint8 (255 = 1; outside tissue 255 for the background class
    that the labels give there, 0 for the rest) when asked for;
    ``tile_count`` tiles were run; ``stain_factors`` (haematoxylin, eosin) scaled each tile's
    stains to the model's reference (None: not normalised).
    """

    labels: np.ndarray
    mpp: float
    class_names: tuple[str, ...]
    class_colours: dict[str, tuple[int, int, int]]
    probabilities: np.ndarray | None = None
    tile_count: int = 0
    stain_factors: tuple[float, float] | None = None
    slide_mpp: float | None = None  # level-0 µm/px of the slide as read


def segment_slide(slide: Slide, model: nn.Module, info: ModelInfo, *, batch_size: int = 16,
                  workers: int | None = None, device: str | torch.device = "cpu",
                  output_mpp: float | None = None, overlap: float = 0.5,
                  tissue: TissueMask | None = None, return_probabilities: bool = False,
                  bf16: bool | None = None, compile: bool = False, tta: bool = False,
                  scales: tuple[float, ...] = (1.0,), progress: bool = False,
                  labels_path: str | Path | None = None,
                  probabilities_path: str | Path | None = None) -> ClassMap:
    """Segment a whole slide with ``model``; the class map in memory.

    Parameters
    ----------
    slide : the slide; each DataLoader worker opens its own handle.
    model, info : as given by :func:`biopsy.model.load_checkpoint`; the model takes
        ``info.patch_size_px`` tiles at ``info.input_mpp`` and returns logits (B, C, H, W).
    batch_size : tiles per forward pass.
    workers : DataLoader worker processes reading tiles (0: read in this process); default
        :func:`default_workers`.
    device : where the model runs; the model is moved there.
    output_mpp : µm/px of the returned map; default ``info.input_mpp``, the resolution the model
        predicts at (finer adds no detail, coarser is a nearest-neighbour sample of it).
    overlap : fraction of a tile shared with each neighbour; 0.5 gives step = patch / 2.
    tissue : where the tissue is; tiles without tissue are neither read nor run. Default:
        detected with :func:`biopsy.tissue.detect_tissue`.
    return_probabilities : also return the blended class probabilities.
    bf16 : run the model under bfloat16 autocast; default on CUDA only (on CPUs with native
        bf16 it is ~2x faster too, at a small cost in agreement with fp32).
    compile : ``torch.compile`` the model first (pays off on long runs on CUDA).
    tta : test-time augmentation: each tile's probabilities are the mean of those of the tile and
        its three mirror images (4x the model time; as nnU-Net does by default).
    scales : reading scales, multiples of ``info.input_mpp`` (at least one >= 1): each tile's
        probabilities are the mean over these views of it, the view at scale s being the square
        of s x the tile's side centred on it, read at s x the model's mpp, its predictions
        resampled onto the tile's pixels (multi-scale test-time augmentation: s > 1 gives more
        context, objects seen smaller; s < 1 a closer look at the tile's centre, which only
        there joins the mean; the model time times the number of scales).
    progress : show a tqdm progress bar over tiles.
    labels_path : also write the map there as a label map (:func:`biopsy.labelmap.write_label_map`)
        as its bands come, on a thread of its own; nothing is left there if segmenting fails.
    probabilities_path : also write the blended class probabilities there
        (:func:`biopsy.probabilitymap.probability_map_writer`) as their bands come, never held
        whole; nothing is left there if segmenting fails.

    Raises
    ------
    CheckpointError : the model takes another number of channels than the slide has.
    MppError : the slide's pixel size is unknown.
    ValueError : a scale not positive, or none >= 1; a batch size under 1; an output pixel
        size outside the slide range.
    """
    grid, stain, bands = _run(slide, model, info, batch_size=batch_size, workers=workers,
                              device=device, output_mpp=output_mpp, overlap=overlap, tissue=tissue,
                              return_probabilities=return_probabilities or bool(probabilities_path),
                              bf16=bf16, compile=compile, tta=tta, scales=scales,
                              progress=progress)
    output_mpp = output_mpp or info.input_mpp
    shape_px = output_shape_px(slide, output_mpp)
    labels = np.empty(shape_px, np.uint8)
    probabilities = (np.empty((len(info.class_names),) + shape_px, np.uint8)
                     if return_probabilities else None)
    probabilities_writer = nullcontext() if probabilities_path is None else probability_map_writer(
        probabilities_path, shape_px, output_mpp, info.class_names)
    labels_written = False
    try:
        # closed at once when a writer fails: the reading workers stop then
        with closing(bands), probabilities_writer as add_probabilities:
            filled = _filled(bands, labels, probabilities, add_probabilities)
            if labels_path is None:
                collections.deque(filled, maxlen=0)
            else:
                write_label_map(labels_path, filled, output_mpp, info.class_names,
                                info.class_colours, shape_px=shape_px, slide_mpp=slide.mpp[0])
                labels_written = True
    except BaseException:
        if labels_written:  # the probabilities' file, finished last, failed
            Path(labels_path).unlink(missing_ok=True)
        raise
    return ClassMap(labels, output_mpp, tuple(info.class_names),
                    {name: tuple(rgb) for name, rgb in info.class_colours.items()},
                    probabilities, len(grid),
                    None if stain is None else (stain.haematoxylin, stain.eosin), slide.mpp[0])


def _filled(bands: Iterator[Band], labels: np.ndarray, probabilities: np.ndarray | None,
            add_probabilities: Callable[[np.ndarray], None] | None) -> Iterator[np.ndarray]:
    """The labels of each band, once it is copied into ``labels`` (and its probabilities into
    ``probabilities`` and given to ``add_probabilities``, where these are given)."""
    top = 0
    for band in bands:
        rows = slice(top, top + len(band.labels))
        labels[rows] = band.labels
        if probabilities is not None:
            probabilities[:, rows] = band.probabilities
        if add_probabilities is not None:
            add_probabilities(band.probabilities)
        top = rows.stop
        yield labels[rows]


def segment_slide_bands(slide: Slide, model: nn.Module, info: ModelInfo,
                        **options) -> tuple[TileGrid, Iterator[Band]]:
    """As :func:`segment_slide` (same options), but the map comes as an iterator of row bands,
    top to bottom, at the output mpp, so that it can be streamed to a file
    (:func:`biopsy.labelmap.write_label_map`) without ever being held whole."""
    grid, _, bands = _run(slide, model, info, **options)
    return grid, bands


def output_shape_px(slide: Slide, output_mpp: float) -> tuple[int, int]:
    """(height, width) of a slide's class map at ``output_mpp``."""
    return grid_shape_px(slide.dimensions, _slide_mpp(slide), output_mpp)


def _run(slide, model, info, *, batch_size=16, workers=None, device="cpu", output_mpp=None,
         overlap=0.5, tissue=None, return_probabilities=False, bf16=None, compile=False,
         tta=False, scales=(1.0,), progress=False
         ) -> tuple[TileGrid, StainShift | None, Iterator[Band]]:
    device = torch.device(device)
    if not (isinstance(batch_size, numbers.Integral) and batch_size >= 1):
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if output_mpp is not None and not is_slide_mpp(output_mpp):
        low, high = SLIDE_MPP_RANGE_UM
        raise ValueError(f"output_mpp must be from {low:g} to {high:g} µm/px (None: the "
                         f"model's), got {output_mpp!r}")
    output_mpp = output_mpp or info.input_mpp
    if bf16 and emulates_bf16(device):
        log.warning("bf16 on this CPU, which has no bfloat16 instructions: the model runs ~10x "
                    "slower than in float32 (leave --bf16 out)")
    stain_later = measures_stain_later(device)
    tissue, tiles = tissue_tiles(slide, info, overlap, tissue, scales,
                                 measure_stain=not stain_later)
    if not len(tiles):
        log.warning("%s: no tissue found; the class map is all background",
                    slide.path)
    background = class_index(info.class_names, "background") or 0
    output_shape = output_shape_px(slide, output_mpp)
    stitcher = BandStitcher(info.class_names, tiles.grid.shape_px, info.input_mpp,
                            output_shape, output_mpp, info.patch_size_px, background,
                            return_probabilities, device, info.glomerulus_threshold,
                            tissue_mask=tissue.near().mask, tissue_mpp=tissue.mpp)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    model = prepare_model(model, device, compile)  # first: the workers inherit its heap setting
    blocks = TileBlocks(tiles)
    if workers is None:
        workers = default_workers(device)
    reading = _start_reading(blocks, workers, device)  # the workers start reading now
    # measured later, the stain is applied on the device; else as the tiles are read
    stain = tile_stain_shift(slide, info, tissue, tiles.grid) if stain_later else tiles.stain
    device_stain = stain if stain_later and shifts_on_device(stain, device) else None
    bands = _bands(blocks, reading, model, info, stitcher, batch_size, device, bf16, tta,
                   progress, device_stain)
    return tiles.grid, stain, bands


def default_workers(device: str | torch.device) -> int:
    """Tile-reading worker processes by default: up to 8 on CUDA, where decoding is the
    bottleneck; none on a CPU, where the model's threads take every core and workers reading
    beside them only slow it (2 cores: 2.3-2.6 -> 1.9-2.0 s for the quick benchmark slide
    without them, 10.5 -> 9.8-10.2 s for a 7.8 mm core, whose reading takes 0.2 s of it)."""
    return min(8, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0


def emulates_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` is a CPU without bfloat16 instructions, where bf16 autocast is emulated
    and slower than float32: an x86 CPU without AVX-512 BF16 or AMX (oneDNN takes any AVX-512 for
    bf16 support), another CPU where oneDNN says so. On a 2-core AVX2 EPYC the bundled model took
    ~800 ms a tile in bf16 against ~72 in float32 (``benchmarks/subpixel.py``)."""
    if torch.device(device).type != "cpu":
        return False
    if platform.machine().lower() in ("x86_64", "amd64"):
        return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return not (torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def measures_stain_later(device: torch.device) -> bool:
    """Whether the stain shift is measured after the reading workers have started, while they
    read ahead (forked before any thread of the measurement exists), and applied to the batches
    on the device (:func:`shifts_on_device`: the stain amounts a slide is normalised by always
    are) instead of in the workers: on CUDA."""
    return device.type == "cuda"


def tissue_tiles(slide: Slide, info: ModelInfo, overlap: float = 0.5,
                 tissue: TissueMask | None = None, scales: tuple[float, ...] = (1.0,),
                 measure_stain: bool = True) -> tuple[TissueMask, TileDataset]:
    """The slide's tissue (detected when not given) and the tiles the model runs on: those of
    the grid at the model's mpp and patch size nearest to tissue, read at ``scales``
    (:class:`~biopsy.tiling.TileDataset`), stain-normalised to the model's reference when it
    has one and ``measure_stain`` (else read as they are: :func:`tile_stain_shift` later).

    Raises
    ------
    CheckpointError, SlideError : the model does not take the slide's channels or bit depth.
    MppError : the slide's pixel size is unknown.
    ValueError : a scale not positive, or none >= 1.
    """
    check_scales(scales)
    check_slide_for_model(slide, info)
    if tissue is None:
        tissue = detect_tissue(slide)
    shape_px = grid_shape_px(slide.dimensions, _slide_mpp(slide), info.input_mpp)
    grid = make_grid(shape_px, info.input_mpp, info.patch_size_px, overlap, tissue,
                     _slide_mpp(slide))
    stain = tile_stain_shift(slide, info, tissue, grid) if measure_stain else None
    return tissue, TileDataset(slide, grid, stain, scales)


def tile_stain_shift(slide: Slide, info: ModelInfo, tissue: TissueMask,
                     grid: TileGrid) -> StainShift | None:
    """The stain shift that brings the slide to the model's reference (None without one, or
    without tiles to shift: :func:`biopsy.stainnorm.slide_stain_shift`), logged."""
    stain = slide_stain_shift(slide, info.stain_reference, tissue) if len(grid) else None
    if stain is not None:
        log.info("%s: stain normalised: haematoxylin x%.3f, eosin x%.3f", slide.path,
                 stain.haematoxylin, stain.eosin)
    return stain


def _bands(blocks: TileBlocks, reading: Iterator, model, info, stitcher: BandStitcher,
           batch_size: int, device: torch.device, bf16: bool, tta: bool, progress: bool,
           device_stain: StainShift | None = None) -> Iterator[Band]:
    """Run the tiles of ``blocks`` (coming from ``reading``: :func:`_start_reading`) in row-major
    order; yield each band as soon as it is finished. ``device_stain``: a stain shift applied to
    each batch on the device (:func:`shift_stains`).

    Inference mode is entered per batch, never across a ``yield``, so that it does not leak into
    the consumer's code.
    """
    tiles = blocks.tiles
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    # put on the device once: a copy from the host per batch would wait for the device
    density_matrix = None if device_stain is None else torch.tensor(
        device_stain.density_matrix(), dtype=torch.float32, device=device)
    bar = tqdm(total=len(tiles), unit="tile", disable=not progress)
    first = 0
    batches = _row_major_batches(blocks, reading, batch_size, device)
    # held by the batches alone, closed with them on an error: the workers stop then, even while
    # a kept traceback (an interactive session's last one) holds this frame
    del reading
    with closing(batches):
        for batch in batches:
            with torch.inference_mode():
                if density_matrix is not None:
                    batch = shift_stains(batch, density_matrix)
                views = [info.normalise(batch[:, view]) for view in range(batch.shape[1])]
                probabilities = batch_probabilities(model, views, tiles.scales, autocast,
                                                    info.patch_size_px, tta)
                bands = stitcher.add(probabilities, tiles.origins_px[first : first + len(batch)])
            first += len(batch)
            bar.update(len(batch))
            yield from bands
    bar.close()
    with torch.inference_mode():
        bands = stitcher.finish()
    yield from bands


def _start_reading(blocks: TileBlocks, workers: int, device: torch.device) -> Iterator:
    """The blocks as ``workers`` processes (no more than there are blocks: each costs a fork)
    read them, pinned on CUDA, in the order they come: the workers start now and read ahead."""
    return iter(DataLoader(blocks, batch_size=None, num_workers=min(workers, len(blocks)),
                           pin_memory=device.type == "cuda", worker_init_fn=single_threaded_opencv))


def _row_major_batches(blocks: TileBlocks, reading: Iterator, batch_size: int,
                       device: torch.device) -> Iterator[torch.Tensor]:
    """The blocks' tiles on ``device`` in row-major order, ``batch_size`` at a time: the blocks
    sent to the device as ``reading`` yields them; a band's tiles are put in order once all its
    blocks are there."""
    rows = blocks.tiles.origins_px[:, 0]
    band, left_over = [], []
    for index, (indices, views) in enumerate(reading):
        band.append((rows[indices.numpy()], views.to(device, non_blocking=True)))
        if index + 1 < len(blocks) and blocks.band_of[index + 1] == blocks.band_of[index]:
            continue
        ready = torch.cat(left_over + _in_row_major(band))
        band, whole = [], len(ready) - len(ready) % batch_size
        if whole:  # (an empty tensor splits into one empty batch)
            yield from ready[:whole].split(batch_size)
        left_over = [ready[whole:].clone()]  # not a view keeping the whole band alive
    if left_over and len(left_over[0]):
        yield left_over[0]


def _in_row_major(band: list[tuple[np.ndarray, torch.Tensor]]) -> list[torch.Tensor]:
    """Slices of a band's blocks (left to right, each row-major: its tiles' grid rows and
    views) that, concatenated, are the band's tiles in row-major order."""
    slices = []
    for row in np.unique(np.concatenate([rows for rows, _ in band])):
        for rows, views in band:
            start, stop = np.searchsorted(rows, row, "left"), np.searchsorted(rows, row, "right")
            if stop > start:
                slices.append(views[start:stop])
    return slices


def shifts_on_device(stain: StainShift | None, device: torch.device) -> bool:
    """Whether :func:`shift_stains` applies ``stain`` on ``device`` rather than the reading
    workers: on CUDA, a shift of stain amounts (no hue turn), not the identity (which
    :meth:`~biopsy.restain.StainShift.apply` leaves exact)."""
    return (device.type == "cuda" and stain is not None and not stain.hue_deg % 360
            and not stain.is_identity)


def shift_stains(rgb: torch.Tensor, density_matrix: torch.Tensor) -> torch.Tensor:
    """:meth:`StainShift.apply <biopsy.restain.StainShift.apply>` on a uint8 (..., 3) tensor
    where it lies, with the shift's ``density_matrix()`` as a float32 tensor there: the same
    float32 steps (torch's own log and exp: a value off by one in ~200 of the 16.7 million
    colours on a CPU, a few more on a GPU, unmeasured).

    On CUDA the tiles are shifted here rather than in the DataLoader workers, whose CPU time per
    tile it was ~35 % of (one core of the 2-core CPU: 1.22 ms a tile with it, 0.79 without)."""
    density = rgb.clamp(min=1).float().div_(255).log_().neg_()
    # the 3 x 3 product written out: a matrix product could run in TF32 on a GPU where a user
    # allowed it, 10 bits of mantissa
    shifted = sum(density[..., channel:channel + 1] * density_matrix[channel]
                  for channel in range(3))
    return shifted.neg_().exp_().clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def prepare_model(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """The model for inference: BatchNorm folded into the convolutions before it where torch.fx can
    trace the model (~12 % less time per tile on CPU, outputs equal to ~1e-5), on ``device`` in
    channels_last memory (the layout ``ModelInfo.normalise`` yields: the fast convolution path on
    CUDA and on CPUs alike, oneDNN ~1.4x over NCHW). On a CPU, the U-Net's decoder upsamples
    sub-pixel (:mod:`biopsy.subpixel`), and the C heap keeps freed memory for the next batch
    (:func:`biopsy.heap.keep_freed_memory`). The caller's model is folded into a copy (but for
    eval mode, left as it is). A model prepared here (or a copy of one) is only moved to
    ``device``, as it was folded for its first device, so that a model prepared once, as
    :func:`biopsy.pipeline.load_model` does, is not copied again for every slide (~0.1 s on a
    2-core CPU)."""
    device = torch.device(device)
    if device.type == "cpu":
        keep_freed_memory()
    if getattr(model, PREPARED, False):
        prepared = model
    else:
        prepared = _folded(model.eval(), device)
        if prepared is not model:  # the caller's own model may still change: not marked
            setattr(prepared, PREPARED, True)
    prepared = prepared.to(device, memory_format=torch.channels_last)
    return torch.compile(prepared) if compile else prepared


def _folded(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` with BatchNorm folded (sub-pixel decoder too for a U-Net on a CPU), or
    ``model`` itself where torch.fx cannot trace it."""
    if device.type == "cpu" and isinstance(model, ResNetUNet):
        return inference_unet(model)
    try:
        return fuse(model)
    except Exception as error:  # noqa: BLE001 - fx cannot trace every module; folding is optional
        log.debug("BatchNorm not folded (%s)", error)
        return model


def check_slide_for_model(slide, info) -> None:
    """Raise unless the model takes the slide: brightfield or fluorescence alike, as many
    channels, 8 bits (:class:`CheckpointError`, :class:`SlideError`)."""
    if slide.is_fluorescence != info.fluorescence:
        kinds = ("brightfield", "fluorescence")
        one_channel = (" (one channel: a label map written by biopsy is scored with --from-labels)"
                       if len(slide.channel_names) == 1 else "")
        raise CheckpointError(
            f"{slide.path}: a {kinds[slide.is_fluorescence]} slide{one_channel}, and the model was "
            f"trained on {kinds[info.fluorescence]} slides; use a model trained on this kind of slide")
    channels = len(slide.channel_names)
    if channels != info.in_channels:
        raise CheckpointError(
            f"{slide.path}: the model takes {info.in_channels} channels, the "
            f"slide has {channels} ({', '.join(slide.channel_names)}); use a model trained on "
            "this kind of slide")
    if np.dtype(slide.dtype) != np.uint8:
        raise SlideError(f"{slide.path}: {slide.dtype} pixels; the models take 8-bit slides, "
                         "convert it to 8 bits per channel")


def _slide_mpp(slide) -> tuple[float, float]:
    if slide.mpp is None:
        raise MppError(f"{slide.path}: pixel size unknown; {GIVE_MPP}")
    return slide.mpp

