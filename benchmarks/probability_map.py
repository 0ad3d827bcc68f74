"""``biopsy segment --probabilities`` on a whole-slide map: probabilities.ome.tif from bands
(as segmenting makes them) against tifffile writing the whole (C, h, w) array held in memory (how
this project wrote it before), each in a process of its own: wall time and peak memory.

The probabilities are the bundled model's on the quick synthetic slide (1.5 mm core, 1 µm/px, 11
classes; segmented here in a few seconds), repeated to ``--size-px`` square: a 60,000 px slide at
0.5 µm/px gives a 30,000 px map (9.9 GB held whole). Bands are 128 rows, made as they are written.
Both files are checked equal, level by level.

    python benchmarks/probability_map.py [--size-px 16000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from biopsy.infer import segment_slide  # noqa: E402
from biopsy.model import DEFAULT_CHECKPOINT, load_checkpoint  # noqa: E402
from biopsy.probabilitymap import TILE_PX, probability_map_writer  # noqa: E402
from biopsy.pyramid import level_shapes  # noqa: E402
from biopsy.slide import open_slide  # noqa: E402
from segment_inputs import make_slide  # noqa: E402

BAND_ROWS = 128
MPP = 1.0


def small_probabilities(work_dir: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """The bundled model's (C, h, w) probabilities of the quick slide, and its class names."""
    slide = open_slide(make_slide(work_dir / "synth-1.5mm", 1, 1.5, 0.8))
    model, info = load_checkpoint(DEFAULT_CHECKPOINT)
    result = segment_slide(slide, model, info, workers=0, return_probabilities=True)
    return result.probabilities, result.class_names


def repeated_rows(small: np.ndarray, top: int, rows: int, size_px: int) -> np.ndarray:
    """Rows ``top`` .. ``top + rows`` of ``small`` repeated to ``size_px`` square."""
    height, width = small.shape[1:]
    indices = np.arange(top, top + rows) % height
    return np.tile(small[:, indices], (1, 1, -(-size_px // width)))[:, :, :size_px]


def bands(small: np.ndarray, size_px: int):
    """The repeated probabilities in bands of ``BAND_ROWS``, top to bottom: (top, band)."""
    for top in range(0, size_px, BAND_ROWS):
        yield top, repeated_rows(small, top, min(BAND_ROWS, size_px - top), size_px)


def from_bands(path: Path, small: np.ndarray, names, size_px: int) -> None:
    with probability_map_writer(path, (size_px, size_px), MPP, names) as add:
        for _, band in bands(small, size_px):
            add(band)


def from_whole(path: Path, small: np.ndarray, names, size_px: int) -> None:
    probabilities = np.empty((len(names), size_px, size_px), np.uint8)
    for top, band in bands(small, size_px):
        probabilities[:, top : top + band.shape[1]] = band
    options = {"tile": (TILE_PX, TILE_PX), "compression": "zlib", "photometric": "minisblack"}
    levels = len(level_shapes((size_px, size_px), min_level_px=TILE_PX))
    with tifffile.TiffWriter(path, ome=True, bigtiff=probabilities.nbytes > 2**31) as tif:
        tif.write(probabilities, subifds=levels - 1, resolution=(1e4 / MPP, 1e4 / MPP),
                  resolutionunit="CENTIMETER", metadata={
                      "axes": "CYX", "PhysicalSizeX": MPP, "PhysicalSizeXUnit": "µm",
                      "PhysicalSizeY": MPP, "PhysicalSizeYUnit": "µm",
                      "Name": "class probabilities", "Channel": {"Name": list(names)}}, **options)
        for level in range(1, levels):
            step = 2**level
            tif.write(probabilities[:, ::step, ::step], subfiletype=1,
                      resolution=(1e4 / (MPP * step), 1e4 / (MPP * step)),
                      resolutionunit="CENTIMETER", metadata=None, **options)


def memory_gb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, in GiB (Linux; unlike
    ``ru_maxrss``, not carried over from the parent through fork and exec)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 2**20


def timed(write, path: Path, small: np.ndarray, names, size_px: int, results) -> None:
    """In a child process: ``write``'s seconds and the process's peak memory (GiB) beyond what
    it held before."""
    start_gb = memory_gb("VmRSS")
    started = time.perf_counter()
    write(path, small, names, size_px)
    seconds = time.perf_counter() - started
    results.put((seconds, memory_gb("VmHWM") - start_gb))


def run(write, path: Path, small: np.ndarray, names, size_px: int) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")  # a fresh process: its own peak memory
    results = context.Queue()
    process = context.Process(target=timed, args=(write, path, small, names, size_px, results))
    process.start()
    process.join()
    if process.exitcode:
        raise SystemExit(f"{write.__name__} failed (exit code {process.exitcode})")
    return results.get()


def same_files(first: Path, second: Path) -> bool:
    """The same pixels, level by level, one channel plane at a time (never a level whole)."""
    with tifffile.TiffFile(first) as one, tifffile.TiffFile(second) as other:
        return all(np.array_equal(a.asarray(), b.asarray())
                   for level, other_level in zip(one.series[0].levels, other.series[0].levels,
                                                 strict=True)
                   for a, b in zip(level.pages, other_level.pages, strict=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-px", type=int, default=16000, help="map side (default 16000)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "biopsy-bench")
    args = parser.parse_args(argv)
    small, names = small_probabilities(args.work_dir)
    whole_gb = len(names) * args.size_px**2 / 2**30
    print(f"probabilities.ome.tif of a {args.size_px} x {args.size_px} px map, {len(names)} classes "
          f"({whole_gb:.1f} GiB whole):")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as out:
        results = {}
        for write in (from_bands, from_whole):
            path = Path(out) / f"{write.__name__}.ome.tif"
            results[write] = run(write, path, small, names, args.size_px)
            print(f"  {write.__name__:<10} {results[write][0]:7.1f} s, peak memory "
                  f"+{results[write][1]:.2f} GiB")
        assert same_files(Path(out) / "from_bands.ome.tif", Path(out) / "from_whole.ome.tif")
    (bands_s, bands_gb), (whole_s, whole_gb) = results[from_bands], results[from_whole]
    print(f"  whole / bands: time {whole_s / bands_s:.2f}x, peak memory "
          f"{whole_gb / max(bands_gb, 1e-3):.1f}x; the files are the same")


if __name__ == "__main__":
    main()
