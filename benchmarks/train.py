"""Training throughput: the project's loop on its real data pipeline vs a plain PyTorch loop.

1. ``ours``: :func:`training.loop.fit` with ``configs/train/synthetic-pas.yaml`` (overridden in
   memory: step count, batch size, workers, precision, compile; output in a temporary folder; no
   validation and no intermediate saves) on synthetic slides made with the ``python -m training
   synth`` code, so every batch goes through the real pipeline: patch sampling, SVS reads in
   DataLoader workers, albumentations, pinned copies, normalisation on the device. One row per
   ``--workers`` value.
2. ``plain``: the same model, loss (Dice + CE), optimiser (the loop's fused AdamW), gradient
   clipping, batch size, precision and channels_last, on one random batch already on the device:
   forward, backward, clip, step and nothing else, the upper bound without data loading.

Warm-up steps (``--warmup``, including any ``torch.compile`` time) are not timed. The table gives
images/s, the ratio ours/plain, the mean GPU utilisation over the timed window (NVML's
"percent of time a kernel was executing", read with ``torch.cuda.utilization``, which needs the
``nvidia-ml-py`` package; n/a on CPU) and the share of wall time the loop spent blocked in
``next(loader)`` (``data_wait_s`` in ``log.csv``). On CUDA the loop runs ahead of the GPU, so a
short wait can overlap GPU work; GPU utilisation is the measure of starvation, the wait says why.
Below the table, the patch stream alone (one worker's work, in this process on one core) and
what that many workers could feed at most, against the plain loop.
Slides are generated once into ``--data`` and reused. ``--profile FILE`` then runs ours once more
under cProfile (the main thread: what launches the GPU's work) and prints where its time goes.

    python benchmarks/train.py --quick                          # CPU smoke run: ~2 min on 2 busy cores
    python benchmarks/train.py --device cuda --workers 4 8 15   # GPU, the config's batch of 8
    python benchmarks/train.py --device cuda --workers 15 --batch-size 32 --compile
    python benchmarks/train.py --device cuda --workers 15 --batch-size 64 --profile train.prof
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import importlib.util
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from biopsy.model import build_model  # noqa: E402
from biopsy.slide import single_threaded_opencv  # noqa: E402
from training.config import Config, config_from_dict  # noqa: E402
from training.cases import find_slides, normalise_stains  # noqa: E402
from training.loop import build_optimiser, fit, model_info, patch_dataset  # noqa: E402
from training.losses import DiceCrossEntropyLoss  # noqa: E402
from training.synthetic import generate_training_set  # noqa: E402

CONFIG = REPO / "configs" / "train" / "synthetic-pas.yaml"
QUICK_PROFILE = {"core_length_mm": 1.0, "core_width_mm": 0.5, "glomeruli": 3}
GPU_TARGET_PERCENT = 90
PROFILE_ROWS = 25


@dataclass
class Result:
    """One row of the table."""

    name: str
    workers: int | None
    images_per_s: float
    gpu_percent: float | None
    data_wait_share: float | None


class UtilisationSampler:
    """GPU utilisation (%) every ``period_s`` in a thread, each sample tagged with ``phase()``
    (0 warm-up, 1 timed, 2 done) at the time it was read."""

    def __init__(self, device: torch.device, phase, period_s: float = 0.1):
        self.device, self.phase, self.period_s = device, phase, period_s
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "UtilisationSampler":
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append((self.phase(), torch.cuda.utilization(self.device)))

    def timed_mean(self) -> float | None:
        """Mean utilisation of the samples read during the timed window (None on CPU)."""
        timed = [value for phase, value in self.samples if phase == 1]
        return statistics.fmean(timed) if timed else None


def benchmark_config(args, workers: int = 0, output: Path | None = None) -> Config:
    """synthetic-pas.yaml with this run's settings, checked like any config (``output``: fit's
    output folder, where fit runs)."""
    data = yaml.safe_load(CONFIG.read_text())
    total = args.warmup + args.steps
    data["output_dir"] = str(output or tempfile.gettempdir())
    data["data"]["root"] = str(args.data)
    data["data"]["split"] = {"validation_cases": []}  # every slide trains
    data["synth"]["slides"] = args.slides
    if args.quick:
        data["synth"]["profile"] = QUICK_PROFILE  # the config's stains
    train = data["train"]
    # fit(stop_at=total) with one step more in the schedule: the end-of-schedule validation and
    # the checkpoints never run; state.pt is written after the last timed row.
    train.update(steps=total + 1, validate_every=total + 1, save_every=total + 1,
                 log_every=args.log_every, batch_size=args.batch_size, workers=workers,
                 compile=args.compile)
    if args.precision:
        train["precision"] = args.precision
    source = f"{CONFIG} (as overridden by {Path(__file__).name})"
    config = config_from_dict(data, source)
    config.source = source  # errors raised later (fit, synth) name it too
    return config


def run_ours(args, workers: int, device: torch.device) -> Result:
    """training.loop.fit for warm-up + timed steps; figures from its log.csv rows after warm-up."""
    with tempfile.TemporaryDirectory(prefix="trainbench-") as folder:
        config = benchmark_config(args, workers, Path(folder))
        log = Path(folder) / "log.csv"
        warm_rows, total_rows = args.warmup // args.log_every, (args.warmup + args.steps) // args.log_every

        def phase() -> int:
            rows = log.read_text().count("\n") - 1 if log.exists() else 0
            return 0 if rows < warm_rows else 1 if rows < total_rows else 2

        with UtilisationSampler(device, phase) as sampler:
            fit(config, stop_at=args.warmup + args.steps)
        images_per_s, wait_share = summarise_log(log, args.warmup, args.batch_size)
    return Result("ours", workers, images_per_s, sampler.timed_mean(), wait_share)


def summarise_log(path: Path, warmup: int, batch_size: int) -> tuple[float, float]:
    """(images/s, share of wall time blocked waiting for data) over the log.csv rows after step
    ``warmup``; each row covers the steps since the previous row."""
    with open(path, newline="") as f:
        rows = [(int(r["step"]), float(r["images_per_s"]), float(r["data_wait_s"]))
                for r in csv.DictReader(f)]
    images = seconds = wait_s = 0.0
    for (previous, _, _), (step, images_per_s, row_wait_s) in zip(rows, rows[1:]):
        if previous >= warmup:
            images += (step - previous) * batch_size
            seconds += (step - previous) * batch_size / images_per_s
            wait_s += row_wait_s
    if not seconds:
        raise SystemExit(f"{path}: no logged rows after the {warmup} warm-up steps")
    return images / seconds, wait_s / seconds


def run_plain(args, device: torch.device) -> Result:
    """forward, loss, backward, clip, optimiser step on one batch already on the device."""
    config = benchmark_config(args)
    info = model_info(config)
    torch.manual_seed(config.seed)
    model = build_model(info.architecture, len(info.class_names), info.in_channels, **info.arguments)
    model = model.to(device, memory_format=torch.channels_last)
    network = torch.compile(model) if config.train.compile else model
    optimiser = build_optimiser(config, model)
    loss_function = DiceCrossEntropyLoss(config.loss.dice_weight, config.loss.ce_weight).to(device)
    size_px = info.patch_size_px
    images = torch.randint(0, 256, (args.batch_size, size_px, size_px, info.in_channels), dtype=torch.uint8)
    inputs = info.normalise(images.to(device))  # float NCHW in channels_last memory
    target = torch.randint(0, len(info.class_names), (args.batch_size, size_px, size_px)).to(device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=config.train.bf16(device.type))

    def step() -> None:
        with autocast:
            loss = loss_function(network(inputs), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
        optimiser.step()

    current = [0]
    with UtilisationSampler(device, lambda: current[0]) as sampler:
        for _ in range(args.warmup):
            step()
        _synchronise(device)
        current[0], start = 1, time.perf_counter()
        for _ in range(args.steps):
            step()
        _synchronise(device)
        elapsed, current[0] = time.perf_counter() - start, 2
    return Result("plain", None, args.batch_size * args.steps / elapsed, sampler.timed_mean(), None)


def profile_ours(args, workers: int, path: Path) -> None:
    """cProfile of the main thread over a run of ours as timed (warm-up included), written to
    ``path``; prints the functions that took most of its time."""
    with tempfile.TemporaryDirectory(prefix="trainprofile-") as folder:
        config = benchmark_config(args, workers, Path(folder))
        profiler = cProfile.Profile()
        profiler.runcall(fit, config, stop_at=args.warmup + args.steps)
    profiler.dump_stats(path)
    print(f"\nmain thread of ours, {workers} workers, {args.warmup} + {args.steps} steps under "
          f"cProfile ({path}), by time in each function itself:")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(PROFILE_ROWS)


def run_patch_stream(args) -> float:
    """Patches per second of the training patch stream (patch sampling, slide reading, labels,
    augmentation: what each DataLoader worker does) in this process, OpenCV single-threaded as
    in a worker: what one worker on one core of this machine can feed."""
    config = benchmark_config(args)
    slides = find_slides(config.data, config.model.classes, config.source)
    if config.model.stain_normalisation:
        normalise_stains(slides, [])
    dataset = patch_dataset(config, slides, rank=0)
    single_threaded_opencv(0)
    count = 10 * args.batch_size
    for index in range(args.batch_size):  # warm-up: slides opened, caches filled
        dataset[index]
    start = time.perf_counter()
    for index in range(args.batch_size, args.batch_size + count):
        dataset[index]
    return count / (time.perf_counter() - start)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_table(results: list[Result], stream: float, args, device: torch.device) -> None:
    plain = next(r for r in results if r.name == "plain")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    config = benchmark_config(args)
    print(f"\n{name}; {config.model.arguments['encoder']} U-Net, {config.model.patch_size_px} px patches, "
          f"batch {args.batch_size}, {'bf16' if config.train.bf16(device.type) else 'fp32'}, "
          f"channels_last, compile {'on' if args.compile else 'off'}; {args.steps} timed steps after "
          f"{args.warmup} warm-up; {args.slides} synthetic slides in {args.data}")
    print(f"{'run':<8}{'workers':>8}{'images/s':>11}{'ours/plain':>12}{'GPU util %':>12}{'data wait %':>13}")
    for r in results:
        print(f"{r.name:<8}{'-' if r.workers is None else r.workers:>8}{r.images_per_s:>11.2f}"
              f"{r.images_per_s / plain.images_per_s:>12.2f}"
              f"{'n/a' if r.gpu_percent is None else f'{r.gpu_percent:.0f}':>12}"
              f"{'-' if r.data_wait_share is None else f'{100 * r.data_wait_share:.1f}':>13}")
    workers = max(args.workers)
    print(f"patch stream in one process (one worker's work on one core): {stream:.1f} patches/s; "
          f"{workers} worker{'s' * (workers > 1)} on as many free cores: at most "
          f"~{workers * stream:.0f} images/s, "
          f"{workers * stream / plain.images_per_s:.2f}x the plain loop")
    if device.type == "cuda":
        best = max((r for r in results if r.name == "ours"), key=lambda r: r.gpu_percent or 0)
        percent = best.gpu_percent or 0  # None: the timed window was shorter than one sample
        print(f"target GPU utilisation >= {GPU_TARGET_PERCENT}% (issue 4): "
              f"{'met' if percent >= GPU_TARGET_PERCENT else 'NOT met'} "
              f"(best: {percent:.0f}% with {best.workers} workers)")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when there is one")
    parser.add_argument("--quick", action="store_true",
                        help="2 small slides, batch 4, 2 + 4 steps, 1 worker (a CPU smoke run)")
    parser.add_argument("--steps", type=int, help="timed steps (default 400 on CUDA, 20 on CPU, 4 quick)")
    parser.add_argument("--warmup", type=int,
                        help="untimed steps first, at least one log row (default 30, 2 quick)")
    parser.add_argument("--batch-size", type=int, help="default: the config's (8); 4 quick")
    parser.add_argument("--workers", type=int, nargs="+",
                        help="DataLoader workers, one 'ours' row each (default: the config's; 1 quick)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="default: the config's")
    parser.add_argument("--compile", action="store_true", help="torch.compile both loops")
    parser.add_argument("--slides", type=int, help="synthetic slides (default 6, 2 quick)")
    parser.add_argument("--data", type=Path, help="slide folder, reused (default: a folder in /tmp)")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="then run ours (the last --workers) again under cProfile, saving "
                             "its statistics in FILE")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before any CUDA call: fit() takes a GPU if it sees one
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    configured = yaml.safe_load(CONFIG.read_text())["train"]
    args.log_every = 1 if args.quick else configured["log_every"]
    args.steps = _multiple(args.steps or (4 if args.quick else 400 if args.device == "cuda" else 20),
                           args.log_every)
    args.warmup = _multiple(args.warmup or (2 if args.quick else 30), args.log_every)
    args.batch_size = args.batch_size or (4 if args.quick else configured["batch_size"])
    args.workers = args.workers or [1 if args.quick else configured["workers"]]
    args.slides = args.slides or (2 if args.quick else 6)
    folder = "quick" if args.quick else "full"
    args.data = args.data or Path(tempfile.gettempdir(), "biopsy-trainbench", folder)
    return args


def _multiple(steps: int, of: int) -> int:
    """``steps`` rounded up to a multiple of ``of`` (whole log.csv rows)."""
    return -(-steps // of) * of


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.device == "cuda" and importlib.util.find_spec("pynvml") is None:  # torch.cuda.utilization's
        raise SystemExit("GPU utilisation needs NVML's Python bindings: pip install nvidia-ml-py")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    generate_training_set(benchmark_config(args))
    results = [run_plain(args, device)]
    for workers in args.workers:
        results.append(run_ours(args, workers, device))
        print(f"ours with {workers} workers: {results[-1].images_per_s:.2f} images/s", file=sys.stderr)
    print_table(results, run_patch_stream(args), args, device)
    if args.profile:
        profile_ours(args, args.workers[-1], args.profile)


if __name__ == "__main__":
    main()
