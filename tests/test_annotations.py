"""Training annotations: COCO (polygons and run-length masks), QuPath GeoJSON and label maps
read into labels at any pixel size, and the glomeruli their outlines make."""

import itertools
import json

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import box

from biopsy.errors import AnnotationError, ConfigError
from biopsy.geojson import IGNORE_INDEX, Annotation, rasterise
from biopsy.labelmap import write_label_map
from glomeruli_dataset import config_dict
from training.annotations import LabelMapLabels, PolygonLabels, outlined_objects, read_coco
from training.cases import find_slides
from training.config import config_from_dict


@pytest.mark.parametrize("document,message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"images": []}), "needs lists"),
    (json.dumps({"images": [{"id": 0, "file_name": "a.png"}], "categories": [{"id": 0, "name": "gn"}],
                 "annotations": [{"image_id": 0, "category_id": 0, "segmentation": [[1, 2, 3]]}]}),
     "annotation 0: a polygon must be"),
    (json.dumps({"images": [{"id": 0, "file_name": "a.png"}], "categories": [{"id": 0, "name": "gn"}],
                 "annotations": [{"image_id": 7, "category_id": 0, "segmentation": [[1, 2, 3, 4, 5, 6]]}]}),
     "unknown image_id 7"),
    (json.dumps({"images": [{"id": 0, "file_name": "a.png"}], "categories": [{"id": 0, "name": "gn"}],
                 "annotations": [{"image_id": [0], "category_id": 0, "segmentation": [[1, 2, 3, 4, 5, 6]]}]}),
     r"annotation 0 refers to unknown image_id \[0\]"),  # TypeError: unhashable type
    (json.dumps({"images": [{"id": 0, "file_name": "a.png"}], "categories": [{"id": 0, "name": "gn"}],
                 "annotations": [{"image_id": 0, "category_id": {}, "segmentation": [[1, 2, 3, 4, 5, 6]]}]}),
     "annotation 0 refers to unknown category_id {}"),
    (json.dumps({"images": [{"id": 0, "file_name": "a.png"}], "categories": [{"id": 0, "name": "gn"}],
                 "annotations": [{"image_id": 0, "category_id": 0, "segmentation": {"counts": "x"}}]}),
     "annotation 0: malformed RLE mask"),
    (json.dumps({"images": [{"id": 0, "file_name": "a.png"}], "categories": [{"id": 0, "name": "gn"}],
                 "annotations": [{"image_id": 0, "category_id": 0,
                                  "segmentation": {"size": [4, 4], "counts": [3, 2]}}]}),
     "RLE runs cover 5 pixels, not 4 x 4"),
    (json.dumps({"images": [{"id": 0, "file_name": "Masson.jpg"}, {"id": 1, "file_name": "Masson.jpg"}],
                 "categories": [], "annotations": []}),  # two cases' images: outlines mixed
     "images 0 and 1 are both 'Masson.jpg'; give each image its path relative to data.root"),
])
def test_malformed_coco_names_file_and_problem(tmp_path, document, message):
    path = tmp_path / "coco.json"
    path.write_text(document)
    with pytest.raises(AnnotationError, match=message) as caught:
        read_coco(path)
    assert str(path) in str(caught.value)


def test_coco_parts_are_one_object_and_crowds_are_ignored(tmp_path):
    """Several polygons of one COCO object are its union (two overlapping squares: 175 px, not
    150; a ring inside another: filled); an ``iscrowd`` object is ignore, not a glomerulus."""
    square = lambda x, y, side: [x, y, x + side, y, x + side, y + side, x, y + side]  # noqa: E731
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({
        "images": [{"id": 0, "file_name": "a.png"}], "categories": [{"id": 0, "name": "gn"}],
        "annotations": [
            {"image_id": 0, "category_id": 0, "segmentation": [square(0, 0, 10), square(5, 5, 10)]},
            {"image_id": 0, "category_id": 0, "segmentation": [square(30, 0, 30), square(40, 10, 5)]},
            {"image_id": 0, "category_id": 0, "iscrowd": 1, "segmentation": [square(70, 0, 10)]}]}))
    overlapping, nested, crowd = read_coco(path)["a.png"]
    assert overlapping.geometry.area == 175 and nested.geometry.area == 900
    assert (overlapping.class_name, crowd.class_name) == ("gn", "ignore")
    labels = PolygonLabels([overlapping, nested, crowd], ["tissue", "tuft"], {"gn": "tuft"}, "tissue", 1.0, "t")
    assert (labels.labels(0, 0, (80, 30), 1.0)[:10, 70:80] == IGNORE_INDEX).all()
    assert len(labels.objects([1])) == 2
    assert set(np.unique(labels.instances(0, 0, (80, 30), 1.0, [1]))) == {0, 1, 2}


