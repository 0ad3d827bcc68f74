"""Glomerulus instances, per-glomerulus measures and cortex composition, from a class map.

Every measure is an exact, deterministic function of the class raster ``labels`` (2-D array of
class indices, meaning given by ``class_names``), the instance raster and ``mpp``; the synthetic
slide generator computes its truth with these same functions.

Coordinates: arrays are (row, col); positions are level-0 pixel (x, y), in the convention of
``biopsy.geojson`` (and QuPath): a class-map pixel (row, col) covers level-0 x from
``origin_x + col * s`` to ``origin_x + (col + 1) * s``, ``s = mpp / level0_mpp``, so its centre is
at ``origin_x + (col + 0.5) * s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import watershed

from biopsy.classes import class_index, glomerular_indices
from biopsy.scoring import CELLULAR_TUFT_CLASSES, INTERSTITIAL_CLASSES, load_score_config

_EIGHT_CONNECTED = np.ones((3, 3), bool)


@dataclass(frozen=True)
class GlomerulusMeasures:
    """Measures of one glomerulus instance ``M`` (its pixels), one CSV row.

    ``n(c)`` is the number of pixels of ``M`` whose class is ``c``; ``|M|`` the pixels of ``M``.

    Attributes
    ----------
    glomerulus_id : the instance's label in the instance raster.
    centroid_x_px, centroid_y_px : mean pixel centre of ``M``, level-0 pixels.
    area_um2 : ``|M| * mpp**2``.
    equivalent_diameter_um : diameter of the disc of that area, ``sqrt(4 * area_um2 / pi)``.
    sclerosis_fraction : ``n(sclerosis) / |M|``.
    cellular_crescent_fraction, fibrous_crescent_fraction : ``n(that crescent) / |M|``.
    cellular_crescent_capsule_coverage, fibrous_crescent_capsule_coverage : fraction (0..1) of
        the outline of ``M`` (its outer boundary, holes filled), measured by the angle it subtends
        at the centre of ``M``, whose nearest pixel inside ``M`` has that crescent class. The
        outline is the marching-squares contour at level 0.5 of the filled mask, pixels
        touching at a corner joined (``skimage.measure.find_contours``); each contour segment
        counts with its signed angle and is given to the mask pixel nearest its midpoint (split
        equally on a tie). By angle,
        not length, so that it is the share of the capsule circumference whether or not
        Bowman's space belongs to ``M``: a crescent's radial ends then add nothing. The centre
        is halfway between the centroids of the filled ``M`` and of its non-crescent pixels
        (``_outline_class_fractions``): within ~3 % of the arc where Bowman's space is thin,
        ~13 % above for a crescent 40 µm thick bulging out of a 90 µm tuft.
    hyaline_deposit_fraction : ``n(hyaline_deposit) / |M|``.
    lesions : lesion calls (``biopsy.scoring.call_lesions``); empty until called.
    tuft_nuclei_per_1000um2 : nuclei whose centre lies on a cellular-tuft pixel of ``M``
        (``scoring.CELLULAR_TUFT_CLASSES``) per 1000 µm2 of those pixels (0 when there are none);
        None when nuclei were not counted.

    A class the model lacks counts 0 pixels.
    """

    glomerulus_id: int
    centroid_x_px: float
    centroid_y_px: float
    area_um2: float
    equivalent_diameter_um: float
    sclerosis_fraction: float
    cellular_crescent_fraction: float
    fibrous_crescent_fraction: float
    cellular_crescent_capsule_coverage: float
    fibrous_crescent_capsule_coverage: float
    hyaline_deposit_fraction: float
    lesions: tuple[str, ...] = ()
    tuft_nuclei_per_1000um2: float | None = None


@dataclass(frozen=True)
class CortexTile:
    """Class composition of one square tissue tile.

    ``x_px``, ``y_px``: level-0 pixel position of the tile's top-left corner; ``size_px``: its
    nominal side in level-0 pixels (tiles at the right and bottom edges may be cut short);
    ``area_um2``: area of each class but ``background`` inside the tile;
    ``interstitial_nuclei``: nuclei whose centre lies on an interstitial pixel of the tile
    (``scoring.INTERSTITIAL_CLASSES``), None when nuclei were not counted.
    """

    x_px: float
    y_px: float
    size_px: float
    area_um2: dict[str, float]
    interstitial_nuclei: int | None = None


def find_glomeruli(labels: np.ndarray, class_names, mpp: float, *,
                   min_area_um2: float | None = None,
                   split_min_depth_um: float | None = None) -> np.ndarray:
    """Instance raster (int32, 0 = none, ids 1..n) of the glomeruli in a class map.

    A glomerulus is an 8-connected region of the glomerular classes
    (``classes.GLOMERULAR_CLASSES``).
    Touching glomeruli are split by a watershed on the Euclidean distance transform of each region,
    seeded by its peaks of depth ``split_min_depth_um``; pieces below ``min_area_um2`` are
    dropped. Both default to the scoring config (``glomeruli`` section).
    """
    if min_area_um2 is None or split_min_depth_um is None:
        settings = load_score_config().glomeruli
        min_area_um2 = settings.min_area_um2 if min_area_um2 is None else min_area_um2
        split_min_depth_um = (settings.split_min_depth_um if split_min_depth_um is None
                              else split_min_depth_um)
    glomerular = glomerular_indices(class_names)
    regions, _ = ndimage.label(np.isin(labels, glomerular), structure=_EIGHT_CONNECTED)
    instances = np.zeros(labels.shape, np.int32)
    min_area_px = min_area_um2 / mpp**2
    next_id = 1
    for region_id, box in enumerate(ndimage.find_objects(regions), start=1):
        region = regions[box] == region_id
        if region.sum() < min_area_px:
            continue
        pieces = _split_touching(region, split_min_depth_um / mpp)
        for piece_id in range(1, int(pieces.max()) + 1):
            piece = pieces == piece_id
            if piece.sum() >= min_area_px:
                instances[box][piece] = next_id
                next_id += 1
    return instances


def _split_touching(region: np.ndarray, depth_px: float) -> np.ndarray:
    """Label image (1..k) of ``region`` split at the necks between its distance-transform peaks.

    Seeds are the regional maxima of the distance transform after an h-maxima transform
    (reconstruction by dilation of ``distance - depth_px``): one plateau per peak that stands
    ``depth_px`` above its saddle, so ridges with shallow dips (a ring, a lobulated tuft) stay one.
    """
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    flattened = reconstruction(distance - depth_px, distance, method="dilation")
    markers, count = ndimage.label(local_maxima(flattened, connectivity=2) & region,
                                   structure=_EIGHT_CONNECTED)
    if count <= 1:
        return region.astype(np.int32)
    return watershed(-distance, markers, mask=region).astype(np.int32)


def measure_glomeruli(labels: np.ndarray, class_names, mpp: float,
                      instances: np.ndarray | None = None,
                      origin_xy_px: tuple[float, float] = (0, 0),
                      level0_mpp: float | None = None,
                      nuclei_xy: np.ndarray | None = None) -> list[GlomerulusMeasures]:
    """Measures of every glomerulus, in order of instance id (see :class:`GlomerulusMeasures`).

    Parameters
    ----------
    labels : class raster at ``mpp`` µm/px.
    instances : instance raster of the same shape (0 = none); None: :func:`find_glomeruli`.
    origin_xy_px : level-0 pixel position of the top-left corner of ``labels``.
    level0_mpp : µm/px of level 0; None: ``labels`` is level 0.
    nuclei_xy : level-0 (x, y) centres of the slide's nuclei (``biopsy.nuclei``); None: not
        counted (``tuft_nuclei_per_1000um2`` None).
    """
    if instances is None:
        instances = find_glomeruli(labels, class_names, mpp)
    if instances.shape != labels.shape:
        raise ValueError(f"instances {instances.shape} and labels {labels.shape} differ in shape")
    scale = mpp / (level0_mpp or mpp)
    index = {name: class_index(class_names, name) for name in
             ("sclerosis", "cellular_crescent", "fibrous_crescent", "hyaline_deposit")}
    tuft_classes = _class_indices(class_names, CELLULAR_TUFT_CLASSES)
    crescent_classes = _class_indices(class_names, ("cellular_crescent", "fibrous_crescent"))
    tuft_nuclei = None
    if nuclei_xy is not None:
        rows, cols = nuclear_pixels(nuclei_xy, labels.shape, origin_xy_px, scale)
        on_tuft = np.isin(labels[rows, cols], tuft_classes)
        tuft_nuclei = np.bincount(instances[rows, cols][on_tuft], minlength=int(instances.max()) + 1)
    measures = []
    for glomerulus_id, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        mask = instances[box] == glomerulus_id
        classes = labels[box]
        pixels = int(mask.sum())
        counts = np.bincount(classes[mask], minlength=len(class_names))
        coverage = _outline_class_fractions(mask, classes, len(class_names), crescent_classes)
        area_fraction = counts / pixels
        rows, cols = np.nonzero(mask)
        area_um2 = pixels * mpp**2
        density = None
        if tuft_nuclei is not None:
            tuft_um2 = float(counts[tuft_classes].sum()) * mpp**2
            density = 1000.0 * tuft_nuclei[glomerulus_id] / tuft_um2 if tuft_um2 > 0 else 0.0
        measures.append(GlomerulusMeasures(
            glomerulus_id=glomerulus_id,
            centroid_x_px=float(origin_xy_px[0] + (box[1].start + cols.mean() + 0.5) * scale),
            centroid_y_px=float(origin_xy_px[1] + (box[0].start + rows.mean() + 0.5) * scale),
            area_um2=area_um2,
            equivalent_diameter_um=float(np.sqrt(4.0 * area_um2 / np.pi)),
            sclerosis_fraction=_of_class(area_fraction, index["sclerosis"]),
            cellular_crescent_fraction=_of_class(area_fraction, index["cellular_crescent"]),
            fibrous_crescent_fraction=_of_class(area_fraction, index["fibrous_crescent"]),
            cellular_crescent_capsule_coverage=_of_class(coverage, index["cellular_crescent"]),
            fibrous_crescent_capsule_coverage=_of_class(coverage, index["fibrous_crescent"]),
            hyaline_deposit_fraction=_of_class(area_fraction, index["hyaline_deposit"]),
            tuft_nuclei_per_1000um2=density,
        ))
    return measures


def nuclear_pixels(nuclei_xy: np.ndarray, shape: tuple[int, int], origin_xy_px, scale: float):
    """(rows, cols) of the map pixels under the nuclei centres that fall inside a map of
    ``shape`` whose pixels are ``scale`` level-0 px wide, from level-0 ``origin_xy_px``."""
    xy = np.asarray(nuclei_xy, np.float64).reshape(-1, 2)
    cols = np.floor((xy[:, 0] - origin_xy_px[0]) / scale).astype(np.int64)
    rows = np.floor((xy[:, 1] - origin_xy_px[1]) / scale).astype(np.int64)
    inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    return rows[inside], cols[inside]


def _class_indices(class_names, names) -> list[int]:
    return [i for i in (class_index(class_names, name) for name in names) if i is not None]


def _of_class(per_class: np.ndarray, index: int | None) -> float:
    """The entry of a class in a per-class array; 0 for a class the model lacks."""
    return float(per_class[index]) if index is not None else 0.0


def _outline_class_fractions(mask: np.ndarray, classes: np.ndarray, n_classes: int,
                             crescent_classes: list[int]) -> np.ndarray:
    """Share of the outer outline of ``mask``, by angle seen from its centre, against each class.

    The outline is the marching-squares contour (level 0.5) of the mask with holes filled, one
    for the 8-connected region; each
    segment counts with the signed angle it subtends at the centre (below) and belongs to the
    mask pixel nearest its midpoint (split equally on a tie). For a closed outline around the
    centre the angles sum to 2 pi, so the shares are fractions of the capsule circumference even
    where Bowman's space is not part of the mask: a crescent's radial ends subtend no angle.

    The centre: halfway between the centroid of the filled mask and that of its pixels other than
    ``crescent_classes`` (the distance-transform peak if it falls outside the outline). A crescent
    pulls the first towards itself and, pushing the tuft inwards, the second away; on the
    synthetic generator's crescents (30-60 % of the capsule) the first read 5.5 % (relative)
    above the arc, the second 4.8 % below, halfway 0.2 % above (SD 1.2 %).
    """
    filled = np.pad(ndimage.binary_fill_holes(mask), 1)
    padded_classes = np.pad(classes, 1)
    centre = np.argwhere(filled).mean(axis=0)
    rest = np.argwhere(np.pad(mask & ~np.isin(classes, crescent_classes), 1))
    if len(rest):
        centre = (centre + rest.mean(axis=0)) / 2
    contours = [c for c in find_contours(filled.astype(np.float32), 0.5, fully_connected="high")
                if len(c) > 1]
    start, end = np.concatenate([c[:-1] for c in contours]), np.concatenate([c[1:] for c in contours])
    turn = _turns(start, end, centre)
    if abs(turn.sum()) < np.pi:  # the centre is outside the outline (a thin or bent region)
        distance = ndimage.distance_transform_edt(filled)
        centre = np.array(np.unravel_index(np.argmax(distance), filled.shape), float)
        turn = _turns(start, end, centre)  # a pixel's centre: always inside
    turn *= np.sign(turn.sum())  # contours may run either way round
    midpoint = (start + end) / 2
    # Each segment lies inside one cell of four pixel centres; give it to the nearest inside ones.
    cell = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    corners = np.floor(midpoint).astype(int)[:, None, :] + cell
    inside = filled[corners[..., 0], corners[..., 1]]
    distance2 = np.where(inside, ((corners - midpoint[:, None, :]) ** 2).sum(-1), np.inf)
    nearest = distance2 <= distance2.min(axis=1, keepdims=True) + 1e-9
    weight = nearest / nearest.sum(axis=1, keepdims=True) * turn[:, None]
    per_class = np.bincount(padded_classes[corners[..., 0], corners[..., 1]].ravel(),
                            weights=weight.ravel(), minlength=n_classes)
    return np.clip(per_class / turn.sum(), 0.0, 1.0)


def _turns(start: np.ndarray, end: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The signed angle (radians) that each segment ``start`` -> ``end`` subtends at ``centre``."""
    start, end = start - centre, end - centre
    return np.arctan2(start[:, 0] * end[:, 1] - start[:, 1] * end[:, 0], (start * end).sum(axis=1))


