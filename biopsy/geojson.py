"""QuPath-compatible GeoJSON: features in level-0 pixel coordinates, polygons to masks (masks to
polygons: :mod:`biopsy.outlines`).

QuPath (0.3 to 0.6) exports either a ``FeatureCollection`` or a bare list of ``Feature`` objects;
each feature's ``properties`` hold ``objectType`` (``annotation`` or ``detection``),
``classification`` (``{"name": ..., "color": [r, g, b]}``, or ``"names": [...]`` for a derived
class), ``measurements`` (a dict of numbers) and, for annotations, ``isLocked``. Coordinates are
level-0 pixels (x, y), origin top-left.

Pixel geometry: pixel (row, col) of a map whose pixels are ``s = mpp / level0_mpp`` level-0 pixels
wide covers ``[col * s, (col + 1) * s)`` horizontally, so its centre is at ``x = (col + 0.5) * s``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, mapping, shape
from skimage.draw import polygon as polygon_pixels

from biopsy.atomic import atomic_path
from biopsy.errors import AnnotationError

IGNORE_INDEX = 255  # label of pixels no annotation covers; training losses ignore it


@dataclass(frozen=True)
class Annotation:
    """One annotated region: a polygon or multipolygon in level-0 pixels and its class name."""

    geometry: Polygon | MultiPolygon
    class_name: str


def make_feature(geometry: Polygon | MultiPolygon, *properties_args, **properties_kwargs) -> dict:
    """A QuPath GeoJSON feature; the other arguments are :func:`feature_properties`'."""
    properties = feature_properties(*properties_args, **properties_kwargs)
    return {"type": "Feature", "geometry": mapping(geometry), "properties": properties}


def feature_text(geometry: Polygon | MultiPolygon, *properties_args, **properties_kwargs) -> str:
    """:func:`make_feature`'s feature as JSON text, its geometry written by GEOS (~4x faster for a
    traced outline: a slide has 100,000s): for a non-empty geometry with finite coordinates, the
    same numbers as ``json.dumps`` of the feature (GEOS writes NaN as null, not an error)."""
    properties = feature_properties(*properties_args, **properties_kwargs)
    return (f'{{"type": "Feature", "geometry": {shapely.to_geojson(geometry)}, '
            f'"properties": {json.dumps(properties, allow_nan=False)}}}')


def feature_properties(
    classification_name: str,
    colour_rgb: Sequence[int],
    measurements: dict[str, float] | None = None,
    object_type: Literal["annotation", "detection"] = "annotation",
    name: str | None = None,
) -> dict:
    """A QuPath feature's properties. Measurements must be numbers: bools become 0/1; None, NaN
    and infinities (not measured) are left out, since QuPath measurements are finite numbers."""
    if object_type not in ("annotation", "detection"):
        raise ValueError(f"object_type must be 'annotation' or 'detection', got {object_type!r}")
    properties: dict = {
        "objectType": object_type,
        "classification": {"name": classification_name, "color": [int(c) for c in colour_rgb]},
    }
    if name is not None:
        properties["name"] = name
    if object_type == "annotation":
        properties["isLocked"] = False
    if measurements:
        properties["measurements"] = {
            key: float(value)
            for key, value in measurements.items()
            if value is not None and math.isfinite(float(value))
        }
    return properties


def write_feature_collection(path: str | Path, features: Iterable[dict | str]) -> None:
    """Write features (dicts, or JSON text from :func:`feature_text`) as one GeoJSON
    FeatureCollection, atomically, each as it comes (a generator's features are never all held:
    a slide's regions can be hundreds of thousands)."""
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as file:
        file.write('{"type": "FeatureCollection", "features": [')
        for index, feature in enumerate(features):
            text = feature if isinstance(feature, str) else json.dumps(feature, allow_nan=False)
            file.write((", " if index else "") + text)
        file.write("]}")


