"""Outlines of a mask's regions as polygons in level-0 pixels (objects.geojson, glomeruli).

OpenCV's border following (Suzuki and Abe) gives, in one pass over the mask and without a label
image, each 8-connected region's outer border and the borders of its holes as closed chains of
border pixels. Each chain becomes the region's marching-squares outline at level 0.5 with the
region 8-connected (what skimage's ``find_contours(..., fully_connected="high")`` traces): its
vertices are the midpoints of the pixel edges between the region and the rest, in order. The
border following passes over exactly those outside neighbours: at each border pixel, the
neighbours turning counter-clockwise on screen from the previous border pixel to the next are
outside, and the 4-neighbours among them give the pixel's vertices. A table of those midpoints
for each pair of turns makes the vertices of many chains at once in NumPy; Shapely's array
functions build and simplify the polygons. Given a process pool, batches of regions are made
into polygons in its workers.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from concurrent.futures import Executor

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon

BORDER_PIXELS_PER_TASK = 100_000  # a task's regions: ~50 ms of work on a 2-core CPU's core
# steps (dx, dy) to a pixel's 8 neighbours, counter-clockwise on screen (y down) from the east;
# the even ones lead to its 4-neighbours
_STEPS = np.array([(1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1)])
_ALONE = 8  # the step from a one-pixel chain's only pixel to its previous and next: none
_STEP_OF = np.full((3, 3), _ALONE)  # [dy + 1, dx + 1] -> step index
_STEP_OF[_STEPS[:, 1] + 1, _STEPS[:, 0] + 1] = np.arange(8)


def _passed_over_midpoints() -> tuple[np.ndarray, np.ndarray]:
    """``(counts, offsets)``: for each (step to the previous border pixel, step to the next),
    how many 4-neighbours the border following passes over between them, and the (dx, dy) from
    the pixel to the midpoints of the edges it shares with them, in that order."""
    counts = np.zeros((9, 9), np.intp)
    offsets = np.zeros((9, 9, 4, 2))
    pairs = [(previous, following) for previous in range(8) for following in range(8)]
    for previous, following in pairs + [(_ALONE, _ALONE)]:
        passed = (range(8) if previous == _ALONE
                  else [(previous + turn) % 8 for turn in range(1, (following - previous - 1) % 8 + 1)])
        midpoints = [_STEPS[step] / 2 for step in passed if step % 2 == 0]
        counts[previous, following] = len(midpoints)
        offsets[previous, following, :len(midpoints)] = np.reshape(midpoints, (-1, 2))
    return counts, offsets


_MIDPOINT_COUNTS, _MIDPOINT_OFFSETS = _passed_over_midpoints()


def polygons_from_mask(
    mask: np.ndarray,
    mpp_of_mask: float,
    level0_mpp: float,
    simplify_tolerance_px: float,
    origin_xy_px: tuple[float, float] = (0, 0),
    executor: Executor | None = None,
) -> Iterator[Polygon]:
    """Polygons (with holes) outlining the True regions of a mask, in level-0 pixels.

    One polygon per 8-connected region, in raster order of the regions' first pixels, its
    marching-squares outline simplified (topology preserved) with a tolerance of
    ``simplify_tolerance_px`` level-0 pixels. ``origin_xy_px`` is the level-0 (x, y) of the mask's
    top-left corner. ``executor`` (a process pool) makes batches of regions in parallel, all
    handed to it before this returns, so that it works on while the caller goes on.
    """
    regions = region_borders(mask)
    make = functools.partial(_polygons, scale=mpp_of_mask / level0_mpp, origin_xy_px=origin_xy_px,
                             simplify_tolerance_px=simplify_tolerance_px)
    tasks = _tasks(regions)
    made = executor.map(make, tasks) if executor and len(tasks) > 1 else map(make, tasks)
    return itertools.chain.from_iterable(made)


def region_borders(mask: np.ndarray) -> list[list[np.ndarray]]:
    """The border chains of each 8-connected region of ``mask``, in raster order of the regions'
    first pixels: its outer border, then its holes' borders, each an (n, 2) array of the (x, y)
    of its border pixels in the order the border following visits them (a pixel twice where the
    region is one pixel wide)."""
    contours, hierarchy = cv2.findContours(np.ascontiguousarray(mask, bool).view(np.uint8),
                                           cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return []
    following, _, first_hole, parent = hierarchy[0].T
    regions = []
    for index in np.flatnonzero(parent == -1):  # holes have a parent; a region in a hole has none
        chains = [contours[index][:, 0]]
        hole = first_hole[index]
        while hole != -1:
            chains.append(contours[hole][:, 0])
            hole = following[hole]
        regions.append(chains)
    # the border following starts a region's outer border at its first pixel in raster order
    regions.sort(key=lambda chains: (chains[0][0, 1], chains[0][0, 0]))
    return regions


def _tasks(regions: list[list[np.ndarray]]) -> list[list[list[np.ndarray]]]:
    """``regions`` in consecutive batches of about ``BORDER_PIXELS_PER_TASK`` border pixels."""
    border_pixels = np.cumsum([sum(len(chain) for chain in region) for region in regions])
    batch = border_pixels // BORDER_PIXELS_PER_TASK
    starts = np.flatnonzero(np.diff(batch, prepend=-1))
    return [regions[start:stop] for start, stop in zip(starts, [*starts[1:], len(regions)])]


def _polygons(regions: list[list[np.ndarray]], scale: float, origin_xy_px,
              simplify_tolerance_px: float) -> list[Polygon]:
    """The simplified outline of each of ``regions`` (from :func:`region_borders`)."""
    chains = [chain for region in regions for chain in region]
    vertices_xy, chain_of_vertex = outline_vertices(chains)
    rings = shapely.linearrings(np.asarray(origin_xy_px) + (vertices_xy + 0.5) * scale,
                                indices=chain_of_vertex)
    # collinear vertices first (the shape unchanged): the topology-preserving pass on the rest of
    # an outline is ~3x faster, and may keep other vertices than without
    rings = shapely.simplify(rings, 0, preserve_topology=False)
    region_of_ring = np.repeat(np.arange(len(regions)), [len(region) for region in regions])
    # each ring simplified alone, topology kept within it: GEOS checks a polygon's rings against
    # each other in time quadratic in its holes (a region of 28,713 holes: 6.6 s; alone 0.14 s);
    # a polygon whose rings then cross or nest is simplified whole
    polygons = shapely.polygons(shapely.simplify(rings, simplify_tolerance_px,
                                                 preserve_topology=True), indices=region_of_ring)
    crossed = ~shapely.is_valid(polygons)
    if crossed.any():
        whole = shapely.polygons(rings, indices=region_of_ring)[crossed]
        polygons[crossed] = shapely.simplify(whole, simplify_tolerance_px, preserve_topology=True)
    return list(polygons)


def outline_vertices(chains: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The marching-squares outline of each closed chain of border pixels (x, y): its vertices
    (x, y) in mask pixels, all chains' one after another, and the index of the chain of each."""
    lengths = np.array([len(chain) for chain in chains])
    pixels = np.concatenate(chains)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    index = np.arange(len(pixels))
    previous, following = index - 1, index + 1
    previous[starts], following[ends - 1] = ends - 1, starts  # closed chains
    to_previous = _step_index(pixels[previous] - pixels)
    to_following = _step_index(pixels[following] - pixels)
    counts = _MIDPOINT_COUNTS[to_previous, to_following]
    pixel_of_vertex = np.repeat(index, counts)
    slot = np.arange(len(pixel_of_vertex)) - np.repeat(np.cumsum(counts) - counts, counts)
    offsets = _MIDPOINT_OFFSETS[to_previous[pixel_of_vertex], to_following[pixel_of_vertex], slot]
    chain_of_pixel = np.repeat(np.arange(len(chains)), lengths)
    return pixels[pixel_of_vertex] + offsets, chain_of_pixel[pixel_of_vertex]


def _step_index(steps_xy: np.ndarray) -> np.ndarray:
    """Index in ``_STEPS`` of each (dx, dy) step to a neighbour; ``_ALONE`` for (0, 0)."""
    return _STEP_OF[steps_xy[:, 1] + 1, steps_xy[:, 0] + 1]
