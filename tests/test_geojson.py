"""QuPath GeoJSON: polygons to masks, QuPath files in, malformed files out."""

import json

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Point, Polygon, box

from biopsy.errors import AnnotationError
from biopsy.geojson import (
    IGNORE_INDEX,
    Annotation,
    feature_text,
    make_feature,
    rasterise,
    rasterise_instances,
    read_annotations,
    write_feature_collection,
)
from biopsy.outlines import polygons_from_mask


def test_mask_to_polygons_to_raster_round_trip_is_exact():
    rng = np.random.default_rng(3)
    mask = np.kron(rng.random((20, 20)) > 0.6, np.ones((6, 6), bool))
    polygons = list(polygons_from_mask(mask, 2.0, 0.5, simplify_tolerance_px=0.0))
    annotations = [Annotation(p, "tuft") for p in polygons]
    labels = rasterise(annotations, ["background", "tuft"], mask.shape, 2.0, 0.5, unlabelled=0)
    np.testing.assert_array_equal(labels == 1, mask)


def test_rasterise_draws_nested_regions_on_top_and_marks_the_rest_unlabelled():
    cortex = Annotation(box(0, 0, 80, 80), "tissue")
    glomerulus = Annotation(box(20, 20, 40, 40), "tuft")
    labels = rasterise([glomerulus, cortex], ["background", "tissue", "tuft"], (50, 50), 2.0, 1.0)
    assert (labels[10:20, 10:20] == 2).all()  # level-0 20..40 -> map pixels 10..19
    assert (labels[:40, :40][labels[:40, :40] != 2] == 1).all()
    assert (labels[40:, :] == IGNORE_INDEX).all()
    with pytest.raises(AnnotationError, match="'crescent'"):
        rasterise([Annotation(box(0, 0, 4, 4), "crescent")], ["tuft"], (5, 5), 1.0, 1.0)


def test_instances_keep_overlapping_outlines_apart_and_match_point_in_polygon():
    """Each outline its own id; a shared pixel goes to the smaller (drawn last)."""
    big, small, apart = Point(30, 30).buffer(20), Point(58, 30).buffer(12), box(70, 70, 90, 94)
    instances = rasterise_instances([big, small, apart], (60, 60), 2.0, 1.0)
    assert instances.dtype == np.int32 and set(np.unique(instances)) == {0, 1, 2, 3}
    rows, cols = np.mgrid[:60, :60]
    centres = shapely.points((cols + 0.5) * 2, (rows + 0.5) * 2)
    expected = np.zeros((60, 60), np.int32)
    for value, geometry in ((1, big), (3, apart), (2, small)):  # larger first
        expected[shapely.contains(geometry, centres)] = value
    np.testing.assert_array_equal(instances, expected)
    assert ((instances == 2) & shapely.contains(big, centres)).any()  # they overlap


def test_features_are_written_as_they_come_and_the_file_is_whole_or_absent(tmp_path):
    features = [make_feature(box(i, 0, i + 5, 5), "tubule", (80, 160, 230), {"area_um2": 25.0 * i},
                             object_type="detection") for i in range(3)]
    expected = json.dumps({"type": "FeatureCollection", "features": features})
    path = tmp_path / "objects.geojson"
    write_feature_collection(path, (feature for feature in features))
    assert path.read_text() == expected
    write_feature_collection(tmp_path / "none.geojson", iter(()))
    assert json.loads((tmp_path / "none.geojson").read_text())["features"] == []

    def failing():
        yield features[0]
        raise RuntimeError("tracing failed")

    with pytest.raises(RuntimeError):
        write_feature_collection(path, failing())
    assert path.read_text() == expected  # the earlier file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.geojson", "objects.geojson"]


def test_feature_text_is_the_feature_as_json_with_the_same_numbers(tmp_path):
    rng = np.random.default_rng(4)
    polygons = [Polygon(rng.uniform(-1e5, 1e5, (6, 2)) * 10.0 ** rng.uniform(-6, 2)).buffer(0)
                for _ in range(200)]
    polygons.append(Polygon(box(0, 0, 50, 50).exterior.coords, [box(10, 10, 20, 20).exterior.coords]))
    arguments = ("tubule", (80, 160, 230), {"area_um2": 1 / 3, "nan": float("nan")})
    for polygon in polygons:
        as_dict = make_feature(polygon, *arguments, object_type="detection")
        text = feature_text(polygon, *arguments, object_type="detection")
        assert json.loads(text) == json.loads(json.dumps(as_dict))
    path = tmp_path / "mixed.geojson"
    write_feature_collection(path, [as_dict, text])
    assert json.loads(path.read_text())["features"] == [json.loads(text)] * 2


