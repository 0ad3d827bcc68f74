"""Annotations of one slide as labels at any µm/px: COCO or QuPath polygons, or a label map.

Every source answers the same questions in level-0 pixels of its slide: the class labels of a
region (``labels``), its annotated objects one by one (``instances``) and where they are
(``objects``). Classes are renamed to the model's through the config's class map; pixels no
annotation covers take the ``unannotated`` class or :data:`IGNORE_INDEX`.
"""

import copy
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.affinity import translate
from shapely.geometry import MultiPolygon, Polygon, box
from skimage.measure import label, regionprops

from biopsy.errors import AnnotationError
from biopsy.geojson import (IGNORE_INDEX, Annotation, polygonal_parts, rasterise,
                            rasterise_instances, read_json_annotations)
from biopsy.labelmap import read_label_map
from biopsy.outlines import polygons_from_mask
from training.config import IGNORE


@dataclass(frozen=True)
class AnnotatedObject:
    """One annotated object: its model class index and a level-0 (x, y) point inside it."""

    class_index: int
    x: float
    y: float


def coco_image_sizes(path: str | Path) -> dict[str, tuple[int, int]]:
    """(width, height) in pixels of each image of a COCO file (read with :func:`read_coco`
    first) that states both, by file name."""
    document = read_json_annotations(Path(path), "COCO file", "export COCO instance JSON")
    return {str(i["file_name"]): (i["width"], i["height"]) for i in document["images"]
            if isinstance(i.get("width"), int) and isinstance(i.get("height"), int)}


