"""A scored slide: a class map scored, written as a folder, and read back.

The folder (docs/ARCHITECTURE.md) holds ``labels.ome.tif``, ``glomeruli.csv``,
``cortex_tiles.csv``, ``objects.geojson``, ``overview.png`` and, written last, ``summary.json``:
its presence means the folder is whole. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy
import skimage
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from shapely.geometry import MultiPolygon
from skimage.segmentation import find_boundaries

from biopsy import __version__
from biopsy.atomic import atomic_path, write_text_atomic
from biopsy.errors import BiopsyError
from biopsy.geojson import make_feature, write_feature_collection
from biopsy.labelmap import LabelMap, colourise, write_label_map
from biopsy.morphometry import (CortexTile, GlomerulusMeasures, find_glomeruli,
                                measure_cortex_tiles, measure_glomeruli)
from biopsy.outlines import polygons_from_mask
from biopsy.scoring import ScoreConfig, call_lesions, score_slide

SCORED_SLIDE_FORMAT = "biopsy.scored_slide/1"
FILES = ("labels.ome.tif", "glomeruli.csv", "cortex_tiles.csv", "objects.geojson", "overview.png",
         "summary.json")
OVERVIEW_MAX_PX = 2048
# Colour of each lesion call in objects.geojson: that of the class that shows it.
LESION_CLASS = {"normal": "tuft", "segmental_sclerosis": "sclerosis",
                "global_sclerosis": "sclerosis", "cellular_crescent": "cellular_crescent",
                "fibrous_crescent": "fibrous_crescent", "hyaline_deposits": "hyaline_deposit",
                "endocapillary_hypercellularity": "tuft"}


@dataclass(frozen=True)
class ClassMapScores:
    """Everything scored from one class map: instances, measures with lesion calls, scores."""

    instances: np.ndarray
    glomeruli: list[GlomerulusMeasures]
    cortex_tiles: list[CortexTile]
    scores: dict


@dataclass(frozen=True)
class ScoredSlide:
    """A scored-slide folder read back (see :func:`read_score_folder`)."""

    folder: Path
    glomeruli: list[GlomerulusMeasures]
    cortex_tiles: list[CortexTile]
    summary: dict


def score_class_map(labels: np.ndarray, class_names, mpp: float, config: ScoreConfig, *,
                    origin_xy_px: tuple[float, float] = (0, 0),
                    level0_mpp: float | None = None,
                    nuclei_xy: np.ndarray | None = None) -> ClassMapScores:
    """Find and measure glomeruli, call their lesions, measure cortex tiles and score the slide.

    ``nuclei_xy``: level-0 (x, y) nucleus centres of the slide (``biopsy.nuclei``), for the
    nuclear-density components; None leaves them not assessed.
    """
    instances = find_glomeruli(labels, class_names, mpp,
                               min_area_um2=config.glomeruli.min_area_um2,
                               split_min_depth_um=config.glomeruli.split_min_depth_um)
    glomeruli = [dataclasses.replace(g, lesions=tuple(call_lesions(g, config.lesions)))
                 for g in measure_glomeruli(labels, class_names, mpp, instances,
                                            origin_xy_px=origin_xy_px, level0_mpp=level0_mpp,
                                            nuclei_xy=nuclei_xy)]
    tiles = measure_cortex_tiles(labels, class_names, mpp, config.cortex.tile_um,
                                 origin_xy_px=origin_xy_px, level0_mpp=level0_mpp,
                                 nuclei_xy=nuclei_xy)
    return ClassMapScores(instances, glomeruli, tiles,
                          score_slide(glomeruli, tiles, class_names, config))


def write_score_folder(out_dir: str | Path, label_map: LabelMap,
                       glomeruli: list[GlomerulusMeasures], cortex_tiles: list[CortexTile],
                       scores: dict, provenance: dict, *, instances: np.ndarray,
                       config: ScoreConfig, level0_mpp: float | None = None) -> Path:
    """Write a scored-slide folder; ``summary.json`` last, after removing any previous one.

    Parameters
    ----------
    label_map : the class map scored (written as ``labels.ome.tif``).
    instances : the glomerulus instance raster of ``label_map`` (ids = ``glomerulus_id``).
    provenance : where the scores come from (source file and its SHA-256, model and its hash);
        the config and software versions are added to it here.
    level0_mpp : µm/px of the slide's level 0, for ``objects.geojson``; None: the label map's.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").unlink(missing_ok=True)
    write_label_map(out_dir / "labels.ome.tif", label_map.labels, label_map.mpp,
                    label_map.class_names, label_map.class_colours,
                    slide_mpp=level0_mpp if level0_mpp is not None else label_map.slide_mpp)
    write_text_atomic(out_dir / "glomeruli.csv", _glomeruli_csv(glomeruli))
    write_text_atomic(out_dir / "cortex_tiles.csv", _cortex_tiles_csv(cortex_tiles, label_map))
    write_feature_collection(out_dir / "objects.geojson",
                             _glomerulus_features(glomeruli, instances, label_map, level0_mpp))
    with atomic_path(out_dir / "overview.png") as temporary:
        _overview(label_map, instances, glomeruli, level0_mpp).save(temporary, format="PNG")
    summary = {
        "format": SCORED_SLIDE_FORMAT,
        "scores": scores,
        "label_map": {"mpp": label_map.mpp, "shape_px": list(label_map.labels.shape),
                      "class_names": list(label_map.class_names),
                      "level0_mpp": level0_mpp or label_map.mpp},
        "provenance": provenance | {"config": config.as_dict(), "software": _software()},
        "files": list(FILES),
    }
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
    return out_dir


