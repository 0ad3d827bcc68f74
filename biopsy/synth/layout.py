"""The geometry of a whole synthetic slide, deterministic for a profile and seed.

Needle cores run top to bottom (so that row bands stay narrow on long slides). Inside each core:
glomeruli and arteries placed without overlap, fibrosis patches, then tubules around them
(``tubules``; small and atrophic in the patches' widened interstitium), and interstitial nuclei. All coordinates are level-0 pixels (x, y).

The activity lesions shown by nuclei alone (endocapillary hypercellularity, interstitial
inflammation) draw from their own random stream, so a profile without them gives the same slide
as before they existed.

Every object kind keeps the row range of each object (``Layout.select``) so that a band renderer
visits only the objects that meet its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import shapely
from scipy.spatial import cKDTree
from shapely.geometry import Point, Polygon

from biopsy.errors import ConfigError
from biopsy.synth.geometry import (angles, exterior_vertices, nuclei_rows, periodic_noise,
                                   points_along, polar_outline, polygon_of, random_points_in)
from biopsy.synth.glomerulus import LESION_NAMES, Glomerulus, build_glomerulus, endocapillary_nuclei
from biopsy.synth.profile import LesionProfile
from biopsy.synth.tubules import (NORMAL_KEEPS, Tubule, build_tubules, calibrate_atrophy,
                                  tubule_cells)

MARGIN_MM = 0.3
CORE_GAP_MM = 0.4
FIBROSIS_YIELD = 0.62  # expected fibrosis share of a patch's area (the rest: atrophic tubules)


@dataclass
class Artery:
    """Concentric outlines (k, 2): adventitia, media, internal elastic lamina, lumen."""

    outer: np.ndarray
    media: np.ndarray
    lamina: np.ndarray
    lumen: np.ndarray


@dataclass
class Layout:
    """All objects of a slide; ``nuclei`` is an (n, 6) table sorted by y (see ``nuclei_rows``)."""

    shape_px: tuple[int, int]
    mpp: float
    cores: list[np.ndarray]
    fibrosis: list[np.ndarray]
    tubules: list[Tubule]
    arteries: list[Artery]
    glomeruli: list[Glomerulus]
    nuclei: np.ndarray
    _rows: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        outlines = {"cores": self.cores, "fibrosis": self.fibrosis,
                    "tubules": [t.outer for t in self.tubules],
                    "arteries": [a.outer for a in self.arteries],
                    "glomeruli": [g.capsule for g in self.glomeruli]}
        for kind, items in outlines.items():
            self._rows[kind] = (np.array([v[:, 1].min() for v in items]),
                                np.array([v[:, 1].max() for v in items]))
        self.nuclei = self.nuclei[np.argsort(self.nuclei[:, 1], kind="stable")]

    def select(self, kind: str, y0: float, y1: float) -> np.ndarray:
        """Indices of the objects of ``kind`` whose row range meets [y0, y1)."""
        ymin, ymax = self._rows[kind]
        return np.flatnonzero((ymin < y1) & (ymax >= y0)) if len(ymin) else np.zeros(0, int)

    def nuclei_in(self, y0: float, y1: float) -> np.ndarray:
        reach = float(self.nuclei[:, 2].max()) if len(self.nuclei) else 0.0
        start, stop = np.searchsorted(self.nuclei[:, 1], [y0 - reach, y1 + reach])
        return self.nuclei[start:stop]


def build_layout(profile: LesionProfile, seed: int | None = None) -> Layout:
    """The geometry of the slide that ``profile`` describes (``seed`` overrides ``profile.seed``)."""
    seed = profile.seed if seed is None else seed
    rng = np.random.default_rng(seed)
    nuclear_rng = np.random.default_rng([seed, 7])  # nuclear lesions: a stream of their own
    um = 1.0 / profile.mpp
    core_width = profile.core_width_mm * 1000 * um
    margin, gap = MARGIN_MM * 1000 * um, CORE_GAP_MM * 1000 * um
    width = int(round(2 * margin + profile.cores * core_width + (profile.cores - 1) * gap))
    height = int(round(2 * margin + profile.core_length_mm * 1000 * um))
    cores = []
    for k in range(profile.cores):
        length = profile.core_length_mm * 1000 * um * (1.0 if k == 0 else rng.uniform(0.7, 0.95))
        x_centre = margin + core_width / 2 + k * (core_width + gap)
        cores.append(_core_outline(x_centre, margin, length, core_width, rng))
    core_polygons = [polygon_of(c) for c in cores]
    tissue = shapely.union_all(core_polygons)

    lesions = _assign_hypercellularity(_assign_lesions(profile, rng),
                                       profile.endocapillary_hypercellularity, nuclear_rng)
    glomeruli, nuclei = [], []
    centres = _place_discs(core_polygons, [_diameter_um(l, rng) / 2 * um for l in lesions], [], rng,
                           "glomeruli", clearance=25 * um)
    for gid, ((x, y, radius), lesion_set) in enumerate(zip(centres, lesions), start=1):
        glomerulus, glomerulus_nuclei = build_glomerulus(
            gid, (x, y), 2 * radius / um, lesion_set, profile.deposit_burden, um, rng)
        glomeruli.append(glomerulus)
        nuclei.append(glomerulus_nuclei)
        if "endocapillary_hypercellularity" in lesion_set:
            nuclei.append(endocapillary_nuclei(glomerulus, um, nuclear_rng))

    area_mm2 = tissue.area / (1000 * um) ** 2
    artery_radii = list(rng.uniform(40, 75, max(1, round(area_mm2 * 0.3))) * um)
    artery_radii += list(rng.uniform(12, 20, round(len(glomeruli) * 0.5 + area_mm2 * 0.5)) * um)
    discs = _place_discs(core_polygons, artery_radii, centres, rng, "arteries", clearance=15 * um)
    arteries = []
    for x, y, radius in discs:
        artery, artery_nuclei = _artery((x, y), radius, um, rng)
        arteries.append(artery)
        nuclei.append(artery_nuclei)

    obstacles = shapely.union_all([polygon_of(g.capsule).buffer(5 * um) for g in glomeruli]
                                  + [polygon_of(a.outer).buffer(4 * um) for a in arteries])
    cortex_area = tissue.difference(obstacles).area
    patch_area = profile.fibrosis_percent / 100 * cortex_area / FIBROSIS_YIELD
    patch_seed, tubule_seed, atrophy_seed = (int(v) for v in rng.integers(2**31, size=3))
    for _ in range(5):  # aim the patch area so that the fibrosis share meets the profile
        patches = _fibrosis_patches(tissue, patch_area, um, np.random.default_rng(patch_seed))
        cells, points, in_patch = tubule_cells(tissue, obstacles, patches, um,
                                                np.random.default_rng(tubule_seed))
        atrophic = calibrate_atrophy(cells, in_patch, points, patches, profile.atrophy_percent,
                                     np.random.default_rng(atrophy_seed))
        fibrosis = _expected_fibrosis_area(patches, tissue, obstacles, cells, in_patch, atrophic, um)
        achieved = 100 * fibrosis / cortex_area
        if (profile.fibrosis_percent == 0 or abs(achieved - profile.fibrosis_percent) < 1.0
                or patch_area >= tissue.area):
            break
        patch_area = min(patch_area * profile.fibrosis_percent / max(achieved, 0.5), tissue.area)
    tubules, tubule_nuclei = build_tubules(cells, atrophic, um, rng)
    nuclei.append(tubule_nuclei)
    nuclei.append(_interstitial_nuclei(tissue, patches, tubules, glomeruli, arteries, um, rng))
    if profile.inflammation_percent > 0:
        infiltrates = _fibrosis_patches(tissue, profile.inflammation_percent / 100 * cortex_area, um,
                                        nuclear_rng)
        nuclei.append(_infiltrate_nuclei(tissue, infiltrates, tubules, glomeruli, arteries, um,
                                         nuclear_rng))
    fibrosis_outlines = [exterior_vertices(p) for p in getattr(patches, "geoms", [patches])
                         if isinstance(p, Polygon) and not p.is_empty]
    return Layout((height, width), profile.mpp, cores, fibrosis_outlines, tubules, arteries,
                  glomeruli, np.vstack(nuclei))


def _expected_fibrosis_area(patches, tissue, obstacles, cells, in_patch, atrophic, um: float) -> float:
    """Area (px^2) the patches will leave as fibrosis: patch minus obstacles and its tubules.

    Tubule areas are estimated as ``tubules`` draws them (an atrophic one: 0.55 of its cell's
    equivalent radius, at most 15 µm; a normal one: ``NORMAL_KEEPS`` of its cell): exact enough
    to aim the patches; the truth is measured.
    """
    if patches.is_empty:
        return 0.0
    region = patches.intersection(tissue).difference(obstacles)
    area = shapely.area(cells[in_patch])
    radius = np.minimum(0.55 * np.sqrt(area / np.pi), 15 * um)
    kept = np.where(atrophic[in_patch], np.pi * radius**2, NORMAL_KEEPS * area)
    return region.area - float(kept.sum())


def _core_outline(x_centre: float, top: float, length: float, width: float, rng) -> np.ndarray:
    """A needle core: a gently bent band with wavy edges and rounded, ragged ends."""
    t = np.linspace(0, 1, 400)
    y = top + t * length
    bend = rng.uniform(-0.08, 0.08) * width * np.sin(np.pi * t * rng.uniform(0.5, 1.5) + rng.uniform(0, 6))
    half = width / 2 * (1 + periodic_noise(rng, 2 * np.pi * t, range(2, 30), 0.05))
    end = np.clip(np.minimum(t, 1 - t) * length / (0.6 * width), 0, 1)
    half = half * np.sqrt(1 - (1 - end) ** 2)
    left = np.stack([x_centre + bend - half, y], axis=1)
    right = np.stack([x_centre + bend + half, y], axis=1)
    return np.vstack([left, right[::-1]]).astype(np.float32)


def _assign_lesions(profile: LesionProfile, rng) -> list[tuple[str, ...]]:
    """Exact lesion counts over the glomeruli (rounded), shuffled onto them.

    Globally sclerosed glomeruli carry no other lesion; crescents and deposits go to the others.
    """
    n = profile.glomeruli
    count = {name: int(round(getattr(profile, name) * n)) for name in LESION_NAMES}
    order = rng.permutation(n)
    lesions: list[list[str]] = [[] for _ in range(n)]
    g = count["global_sclerosis"]
    for i in order[:g]:
        lesions[i].append("global_sclerosis")
    others = order[g:]
    for i in rng.permutation(others)[:count["segmental_sclerosis"]]:
        lesions[i].append("segmental_sclerosis")
    crescents = rng.permutation(others)
    for i in crescents[:count["cellular_crescent"]]:
        lesions[i].append("cellular_crescent")
    fibrous = count["fibrous_crescent"]
    for i in crescents[count["cellular_crescent"]:count["cellular_crescent"] + fibrous]:
        lesions[i].append("fibrous_crescent")
    for i in rng.permutation(others)[:count["hyaline_deposit"]]:
        lesions[i].append("hyaline_deposit")
    return [tuple(sorted(l)) for l in lesions]


def _assign_hypercellularity(lesions: list[tuple[str, ...]], fraction: float,
                             rng) -> list[tuple[str, ...]]:
    """Endocapillary hypercellularity on round(fraction * n) glomeruli, none globally sclerosed."""
    count = int(round(fraction * len(lesions)))
    if count == 0:
        return lesions
    candidates = [i for i, l in enumerate(lesions) if "global_sclerosis" not in l]
    chosen = set(rng.permutation(candidates)[:count].tolist())
    return [tuple(sorted(l + ("endocapillary_hypercellularity",))) if i in chosen else l
            for i, l in enumerate(lesions)]


def _diameter_um(lesions: tuple[str, ...], rng) -> float:
    """Corpuscle diameter: 150-250 µm; globally sclerosed glomeruli shrink."""
    if "global_sclerosis" in lesions:
        return float(rng.uniform(130, 180))
    return float(np.clip(rng.normal(195, 25), 150, 250))


def _place_discs(cores: list[Polygon], radii: list[float], taken, rng, what: str,
                 clearance: float) -> list[tuple[float, float, float]]:
    """Non-overlapping discs inside the cores (rejection sampling in batches), largest first."""
    placed = np.array([tuple(d) for d in taken], np.float64).reshape(-1, 3)
    result: list[tuple[float, float, float]] = [None] * len(radii)  # type: ignore[list-item]
    areas = np.array([c.area for c in cores])
    boundaries = [c.exterior for c in cores]
    for index in np.argsort(radii)[::-1]:
        radius = radii[index]
        for _ in range(40):
            k = rng.choice(len(cores), p=areas / areas.sum())
            xmin, ymin, xmax, ymax = cores[k].bounds
            xy = rng.uniform((xmin, ymin), (xmax, ymax), (256, 2))
            ok = shapely.contains_xy(cores[k], xy[:, 0], xy[:, 1])
            ok &= shapely.distance(boundaries[k], shapely.points(xy)) > radius + clearance / 2
            if len(placed):
                gaps = np.hypot(xy[:, None, 0] - placed[:, 0], xy[:, None, 1] - placed[:, 1]) - placed[:, 2]
                ok &= (gaps > radius + clearance).all(axis=1)
            if ok.any():
                x, y = xy[np.argmax(ok)]
                placed = np.vstack([placed, (x, y, radius)])
                result[index] = (float(x), float(y), radius)
                break
        else:
            raise ConfigError(f"lesion profile: cannot fit {len(radii)} {what} into the tissue; "
                              "lower the glomerulus count or make the cores longer")
    return result


def _artery(centre_xy, radius: float, um: float, rng) -> tuple[Artery, np.ndarray]:
    """An artery (radius > 30 µm) or arteriole: adventitia, media, internal elastic lamina, lumen."""
    theta = angles(128)
    small = radius < 30 * um
    outline = radius * (1 + periodic_noise(rng, theta, range(2, 5), 0.08))
    shares = (0.93, 0.5, 0.42) if small else (0.86, 0.56, 0.5)
    media, lamina, lumen = (polar_outline(centre_xy, outline * s, theta) for s in shares)
    wavy = outline * shares[1] * (1 + 0.02 * np.sin(theta * rng.integers(18, 30)))
    artery = Artery(polar_outline(centre_xy, outline, theta), media,
                    polar_outline(centre_xy, wavy, theta), lumen)
    tables = []
    layers = np.linspace(shares[1] + 0.05, shares[0] - 0.04, 2 if small else 5)
    for share in layers:
        points, tangent = points_along(polar_outline(centre_xy, outline * share, theta), 7 * um, rng, 0.75)
        tables.append(nuclei_rows(points, (4.2 * um, 1.1 * um), tangent, rng))
    points, tangent = points_along(polar_outline(centre_xy, outline * shares[2] * 1.02, theta), 14 * um, rng, 0.6)
    tables.append(nuclei_rows(points, (3.0 * um, 0.9 * um), tangent, rng))
    return artery, np.vstack(tables)


def _fibrosis_patches(tissue: Polygon, area: float, um: float, rng):
    """Blobby patches inside the tissue until their union covers ``area`` (px^2); the last blob
    is shrunk (bisection on its scale) so that the union ends close to ``area``."""
    patches = Polygon()
    if area <= 0:
        return patches
    theta = angles(64)
    xmin, ymin, xmax, ymax = tissue.bounds
    for _ in range(500):
        if patches.area >= 0.98 * area:
            break
        centre = (rng.uniform(xmin, xmax), rng.uniform(ymin, ymax))
        if not tissue.contains(Point(centre)):
            continue
        radius = rng.uniform(90, 260) * um * (1 + periodic_noise(rng, theta, range(2, 7), 0.3))

        def grown(scale: float):
            return patches.union(polygon_of(polar_outline(centre, radius * scale, theta)).intersection(tissue))

        candidate = grown(1.0)
        if candidate.area > area:
            low, high = 0.0, 1.0
            for _ in range(12):
                middle = (low + high) / 2
                low, high = (middle, high) if grown(middle).area < area else (low, middle)
            candidate = grown(high)
        patches = candidate
    return patches


def _interstitial_nuclei(tissue, patches, tubules, glomeruli, arteries, um, rng) -> np.ndarray:
    """Fibroblasts and capillary endothelium in the interstitium; lymphocytes in fibrosis."""
    objects = ([polygon_of(t.outer) for t in tubules] + [polygon_of(g.capsule) for g in glomeruli]
               + [polygon_of(a.outer) for a in arteries])
    points = random_points_in(tissue.buffer(-3 * um), int(tissue.area / (260 * um * um)), rng)
    tree = shapely.STRtree(objects)
    occupied = tree.query(shapely.points(points), predicate="within")[0]
    points = np.delete(points, np.unique(occupied), axis=0)
    fibrotic = (shapely.contains_xy(patches, points[:, 0], points[:, 1]) if not patches.is_empty
                else np.zeros(len(points), bool))
    spindle = points[~fibrotic]
    round_cells = points[fibrotic][rng.random(fibrotic.sum()) < 0.5]
    return np.vstack([
        nuclei_rows(spindle, (3.2 * um, 1.3 * um), rng.uniform(0, 180, len(spindle)), rng),
        nuclei_rows(round_cells, (2.0 * um, 1.8 * um), rng.uniform(0, 180, len(round_cells)), rng, 1.15),
    ])


def _infiltrate_nuclei(tissue, infiltrates, tubules, glomeruli, arteries, um, rng) -> np.ndarray:
    """Dense small round lymphocytes in the interstitium of the infiltrate patches, at least
    5 µm apart (centre to centre), kept 1.5 µm off tubules, glomeruli and arteries."""
    region = infiltrates.intersection(tissue.buffer(-3 * um))
    points = random_points_in(region, int(region.area / (12 * um * um)), rng)
    objects = ([polygon_of(t.outer) for t in tubules] + [polygon_of(g.capsule) for g in glomeruli]
               + [polygon_of(a.outer) for a in arteries])
    touching = shapely.STRtree(objects).query(shapely.points(points), predicate="dwithin",
                                              distance=1.5 * um)[0]
    points = np.delete(points, np.unique(touching), axis=0)
    crowded = [j for i, j in sorted(cKDTree(points).query_pairs(5 * um))]
    points = np.delete(points, np.unique(np.asarray(crowded, int)), axis=0)
    return nuclei_rows(points, (2.1 * um, 1.9 * um), rng.uniform(0, 180, len(points)), rng, 1.2)
