"""Tubules: the shrunken Voronoi cells of a jittered hexagonal grid over the cortex.

Normal tubules are rounded (an ellipse fitted to the cell, clipped to it) with a basal ring of
nuclei: proximal ones with tall granular epithelium, a narrow lumen and a brush border, distal
ones with low epithelium and an open lumen. Atrophic tubules are small, with a thick wrinkled
basement membrane, flat epithelium and sometimes a hyaline cast. Coordinates: level-0 px (x, y).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import Polygon

from biopsy.synth.geometry import (angles, exterior_vertices, hex_points, largest_part, nuclei_rows,
                                   periodic_noise, points_along, polar_outline, polygon_of)

ATROPHIC_KEEPS, NORMAL_KEEPS = 0.22, 0.76  # share of its Voronoi cell a tubule covers (measured)


@dataclass
class Tubule:
    """Outline (basement membrane) and lumen as (k, 2) float32 (x, y) vertices; lumen None when
    collapsed; ``cast``: a hyaline cast fills the lumen."""

    outer: np.ndarray
    lumen: np.ndarray | None
    atrophic: bool
    proximal: bool
    cast: bool = False
    stain_factor: float = 1.0  # how strongly its cytoplasm stains, relative to its kind


def tubule_cells(tissue: Polygon, obstacles, patches, um: float, rng):
    """Voronoi cells of a jittered hexagonal grid in the cortex, clipped to it and around the
    obstacles; fewer, wider-spaced cells in the fibrosis patches. Returns cells, seed points and
    whether each seed lies in a patch."""
    points = hex_points(tissue.bounds, 56 * um, 18 * um, rng)
    in_patch = shapely.contains_xy(patches, points[:, 0], points[:, 1]) if not patches.is_empty \
        else np.zeros(len(points), bool)
    keep = shapely.contains_xy(tissue, points[:, 0], points[:, 1])
    keep &= ~shapely.contains_xy(obstacles, points[:, 0], points[:, 1])
    keep &= ~in_patch | (rng.random(len(points)) < 0.85)
    points, in_patch = points[keep], in_patch[keep]
    cells = shapely.get_parts(shapely.voronoi_polygons(shapely.multipoints(points), ordered=True))
    region = tissue.buffer(-3 * um).difference(obstacles)
    shapely.prepare(region)
    crossing = ~shapely.contains(region, cells)
    cells[crossing] = shapely.intersection(cells[crossing], region)
    return cells, points, in_patch


def build_tubules(cells, atrophic: np.ndarray, um: float, rng) -> tuple[list[Tubule], np.ndarray]:
    """A tubule in each cell large enough, atrophic or normal, and the nuclei of them all."""
    tubules, nuclei = [], []
    for cell, is_atrophic in zip(cells, atrophic):
        cell = largest_part(cell)
        if cell is None or cell.area < (20 * um) ** 2:
            continue
        built = _atrophic_tubule(cell, um, rng) if is_atrophic else _normal_tubule(cell, um, rng)
        if built is not None:
            tubules.append(built[0])
            nuclei.append(built[1])
    return tubules, (np.vstack(nuclei) if nuclei else np.zeros((0, 6), np.float32))


def calibrate_atrophy(cells, atrophic: np.ndarray, points, patches, atrophy_percent: float,
                       rng) -> np.ndarray:
    """Mark cells atrophic nearest to the patches first (or unmark patch cells at random) until
    the atrophic share of tubular area meets the profile.

    An atrophic tubule keeps ~22 % of its cell's area (``_atrophic_tubule``), a normal one ~76 %.
    """
    kept = shapely.area(cells) * np.where(atrophic, ATROPHIC_KEEPS, NORMAL_KEEPS)
    target = atrophy_percent / 100
    atrophic_area, total = kept[atrophic].sum(), kept.sum()
    atrophic = atrophic.copy()
    marking = bool(atrophic_area < target * total)
    if marking:
        distance = (shapely.distance(patches, shapely.points(points)) if not patches.is_empty
                    else np.zeros(len(points)))
        order = np.flatnonzero(~atrophic)[np.argsort(distance[~atrophic], kind="stable")]
        shrink = ATROPHIC_KEEPS / NORMAL_KEEPS
        shares = ((atrophic_area + np.cumsum(shrink * kept[order]))
                  / (total - np.cumsum((1 - shrink) * kept[order])))
        count = int(np.searchsorted(shares, target)) + 1
    else:
        order = rng.permutation(np.flatnonzero(atrophic))
        grow = NORMAL_KEEPS / ATROPHIC_KEEPS
        shares = ((atrophic_area - np.cumsum(kept[order]))
                  / (total + np.cumsum((grow - 1) * kept[order])))
        count = int(np.searchsorted(-shares, -target)) + 1
    atrophic[order[:count]] = marking
    return atrophic


def _normal_tubule(cell: Polygon, um: float, rng):
    """A tubule filling its cell but a thin interstitium: proximal (tall epithelium, narrow lumen
    with brush border) or distal (low epithelium, open lumen), nuclei in a basal ring."""
    shrunk = cell.buffer(-rng.uniform(1.5, 3) * um, 4)
    box = shrunk.minimum_rotated_rectangle
    corners = np.asarray(box.exterior.coords)[:4]
    sides = corners[1:3] - corners[0:2]
    half = np.hypot(sides[:, 0], sides[:, 1]) / 2 * 1.02
    angle = np.arctan2(sides[0, 1], sides[0, 0])
    theta = angles(64)
    local = np.stack([half[0] * np.cos(theta), half[1] * np.sin(theta)], axis=1)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    ellipse = polygon_of(local @ rotation.T + np.asarray(box.centroid.coords[0]))
    outer = largest_part(ellipse.intersection(shrunk).buffer(-4 * um, 4).buffer(4 * um, 4))
    if outer is None or outer.area < (14 * um) ** 2:
        return None
    proximal = rng.random() < 0.65
    radius = np.sqrt(outer.area / np.pi)
    epithelium = radius * (rng.uniform(0.6, 0.8) if proximal else rng.uniform(0.4, 0.55))
    lumen = largest_part(outer.buffer(-epithelium - 2 * um, 4).buffer(2 * um, 4))
    if lumen is not None and lumen.area < (2 * um) ** 2:
        lumen = None
    ring = largest_part(outer.buffer(-min(epithelium * 0.5, 6 * um), 4))
    nuclei = np.zeros((0, 6), np.float32)
    if ring is not None:
        points, tangent = points_along(exterior_vertices(ring), (8 if proximal else 6.5) * um, rng,
                                       0.75 if proximal else 0.85)
        nuclei = nuclei_rows(points, (2.7 * um, 2.2 * um), tangent, rng, darkness=0.9 if proximal else 1.0)
    return Tubule(exterior_vertices(outer), exterior_vertices(lumen) if lumen else None,
                  False, proximal, stain_factor=float(rng.uniform(0.75, 1.25))), nuclei


def _atrophic_tubule(cell: Polygon, um: float, rng):
    """A small tubule in its cell's middle: thick wrinkled membrane, flat epithelium, maybe a cast."""
    centre = cell.representative_point()
    radius = min(0.55 * np.sqrt(cell.area / np.pi), rng.uniform(11, 19) * um)
    if radius < 6 * um:
        return None
    theta = angles(96)
    outline = radius * (1 + 0.05 * np.sin(theta * rng.integers(9, 15) + rng.uniform(0, 6))
                        + periodic_noise(rng, theta, range(2, 6), 0.12))
    outer = polygon_of(polar_outline((centre.x, centre.y), outline, theta)).intersection(cell)
    outer = largest_part(outer)
    if outer is None:
        return None
    lumen = largest_part(outer.buffer(-5.5 * um, 4))
    ring = largest_part(outer.buffer(-4 * um, 4))
    nuclei = np.zeros((0, 6), np.float32)
    if ring is not None:
        points, tangent = points_along(exterior_vertices(ring), 9 * um, rng, 0.7)
        nuclei = nuclei_rows(points, (3.0 * um, 1.3 * um), tangent, rng)
    cast = lumen is not None and rng.random() < 0.3
    return Tubule(exterior_vertices(outer), exterior_vertices(lumen) if lumen else None,
                  True, False, cast), nuclei