def read_score_folder(folder: str | Path) -> ScoredSlide:
    """Glomeruli, cortex tiles and summary of a folder written by :func:`write_score_folder`.

    Raises
    ------
    BiopsyError
        The folder is missing, incomplete (no ``summary.json``: scoring did not finish) or not a
        scored-slide folder.
    """
    folder = Path(folder)
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise BiopsyError(f"{folder}: not a complete scored slide (no summary.json: scoring did "
                          "not finish); run `biopsy score` into it again")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary.get("format") != SCORED_SLIDE_FORMAT:
            raise ValueError(f"format {summary.get('format')!r}, expected {SCORED_SLIDE_FORMAT!r}")
        glomeruli = [_glomerulus_from_row(row) for row in _csv_rows(folder / "glomeruli.csv")]
        tiles = [_cortex_tile_from_row(row) for row in _csv_rows(folder / "cortex_tiles.csv")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise BiopsyError(f"{folder}: malformed scored-slide folder ({error}); run `biopsy score` "
                          "into a new folder") from None
    return ScoredSlide(folder, glomeruli, tiles, summary)


# --- tables ------------------------------------------------------------------------------------

GLOMERULUS_COLUMNS = tuple(f.name for f in dataclasses.fields(GlomerulusMeasures))


def _glomeruli_csv(glomeruli: list[GlomerulusMeasures]) -> str:
    """One row per glomerulus; floats at full precision, lesions joined by ';'."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(GLOMERULUS_COLUMNS)
    for g in glomeruli:
        row = dataclasses.asdict(g)
        row["lesions"] = ";".join(row["lesions"])
        writer.writerow([row[c] for c in GLOMERULUS_COLUMNS])
    return text.getvalue()


def _glomerulus_from_row(row: dict[str, str]) -> GlomerulusMeasures:
    values = {}
    for field in dataclasses.fields(GlomerulusMeasures):
        text = row.get(field.name, "")  # a column added later is empty in older folders
        if field.name == "lesions":
            values[field.name] = tuple(text.split(";")) if text else ()
        elif field.name == "tuft_nuclei_per_1000um2":
            values[field.name] = float(text) if text else None  # empty: nuclei not counted
        else:
            values[field.name] = int(text) if field.type == "int" else float(text)
    return GlomerulusMeasures(**values)


def _cortex_tiles_csv(tiles: list[CortexTile], label_map: LabelMap) -> str:
    """One row per tissue tile: position, size (level-0 px), ``<class>_area_um2`` columns and
    ``interstitial_nuclei`` (empty when nuclei were not counted)."""
    names = [n for n in label_map.class_names if n != "background"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["x_px", "y_px", "size_px"] + [f"{n}_area_um2" for n in names]
                    + ["interstitial_nuclei"])
    for t in tiles:
        writer.writerow([t.x_px, t.y_px, t.size_px] + [t.area_um2[n] for n in names]
                        + [t.interstitial_nuclei])
    return text.getvalue()


def _cortex_tile_from_row(row: dict[str, str]) -> CortexTile:
    areas = {key.removesuffix("_area_um2"): float(value) for key, value in row.items()
             if key.endswith("_area_um2")}
    nuclei = row.get("interstitial_nuclei") or None  # empty or absent: not counted
    return CortexTile(float(row["x_px"]), float(row["y_px"]), float(row["size_px"]), areas,
                      None if nuclei is None else int(nuclei))


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


# --- pictures ----------------------------------------------------------------------------------

def _glomerulus_features(glomeruli, instances, label_map: LabelMap, level0_mpp) -> list[dict]:
    """One QuPath annotation per glomerulus: outline, lesion calls as classification, measures."""
    level0_mpp = level0_mpp or label_map.mpp
    scale = label_map.mpp / level0_mpp
    boxes = ndimage.find_objects(instances)
    features = []
    for g in glomeruli:
        box = boxes[g.glomerulus_id - 1]
        parts = list(polygons_from_mask(instances[box] == g.glomerulus_id, label_map.mpp,
                                        level0_mpp, simplify_tolerance_px=0.5 * scale,
                                        origin_xy_px=(box[1].start * scale, box[0].start * scale)))
        lesions = g.lesions or ("normal",)
        colour = label_map.class_colours.get(LESION_CLASS[lesions[0]], (128, 128, 128))
        measurements = {k: v for k, v in dataclasses.asdict(g).items() if k != "lesions"}
        measurements |= {f"lesion: {name}": name in lesions for name in LESION_CLASS}
        features.append(make_feature(parts[0] if len(parts) == 1 else MultiPolygon(parts),
                                     ": ".join(lesions), colour, measurements,
                                     name=f"G{g.glomerulus_id}"))
    return features


def _overview(label_map: LabelMap, instances: np.ndarray, glomeruli,
              level0_mpp: float | None) -> Image.Image:
    """The class map in class colours, glomerulus outlines in black, each numbered by its id."""
    step = max(1, int(np.ceil(max(label_map.labels.shape) / OVERVIEW_MAX_PX)))
    rgb = colourise(label_map.labels[::step, ::step],
                    [label_map.class_colours[n] for n in label_map.class_names])
    rgb[find_boundaries(instances[::step, ::step], mode="inner")] = 0
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    level0_to_overview = (level0_mpp or label_map.mpp) / label_map.mpp / step
    # Numbers a third of a typical glomerulus high, readable whatever the map's size.
    diameter_px = np.median([g.equivalent_diameter_um for g in glomeruli] or [0]) \
        / label_map.mpp / step
    font = ImageFont.load_default(size=int(np.clip(diameter_px / 3, 12, 64)))
    for g in glomeruli:
        xy = (g.centroid_x_px * level0_to_overview, g.centroid_y_px * level0_to_overview)
        draw.text(xy, str(g.glomerulus_id), fill=(0, 0, 0), font=font, anchor="mm",
                  stroke_width=2, stroke_fill=(255, 255, 255))
    return image


def _software() -> dict:
    return {"biopsy": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "scikit-image": skimage.__version__}
