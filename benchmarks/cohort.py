"""Cohort throughput: ``biopsy batch`` over synthetic slides with one process, and with several
ranks sharing the machine's device(s) under ``torchrun``, slides per minute side by side.

With more ranks than GPUs, local ranks take the GPUs in turn
(:attr:`biopsy.batch.DistributedContext.device`), so that one rank segments a slide on the GPU
while another detects nuclei, scores and writes on the CPU. Each run scores the whole cohort
into a fresh folder (comparisons and cohort statistics included); slides are made once
(``benchmarks/scoring.py``'s synthetic slides, one stain per patient) and reused from
``--work-dir``.

    python benchmarks/cohort.py                                         # 8 slides, 1 and 2 ranks
    python benchmarks/cohort.py --slides 2 --core-length-mm 1 --ranks 1 2  # a CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring import FIRST_SEED, PRESETS, STAINS, ensure_slide  # noqa: E402


def write_manifest(work_dir: Path, slides: int, core_length_mm: float) -> Path:
    """manifest.csv of ``slides`` synthetic slides in ``work_dir`` (made unless there already):
    patient i's pre and post slides, one stain per patient."""
    rows = []
    for index in range(slides):
        preset, stain = PRESETS[index % len(PRESETS)], STAINS[index // 2 % len(STAINS)]
        seed = FIRST_SEED + index
        folder = work_dir / f"{preset}-{stain}-{seed}-{core_length_mm:g}mm" / "synth"
        truth = ensure_slide(folder, preset, stain, seed, core_length_mm)
        rows.append({"patient_id": f"P{index // 2}", "timepoint": ("pre", "post")[index % 2],
                     "slide": folder / truth["slide"]["file"], "stain": stain})
    manifest = work_dir / f"manifest-{slides}-{core_length_mm:g}mm.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def batch_seconds(manifest: Path, ranks: int, workers: int | None) -> float:
    """Wall time of scoring the manifest's cohort into a fresh folder with ``ranks`` processes."""
    arguments = [str(manifest), "--no-progress"] + ([] if workers is None else ["--workers", str(workers)])
    launch = [sys.executable] + ([] if ranks == 1 else  # torchrun, where no script of it is
                                 ["-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={ranks}"])
    # the machine's cores shared between the ranks (torchrun would give each rank one thread)
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run(launch + ["-m", "biopsy", "batch"] + arguments + ["--out", out], check=True,
                       env=os.environ | threads)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=8, help="cohort size, two per patient (default 8)")
    parser.add_argument("--core-length-mm", type=float, default=3.0, help="biopsy core length (default 3)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2],
                        help="processes per run, one row each (default 1 2)")
    parser.add_argument("--workers", type=int, help="tile-reading workers per rank (default: batch's)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "biopsy-cohort",
                        help="where the slides are made and reused (default: %(default)s)")
    args = parser.parse_args(argv)
    work_dir = args.work_dir.resolve()  # the manifest's slide paths are taken from its folder
    work_dir.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(work_dir, args.slides, args.core_length_mm)
    seconds = {ranks: batch_seconds(manifest, ranks, args.workers) for ranks in args.ranks}
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    print(f"\n{args.slides} synthetic slides of {args.core_length_mm:g} mm cores; {device}; "
          f"workers per rank: {args.workers or 'batch default'}")
    print("| ranks | wall s | slides/min | time / first row |\n| ---: | ---: | ---: | ---: |")
    first = seconds[args.ranks[0]]
    for ranks, wall in seconds.items():
        print(f"| {ranks} | {wall:.1f} | {60 * args.slides / wall:.1f} | {wall / first:.2f}x |")


if __name__ == "__main__":
    main()