def measure_cortex_tiles(labels: np.ndarray, class_names, mpp: float,
                         tile_um: float | None = None, *,
                         origin_xy_px: tuple[float, float] = (0, 0),
                         level0_mpp: float | None = None,
                         nuclei_xy: np.ndarray | None = None) -> list[CortexTile]:
    """Area of each class per square tile of ``tile_um`` (default: scoring config), tissue only.

    Tiles form a grid from the top-left corner of ``labels``; a tile with no pixel other than
    ``background`` is left out. Their sums give the slide's cortex areas; the pre/post comparison
    judges their change over blocks of them (``biopsy.compare.tile_blocks``). With ``nuclei_xy``
    (level-0 (x, y) centres), each tile also counts the nuclei on its interstitial pixels.
    """
    if tile_um is None:
        tile_um = load_score_config().cortex.tile_um
    tile_px = max(1, round(tile_um / mpp))
    scale = mpp / (level0_mpp or mpp)
    background = class_index(class_names, "background")
    interstitial_nuclei = None
    if nuclei_xy is not None:
        rows, cols = nuclear_pixels(nuclei_xy, labels.shape, origin_xy_px, scale)
        on_interstitium = np.isin(labels[rows, cols], _class_indices(class_names, INTERSTITIAL_CLASSES))
        grid = (-(-labels.shape[0] // tile_px), -(-labels.shape[1] // tile_px))
        interstitial_nuclei = np.zeros(grid, np.int64)
        np.add.at(interstitial_nuclei, (rows[on_interstitium] // tile_px,
                                        cols[on_interstitium] // tile_px), 1)
    tiles = []
    for row in range(0, labels.shape[0], tile_px):
        for col in range(0, labels.shape[1], tile_px):
            counts = np.bincount(labels[row:row + tile_px, col:col + tile_px].ravel(),
                                 minlength=len(class_names))
            if counts.sum() == (counts[background] if background is not None else 0):
                continue
            tiles.append(CortexTile(
                x_px=origin_xy_px[0] + col * scale, y_px=origin_xy_px[1] + row * scale,
                size_px=tile_px * scale,
                area_um2={name: float(counts[i]) * mpp**2 for i, name in enumerate(class_names)
                          if i != background},
                interstitial_nuclei=None if interstitial_nuclei is None
                else int(interstitial_nuclei[row // tile_px, col // tile_px])))
    return tiles
