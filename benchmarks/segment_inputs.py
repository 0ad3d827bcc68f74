"""Inputs of the segmentation benchmark: synthetic slides.

- :func:`make_slide`: a ``biopsy synth`` slide (biopsy cores on glass, JPEG Aperio SVS at
  0.5 µm/px) with its truth label map at 1 µm/px;
- :func:`make_large_slide`: a large square slide (e.g. 60,000 x 60,000 px) tiled with copies of a
  small synthetic slide, built in bounded memory in a minute or two.

Each is cached: an existing output is reused.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

SLIDE_MPP = 0.5
BAND_PX = 256  # rows per band handed to the pyramid writer (one JPEG tile row)


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


def make_large_slide(path: Path, size_px: int, source: Path) -> Path:
    """A ``size_px`` x ``size_px`` slide at the source's µm/px: copies of the ``source`` slide's
    level 0 (a synthetic core with its glass margins) laid edge to edge, row by row, written as a
    JPEG (q90) Aperio SVS pyramid by :func:`biopsy.pyramid.write_pyramid`.

    The tissue share is the source's: for the ``--quick`` core slide ~35% of the area and ~56%
    of the 256 px tiles at 1 µm/px, as on a densely cut section. Memory holds the source image
    and a few bands of ``BAND_PX`` rows (a 60,000 px wide band: 46 MB; up to 4 wait for the
    writer's thread); the 2x spool of the pyramid
    writer takes a quarter of level 0 on disk while it runs. Measured on a loaded 2-core CPU:
    30,000 px in 33 s (228 MiB); 60,000 px, 4x the pixels: ~2 min, ~0.9 GB. An existing
    ``path`` is reused (it is written atomically).
    """
    from biopsy.pyramid import write_pyramid
    from biopsy.slide import open_slide

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    slide = open_slide(source)
    width, height = slide.dimensions
    image = slide.read_level(0, 0, 0, width, height)
    started = time.perf_counter()
    write_pyramid(path, mosaic_bands(image, size_px), (size_px, size_px), slide.mpp[0],
                  style="aperio", description_extra={"Title": f"mosaic of {source}"})
    print(f"large slide: {size_px} x {size_px} px written in {time.perf_counter() - started:.0f} s "
          f"({path.stat().st_size / 2**20:.0f} MiB)", flush=True)
    return path


def mosaic_bands(image: np.ndarray, size_px: int):
    """Row bands (``BAND_PX`` rows, the last shorter) of a ``size_px`` square tiled with
    ``image`` from its top-left corner."""
    height, width = image.shape[:2]
    copies = -(-size_px // width)
    for top in range(0, size_px, BAND_PX):
        rows = np.arange(top, min(top + BAND_PX, size_px)) % height
        yield np.tile(image[rows], (1, copies, 1))[:, :size_px]
