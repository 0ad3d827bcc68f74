"""What ``biopsy segment`` writes beside the label map: objects.geojson's features against each
class's outlines, made in a process pool as alone; segment.json's class areas against the map."""

import json

import numpy as np
import pytest
from shapely.geometry import shape

from biopsy import outlines
from biopsy.infer import ClassMap
from biopsy.outlines import polygons_from_mask
from biopsy.segment_outputs import region_features, write_segmentation
from inference_models import write_slide

CLASS_NAMES = ("background", "tissue", "tuft", "tubule")
MAP_MPP, LEVEL0_MPP = 2.0, 0.5


def class_map() -> ClassMap:
    """Tissue with discs of tuft and tubule over it, some overlapping, some over its edge."""
    rng = np.random.default_rng(3)
    labels = np.zeros((150, 200), np.uint8)
    labels[10:140, 10:190] = 1
    rows, cols = np.mgrid[:150, :200]
    for _ in range(60):
        row, col, radius = rng.integers(0, 150), rng.integers(0, 200), rng.integers(1, 15)
        labels[(rows - row) ** 2 + (cols - col) ** 2 < radius**2] = rng.integers(2, 4)
    colours = {name: (index * 60, 0, 0) for index, name in enumerate(CLASS_NAMES)}
    return ClassMap(labels, MAP_MPP, CLASS_NAMES, colours)


def test_features_are_each_class_outlines_in_class_order():
    classes = class_map()
    features = [json.loads(text) for text in region_features(classes, LEVEL0_MPP)]
    expected = [(name, polygon) for index, name in enumerate(CLASS_NAMES) if index > 0
                for polygon in polygons_from_mask(classes.labels == index, MAP_MPP, LEVEL0_MPP,
                                                  MAP_MPP / LEVEL0_MPP)]
    assert len(features) == len(expected) > 40
    for feature, (name, polygon) in zip(features, expected):
        assert feature["properties"]["classification"]["name"] == name
        assert feature["properties"]["objectType"] == "detection"
        assert shape(feature["geometry"]).equals_exact(polygon, 0)
        assert feature["properties"]["measurements"]["area_um2"] == polygon.area * LEVEL0_MPP**2


def test_a_process_pool_makes_the_same_features(monkeypatch):
    monkeypatch.setattr(outlines, "BORDER_PIXELS_PER_TASK", 100)  # many tasks a class
    classes = class_map()
    assert list(region_features(classes, LEVEL0_MPP, workers=2)) == list(
        region_features(classes, LEVEL0_MPP))


def test_segment_json_holds_each_class_area(tmp_path):
    classes = class_map()
    slide = write_slide(tmp_path / "slide.tif", np.full((600, 800, 3), 200, np.uint8), LEVEL0_MPP)
    write_segmentation(tmp_path / "out", classes, slide, {"model": "toy"})
    summary = json.loads((tmp_path / "out" / "segment.json").read_text())
    pixels = np.bincount(classes.labels.ravel(), minlength=len(CLASS_NAMES))
    assert summary["class_area_um2"] == {name: float(count * MAP_MPP**2)
                                         for name, count in zip(CLASS_NAMES, pixels)}
    assert summary["model"] == "toy" and summary["shape_px"] == [150, 200]


def test_an_error_in_finding_a_later_class_comes_out(monkeypatch):
    from biopsy import segment_outputs

    def fails_on_tubule(mask, *args, **kwargs):
        if np.array_equal(mask, class_map().labels == 3):  # found on the thread, one class ahead
            raise MemoryError("tubule")
        return polygons_from_mask(mask, *args, **kwargs)

    monkeypatch.setattr(segment_outputs, "polygons_from_mask", fails_on_tubule)
    features = region_features(class_map(), LEVEL0_MPP)
    assert json.loads(next(features))["properties"]["classification"]["name"] == "tissue"
    with pytest.raises(MemoryError, match="tubule"):
        list(features)


def test_a_new_run_marks_the_folder_not_whole_and_drops_optional_outputs(tmp_path):
    from biopsy.segment_outputs import begin_segmentation

    for name in ("segment.json", "probabilities.ome.tif", "labels.ome.tif", "objects.geojson"):
        (tmp_path / name).write_text("an earlier run's")
    assert begin_segmentation(tmp_path) == tmp_path / "labels.ome.tif"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.ome.tif", "objects.geojson"]
