"""A segmented slide as a folder: what ``biopsy segment`` writes.

``labels.ome.tif`` (pyramidal label map with mpp and class table, :mod:`biopsy.labelmap`),
optionally ``probabilities.ome.tif`` (pyramidal OME-TIFF, one uint8 channel per class, 255 = 1),
``objects.geojson`` (the predicted regions of every non-background class as simplified polygons in
level-0 pixels, QuPath detections with their area), ``overview.png`` (the slide with the class
colours laid over it) and, written last, ``segment.json`` (slide, model, options, class areas):
its presence means the folder is whole. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from biopsy.atomic import atomic_path, remove_temporaries, write_text_atomic
from biopsy.classes import class_index
from biopsy.geojson import feature_text, write_feature_collection
from biopsy.infer import ClassMap
from biopsy.labelmap import colourise, write_label_map
from biopsy.outlines import polygons_from_mask
from biopsy.probabilitymap import write_probability_map

SEGMENTATION_FORMAT = "biopsy.segmentation/1"
PROBABILITIES_FILE = "probabilities.ome.tif"
SEGMENT_FILES = ("labels.ome.tif", "objects.geojson", "overview.png", "segment.json",
                 PROBABILITIES_FILE)
OVERVIEW_MAX_PX = 2048


def begin_segmentation(out_dir: str | Path) -> Path:
    """Make ``out_dir`` and mark it not whole (segment.json removed; an earlier run's
    probabilities.ome.tif too, which this run may not write); the path of its labels.ome.tif, for
    :func:`biopsy.infer.segment_slide` to write while segmenting."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "segment.json").unlink(missing_ok=True)  # the folder is whole again only at the end
    (out_dir / PROBABILITIES_FILE).unlink(missing_ok=True)
    remove_temporaries(out_dir, SEGMENT_FILES)  # a killed run's
    return out_dir / "labels.ome.tif"


def write_segmentation(out_dir: str | Path, class_map: ClassMap, slide, provenance: dict,
                       workers: int = 0, labels_written: bool = False) -> None:
    """Write the folder for ``class_map`` of ``slide``; ``provenance`` goes into segment.json;
    ``workers`` processes trace the outlines of objects.geojson (0: this one); ``labels_written``:
    labels.ome.tif (and probabilities.ome.tif, if asked for) was written while segmenting, after
    :func:`begin_segmentation`."""
    out_dir = Path(out_dir)
    colours = [class_map.class_colours[name] for name in class_map.class_names]
    if not labels_written:
        write_label_map(begin_segmentation(out_dir), class_map.labels, class_map.mpp,
                        class_map.class_names, class_map.class_colours,
                        slide_mpp=class_map.slide_mpp)
    if class_map.probabilities is not None:
        write_probability_map(out_dir / PROBABILITIES_FILE, class_map.probabilities,
                              class_map.mpp, class_map.class_names)
    # closed on a failed write: its pool of tracing processes is shut down then, not later
    with contextlib.closing(region_features(class_map, slide.mpp[0], workers)) as features:
        write_feature_collection(out_dir / "objects.geojson", features)
    with atomic_path(out_dir / "overview.png") as temporary:
        overview(class_map, slide, colours).save(temporary, format="PNG")
    pixel_area_um2 = class_map.mpp**2
    # one class at a time: np.bincount would first copy the map into 8-byte integers
    counts = [np.count_nonzero(class_map.labels == index)
              for index in range(len(class_map.class_names))]
    summary = {
        "format": SEGMENTATION_FORMAT,
        **provenance,
        "mpp": class_map.mpp,
        "shape_px": list(class_map.labels.shape),
        "tile_count": class_map.tile_count,
        "class_area_um2": {name: float(count * pixel_area_um2)
                           for name, count in zip(class_map.class_names, counts)},
    }
    write_text_atomic(out_dir / "segment.json", json.dumps(summary, indent=2))


def region_features(class_map: ClassMap, level0_mpp: float, workers: int = 0) -> Iterator[str]:
    """One QuPath detection (JSON text) per connected region of each non-background class,
    simplified to one map pixel, with its outline's area in µm² (below its pixels' for a region
    of a few pixels: a lone pixel's outline is a diamond), made as they are written; ``workers``
    processes trace them (0: this one), the next class's found on a thread and traced while this
    one's are written (two classes' held). Closed early, the tracing still queued is dropped."""
    background = class_index(class_map.class_names, "background")
    level0_px_per_map_px = class_map.mpp / level0_mpp
    executor = ProcessPoolExecutor(workers) if workers > 0 else None
    try:
        traced = ((name, polygons_from_mask(class_map.labels == index, class_map.mpp, level0_mpp,
                                            level0_px_per_map_px, executor=executor))
                  for index, name in enumerate(class_map.class_names) if index != background)
        for name, polygons in _taken_ahead(traced):
            for polygon in polygons:
                yield feature_text(polygon, name, class_map.class_colours[name],
                                   {"area_um2": polygon.area * level0_mpp**2},
                                   object_type="detection")
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)


def _taken_ahead(items: Iterator) -> Iterator:
    """``items``, the next one taken on a thread while one is handed on (its OpenCV and NumPy
    work, which releases the GIL, overlaps the caller's)."""
    with ThreadPoolExecutor(1) as thread:
        following = thread.submit(next, items, _END)
        while (item := following.result()) is not _END:
            following = thread.submit(next, items, _END)
            yield item


_END = object()


def overview(class_map: ClassMap, slide, colours) -> Image.Image:
    """The slide thumbnail (long side at most ``OVERVIEW_MAX_PX``) with the non-background classes
    laid over it in their colours, half transparent."""
    step = max(1, int(np.ceil(max(class_map.labels.shape) / OVERVIEW_MAX_PX)))
    labels = class_map.labels[::step, ::step]
    coloured = colourise(labels, colours)
    thumbnail = slide.thumbnail(class_map.mpp * step)
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3:
        return Image.fromarray(coloured)
    thumbnail = _fit(thumbnail, labels.shape)
    background = class_index(class_map.class_names, "background")
    blended = thumbnail.astype(np.uint16) + coloured
    image = np.where((labels != background)[..., None], blended // 2, thumbnail)
    return Image.fromarray(image.astype(np.uint8))


def _fit(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop or pad (white) ``image`` to ``shape``: sizes rounded apart by one pixel."""
    fitted = np.full(shape + image.shape[2:], 255, np.uint8)
    height, width = min(shape[0], image.shape[0]), min(shape[1], image.shape[1])
    fitted[:height, :width] = image[:height, :width]
    return fitted