def test_coco_run_length_masks_read_as_pycocotools_writes_them(tmp_path):
    """Compressed (pycocotools.mask.encode) and plain run lists, a crowd among them: each
    outline rasterises back to its mask, pixel for pixel."""
    coco_mask = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(5)
    masks, annotations = [], []
    for index in range(6):
        mask = np.zeros((40, 56), np.uint8)
        top, left = rng.integers(0, 20, 2)
        mask[top:top + 15, left:left + 30] = rng.random((15, 30)) < 0.8
        rle = coco_mask.encode(np.asfortranarray(mask))
        counts = rle["counts"].decode() if index % 2 else \
            [len(run) for run in _runs(mask.T.ravel())]  # plain runs, column by column
        masks.append(mask.astype(bool))
        annotations.append({"image_id": 0, "category_id": 0, "iscrowd": int(index == 5),
                            "segmentation": {"size": [40, 56], "counts": counts}})
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({"images": [{"id": 0, "file_name": "a.png"}],
                                "categories": [{"id": 0, "name": "gn"}], "annotations": annotations}))
    read = read_coco(path)["a.png"]
    assert [a.class_name for a in read] == ["gn"] * 5 + ["ignore"]
    for annotation, mask in zip(read, masks):
        drawn = rasterise([annotation], ["", "gn", "ignore"], (40, 56), 1.0, 1.0, unlabelled=0)
        np.testing.assert_array_equal(drawn > 0, mask)


def test_a_small_rle_object_on_a_whole_slide_is_laid_out_alone(tmp_path):
    """An 11 x 11 px object at column 5000, row 100 of a 30,000 x 20,000 px image: only the
    columns and rows it covers are laid out (the whole image would be 600 MB of booleans)."""
    height, width, size = 20_000, 30_000, 11
    runs = [5000 * height + 100]
    for _ in range(size - 1):
        runs += [size, height - size]
    runs += [size, height * width - sum(runs) - size]
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({
        "images": [{"id": 0, "file_name": "a.svs"}], "categories": [{"id": 0, "name": "gn"}],
        "annotations": [{"image_id": 0, "category_id": 0,
                         "segmentation": {"size": [height, width], "counts": runs}},
                        {"image_id": 0, "category_id": 0,
                         "segmentation": {"size": [4, 4], "counts": "0P"}}]}))
    with pytest.raises(AnnotationError, match="annotation 1: malformed RLE mask"):
        read_coco(path)  # a compressed string cut short
    document = json.loads(path.read_text())
    del document["annotations"][1]
    path.write_text(json.dumps(document))
    [annotation] = read_coco(path)["a.svs"]
    assert annotation.geometry.bounds == (5000, 100, 5011, 111)
    assert annotation.geometry.area == pytest.approx(size * size - 0.5, abs=0.5)  # marching squares


def _runs(values: np.ndarray):
    """Runs of equal values, the first of zeros (empty when the values start with ones)."""
    groups = [list(g) for _, g in itertools.groupby(values)]
    return ([[]] if values[0] else []) + groups


@pytest.mark.parametrize("outlines, objects", [
    ([(box(0, 0, 100, 100), "tuft"), (box(100, 0, 120, 100), "cellular_crescent")], 1),  # beside
    ([(box(0, 0, 100, 100), "tuft"), (box(105, 0, 120, 100), "cellular_crescent")], 2),  # apart
    ([(box(0, 0, 100, 100).difference(box(40, 40, 60, 60)), "tuft"),
      (box(40, 40, 60, 60), "sclerosis")], 1),  # in the tuft's hole
    ([(box(0, 0, 100, 100), "tuft"), (box(100, 0, 200, 100), "tuft")], 2),  # glomeruli touching
    ([(box(0, 0, 100, 100), "sclerosis"), (box(100, 0, 150, 100), "tuft")], 2),
    ([(box(0, 0, 100, 100), "tuft"), (box(100, 0, 200, 100), "tuft"),
      (box(90, 40, 130, 60), "hyaline_deposit")], 2),  # a deposit over two: the one it covers most
])
def test_outlines_make_glomeruli(outlines, objects):
    made = outlined_objects(outlines)
    assert len(made) == objects
    assert shapely.union_all(made).area == pytest.approx(shapely.union_all([g for g, _ in outlines]).area)


def test_malformed_geojson_names_file(tmp_path):
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "slide1.png")
    geojson = tmp_path / "slide1.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
         "properties": {"classification": {"name": "tuft"}}}]}))
    data = config_dict(tmp_path, tmp_path / "out")["data"]
    data.update(slides="*.png", annotations={"format": "geojson", "path": "{stem}.geojson"},
                case_pattern="(slide\\d)")
    config = config_from_dict({**config_dict(tmp_path, tmp_path / "out"), "data": data}, "test")
    with pytest.raises(AnnotationError, match="Point") as caught:
        find_slides(config.data, config.model.classes, config.source)
    assert str(geojson) in str(caught.value)


