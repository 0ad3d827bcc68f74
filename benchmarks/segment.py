"""Whole-slide segmentation, side by side: this engine, TIAToolbox, MONAI and a naive loop.

One synthetic slide (``biopsy synth``: biopsy cores on glass, JPEG Aperio SVS at 0.5 µm/px, with
its truth label map) and one checkpoint (a ResNet18 U-Net, 11 classes, 256 px tiles at 1 µm/px,
random features with the last layer fitted to the truth, unless ``--model`` is given) go through:

1. ``ours``: :func:`biopsy.infer.segment_slide` (tissue tiles only, worker processes, Gaussian
   blending, band-streamed stitching; bf16 on CUDA); ``ours-bf16`` with bf16 autocast on CPU too;
2. ``tiatoolbox``: ``SemanticSegmentor.run(patch_mode=False)`` with its automatic tissue mask and
   the same tiles, stride and workers (needs ``tiatoolbox``; ``--tia-python`` names an interpreter
   that has it, e.g. a separate environment, since it pins older torch/numpy);
3. ``monai``: ``SlidingWindowInferer(mode="gaussian", sigma_scale=0.125)`` over the slide read whole
   at the model's mpp;
4. ``naive``: every tile (tissue or not) read with OpenSlide ``read_region`` and box-resized,
   batch 1, fp32, NCHW, Gaussian blended into a whole-slide float array.

Each runs in its own process; the table gives wall time (including tissue detection and slide
loading, excluding interpreter start), tiles/s, peak memory (PSS summed over the process and its
workers, so forked workers' shared pages count once), agreement with ours and accuracy against
the truth on tissue pixels, and time relative to ours. ``--parts`` times our stages alone (tile
reading, model on pre-decoded tiles, stitching); ``--rss-check`` runs ours on a 4x longer core.

    python benchmarks/segment.py --quick --parts --rss-check          # 2-core CPU, ~10 minutes
    python benchmarks/segment.py --device cuda --parts --rss-check    # GPU machine

TIAToolbox 2.1 pins torch < 2.13 and older numpy, tifffile and openslide, so it lives in its own
environment layered over the project's (nothing of ours is downgraded)::

    python3.11 -m venv .venv-tia
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-tia/lib/python3.11/site-packages/main.pth
    .venv/bin/pip freeze --exclude-editable > /tmp/constraints.txt
    .venv-tia/bin/pip install --no-deps tiatoolbox==2.1.3
    .venv-tia/bin/pip install -c /tmp/constraints.txt aiohttp click dask defusedxml joblib \
        matplotlib numba pandas psutil scikit-learn zarr timm huggingface-hub transformers \
        umap-learn glymur simpleitk
    python benchmarks/segment.py --quick --tia-python .venv-tia/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SLIDE_MPP = 0.5
MODEL_MPP = 1.0
PATCH_PX = 256
METHODS = ("ours", "ours-bf16", "tiatoolbox", "monai", "naive")


# --- inputs --------------------------------------------------------------------------------------

def make_slide(folder: Path, cores: int, core_length_mm: float, core_width_mm: float) -> Path:
    """A ``biopsy synth`` slide (slide.svs at 0.5 µm/px; truth labels.ome.tif at 1 µm/px)."""
    from biopsy.cli import main as biopsy

    if not (folder / "truth.json").exists():
        glomeruli = max(1, round(4 * cores * core_length_mm * core_width_mm))  # 4 per mm²
        arguments = ["synth", "--out", str(folder), "--seed", "0", "--cores", str(cores),
                     "--core-length-mm", str(core_length_mm), "--core-width-mm", str(core_width_mm),
                     "--glomeruli", str(glomeruli)]
        if biopsy(arguments):
            raise SystemExit(f"biopsy {' '.join(arguments)} failed")
    return folder / "slide.svs"


def make_checkpoint(path: Path, slide_path: Path, steps: int = 150) -> Path:
    """A ResNet18 U-Net that predicts the slide's classes roughly, made in a minute on a CPU:
    random weights, batch-norm statistics measured on 16 tiles of the slide, then only the last
    layer fitted to the truth (``steps`` Adam steps on the frozen features). Its maps look like a
    trained model's: structured, confident in places, uncertain along borders."""
    import torch

    from biopsy.classes import CLASS_COLOURS, CLASS_NAMES
    from biopsy.labelmap import read_label_map
    from biopsy.model import IMAGENET_MEAN, IMAGENET_STD, ModelInfo, build_model, save_checkpoint
    from biopsy.slide import open_slide

    if path.exists():
        return path
    torch.manual_seed(0)
    arguments = {"encoder": "resnet18"}
    model = build_model("unet", len(CLASS_NAMES), 3, **arguments)
    info = ModelInfo("unet", arguments, list(CLASS_NAMES),
                     {n: list(c) for n, c in CLASS_COLOURS.items()}, MODEL_MPP, PATCH_PX, 3,
                     {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                     training_config={"benchmark": "random features, last layer fitted"})
    slide, truth = open_slide(slide_path), read_label_map(slide_path.parent / "labels.ome.tif")
    assert truth.mpp == MODEL_MPP and truth.class_names == CLASS_NAMES
    rng = np.random.default_rng(0)
    height, width = truth.labels.shape
    corners = list(zip(rng.integers(0, width - PATCH_PX, 16),
                       rng.integers(0, height - PATCH_PX, 16)))
    scale = MODEL_MPP / SLIDE_MPP
    tiles = np.stack([slide.read(int(col * scale), int(row * scale), (PATCH_PX, PATCH_PX),
                                 MODEL_MPP) for col, row in corners])
    targets = np.stack([truth.labels[row : row + PATCH_PX, col : col + PATCH_PX]
                        for col, row in corners])
    features = []
    model.head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        model.train()(info.normalise(torch.from_numpy(tiles)))
        model.eval()(info.normalise(torch.from_numpy(tiles)))
    optimiser = torch.optim.Adam(model.head.parameters(), lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model.head(features[-1]),
                                                 torch.from_numpy(targets).long())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    print(f"benchmark model: last layer fitted to the truth, loss {loss.item():.3f}", flush=True)
    save_checkpoint(path, model, info)
    return path


# --- the methods, each run in a child process ----------------------------------------------------

def run_ours(slide_path, checkpoint, args, bf16: bool | None = None) -> dict:
    from biopsy.infer import segment_slide
    from biopsy.model import load_checkpoint
    from biopsy.slide import open_slide

    model, info = load_checkpoint(checkpoint, args.device)
    started = time.perf_counter()
    class_map = segment_slide(open_slide(slide_path), model, info, batch_size=args.batch_size,
                              workers=args.workers, device=args.device, bf16=bf16)
    return {"seconds": time.perf_counter() - started, "tiles": class_map.tile_count,
            "labels": class_map.labels}


def run_parts(slide_path, checkpoint, args) -> dict:
    """Where our time goes: tile reading alone, the model alone on pre-decoded tiles already on
    the device, and stitching alone, each over the tiles of the full run."""
    import torch
    from torch.utils.data import DataLoader

    from biopsy.model import load_checkpoint
    from biopsy.slide import open_slide
    from biopsy.stitch import BandStitcher
    from biopsy.tiling import TileDataset, grid_shape_px, make_grid
    from biopsy.tissue import detect_tissue

    model, info = load_checkpoint(checkpoint, args.device)
    slide = open_slide(slide_path)
    started = time.perf_counter()
    tissue = detect_tissue(slide)
    tissue_seconds = time.perf_counter() - started
    shape_px = grid_shape_px(slide.dimensions, slide.mpp, info.input_mpp)
    grid = make_grid(shape_px, info.input_mpp, info.patch_size_px, 0.5, tissue, slide.mpp)
    loader = DataLoader(TileDataset(slide, grid), batch_size=args.batch_size,
                        num_workers=args.workers)
    started = time.perf_counter()
    sample = None
    for batch in loader:
        sample = batch if sample is None else sample
    read_seconds = time.perf_counter() - started
    device = torch.device(args.device)
    model = model.to(memory_format=torch.channels_last)
    tiles = sample.to(device)  # one real batch, run as often as the full run has batches
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = -(-len(grid) // args.batch_size)
    with torch.inference_mode(), autocast:
        model(info.normalise(tiles))
        _sync(device)
        started = time.perf_counter()
        for _ in range(batches):
            probabilities = model(info.normalise(tiles)).float().softmax(1)
        _sync(device)
    model_seconds = time.perf_counter() - started
    stitcher = BandStitcher(len(info.class_names), shape_px, info.input_mpp, shape_px,
                            info.input_mpp,
                            info.patch_size_px, 0, device=device)
    started = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(grid), args.batch_size):
            origins = grid.origins_px[first : first + args.batch_size]
            stitcher.add(probabilities[: len(origins)], origins)
        stitcher.finish()
        _sync(device)
    stitch_seconds = time.perf_counter() - started
    return {"tiles": len(grid), "tissue detection": tissue_seconds, "tile reading": read_seconds,
            "model (pre-decoded tiles on device)": model_seconds, "stitching": stitch_seconds}


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
    return {"seconds": seconds, "tiles": store["coordinates"].shape[0],
            "labels": np.asarray(store["predictions"]).astype(np.uint8)}


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


RUNNERS = {"ours": run_ours, "ours-bf16": lambda *a: run_ours(*a, bf16=True), "parts": run_parts,
           "tiatoolbox": run_tiatoolbox, "monai": run_monai, "naive": run_naive}


def child(args) -> None:
    result = RUNNERS[args.child](args.slide, args.model, args)
    labels = result.pop("labels", None)
    if labels is not None:
        np.save(args.labels_out, labels)
    print("RESULT " + json.dumps(result), flush=True)


# --- the parent: run each method, measure memory, compare ----------------------------------------

def process_tree_pss_kb(root: int) -> int:
    """Proportional set size (kB) of a process and all its descendants."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                total += next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def run_child(method: str, python: str, slide: Path, checkpoint: Path, args,
              labels_out: Path) -> dict:
    """Run one method in a fresh interpreter; its result plus peak tree PSS in MiB."""
    command = [python, __file__, "--child", method, "--slide", str(slide),
               "--model", str(checkpoint), "--labels-out", str(labels_out), "--device", args.device,
               "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--work-dir", str(args.work_dir)]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment)
    peak_kb = 0
    done = threading.Event()

    def sample():
        nonlocal peak_kb
        while not done.is_set():
            peak_kb = max(peak_kb, process_tree_pss_kb(process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    done.set()
    sampler.join()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {process.returncode}: {last[:160]}"}
    return {**json.loads(lines[-1][len("RESULT "):]), "peak_mib": peak_kb / 1024}


def tissue_on_grid(slide_path: Path, shape_px: tuple[int, int], mpp: float) -> np.ndarray:
    """Our tissue mask sampled at the model grid (agreement is measured on tissue pixels)."""
    from biopsy.slide import open_slide
    from biopsy.stitch import output_index
    from biopsy.tissue import detect_tissue

    tissue = detect_tissue(open_slide(slide_path))
    rows = output_index(shape_px[0], tissue.mpp, mpp, tissue.mask.shape[0])
    cols = output_index(shape_px[1], tissue.mpp, mpp, tissue.mask.shape[1])
    return np.asarray(tissue.mask, bool)[np.ix_(rows, cols)]


def agreement(labels: np.ndarray, reference: np.ndarray, tissue: np.ndarray) -> float:
    """Fraction of tissue pixels where two maps agree (cropped to their common part)."""
    height, width = (min(a, b, c) for a, b, c in zip(labels.shape, reference.shape, tissue.shape))
    same = labels[:height, :width] == reference[:height, :width]
    return float(same[tissue[:height, :width]].mean())


def tia_python(requested: str | None) -> str | None:
    if requested:
        return requested
    probe = subprocess.run([sys.executable, "-c", "import tiatoolbox"], capture_output=True)
    return sys.executable if probe.returncode == 0 else None


def main() -> None:
    from biopsy.model import read_model_info
    from biopsy.slide import open_slide

    args = parse_args()
    if args.child:
        child(args)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    slide = make_slide(args.work_dir / f"synth-{args.core_length_mm}mm", args.cores,
                       args.core_length_mm, args.core_width_mm)
    checkpoint = args.model or make_checkpoint(args.work_dir / "unet-benchmark.safetensors", slide)
    info = read_model_info(checkpoint)
    width, height = open_slide(slide).dimensions
    print(f"slide: {width} x {height} px at {SLIDE_MPP} µm/px ({args.cores} core(s) of "
          f"{args.core_length_mm} x {args.core_width_mm} mm); model: {info.patch_size_px} px tiles "
          f"at {info.input_mpp} µm/px, step {info.patch_size_px // 2}; device {args.device}, "
          f"batch {args.batch_size}, workers {args.workers}, {os.cpu_count()} CPUs", flush=True)
    results, labels = {}, {}
    for method in args.methods:
        python = tia_python(args.tia_python) if method == "tiatoolbox" else sys.executable
        if python is None:
            results[method] = {"error": "tiatoolbox not installed; give --tia-python"}
            continue
        labels_out = args.work_dir / f"labels-{method}.npy"
        labels_out.unlink(missing_ok=True)
        results[method] = run_child(method, python, slide, checkpoint, args, labels_out)
        if labels_out.exists():
            labels[method] = np.load(labels_out)
        print(f"  {method}: {_rounded(results[method])}", flush=True)
    print_table(results, labels, slide, info.input_mpp, info.patch_size_px)
    if args.parts:
        parts = run_child("parts", sys.executable, slide, checkpoint, args,
                          args.work_dir / "none.npy")
        print(f"\nwhere our time goes (s): {_rounded(parts)}")
        model_seconds = parts.get("model (pre-decoded tiles on device)")
        if model_seconds and "seconds" in results.get("ours", {}):
            print(f"ours end to end / model alone on pre-decoded tiles: "
                  f"{results['ours']['seconds'] / model_seconds:.2f}x")
    if args.rss_check:
        rss_check(args, checkpoint, results.get("ours"))


def print_table(results: dict, labels: dict, slide: Path, mpp: float, patch_px: int) -> None:
    from biopsy.labelmap import read_label_map

    truth = read_label_map(slide.parent / "labels.ome.tif")
    tissue = tissue_on_grid(slide, truth.labels.shape, mpp) if truth.mpp == mpp else None
    ours = results.get("ours", {})
    print("\n| method | wall s | tiles | tiles/s | peak MiB | agreement with ours "
          "| accuracy vs truth | time / ours |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for method, result in results.items():
        if "error" in result:
            print(f"| {method} | failed: {result['error']} | | | | | | |")
            continue
        agree = accuracy = ""
        if tissue is not None and method in labels:
            accuracy = f"{agreement(labels[method], truth.labels, tissue):.3f}"
            if "ours" in labels:
                agree = f"{agreement(labels[method], labels['ours'], tissue):.4f}"
        ratio = f"{result['seconds'] / ours['seconds']:.2f}x" if "seconds" in ours else ""
        print(f"| {method} | {result['seconds']:.1f} | {result['tiles']} | "
              f"{result['tiles'] / result['seconds']:.2f} | {result['peak_mib']:.0f} | {agree} | "
              f"{accuracy} | {ratio} |")
    if "seconds" in ours:
        # a 60,000 x 60,000 px slide at 0.5 µm/px, with this slide's share of tissue tiles
        full_grid = len(_grid_for(slide, mpp, patch_px))
        tiles_60k = (30_000 // 128) ** 2 * ours["tiles"] / full_grid
        print(f"\nprojected for a 60,000 x 60,000 px slide at 0.5 µm/px with the same tissue "
              f"share ({ours['tiles'] / full_grid:.0%} of tiles): {tiles_60k:.0f} tiles, "
              f"{tiles_60k / (ours['tiles'] / ours['seconds']) / 60:.1f} min at our tiles/s")


def _rounded(result: dict) -> dict:
    return {key: round(value, 2) if isinstance(value, float) else value
            for key, value in result.items()}


def _grid_for(slide: Path, mpp: float, patch_px: int):
    from biopsy.slide import open_slide
    from biopsy.tiling import grid_shape_px, make_grid

    opened = open_slide(slide)
    return make_grid(grid_shape_px(opened.dimensions, opened.mpp, mpp), mpp, patch_px, 0.5)


def rss_check(args, checkpoint: Path, small: dict | None) -> None:
    """Ours on a slide of 4x the area (a longer core, same width): peak memory should grow < 20%."""
    from biopsy.slide import open_slide

    length = args.core_length_mm
    small_slide = args.work_dir / f"synth-{length}mm" / "slide.svs"
    width, height = open_slide(small_slide).dimensions
    margin_mm = height * SLIDE_MPP / 1000 - length  # glass above and below the core
    long_length = round(4 * (length + margin_mm) - margin_mm, 2)
    large = make_slide(args.work_dir / f"synth-{long_length}mm", args.cores, long_length,
                       args.core_width_mm)
    large_width, large_height = open_slide(large).dimensions
    if not small or "error" in small:
        small = run_child("ours", sys.executable, small_slide, checkpoint, args,
                          args.work_dir / "labels-small.npy")
    big = run_child("ours", sys.executable, large, checkpoint, args,
                    args.work_dir / "labels-large.npy")
    growth = big["peak_mib"] / small["peak_mib"] - 1
    area_ratio = large_width * large_height / (width * height)
    print(f"\npeak memory, ours: {small['peak_mib']:.0f} MiB ({width} x {height} px, "
          f"{small['tiles']} tiles) -> {big['peak_mib']:.0f} MiB ({large_width} x {large_height} "
          f"px, {area_ratio:.1f}x the area, {big['tiles']} tiles, {big['seconds']:.0f} s): "
          f"{100 * growth:+.1f}% ({'within' if growth < 0.2 else 'OVER'} the 20% bound)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a small slide (one 1.5 x 0.8 mm core) for a 2-core CPU")
    parser.add_argument("--cores", type=int, help="tissue cores on the slide (default 2; quick 1)")
    parser.add_argument("--core-length-mm", type=float, help="default 12; quick 1.5")
    parser.add_argument("--core-width-mm", type=float, help="default 1.2; quick 0.8")
    parser.add_argument("--model", type=Path, help="checkpoint (default: a U-Net made here)")
    parser.add_argument("--batch-size", type=int, help="default 64 on CUDA, 8 on CPU")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        help="default: all (ours-bf16 only on CPU, where ours is fp32)")
    parser.add_argument("--tia-python", help="interpreter with tiatoolbox (default: this one)")
    parser.add_argument("--parts", action="store_true", help="also time our parts separately")
    parser.add_argument("--rss-check", action="store_true",
                        help="also run ours on a 4x longer core")
    parser.add_argument("--work-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "biopsy-bench")
    parser.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = (1, 1.5, 0.8) if args.quick else (2, 12.0, 1.2)
    args.cores = args.cores or defaults[0]
    args.core_length_mm = args.core_length_mm or defaults[1]
    args.core_width_mm = args.core_width_mm or defaults[2]
    on_cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (64 if on_cuda else 8)
    args.methods = args.methods or [m for m in METHODS if not (on_cuda and m == "ours-bf16")]
    return args


if __name__ == "__main__":
    main()
