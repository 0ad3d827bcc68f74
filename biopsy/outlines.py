"""Outlines of a mask's regions as polygons in level-0 pixels (objects.geojson, glomeruli).

Each 8-connected region is found by OpenCV's border following (its outer boundary gives its
bounding box and first pixel: no label image of the whole mask, whose int32 labels would take four
times a class map's memory per class), cut out alone from its box, and traced by marching squares
along pixel edges. Given a process pool, the cutting and tracing, most of the time, run in its
workers.
"""

from __future__ import annotations

import functools
from concurrent.futures import Executor

import cv2
import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import Polygon
from skimage.measure import find_contours

from biopsy.geojson import polygonal_parts

REGIONS_PER_TASK = 256
_EIGHT_CONNECTED = np.ones((3, 3), bool)


def polygons_from_mask(
    mask: np.ndarray,
    mpp_of_mask: float,
    level0_mpp: float,
    simplify_tolerance_px: float,
    origin_xy_px: tuple[float, float] = (0, 0),
    executor: Executor | None = None,
) -> list[Polygon]:
    """Polygons (with holes) outlining the True regions of a mask, in level-0 pixels.

    One polygon per 8-connected region, in raster order of the regions' first pixels, traced by
    marching squares along pixel edges and simplified (topology preserved) with a tolerance of
    ``simplify_tolerance_px`` level-0 pixels. ``origin_xy_px`` is the level-0 (x, y) of the mask's
    top-left corner; ``executor`` (a process pool) traces batches of regions in parallel.
    """
    regions = region_boxes(mask)
    trace = functools.partial(_trace, scale=mpp_of_mask / level0_mpp, origin_xy_px=origin_xy_px,
                              simplify_tolerance_px=simplify_tolerance_px)
    tasks = [regions[start:start + REGIONS_PER_TASK]
             for start in range(0, len(regions), REGIONS_PER_TASK)]
    traced = executor.map(trace, tasks) if executor and len(tasks) > 1 else map(trace, tasks)
    return [polygon for polygons in traced for polygon in polygons]


def region_boxes(mask: np.ndarray) -> list[tuple[int, int, np.ndarray, tuple[int, int]]]:
    """``(top, left, box, first)`` per 8-connected region of ``mask``, in raster order of each
    region's first pixel: ``box`` is the mask within the region's bounding box (at row ``top``,
    column ``left``; other regions may reach into it) and ``first`` the (row, col) in ``box`` of
    the region's first pixel."""
    mask = np.ascontiguousarray(mask, bool)
    contours, hierarchy = cv2.findContours(mask.view(np.uint8), cv2.RETR_CCOMP,
                                           cv2.CHAIN_APPROX_SIMPLE)
    parents = hierarchy[0][:, 3] if contours else []
    # holes have a parent; a region inside a hole is outer again
    outer = [contour for contour, parent in zip(contours, parents) if parent == -1]
    # border following starts at the region's first pixel in raster order
    firsts = [tuple(contour[0, 0]) for contour in outer]  # (x, y)
    boxes = []
    for (first_x, first_y), contour in sorted(zip(firsts, outer), key=lambda pair: pair[0][::-1]):
        left, top, width, height = cv2.boundingRect(contour)
        boxes.append((top, left, mask[top:top + height, left:left + width],
                      (first_y - top, first_x - left)))
    return boxes


def _trace(regions: list[tuple[int, int, np.ndarray, tuple[int, int]]], scale: float, origin_xy_px,
           simplify_tolerance_px: float) -> list[Polygon]:
    """The polygonal parts outlining each of ``regions`` (from :func:`region_boxes`)."""
    polygons = []
    for top, left, box, first in regions:
        labelled, _ = ndimage.label(box, structure=_EIGHT_CONNECTED)
        crop = labelled == labelled[first]  # the region alone
        rings = []
        for contour in find_contours(np.pad(crop, 1).astype(np.uint8), 0.5, fully_connected="high"):
            rows, cols = contour[:, 0] + top - 1, contour[:, 1] + left - 1
            rings.append(np.column_stack([origin_xy_px[0] + (cols + 0.5) * scale,
                                          origin_xy_px[1] + (rows + 0.5) * scale]))
        rings = [ring for ring in rings if len(ring) >= 4]
        if not rings:
            continue
        rings.sort(key=lambda ring: Polygon(ring).area, reverse=True)
        polygon = shapely.make_valid(Polygon(rings[0], rings[1:]))
        # collinear vertices first (the shape unchanged): the topology-preserving pass on the
        # rest of a traced outline is ~3x faster, and may keep other vertices than without
        polygon = polygon.simplify(0, preserve_topology=False)
        polygon = polygon.simplify(simplify_tolerance_px, preserve_topology=True)
        polygons.extend(polygonal_parts(polygon))
    return polygons