def test_geojson_beside_a_dotted_slide_name_is_found_and_a_slide_without_is_named(tmp_path,
                                                                                  caplog):
    """{stem} stopped at the first dot: S19.0001-PAS.png looked for S19.geojson and was left out
    without a word."""
    for name in ("S19.0001-PAS", "S19.0002-PAS"):
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "S19.0001-PAS.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[2, 2], [20, 2], [20, 20], [2, 2]]]},
         "properties": {"classification": {"name": "tuft"}}}]}))
    data = config_dict(tmp_path, tmp_path / "out")["data"]
    data.update(slides="*.png", annotations={"format": "geojson", "path": "{stem}.geojson"},
                case_pattern="(S\\d+\\.\\d+)", stain_pattern="(PAS)")
    config = config_from_dict({**config_dict(tmp_path, tmp_path / "out"), "data": data}, "test")
    with caplog.at_level("INFO"):
        [slide] = find_slides(config.data, config.model.classes, config.source)
    assert slide.case == "S19.0001"
    assert "1 of the 2 slides have no annotations and are left out (e.g. S19.0002-PAS.png" in caplog.text


def test_two_slides_matching_one_coco_image_by_file_name_are_refused(tmp_path):
    """caseA/Masson.jpg and caseB/Masson.jpg, the COCO file naming one Masson.jpg: both slides
    took its outlines."""
    for case in ("case1", "case2"):
        (tmp_path / case).mkdir()
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / case / "Masson.png")
    (tmp_path / "coco.json").write_text(json.dumps({
        "images": [{"id": 0, "file_name": "Masson.png"}], "categories": [{"id": 0, "name": "gn"}],
        "annotations": [{"image_id": 0, "category_id": 0, "segmentation": [[2, 2, 20, 2, 20, 20]]}]}))
    data = config_dict(tmp_path, tmp_path / "out")["data"]
    data.update(slides="*/*.png", case_pattern="(case\\d)/", stain_pattern="(Masson)")
    config = config_from_dict({**config_dict(tmp_path, tmp_path / "out"), "data": data}, "test")
    with pytest.raises(ConfigError, match="would both take the outlines of COCO image 'Masson.png'"):
        find_slides(config.data, config.model.classes, config.source)


def test_a_coco_image_of_another_size_than_the_slide_is_refused(tmp_path):
    """Outlines exported from a half-size copy were laid over the full image at half scale."""
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "case1-PAS.png")
    (tmp_path / "coco.json").write_text(json.dumps({
        "images": [{"id": 0, "file_name": "case1-PAS.png", "width": 30, "height": 20}],
        "categories": [{"id": 0, "name": "gn"}],
        "annotations": [{"image_id": 0, "category_id": 0, "segmentation": [[2, 2, 20, 2, 20, 18]]}]}))
    data = config_dict(tmp_path, tmp_path / "out")["data"]
    data.update(slides="*.png")
    config = config_from_dict({**config_dict(tmp_path, tmp_path / "out"), "data": data}, "test")
    with pytest.raises(ConfigError, match="is 60 x 40 px, its COCO image 30 x 20"):
        find_slides(config.data, config.model.classes, config.source)


def test_label_map_and_geojson_sources_give_labels_at_the_model_mpp(tmp_path):
    truth = np.zeros((40, 60), np.uint8)  # at 2 µm/px
    truth[10:20, 30:50] = 2
    names = ["background", "tissue", "tuft"]
    write_label_map(tmp_path / "labels.ome.tif", truth, 2.0, names,
                    {"background": (255, 255, 255), "tissue": (1, 1, 1), "tuft": (2, 2, 2)})
    source = LabelMapLabels(tmp_path / "labels.ome.tif", ["tissue", "tuft"], {"background": "ignore"}, 0.5)
    labels = source.labels(x=100, y=60, size_px=(30, 20), mpp=1.0)  # level-0 at 0.5 µm/px
    expected = np.repeat(np.repeat(np.where(truth == 2, 1, 255), 2, 0), 2, 1)[30:50, 50:80]
    assert np.array_equal(labels, expected)
    (obj,) = source.objects([0, 1])
    assert (obj.class_index, obj.x, obj.y) == (1, pytest.approx(160, abs=4), pytest.approx(60, abs=4))
    # the slide taken at 1.5x its pixel size: the same level-0 pixels read at 1.5x the µm/px
    scaled = source.with_mpp_scaled(1.5)
    assert np.array_equal(scaled.labels(x=100, y=60, size_px=(30, 20), mpp=1.5), labels)
    assert scaled.objects([0, 1]) == [obj] and source.level0_mpp == 0.5
    polygons = PolygonLabels([Annotation(box(120, 40, 200, 80), "glom")], ["tissue", "tuft"],
                             {"glom": "tuft"}, "tissue", 0.5, "test")
    expected = np.zeros((20, 30), np.uint8)
    expected[:10, 10:] = 1  # output pixel centres (101 + 2 col, 61 + 2 row) inside the box
    assert np.array_equal(polygons.labels(100, 60, (30, 20), 1.0), expected)
    assert np.array_equal(polygons.with_mpp_scaled(1.5).labels(100, 60, (30, 20), 1.5), expected)