def read_json_annotations(path: Path, what: str, fix: str) -> object:
    """The parsed JSON of an annotation file; :class:`AnnotationError` naming ``path`` and ``fix``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read {what} ({error.strerror})") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AnnotationError(f"{path}: not valid JSON ({error}); {fix}") from error


def read_annotations(path: str | Path) -> list[Annotation]:
    """Annotations of a QuPath GeoJSON file (FeatureCollection or bare list of features).

    Accepts Polygon and MultiPolygon geometries; self-intersecting rings are repaired
    (``shapely.make_valid``). Raises :class:`AnnotationError` naming the file and the problem
    for bad JSON, a missing or unsupported geometry, invalid coordinates or a missing
    classification.
    """
    path = Path(path)
    document = read_json_annotations(path, "annotation file", "export GeoJSON from QuPath")
    if isinstance(document, dict) and document.get("type") == "FeatureCollection":
        features = document.get("features")
    elif isinstance(document, dict) and document.get("type") == "Feature":
        features = [document]
    else:
        features = document
    if not isinstance(features, list):
        raise AnnotationError(f"{path}: expected a GeoJSON FeatureCollection or a list of features")
    return [_annotation(path, index, feature) for index, feature in enumerate(features)]


def _annotation(path: Path, index: int, feature: object) -> Annotation:
    where = f"{path}: feature {index}"
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise AnnotationError(f"{where} is not a GeoJSON Feature")
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict) or "type" not in geometry:
        raise AnnotationError(f"{where} has no geometry")
    if geometry["type"] not in ("Polygon", "MultiPolygon"):
        raise AnnotationError(f"{where} has geometry {geometry['type']!r}; only Polygon and "
                              "MultiPolygon are supported (convert points/lines to areas in QuPath)")
    try:
        polygon = shape(geometry)
        coordinates = shapely.get_coordinates(polygon)
    except (ValueError, TypeError, AttributeError, IndexError, shapely.errors.GEOSException) as error:
        raise AnnotationError(f"{where} has invalid coordinates ({error})") from error
    if polygon.is_empty or not np.isfinite(coordinates).all():
        raise AnnotationError(f"{where} has empty or non-finite coordinates")
    if not polygon.is_valid:
        polygon = _as_polygonal(shapely.make_valid(polygon))
    if polygon.area == 0:
        raise AnnotationError(f"{where} has no area (fewer than 3 distinct points, or all on a line)")
    return Annotation(geometry=polygon, class_name=_class_name(where, feature.get("properties")))


def _class_name(where: str, properties: object) -> str:
    classification = properties.get("classification") if isinstance(properties, dict) else None
    if isinstance(classification, dict):
        name = classification.get("name")
        names = classification.get("names")
        if isinstance(name, str) and name:
            return name
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return ": ".join(names)  # QuPath's string form of a derived class
    raise AnnotationError(f"{where} has no classification name; set a class on it in QuPath")


def polygonal_parts(geometry) -> list[Polygon]:
    """The non-empty polygons of ``geometry`` (a polygon, multipolygon or collection)."""
    if isinstance(geometry, Polygon):
        return [] if geometry.is_empty else [geometry]
    return [part for part in getattr(geometry, "geoms", []) for part in polygonal_parts(part)]


def _as_polygonal(geometry) -> Polygon | MultiPolygon:
    parts = polygonal_parts(geometry)
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def rasterise(
    annotations: Sequence[Annotation],
    class_names: Sequence[str],
    shape_px: tuple[int, int],
    mpp: float,
    level0_mpp: float,
    unlabelled: int = IGNORE_INDEX,
) -> np.ndarray:
    """Label map (uint8, ``shape_px`` = (height, width) at ``mpp``) of annotations by class index.

    A pixel takes the class of the annotation containing its centre; larger annotations are drawn
    first, so a region nested inside another (a glomerulus inside a cortex outline) wins. Pixels no
    annotation covers get ``unlabelled``. Raises :class:`AnnotationError` for a class name not in
    ``class_names``.
    """
    unknown = sorted({a.class_name for a in annotations} - set(class_names))
    if unknown:
        raise AnnotationError(f"annotation classes {unknown} are not among the classes {list(class_names)}")
    labels = np.full(shape_px, unlabelled, np.uint8)
    for annotation in sorted(annotations, key=lambda a: a.geometry.area, reverse=True):
        _draw(labels, annotation.geometry, list(class_names).index(annotation.class_name),
              level0_mpp / mpp)
    return labels


def rasterise_instances(geometries: Sequence, shape_px: tuple[int, int], mpp: float,
                        level0_mpp: float) -> np.ndarray:
    """Instance map (int32, ``shape_px`` at ``mpp``): geometry ``i`` drawn as ``i + 1``, 0 elsewhere.

    Drawn as :func:`rasterise` draws (larger first), so a pixel two outlines share goes to the
    smaller; outlines that touch or overlap stay separate instances.
    """
    instances = np.zeros(shape_px, np.int32)
    for index in sorted(range(len(geometries)), key=lambda i: geometries[i].area, reverse=True):
        _draw(instances, geometries[index], index + 1, level0_mpp / mpp)
    return instances


def _draw(labels: np.ndarray, geometry, value: int, scale: float) -> None:
    """Set ``value`` on the pixels whose centres ``geometry`` (level-0 pixels times ``scale``)
    holds."""
    for polygon in polygonal_parts(geometry):
        rows, cols = _ring_pixels(polygon.exterior, scale, labels.shape)
        if not rows.size:
            continue
        top, left = rows.min(), cols.min()
        inside = np.zeros((rows.max() - top + 1, cols.max() - left + 1), bool)
        inside[rows - top, cols - left] = True
        for hole in polygon.interiors:
            hole_rows, hole_cols = _ring_pixels(hole, scale, labels.shape)
            inside[hole_rows - top, hole_cols - left] = False
        window = labels[top : top + inside.shape[0], left : left + inside.shape[1]]
        window[inside] = value


def _ring_pixels(ring, scale: float, shape_px: tuple[int, int]):
    """Indices of the pixels whose centres lie inside a ring given in level-0 pixels."""
    xy = np.asarray(ring.coords)
    return polygon_pixels(xy[:, 1] * scale - 0.5, xy[:, 0] * scale - 0.5, shape_px)