def read_coco(path: str | Path) -> dict[str, list[Annotation]]:
    """Polygons of a COCO instance JSON by image file name (as written in the file).

    Polygon and run-length (RLE) segmentations are read; an object's several polygons are its
    parts (their union). A crowd (``iscrowd: 1``) is ``ignore``: neither trained on nor counted.
    Images listed with no annotation map to an empty list. Raises :class:`AnnotationError`
    naming the file and the problem.
    """
    path = Path(path)
    document = read_json_annotations(path, "COCO file", "export COCO instance JSON")
    if not isinstance(document, dict) or not all(
        isinstance(document.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise AnnotationError(f"{path}: not COCO instances JSON (needs lists 'images', "
                              "'annotations' and 'categories')")
    try:
        categories = {c["id"]: str(c["name"]) for c in document["categories"]}
        images = {i["id"]: str(i["file_name"]) for i in document["images"]}
    except (KeyError, TypeError) as error:
        raise AnnotationError(f"{path}: category or image without 'id'/'name'/'file_name' "
                              f"({error!r})") from error
    first_id: dict[str, object] = {}
    for image_id, name in images.items():
        if first_id.setdefault(name, image_id) != image_id:
            raise AnnotationError(f"{path}: images {first_id[name]!r} and {image_id!r} are both "
                                  f"{name!r}; give each image its path relative to data.root, so "
                                  "that their outlines stay apart")
    by_image: dict[str, list[Annotation]] = {name: [] for name in images.values()}
    for index, entry in enumerate(document["annotations"]):
        where = f"{path}: annotation {index}"
        if not isinstance(entry, dict):
            raise AnnotationError(f"{where} is not an object")
        for key, known in (("image_id", images), ("category_id", categories)):
            value = entry.get(key)  # a list raised TypeError: unhashable type
            if not isinstance(value, Hashable) or value not in known:
                raise AnnotationError(f"{where} refers to unknown {key} {value!r}")
        geometry = _coco_geometry(where, entry.get("segmentation"))
        crowd = entry.get("iscrowd") in (1, True)  # a group not outlined one by one
        name = IGNORE if crowd else categories[entry["category_id"]]
        by_image[images[entry["image_id"]]].append(Annotation(geometry=geometry, class_name=name))
    return by_image


def _coco_geometry(where: str, segmentation) -> Polygon | MultiPolygon:
    if isinstance(segmentation, dict):
        return _rle_geometry(where, segmentation)
    if not isinstance(segmentation, list) or not segmentation:
        raise AnnotationError(f"{where} has no polygon segmentation")
    polygons = []
    for ring in segmentation:
        if (not isinstance(ring, list) or len(ring) < 6 or len(ring) % 2
                or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in ring)):
            raise AnnotationError(f"{where}: a polygon must be a flat list of at least 3 finite "
                                  "x, y pairs")
        polygons.append(shapely.make_valid(Polygon(np.reshape(ring, (-1, 2)))))
    # COCO's rings are the parts of one object: their union (pycocotools merges their masks).
    parts = [p for p in polygonal_parts(shapely.union_all(polygons)) if p.area > 0]
    if not parts:
        raise AnnotationError(f"{where} has a polygon of zero area")
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def _rle_geometry(where: str, segmentation: dict) -> Polygon | MultiPolygon:
    """The outline of a COCO run-length mask: ``counts`` a list of runs or pycocotools'
    compressed string, column by column over ``size`` = [height, width], off pixels first. Only
    the rows and columns the mask covers are laid out (a whole-slide image's size is not)."""
    try:
        height, width = (_whole(v) for v in segmentation["size"])
        counts = segmentation["counts"]
        runs = np.array(_compressed_runs(counts) if isinstance(counts, str) else
                        [_whole(c) for c in counts], np.int64)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise AnnotationError(f"{where}: malformed RLE mask ({error!r})") from None
    if runs.min(initial=0) < 0 or runs.sum() != height * width:
        raise AnnotationError(f"{where}: RLE runs cover {runs.sum()} pixels, not {height} x {width}")
    ends = np.cumsum(runs)
    starts, on = ends - runs, (np.arange(len(runs)) % 2 == 1) & (runs > 0)
    if not on.any():
        raise AnnotationError(f"{where} has an empty RLE mask")
    first_col, end_col = starts[on].min() // height, (ends[on].max() - 1) // height + 1
    low, high = first_col * height, end_col * height  # the columns the mask covers
    window = np.repeat(on, np.clip(ends, low, high) - np.clip(starts, low, high))
    mask = window.reshape(end_col - first_col, height).T
    rows = np.flatnonzero(mask.any(axis=1))
    mask = mask[rows[0]:rows[-1] + 1]
    parts = list(polygons_from_mask(mask, 1.0, 1.0, simplify_tolerance_px=0.0,
                                    origin_xy_px=(float(first_col), float(rows[0]))))
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def _whole(value) -> int:
    """A count or size: a whole number (a float with a fraction is malformed, not cut)."""
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


def _compressed_runs(text: str) -> list[int]:
    """pycocotools' string form of RLE counts: each run in 5-bit groups (ASCII 48 + group, bit 6
    set while more follow, sign in the last group's bit 5), from the fourth on as the difference
    from the run two before. A string cut short raises IndexError."""
    runs: list[int] = []
    position = 0
    while position < len(text):
        value = shift = 0
        more = True
        while more:
            group = ord(text[position]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position, shift = position + 1, shift + 5
            if not more and group & 0x10:
                value -= 1 << shift
        runs.append(value + runs[-2] if len(runs) > 2 else value)
    return runs


def _rasterise_names(class_names: list[str]) -> list[str]:
    """Class names for :func:`rasterise` with ``ignore`` at index 255, so ignore regions draw too."""
    return list(class_names) + [""] * (IGNORE_INDEX - len(class_names)) + [IGNORE]


class PolygonLabels:
    """Labels from polygons (COCO or GeoJSON) of one slide, renamed to model classes."""

    def __init__(self, annotations: list[Annotation], class_names: list[str], class_map: dict[str, str],
                 unannotated: str, level0_mpp: float, source: str):
        self.class_names = list(class_names)
        self.level0_mpp = level0_mpp
        renamed = []
        for annotation in annotations:
            name = class_map.get(annotation.class_name, annotation.class_name)
            if name not in self.class_names and name != IGNORE:
                raise AnnotationError(f"{source}: class {annotation.class_name!r} is not a model class; "
                                      "map it in data.annotations.class_map")
            renamed.append(Annotation(annotation.geometry, name))
        self.annotations = renamed
        self.unannotated = IGNORE_INDEX if unannotated == IGNORE else self.class_names.index(unannotated)
        self._tree = shapely.STRtree([a.geometry for a in renamed]) if renamed else None

    def with_mpp_scaled(self, factor: float) -> "PolygonLabels":
        """A copy for the slide taken at ``factor`` times its pixel size (the polygons stay in
        level-0 pixels)."""
        scaled = copy.copy(self)
        scaled.level0_mpp = self.level0_mpp * factor
        return scaled

    def labels(self, x: float, y: float, size_px: tuple[int, int], mpp: float) -> np.ndarray:
        """(h, w) uint8 labels of the region with level-0 top-left (x, y), ``size_px`` at ``mpp``."""
        width, height = size_px
        scale = mpp / self.level0_mpp
        patch = box(x, y, x + width * scale, y + height * scale)
        hits = self._tree.query(patch) if self._tree is not None else []
        shifted = [Annotation(translate(self.annotations[i].geometry, -x, -y), self.annotations[i].class_name)
                   for i in sorted(hits)]
        return rasterise(shifted, _rasterise_names(self.class_names), (height, width), mpp,
                         self.level0_mpp, unlabelled=self.unannotated)

    def instances(self, x: float, y: float, size_px: tuple[int, int], mpp: float,
                  class_indices: list[int]) -> np.ndarray:
        """(h, w) int32 instance map of the region (as :meth:`labels`): each object that the
        annotations of the given classes outline (:func:`outlined_objects`) its own id, so that
        annotated objects which touch stay apart."""
        width, height = size_px
        scale = mpp / self.level0_mpp
        patch = box(x, y, x + width * scale, y + height * scale)
        hits = self._tree.query(patch) if self._tree is not None else []
        wanted = {self.class_names[i] for i in class_indices}
        outlines = [(translate(self.annotations[i].geometry, -x, -y), self.annotations[i].class_name)
                    for i in sorted(hits) if self.annotations[i].class_name in wanted]
        return rasterise_instances(outlined_objects(outlines), (height, width), mpp,
                                   self.level0_mpp)

    def objects(self, class_indices: list[int]) -> list[AnnotatedObject]:
        """A point inside every annotation of the given classes."""
        return [AnnotatedObject(self.class_names.index(a.class_name), *_inside_point(a.geometry))
                for a in self.annotations
                if a.class_name != IGNORE and self.class_names.index(a.class_name) in class_indices]


# Classes outlined as parts of a glomerulus, never a glomerulus alone (a globally sclerotic one
# is outlined as sclerosis, a normal one as tuft).
PART_CLASSES = ("cellular_crescent", "fibrous_crescent", "hyaline_deposit")
_TOUCH_PX = 1.0  # level-0 px: outlines this close are drawn against each other


def outlined_objects(outlines: list[tuple[object, str]]) -> list:
    """The objects that ``(geometry, class name)`` outlines draw, each the union of its outlines.

    An outline lying mostly (over half its area) inside a larger one, holes filled, is part of
    it (a lesion drawn inside its glomerulus); an outline of :data:`PART_CLASSES` is part of the
    object it overlaps most, or else touches (a crescent drawn beside its tuft). Otherwise an
    outline is an object of its own, even where it touches another (two glomeruli side by side).
    """
    geometries = [geometry for geometry, _ in outlines]
    filled = [shapely.union_all([Polygon(part.exterior) for part in polygonal_parts(g)])
              for g in geometries]
    order = sorted(range(len(outlines)), key=lambda i: geometries[i].area, reverse=True)
    order.sort(key=lambda i: outlines[i][1] in PART_CLASSES)  # parts last, each onto a whole
    rank = {index: position for position, index in enumerate(order)}
    tree = shapely.STRtree(filled)
    owner: dict[int, int] = {}
    for index in order:
        geometry, is_part = geometries[index], outlines[index][1] in PART_CLASSES
        near = sorted((int(j) for j in tree.query(geometry.buffer(_TOUCH_PX))
                       if rank[int(j)] < rank[index]), key=rank.get)
        overlap = {j: filled[j].intersection(geometry).area for j in near}
        inside = [j for j in near if geometry.area > 0 and overlap[j] > geometry.area / 2]
        if is_part and not inside and near:
            inside = [max(near, key=lambda j: (overlap[j], -filled[j].distance(geometry)))]
            inside = [j for j in inside if overlap[j] > 0 or filled[j].distance(geometry) <= _TOUCH_PX]
        owner[index] = owner[inside[0]] if inside else index
    parts: dict[int, list] = {}
    for index in order:
        parts.setdefault(owner[index], []).append(geometries[index])
    return [shapely.union_all(group) for group in parts.values()]


def _inside_point(geometry) -> tuple[float, float]:
    point = geometry.centroid if geometry.contains(geometry.centroid) else geometry.representative_point()
    return point.x, point.y


class LabelMapLabels:
    """Labels from a label-map image (e.g. synthetic truth), renamed to model classes."""

    def __init__(self, path: Path, class_names: list[str], class_map: dict[str, str], level0_mpp: float):
        self.path = path
        self.class_names = list(class_names)
        self.class_map = class_map
        self.level0_mpp = level0_mpp
        self.mpp_factor = 1.0  # the map's pixels taken as this many times their recorded size
        self._map = None  # read on first use, in the process that uses it

    def _label_map(self):
        if self._map is None:
            label_map = read_label_map(self.path)
            lookup = np.full(256, IGNORE_INDEX, np.uint8)
            for index, name in enumerate(label_map.class_names):
                name = self.class_map.get(name, name)
                if name not in self.class_names and name != IGNORE:
                    raise AnnotationError(f"{self.path}: class {name!r} is not a model class; map it "
                                          "in data.annotations.class_map")
                if name != IGNORE:
                    lookup[index] = self.class_names.index(name)
            self._map = (lookup[label_map.labels], label_map.mpp)
        labels, map_mpp = self._map
        return labels, map_mpp * self.mpp_factor

    def with_mpp_scaled(self, factor: float) -> "LabelMapLabels":
        """A copy for the slide taken at ``factor`` times its pixel size: the map with it."""
        scaled = copy.copy(self)
        scaled.level0_mpp, scaled.mpp_factor = self.level0_mpp * factor, self.mpp_factor * factor
        return scaled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}

    def labels(self, x: float, y: float, size_px: tuple[int, int], mpp: float) -> np.ndarray:
        """Nearest-neighbour labels of the region at ``mpp``; ignore outside the map."""
        labels, map_mpp = self._label_map()
        scale = mpp / self.level0_mpp  # level-0 px per output px
        to_map = self.level0_mpp / map_mpp
        width, height = size_px
        cols = np.floor((x + (np.arange(width) + 0.5) * scale) * to_map).astype(np.int64)
        rows = np.floor((y + (np.arange(height) + 0.5) * scale) * to_map).astype(np.int64)
        inside = (rows[:, None] >= 0) & (rows[:, None] < labels.shape[0]) \
            & (cols[None, :] >= 0) & (cols[None, :] < labels.shape[1])
        out = labels[np.clip(rows, 0, labels.shape[0] - 1)[:, None],
                     np.clip(cols, 0, labels.shape[1] - 1)[None, :]]
        return np.where(inside, out, IGNORE_INDEX).astype(np.uint8)

    def instances(self, x: float, y: float, size_px: tuple[int, int], mpp: float,
                  class_indices: list[int]) -> np.ndarray:
        """(h, w) int32 instance map of the region (as :meth:`labels`): the 8-connected regions
        of the given classes (a label map does not say where touching objects part)."""
        return label(np.isin(self.labels(x, y, size_px, mpp), class_indices), connectivity=2
                     ).astype(np.int32)

    def objects(self, class_indices: list[int]) -> list[AnnotatedObject]:
        """A point (nearest the centroid) in every connected region of the given classes."""
        labels, map_mpp = self._label_map()
        to_level0 = map_mpp / self.level0_mpp
        found = []
        for index in class_indices:
            for region in regionprops(label(labels == index, connectivity=1)):
                coords = region.coords
                nearest = coords[np.argmin(((coords - region.centroid) ** 2).sum(axis=1))]
                found.append(AnnotatedObject(index, (nearest[1] + 0.5) * to_level0,
                                             (nearest[0] + 0.5) * to_level0))
        return found