def test_written_features_have_qupath_properties_and_read_back(tmp_path):
    square = box(10, 20, 110, 220)
    hollow = Polygon(box(0, 0, 50, 50).exterior.coords, [box(10, 10, 20, 20).exterior.coords])
    features = [
        make_feature(square, "sclerosis", (150, 40, 150), {"area_um2": 5000.0, "global": True,
                                                            "undefined": float("nan"),
                                                            "not_measured": None}, name="G1"),
        make_feature(hollow, "tubule", (80, 160, 230), object_type="detection"),
    ]
    path = tmp_path / "objects.geojson"
    write_feature_collection(path, features)
    document = json.loads(path.read_text())
    assert document["type"] == "FeatureCollection"
    properties = document["features"][0]["properties"]
    assert properties == {
        "objectType": "annotation",
        "classification": {"name": "sclerosis", "color": [150, 40, 150]},
        "name": "G1",
        "isLocked": False,
        "measurements": {"area_um2": 5000.0, "global": 1.0},
    }
    assert document["features"][1]["properties"]["objectType"] == "detection"
    annotations = read_annotations(path)
    assert [a.class_name for a in annotations] == ["sclerosis", "tubule"]
    assert annotations[0].geometry.equals(square) and annotations[1].geometry.equals(hollow)


QUPATH_05_EXPORT = """{
  "type": "FeatureCollection",
  "features": [
    {
      "type": "Feature",
      "id": "6c1a7f5e-3e84-4f4e-9a43-2f2b0d0c2a11",
      "geometry": {"type": "Polygon",
                   "coordinates": [[[1000, 2000], [1100, 2000], [1100, 2100], [1000, 2100], [1000, 2000]]]},
      "properties": {"objectType": "annotation", "name": "glom 1",
                     "classification": {"name": "Glomerulus", "color": [255, 0, 0]}, "isLocked": false}
    },
    {
      "type": "Feature",
      "id": "0a9e7b47-2d7e-4d8f-8c48-5d0b1b6f7e22",
      "geometry": {"type": "MultiPolygon",
                   "coordinates": [[[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]],
                                   [[[20, 20], [30, 20], [30, 30], [20, 30], [20, 20]]]]},
      "properties": {"objectType": "annotation",
                     "classification": {"names": ["Glomerulus", "Sclerotic"], "color": [0, 0, 255]}}
    }
  ]
}"""

QUPATH_02_EXPORT = """[
  {"type": "Feature", "id": "PathAnnotationObject",
   "geometry": {"type": "Polygon", "coordinates": [[[5, 5], [15, 5], [10, 15], [5, 5]]]},
   "properties": {"classification": {"name": "Tubule", "colorRGB": -3670016},
                  "isLocked": false, "measurements": []}}
]"""


def test_reads_qupath_feature_collections_and_bare_feature_lists(tmp_path):
    collection = tmp_path / "qupath05.geojson"
    collection.write_text(QUPATH_05_EXPORT)
    first, second = read_annotations(collection)
    assert first.class_name == "Glomerulus" and first.geometry.area == 100 * 100
    assert first.geometry.bounds == (1000, 2000, 1100, 2100)
    assert second.class_name == "Glomerulus: Sclerotic"
    assert isinstance(second.geometry, MultiPolygon) and second.geometry.area == 200
    bare = tmp_path / "qupath02.json"
    bare.write_text(QUPATH_02_EXPORT)
    (tubule,) = read_annotations(bare)
    assert tubule.class_name == "Tubule" and tubule.geometry.area == 50


def feature(geometry, properties=None) -> dict:
    return {"type": "Feature", "geometry": geometry,
            "properties": properties if properties is not None else {"classification": {"name": "tuft"}}}


SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]}


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"type": "FeatureCollection", "features": [', "not valid JSON"),
        ('{"type": "FeatureCollection"}', "expected a GeoJSON FeatureCollection"),
        (json.dumps([{"type": "Point"}]), "feature 0 is not a GeoJSON Feature"),
        (json.dumps([feature(None)]), "feature 0 has no geometry"),
        (json.dumps([feature({"type": "Point", "coordinates": [1, 2]})]), "geometry 'Point'"),
        (json.dumps([feature(SQUARE), feature({"type": "Polygon", "coordinates": [[["a", 0], [1, 1]]]})]),
         "feature 1 has invalid coordinates"),
        (json.dumps([feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]})]),
         "feature 0 has invalid coordinates"),
        (json.dumps([feature(SQUARE, {"objectType": "annotation"})]), "feature 0 has no classification"),
        (json.dumps([feature(SQUARE, {"classification": {"name": ""}})]), "feature 0 has no classification"),
        (json.dumps([feature(SQUARE), feature({"type": "Polygon", "coordinates": [
            [[5, 5], [40, 40], [5, 5], [5, 5]]]})]), "feature 1 has no area"),
        (json.dumps([feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [2, 2], [0, 0]]]})]),
         "feature 0 has no area"),
    ],
)
def test_malformed_geojson_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=message) as error:
        read_annotations(path)
    assert str(path) in str(error.value)


def test_bowtie_is_repaired_into_valid_polygons(tmp_path):
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    path = tmp_path / "bowtie.geojson"
    path.write_text(json.dumps([feature(bowtie)]))
    (annotation,) = read_annotations(path)
    assert annotation.geometry.is_valid and annotation.geometry.area == pytest.approx(50)


def test_missing_file_is_an_annotation_error(tmp_path):
    with pytest.raises(AnnotationError, match="nothing.geojson: cannot read"):
        read_annotations(tmp_path / "nothing.geojson")
