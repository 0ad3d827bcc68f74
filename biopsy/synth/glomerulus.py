"""Geometry of one glomerulus and its lesions, in level-0 pixels.

A glomerulus is Bowman's capsule (a ring), Bowman's space, and the tuft: capillary loops (lumina
with thin walls) in mesangial matrix, with nuclei between the loops. Lesions replace parts of it:

- sclerosis: a homogeneous acellular region of the tuft (segmental: a cap at the tuft's edge;
  global: the whole, shrunken tuft); loops and nuclei inside it are removed.
- crescent: a layer in Bowman's space along an arc of the capsule that pushes the tuft inwards;
  it always spans the space, from the capsule to the tuft.
- hyaline deposits: wire loops (thick rings on capillary walls) and hyaline thrombi (filled
  lumina), on loops well inside the tuft and outside sclerosis.
- endocapillary hypercellularity (``endocapillary_nuclei``, added by the layout from its own
  random stream): cells inside narrowed capillary lumina and more mesangial cells; no class of
  its own, the truth counts its nuclei.

The truth classes (tuft, sclerosis, crescent, hyaline_deposit) are exactly these shapes; the
glomerulus instance is tuft plus crescent. Bowman's space and capsule are ``tissue``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import shapely
from scipy.spatial import cKDTree
from shapely.geometry import Point, Polygon

from biopsy.synth.geometry import (angles, exterior_vertices, hex_points, largest_part,
                                   nuclei_rows, periodic_noise, points_along, polar_outline,
                                   polygon_of, random_points_in)

LESION_NAMES = ("global_sclerosis", "segmental_sclerosis", "cellular_crescent", "fibrous_crescent",
                "hyaline_deposit")


@dataclass
class Glomerulus:
    """One glomerulus: outlines as (k, 2) float32 (x, y) vertices; ``loops`` (n, 6): x, y, long
    semi-axis, short/long axis ratio, angle (deg), red cell inside (0/1); ``wire_loops`` (n, 4):
    x, y, ring radius, ring thickness; ``thrombi`` (n, 3): x, y, r."""

    glomerulus_id: int
    lesions: tuple[str, ...]
    capsule: np.ndarray
    capsule_inner: np.ndarray
    tuft: np.ndarray
    sclerosis: np.ndarray | None
    crescent: np.ndarray | None
    crescent_kind: str | None
    loops: np.ndarray
    wire_loops: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    thrombi: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        (xmin, ymin), (xmax, ymax) = self.capsule.min(0), self.capsule.max(0)
        return float(xmin), float(ymin), float(xmax), float(ymax)

    def instance_polygon(self) -> Polygon:
        """The glomerulus instance: tuft and crescent."""
        tuft = polygon_of(self.tuft)
        return tuft if self.crescent is None else tuft.union(polygon_of(self.crescent))

    def deposit_geometry(self):
        """Union of wire-loop rings and thrombi (shapely), empty when there are none."""
        parts = [Point(x, y).buffer(r + t / 2, 16).difference(Point(x, y).buffer(r - t / 2, 16))
                 for x, y, r, t in self.wire_loops]
        parts += [Point(x, y).buffer(r, 16) for x, y, r in self.thrombi]
        return shapely.union_all(parts) if parts else Polygon()


def build_glomerulus(glomerulus_id: int, centre_xy: tuple[float, float], diameter_um: float,
                     lesions: tuple[str, ...], deposit_burden: float, px_per_um: float,
                     rng: np.random.Generator) -> tuple[Glomerulus, np.ndarray]:
    """A glomerulus with the given lesions and its nuclei table (see ``nuclei_rows``)."""
    um = px_per_um
    theta = angles(192)
    global_sclerosis = "global_sclerosis" in lesions
    crescent_kind = next((k for k in ("cellular_crescent", "fibrous_crescent") if k in lesions), None)
    capsule_thickness = (rng.uniform(4.5, 7) if global_sclerosis or crescent_kind == "fibrous_crescent"
                         else rng.uniform(2, 3)) * um
    radius_outer = diameter_um / 2 * um * (1 + periodic_noise(rng, theta, range(2, 6), 0.07))
    radius_inner = radius_outer - capsule_thickness
    space = (rng.uniform(14, 24) if global_sclerosis else rng.uniform(5, 9)) * um
    lobes = rng.integers(4, 8)
    lobulation = 0.035 * np.cos(lobes * theta + rng.uniform(0, 2 * np.pi))
    radius_tuft = (radius_inner - space) * (0.965 + lobulation + periodic_noise(rng, theta, range(3, 12), 0.02))

    crescent = None
    if crescent_kind is not None:
        coverage = rng.uniform(0.3, 0.6)
        width = 2 * np.pi * coverage
        offset = (theta - rng.uniform(0, 2 * np.pi) + np.pi) % (2 * np.pi) - np.pi
        in_arc = np.abs(offset) <= width / 2
        depth_um = rng.uniform(18, 34) if crescent_kind == "cellular_crescent" else rng.uniform(12, 26)
        depth = depth_um * um * np.cos(np.pi * offset / width).clip(0) ** 0.6
        radius_tuft = np.where(in_arc, np.minimum(radius_tuft, radius_inner - np.maximum(depth, space)),
                               radius_tuft)
        crescent = _crescent_outline(centre_xy, theta, in_arc, offset, radius_inner, radius_tuft, um)

    tuft = polar_outline(centre_xy, radius_tuft, theta)
    tuft_polygon = polygon_of(tuft)
    sclerosis = None
    if global_sclerosis:
        sclerosis = tuft
    elif "segmental_sclerosis" in lesions:
        sclerosis = _segmental_cap(tuft_polygon, centre_xy, float(radius_tuft.mean()), rng)
    sclerosis_polygon = polygon_of(sclerosis) if sclerosis is not None else None

    loops = np.zeros((0, 6), np.float32) if global_sclerosis else _capillary_loops(
        tuft_polygon, sclerosis_polygon, centre_xy, um, rng)
    glomerulus = Glomerulus(glomerulus_id, lesions, polar_outline(centre_xy, radius_outer, theta),
                            polar_outline(centre_xy, radius_inner, theta), tuft, sclerosis, crescent,
                            crescent_kind, loops)
    if "hyaline_deposit" in lesions:
        _add_deposits(glomerulus, tuft_polygon, sclerosis_polygon, centre_xy, deposit_burden, um, rng)
    nuclei = _nuclei(glomerulus, tuft_polygon, sclerosis_polygon, um, rng)
    return glomerulus, nuclei


def _crescent_outline(centre_xy, theta, in_arc, offset, radius_inner, radius_tuft, um) -> np.ndarray:
    """Outline of the crescent: capsule side forwards along the arc, tuft side backwards.

    The tuft side sits 1 µm inside the tuft so that the two share their border without a gap.
    """
    order = np.argsort(offset[in_arc])
    arc_theta = theta[in_arc][order]
    outer = polar_outline(centre_xy, radius_inner[in_arc][order], arc_theta)
    inner = polar_outline(centre_xy, radius_tuft[in_arc][order] - 1.0 * um, arc_theta)
    return np.vstack([outer, inner[::-1]])


def _segmental_cap(tuft: Polygon, centre_xy, radius_tuft: float, rng) -> np.ndarray:
    """A cap of the tuft at its edge covering 15-38 % of it (bisection on the cap's disc radius)."""
    target = rng.uniform(0.15, 0.38)
    direction = rng.uniform(0, 2 * np.pi)
    seed = Point(centre_xy[0] + radius_tuft * np.cos(direction), centre_xy[1] + radius_tuft * np.sin(direction))
    low, high = 0.1 * radius_tuft, 2.0 * radius_tuft
    for _ in range(20):
        middle = (low + high) / 2
        if tuft.intersection(seed.buffer(middle, 32)).area / tuft.area < target:
            low = middle
        else:
            high = middle
    cap = largest_part(tuft.intersection(seed.buffer(high, 32)))
    return exterior_vertices(cap)


def _capillary_loops(tuft: Polygon, sclerosis: Polygon | None, centre_xy, um, rng) -> np.ndarray:
    """Capillary lumina (elliptical, some with a red cell) packed in the tuft, sparing mesangial
    stalks and sclerosis; see ``Glomerulus.loops``."""
    points = hex_points(tuft.bounds, 14 * um, 3.5 * um, rng)
    radius = rng.uniform(4.0, 7.5, len(points)) * um
    inner = tuft.buffer(-8 * um)
    keep = shapely.contains_xy(inner, points[:, 0], points[:, 1])
    stalks = centre_xy + rng.normal(0, 0.25, (rng.integers(3, 6), 2)) * np.sqrt(tuft.area / np.pi)
    keep &= cKDTree(stalks).query(points)[0] > 9 * um
    if sclerosis is not None:
        keep &= shapely.distance(sclerosis, shapely.points(points)) > radius + 2.0 * um
    n = int(keep.sum())
    return np.column_stack([points[keep], radius[keep], rng.uniform(0.45, 1.0, n),
                            rng.uniform(0, 180, n), rng.random(n) < 0.4]).astype(np.float32)


def _add_deposits(glomerulus: Glomerulus, tuft: Polygon, sclerosis, centre_xy, burden: float, um, rng) -> None:
    """Turn peripheral loops into wire loops (80 %) and hyaline thrombi until ``burden`` of the tuft."""
    loops = glomerulus.loops
    if not len(loops):
        return
    thickness = rng.uniform(2.4, 3.6, len(loops)) * um
    reach = loops[:, 2] + thickness / 2 + 1.0 * um
    points = shapely.points(loops[:, :2])
    allowed = shapely.distance(tuft.exterior, points) > reach
    if sclerosis is not None:
        allowed &= shapely.distance(sclerosis, points) > reach
    peripheral = np.hypot(*(loops[:, :2] - centre_xy).T) / np.sqrt(tuft.area / np.pi)
    order = np.argsort(-peripheral + rng.uniform(0, 0.6, len(loops)))
    wire, thrombi, area = [], [], 0.0
    for i in order:
        if not allowed[i] or area >= burden * tuft.area:
            continue
        x, y, r = loops[i, :3]
        loops[i, 3:] = (1.0, 0.0, 0.0)  # a deposit-laden loop is round and holds no red cell
        if rng.random() < 0.8:
            wire.append((x, y, r, thickness[i]))
            area += 2 * np.pi * r * thickness[i]
        else:
            thrombi.append((x, y, r))
            area += np.pi * r * r
    glomerulus.wire_loops = np.array(wire, np.float32).reshape(-1, 4)
    glomerulus.thrombi = np.array(thrombi, np.float32).reshape(-1, 3)


def _nuclei(g: Glomerulus, tuft: Polygon, sclerosis, um, rng) -> np.ndarray:
    """Nuclei of the tuft (between loops), capsule (parietal, flat) and crescent (layered)."""
    tables = []
    if "global_sclerosis" not in g.lesions:
        points = random_points_in(tuft, int(tuft.area / (50 * um * um)), rng)
        if len(g.loops) and len(points):
            distance, nearest = cKDTree(g.loops[:, :2]).query(points)
            points = points[distance > g.loops[nearest, 2] * (1 + g.loops[nearest, 3]) / 2 + 0.8 * um]
        tables.append(nuclei_rows(points, (2.6 * um, 2.0 * um), rng.uniform(0, 180, len(points)), rng))
    parietal, tangent = points_along(g.capsule_inner, 16 * um, rng, keep=0.7)
    if g.crescent is not None and len(parietal):
        parietal_keep = ~shapely.contains_xy(polygon_of(g.crescent), parietal[:, 0], parietal[:, 1])
        parietal, tangent = parietal[parietal_keep], tangent[parietal_keep]
    tables.append(nuclei_rows(parietal, (3.2 * um, 1.1 * um), tangent, rng))
    if g.crescent is not None:
        crescent = polygon_of(g.crescent)
        cellular = g.crescent_kind == "cellular_crescent"
        points = random_points_in(crescent, int(crescent.area / ((38 if cellular else 320) * um * um)), rng)
        centre = np.asarray(g.capsule.mean(0))
        angle = np.degrees(np.arctan2(points[:, 1] - centre[1], points[:, 0] - centre[0])) + 90
        axes = (3.0 * um, 1.9 * um) if cellular else (3.6 * um, 0.9 * um)
        tables.append(nuclei_rows(points, axes, angle + rng.normal(0, 15, len(points)), rng))
    nuclei = np.vstack(tables) if tables else np.zeros((0, 6), np.float32)
    if sclerosis is not None and len(nuclei):
        clear = shapely.distance(sclerosis, shapely.points(nuclei[:, :2])) > nuclei[:, 2] + 2.5 * um
        nuclei = nuclei[clear]
    return nuclei


def endocapillary_nuclei(g: Glomerulus, um: float, rng: np.random.Generator) -> np.ndarray:
    """Nuclei of endocapillary hypercellularity, about 1.5 times a normal tuft's again.

    One or two swollen endothelial cells or leukocytes in each capillary lumen but the thrombosed
    ones (the lumina narrowed to 0.8 of their radius, in place) and more mesangial cells between
    the loops; none in sclerosis.
    """
    tuft = polygon_of(g.tuft)
    sclerosis = polygon_of(g.sclerosis) if g.sclerosis is not None else None
    loops = g.loops
    open_loops = loops
    if len(g.thrombi) and len(loops):
        open_loops = loops[cKDTree(g.thrombi[:, :2]).query(loops[:, :2])[0] > 0.5 * um]
    wide = open_loops[:, 2] > 5.5 * um
    along = np.radians(open_loops[wide, 4])
    offset = 0.4 * open_loops[wide, 2:3] * np.column_stack([np.cos(along), np.sin(along)])
    intracapillary = np.vstack([open_loops[~wide, :2], open_loops[wide, :2] + offset,
                                open_loops[wide, :2] - offset])
    intracapillary = intracapillary + rng.normal(0, 0.5 * um, intracapillary.shape)
    if len(loops):
        loops[:, 2] *= 0.8
    region = tuft.difference(sclerosis) if sclerosis is not None else tuft
    mesangial = random_points_in(region, int(region.area / (110 * um * um)), rng)
    if len(loops) and len(mesangial):
        distance, nearest = cKDTree(loops[:, :2]).query(mesangial)
        mesangial = mesangial[distance > loops[nearest, 2] * (1 + loops[nearest, 3]) / 2 + 0.8 * um]
    nuclei = np.vstack([
        nuclei_rows(intracapillary, (2.4 * um, 1.9 * um), rng.uniform(0, 180, len(intracapillary)),
                    rng),
        nuclei_rows(mesangial, (2.6 * um, 2.0 * um), rng.uniform(0, 180, len(mesangial)), rng),
    ])
    if sclerosis is not None and len(nuclei):
        clear = shapely.distance(sclerosis, shapely.points(nuclei[:, :2])) > nuclei[:, 2] + 2.5 * um
        nuclei = nuclei[clear]
    return nuclei
