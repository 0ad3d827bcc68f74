"""Whole-slide segmentation, side by side: this engine, TIAToolbox, MONAI and a naive loop.

One synthetic slide (``biopsy synth``: biopsy cores on glass, JPEG Aperio SVS at 0.5 µm/px, with
its truth label map) and one checkpoint (the bundled model, ``biopsy/models/default.safetensors``:
a ResNet18 U-Net, 11 classes, 256 px tiles at 1 µm/px; or ``--model``) go through
(inputs: ``segment_inputs.py``; the methods: ``segment_runners.py``):

1. ``ours``: :func:`biopsy.infer.segment_slide` (tissue tiles only, read in this process on a
   CPU and by worker processes on CUDA, Gaussian blending, band-streamed stitching; bf16 on
   CUDA), the model prepared first (:func:`biopsy.infer.prepare_model`: BatchNorm folded, on a
   CPU the sub-pixel decoder); ``ours-bf16`` with bf16 autocast on CPU too; ``ours-int8`` with
   the int8 model built from the checkpoint's calibration (``biopsy calibrate``); preparing and
   building are part of loading the model, once per process (``biopsy.pipeline.load_model``),
   so like loading they are reported beside the wall time, not in it; ``ours-compile`` (only
   when asked for) with ``torch.compile``, its compilation in the wall time; stain normalisation off, as the peers have none (``--large-px`` keeps it: the production path);
2. ``tiatoolbox``: ``SemanticSegmentor.run(patch_mode=False)`` with its automatic tissue mask and
   the same tiles and stride, workers as ``method_workers`` says (needs ``tiatoolbox``;
   ``--tia-python`` names an interpreter that has it, e.g. a separate environment, since it pins
   older torch/numpy);
3. ``monai``: ``SlidingWindowInferer(mode="gaussian", sigma_scale=0.125)`` over the slide read whole
   at the model's mpp;
4. ``naive``: every tile (tissue or not) read with OpenSlide ``read_region`` and box-resized,
   batch 1, fp32, NCHW, Gaussian blended into a whole-slide float array.

Each runs in its own process, ``--repeat`` times and once more: the table gives the median wall
time (including tissue detection and slide loading, excluding interpreter start) and tiles/s of
the timed runs, peak memory from the last run (PSS summed over the process and its workers, so
forked workers' shared pages count once, sampled every 0.1 s: the sampling itself slows a 2-core
machine by up to a third, so it stays out of the timed runs), agreement with ours and accuracy against
the truth on tissue pixels, and time relative to ours. ``--parts`` times our stages alone (tissue
detection, tile reading, host-to-device transfer, model on pre-decoded tiles, stitching);
``--rss-check`` runs ours on a 4x longer core. ``--large-px N`` times ours end to end (slide in,
pyramidal ``labels.ome.tif`` out, streamed) on an N x N px slide at 0.5 µm/px tiled with copies of
the ``--quick`` core slide (~35% of the area tissue), built once per size in the work dir (60,000
px: ~1 GB, ~1-2 min), and where its time goes.

    python benchmarks/segment.py --quick --parts --rss-check --repeat 3   # 2-core CPU, ~10 minutes
    python benchmarks/segment.py --quick --methods ours --large-px 4000   # CPU, ~3-10 minutes
    python benchmarks/segment.py --device cuda --parts --rss-check --large-px 60000  # GPU machine

TIAToolbox 2.1 pins torch < 2.13 and older numpy, tifffile and openslide, so it lives in its own
environment layered over the project's (nothing of ours is downgraded): ``make tia-venv`` makes
``.venv-tia``, and ``make bench`` then passes ``--tia-python .venv-tia/bin/python``::

    make tia-venv
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
from pathlib import Path

import numpy as np

from segment_inputs import SLIDE_MPP, make_large_slide, make_slide
from segment_runners import RUNNERS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("ours", "ours-bf16", "ours-int8", "ours-compile", "tiatoolbox", "monai", "naive")
CPU_ONLY = ("ours-bf16", "ours-int8")  # on CUDA, ours is bf16 already and int8 is CPU-only


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
              labels_out: Path, memory_interval_s: float | None = None) -> dict:
    """Run one method in a fresh interpreter: its result, plus its peak tree PSS in MiB when
    ``memory_interval_s`` is given. Sampling PSS walks the page tables of every process of the
    tree (~50 ms for a torch process), so on a small machine it slows the run it measures by up
    to a third: wall times come from runs without it."""
    command = [python, __file__, "--child", method, "--slide", str(slide),
               "--model", str(checkpoint), "--labels-out", str(labels_out), "--device", args.device,
               "--batch-size", str(args.batch_size), "--workers", str(method_workers(method, args)),
               "--work-dir", str(args.work_dir),
               *(["--large-px", str(args.large_px)] if args.large_px else [])]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment)
    peak_kb = 0
    done = threading.Event()

    def sample():
        nonlocal peak_kb
        while not done.is_set():
            peak_kb = max(peak_kb, process_tree_pss_kb(process.pid))
            done.wait(memory_interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    if memory_interval_s:
        sampler.start()
    stdout, stderr = process.communicate()
    done.set()
    if memory_interval_s:
        sampler.join()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {process.returncode}: {last[:160]}"}
    result = json.loads(lines[-1][len("RESULT "):])
    return {**result, "peak_mib": peak_kb / 1024} if memory_interval_s else result


def method_workers(method: str, args) -> int:
    """Tile-reading worker processes for ``method``: ``--workers`` when given; else ours as
    ``biopsy segment`` has them (none on a CPU, up to 8 on CUDA), and TIAToolbox's loader
    min(8, CPUs), its fastest on the 2-core CPU (5.9 s, against 6.4 s without; MONAI and the
    naive loop read in their own process)."""
    if args.workers is not None:
        return args.workers
    if method == "tiatoolbox":
        return min(8, os.cpu_count() or 1)
    from biopsy.infer import default_workers
    return default_workers(args.device)


def timed_and_sampled(method: str, python: str, slide: Path, checkpoint: Path, args,
                      labels_out: Path) -> dict:
    """A method's result with the median wall time of ``args.repeat`` runs without memory
    sampling, and its peak memory from one more run sampled every 0.1 s."""
    runs = []
    for _ in range(args.repeat):
        runs.append(run_child(method, python, slide, checkpoint, args, labels_out))
        if "error" in runs[-1]:
            return runs[-1]
    memory = run_child(method, python, slide, checkpoint, args, labels_out.with_suffix(".mem.npy"),
                       memory_interval_s=0.1)
    labels_out.with_suffix(".mem.npy").unlink(missing_ok=True)
    seconds = [run["seconds"] for run in runs]
    return {**runs[0], "seconds": float(np.median(seconds)), "spread_s": max(seconds) - min(seconds),
            "peak_mib": memory.get("peak_mib", float("nan"))}


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
    from biopsy.model import DEFAULT_CHECKPOINT, read_model_info
    from biopsy.slide import open_slide

    args = parse_args()
    if args.child:
        child(args)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    slide = make_slide(args.work_dir / f"synth-{args.core_length_mm}mm", args.cores,
                       args.core_length_mm, args.core_width_mm)
    checkpoint = args.model or DEFAULT_CHECKPOINT
    info = read_model_info(checkpoint)
    width, height = open_slide(slide).dimensions
    print(f"slide: {width} x {height} px at {SLIDE_MPP} µm/px ({args.cores} core(s) of "
          f"{args.core_length_mm} x {args.core_width_mm} mm); model: {info.patch_size_px} px tiles "
          f"at {info.input_mpp} µm/px, step {info.patch_size_px // 2}; device {args.device}, "
          f"batch {args.batch_size}, workers: ours {method_workers('ours', args)}, TIAToolbox "
          f"{method_workers('tiatoolbox', args)}; {os.cpu_count()} CPUs", flush=True)
    results, labels = {}, {}
    for method in args.methods:
        python = tia_python(args.tia_python) if method == "tiatoolbox" else sys.executable
        if python is None:
            results[method] = {"error": "tiatoolbox not installed; give --tia-python"}
            continue
        labels_out = args.work_dir / f"labels-{method}.npy"
        labels_out.unlink(missing_ok=True)
        results[method] = timed_and_sampled(method, python, slide, checkpoint, args, labels_out)
        if labels_out.exists():
            labels[method] = np.load(labels_out)
        print(f"  {method}: {_rounded(results[method])}", flush=True)
    print_table(results, labels, slide, info.input_mpp, info.patch_size_px,
                project=not args.large_px)  # --large-px measures it instead
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
    if args.large_px:
        large_check(args, checkpoint)


def print_table(results: dict, labels: dict, slide: Path, mpp: float, patch_px: int,
                project: bool = True) -> None:
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
    prepared = {method: f"{result['model prepared in s']:.2f} s" for method, result in
                results.items() if "model prepared in s" in result}
    if prepared:
        print(f"\nours: the model was prepared (int8: built and prepared) before the timed run in "
              f"{', '.join(f'{method} {s}' for method, s in prepared.items())} (once per process, "
              f"like loading the checkpoint, which no method's time includes)")
    if "seconds" in ours and project:
        # a 60,000 x 60,000 px slide at 0.5 µm/px, with this slide's share of tissue tiles
        full_grid = len(_grid_for(slide, mpp, patch_px))
        tiles_60k = (30_000 // 128) ** 2 * ours["tiles"] / full_grid
        print(f"\nprojected for a 60,000 x 60,000 px slide at 0.5 µm/px with the same tissue "
              f"share ({ours['tiles'] / full_grid:.0%} of tiles): {tiles_60k:.0f} tiles, "
              f"{tiles_60k / (ours['tiles'] / ours['seconds']) / 60:.1f} min at our tiles/s "
              f"(an upper bound where this slide's fixed costs weigh; --large-px 60000 "
              f"measures it)")


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
                          args.work_dir / "labels-small.npy", memory_interval_s=0.1)
    big = run_child("ours", sys.executable, large, checkpoint, args,
                    args.work_dir / "labels-large.npy", memory_interval_s=0.1)
    growth = big["peak_mib"] / small["peak_mib"] - 1
    area_ratio = large_width * large_height / (width * height)
    print(f"\npeak memory, ours: {small['peak_mib']:.0f} MiB ({width} x {height} px, "
          f"{small['tiles']} tiles) -> {big['peak_mib']:.0f} MiB ({large_width} x {large_height} "
          f"px, {area_ratio:.1f}x the area, {big['tiles']} tiles, {big['seconds']:.0f} s): "
          f"{100 * growth:+.1f}% ({'within' if growth < 0.2 else 'OVER'} the 20% bound)")


def large_check(args, checkpoint: Path) -> None:
    """Ours end to end on an ``args.large_px`` square slide made of copies of the quick core slide
    (the map streamed to a pyramidal label map), then each of its stages alone."""
    source = make_slide(args.work_dir / "synth-1.5mm", 1, 1.5, 0.8)
    folder = args.work_dir / f"large-{args.large_px}px"
    slide = make_large_slide(folder / "slide.svs", args.large_px, source)
    # one run, for time and memory: sampled once a second, a few % of one core
    ours = run_child("large", sys.executable, slide, checkpoint, args, folder / "labels.ome.tif",
                     memory_interval_s=1.0)
    parts = run_child("parts", sys.executable, slide, checkpoint, args, folder / "none.npy")
    size = f"{args.large_px:,} x {args.large_px:,} px"
    if "error" in ours:
        print(f"\n{size}: ours failed: {ours['error']}")
        return
    print(f"\n{size} at {SLIDE_MPP} µm/px (copies of {source.parent.name}): "
          f"{ours['tissue fraction']:.0%} of the area tissue, {ours['tiles']} of "
          f"{ours['grid tiles']} tiles ({ours['tiles'] / ours['grid tiles']:.0%})")
    print(f"ours end to end (slide in, labels.ome.tif out): {ours['seconds']:.1f} s "
          f"({ours['seconds'] / 60:.1f} min), {ours['tiles'] / ours['seconds']:.1f} tiles/s, "
          f"peak {ours['peak_mib']:.0f} MiB")
    if "error" in parts:
        print(f"where its time goes: failed: {parts['error']}")
        return
    stages = {key: value for key, value in parts.items() if key not in ("tiles", "peak_mib")}
    largest = max(stages, key=stages.get)
    print(f"where its time goes (s, each stage alone): {_rounded(stages)}; largest: {largest} "
          f"({stages[largest] / ours['seconds']:.0%} of end to end)")
    model_s = stages["model (pre-decoded tiles on device)"]
    print(f"ours end to end / model alone on pre-decoded tiles: {ours['seconds'] / model_s:.2f}x; "
          f"the tile loop with the writing it feeds (first band to last, "
          f"{ours['tile loop seconds']:.1f} s) / model alone: "
          f"{ours['tile loop seconds'] / model_s:.2f}x")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a small slide (one 1.5 x 0.8 mm core) for a 2-core CPU")
    parser.add_argument("--cores", type=int, help="tissue cores on the slide (default 2; quick 1)")
    parser.add_argument("--core-length-mm", type=float, help="default 12; quick 1.5")
    parser.add_argument("--core-width-mm", type=float, help="default 1.2; quick 0.8")
    parser.add_argument("--model", type=Path, help="checkpoint (default: the bundled model)")
    parser.add_argument("--batch-size", type=int, help="default 64 on CUDA, 8 on CPU")
    parser.add_argument("--workers", type=int,
                        help="tile-reading workers of ours and TIAToolbox (default: ours none "
                             "on a CPU and up to 8 on CUDA, as biopsy segment; TIAToolbox "
                             "min(8, CPUs))")
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        help="default: all but ours-compile (ours-bf16 and ours-int8 only on "
                             "CPU, where ours is fp32; ours-bf16 only where the CPU has bf16 "
                             "instructions)")
    parser.add_argument("--tia-python", help="interpreter with tiatoolbox (default: this one)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed runs per method; the table gives the median (default 1)")
    parser.add_argument("--parts", action="store_true", help="also time our parts separately")
    parser.add_argument("--rss-check", action="store_true",
                        help="also run ours on a 4x longer core")
    parser.add_argument("--large-px", type=int, metavar="N",
                        help="also time ours on an N x N px slide (e.g. 60000; 8000 on a CPU)")
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
    skipped = {"ours-compile"} | (set(CPU_ONLY) if on_cuda else set())
    from biopsy.infer import emulates_bf16
    if not on_cuda and emulates_bf16("cpu"):
        skipped.add("ours-bf16")  # ~10x slower than float32 here: nothing to learn
    args.methods = args.methods or [m for m in METHODS if m not in skipped]
    return args


if __name__ == "__main__":
    main()
