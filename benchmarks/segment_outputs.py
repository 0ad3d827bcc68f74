"""What ``biopsy segment`` writes after segmenting, on a whole-slide class map: its time and memory.

The class map is the bundled model's on the quick synthetic slide (1.5 mm core, 1 µm/px; segmented
here in a few seconds), repeated to ``--size-px`` square: a 60,000 px slide at 0.5 µm/px gives a
30,000 px map. Times ``write_segmentation`` (labels.ome.tif, objects.geojson, overview.png,
segment.json) with ``--workers`` tracing processes, then objects.geojson's outlines alone against
skimage's marching squares region by region (the earlier implementation, one process) on a
``--peer-size-px`` map, as a ratio.

    python benchmarks/segment_outputs.py [--size-px 30000] [--workers 2] [--peer-size-px 8000]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import Polygon
from skimage.measure import find_contours

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from biopsy.infer import ClassMap, segment_slide  # noqa: E402
from biopsy.model import load_checkpoint  # noqa: E402
from biopsy.outlines import polygons_from_mask  # noqa: E402
from biopsy.segment_outputs import write_segmentation  # noqa: E402
from biopsy.slide import open_slide  # noqa: E402
from segment_inputs import make_slide  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "biopsy" / "models" / "default.safetensors"


def class_map_of_size(slide, size_px: int) -> ClassMap:
    """The bundled model's class map of ``slide``, repeated to ``size_px`` square."""
    model, info = load_checkpoint(MODEL)
    small = segment_slide(slide, model, info, workers=0)
    repeats = (-(-size_px // small.labels.shape[0]), -(-size_px // small.labels.shape[1]))
    labels = np.ascontiguousarray(np.tile(small.labels, repeats)[:size_px, :size_px])
    return ClassMap(labels, small.mpp, small.class_names, small.class_colours)


def peer_polygons(mask: np.ndarray, tolerance_px: float) -> list[Polygon]:
    """Each 8-connected region labelled, cut out and traced by skimage's marching squares."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    polygons = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        region = np.pad(labels[box] == index, 1).astype(np.uint8)
        rings = [np.column_stack([contour[:, 1] + box[1].start - 0.5, contour[:, 0] + box[0].start - 0.5])
                 for contour in find_contours(region, 0.5, fully_connected="high")]
        rings.sort(key=lambda ring: Polygon(ring).area, reverse=True)
        polygon = shapely.make_valid(Polygon(rings[0], rings[1:]))
        polygon = polygon.simplify(0, preserve_topology=False)
        polygons.append(polygon.simplify(tolerance_px, preserve_topology=True))
    return polygons


def outline_seconds(class_map: ClassMap, trace) -> tuple[float, int]:
    """Seconds ``trace(mask)`` takes over every non-background class's mask, and the regions."""
    started, regions = time.perf_counter(), 0
    for index in range(1, len(class_map.class_names)):
        regions += len(trace(class_map.labels == index))
    return time.perf_counter() - started, regions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-px", type=int, default=30000, help="class map side (default 30000)")
    parser.add_argument("--workers", type=int, default=2, help="tracing processes (default 2)")
    parser.add_argument("--peer-size-px", type=int, default=8000,
                        help="class map side for the comparison of outlines (default 8000; 0: none)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "biopsy-bench")
    args = parser.parse_args(argv)
    slide = open_slide(make_slide(args.work_dir / "synth-1.5mm", 1, 1.5, 0.8))
    class_map = class_map_of_size(slide, args.size_px)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        write_segmentation(out, class_map, slide, {}, workers=args.workers)
        seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.size_px} x {args.size_px} px class map, {args.workers} workers: write_segmentation "
          f"{seconds:.1f} s; peak memory of this process {peak_gb:.2f} GB (the map: "
          f"{class_map.labels.nbytes / 2**30:.2f} GB)")
    if args.peer_size_px:
        small = class_map_of_size(slide, args.peer_size_px)
        ours, regions = outline_seconds(small, lambda mask: list(polygons_from_mask(mask, 1, 1, 1)))
        peer, peer_regions = outline_seconds(small, lambda mask: peer_polygons(mask, 1))
        assert regions == peer_regions, (regions, peer_regions)
        print(f"outlines of a {args.peer_size_px} px map, {regions} regions, one process: ours "
              f"{ours:.1f} s, skimage region by region {peer:.1f} s ({peer / ours:.1f}x ours)")


if __name__ == "__main__":
    main()
