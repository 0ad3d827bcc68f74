"""A synthetic slide folder: the slide, its truth label map, GeoJSON and scores, and the profile.

``generate_slide`` writes into ``out_dir``::

    slide.svs | slide.tiff   pyramidal tiled JPEG TIFF (Aperio SVS style or generic), level 0 at profile.mpp
    labels.ome.tif           truth class map (``CLASS_NAMES`` order) at profile.label_mpp
    truth.geojson            one feature per glomerulus and per lesion region (level-0 px)
    profile.yaml             the resolved lesion profile
    truth.json               per-glomerulus measures and lesion calls, slide scores (written last)

The truth measures and scores are computed by the shared ``biopsy.morphometry`` and
``biopsy.scoring`` functions from the truth label map, the known glomerulus instances and the
drawn nuclei (their exact centres, for the nuclear densities of endocapillary hypercellularity and
interstitial inflammation), window by window, so memory stays bounded on long slides.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

import numpy as np
import shapely
import yaml

from biopsy import __version__
from biopsy.atomic import write_text_atomic
from biopsy.classes import CLASS_COLOURS, CLASS_NAMES
from biopsy.geojson import make_feature as _make_feature, write_feature_collection
from biopsy.labelmap import write_label_map
from biopsy.morphometry import CortexTile, GlomerulusMeasures, measure_cortex_tiles, measure_glomeruli
from biopsy.pyramid import write_pyramid
from biopsy.scoring import call_lesions, load_score_config, score_slide
from biopsy.synth.geometry import polygon_of
from biopsy.synth.layout import Layout, build_layout
from biopsy.synth.profile import LesionProfile
from biopsy.synth.render import label_bands, label_shape, render_labels, rgb_bands
from biopsy.synth.stain import PRESETS, Stain, drift_stain, vary_stain
from biopsy.synth.texture import Textures

TRUTH_FORMAT = "biopsy.synth_truth/1"
SlideFormat = Literal["aperio", "generic"]
SLIDE_NAMES = {"aperio": "slide.svs", "generic": "slide.tiff"}
GEOJSON_GRID_PX = 0.1


def slide_stain(profile: LesionProfile) -> Stain:
    """The stain of a slide: the profile's preset, varied as one lab day would (seeded)."""
    return vary_stain(PRESETS[profile.stain], np.random.default_rng([profile.seed, 1]))


def generate_slide(profile: LesionProfile, out_dir: str | Path, *, slide_format: SlideFormat = "aperio",
                   stain: Stain | None = None, jpeg_quality: int = 90) -> dict:
    """Write a synthetic slide folder (see module docstring) and return its truth.

    ``stain`` overrides the profile's (seeded) stain, e.g. to drift a follow-up biopsy.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "truth.json").unlink(missing_ok=True)  # the folder is incomplete until rewritten
    for stale in set(SLIDE_NAMES.values()) - {SLIDE_NAMES[slide_format]}:
        (out_dir / stale).unlink(missing_ok=True)
    stain = stain or slide_stain(profile)
    layout = build_layout(profile)
    textures = Textures(layout.shape_px, 1.0 / profile.mpp, profile.seed)
    slide_name = SLIDE_NAMES[slide_format]
    write_pyramid(out_dir / slide_name, rgb_bands(layout, stain, textures), layout.shape_px,
                  profile.mpp, style=slide_format, quality=jpeg_quality,
                  description_extra={"Title": f"synthetic {profile.name} seed {profile.seed}"}
                  if slide_format == "aperio" else {"synthetic": profile.to_dict()})
    config = load_score_config()
    cortex_tiles = _write_labels(out_dir / "labels.ome.tif", layout, profile, config.cortex.tile_um)
    glomeruli = [replace(m, lesions=tuple(call_lesions(m, config.lesions)))
                 for m in measure_truth_glomeruli(layout, profile.label_mpp)]
    write_feature_collection(out_dir / "truth.geojson", _features(layout, glomeruli, profile))
    write_text_atomic(out_dir / "profile.yaml", yaml.safe_dump(profile.to_dict(), sort_keys=False))
    truth = {
        "format": TRUTH_FORMAT,
        "generator": {"package": "biopsy", "version": __version__},
        "profile": profile.to_dict(),
        "stain": stain.to_dict(),
        "slide": {"file": slide_name, "format": slide_format, "shape_px": list(layout.shape_px),
                  "mpp": profile.mpp},
        "label_map": {"file": "labels.ome.tif", "mpp": profile.label_mpp,
                      "shape_px": list(label_shape(layout, profile.label_mpp)),
                      "class_names": list(CLASS_NAMES),
                      "glomerulus": "tuft + crescents; Bowman's space and capsule are tissue"},
        "score_config": config.name,
        "glomeruli": [asdict(g) | {"drawn_lesions": list(layout.glomeruli[i].lesions)}
                      for i, g in enumerate(glomeruli)],
        "scores": score_slide(glomeruli, cortex_tiles, CLASS_NAMES, config),
    }
    write_text_atomic(out_dir / "truth.json", json.dumps(truth, indent=2))
    return truth


def generate_pair(baseline: LesionProfile, followup: LesionProfile, out_dir: str | Path, *,
                  slide_format: SlideFormat = "aperio") -> tuple[dict, dict]:
    """One synthetic patient: ``out_dir/baseline`` and ``out_dir/follow_up``.

    The two biopsies are different tissue (each profile's own seed) stained with the same
    protocol, the follow-up with a consistent drift (fainter main stain, shifted balance), as
    sections cut and stained years apart are. Both stain preset: the baseline's.
    """
    if baseline.seed == followup.seed:
        followup = replace(followup, seed=baseline.seed + 1)
    followup = replace(followup, stain=baseline.stain)
    stain = slide_stain(baseline)
    drifted = drift_stain(stain, np.random.default_rng([baseline.seed, 2]))
    out_dir = Path(out_dir)
    return (generate_slide(baseline, out_dir / "baseline", slide_format=slide_format, stain=stain),
            generate_slide(followup, out_dir / "follow_up", slide_format=slide_format, stain=drifted))


def _write_labels(path: Path, layout: Layout, profile: LesionProfile, tile_um: float) -> list[CortexTile]:
    """Write the truth label map band by band; return the cortex tiles measured on the way."""
    tile_px = max(1, round(tile_um / profile.label_mpp))
    tiles: list[CortexTile] = []
    scale = profile.label_mpp / profile.mpp

    def bands():
        row = 0
        for labels, _ in label_bands(layout, profile.label_mpp, band_px=tile_px):
            nuclei = layout.nuclei_in(row * scale, (row + labels.shape[0]) * scale)[:, :2]
            tiles.extend(measure_cortex_tiles(labels, CLASS_NAMES, profile.label_mpp, tile_um,
                                              origin_xy_px=(0.0, row * scale), level0_mpp=profile.mpp,
                                              nuclei_xy=nuclei))
            row += labels.shape[0]
            yield labels

    write_label_map(path, bands(), profile.label_mpp, CLASS_NAMES, CLASS_COLOURS,
                    shape_px=label_shape(layout, profile.label_mpp), slide_mpp=profile.mpp)
    return tiles


def measure_truth_glomeruli(layout: Layout, label_mpp: float) -> list[GlomerulusMeasures]:
    """Measures of every drawn glomerulus from a label-map window around it, its known pixels and
    the drawn nuclei."""
    scale = label_mpp / layout.mpp
    height, width = label_shape(layout, label_mpp)
    measures = []
    for g in layout.glomeruli:
        xmin, ymin, xmax, ymax = g.bounds
        col, row = max(int(xmin / scale) - 2, 0), max(int(ymin / scale) - 2, 0)
        right, bottom = min(int(xmax / scale) + 3, width), min(int(ymax / scale) + 3, height)
        labels, instances = render_labels(layout, scale, col, row, right - col, bottom - row)
        own = np.where(instances == g.glomerulus_id, g.glomerulus_id, 0).astype(np.int32)
        nuclei = layout.nuclei_in(row * scale, bottom * scale)[:, :2]
        measures += measure_glomeruli(labels, CLASS_NAMES, label_mpp, instances=own,
                                      origin_xy_px=(col * scale, row * scale), level0_mpp=layout.mpp,
                                      nuclei_xy=nuclei)
    return measures


def _features(layout: Layout, glomeruli: list[GlomerulusMeasures], profile: LesionProfile) -> list[dict]:
    """Glomeruli (classified ``tuft``, outline = tuft + crescent, with their measures), their
    crescents, sclerosis and deposits, fibrosis patches and atrophic tubules.

    Coordinates are rounded to 0.1 level-0 px, which keeps the file small and changes no area
    by more than a fraction of a pixel.
    """
    um2 = profile.mpp ** 2

    def make_feature(geometry, *args, **kwargs):
        return _make_feature(shapely.set_precision(geometry, GEOJSON_GRID_PX), *args, **kwargs)

    features = []
    for g, measures in zip(layout.glomeruli, glomeruli):
        numbers = {k: v for k, v in asdict(measures).items() if isinstance(v, (int, float))}
        numbers |= {f"call_{lesion}": 1 for lesion in measures.lesions}
        name = f"glomerulus {g.glomerulus_id}"
        features.append(make_feature(g.instance_polygon(), "tuft", CLASS_COLOURS["tuft"], numbers, name=name))
        parts = []
        if g.crescent is not None:
            parts.append((g.crescent_kind, polygon_of(g.crescent)))
        if g.sclerosis is not None:
            parts.append(("sclerosis", polygon_of(g.sclerosis)))
        deposits = g.deposit_geometry()
        if not deposits.is_empty:
            parts.append(("hyaline_deposit", deposits))
        for class_name, geometry in parts:
            features.append(make_feature(geometry, class_name, CLASS_COLOURS[class_name],
                                         {"area_um2": geometry.area * um2}, name=f"{name} {class_name}"))
    for vertices in layout.fibrosis:
        patch = polygon_of(vertices)
        features.append(make_feature(patch, "fibrosis", CLASS_COLOURS["fibrosis"], {"area_um2": patch.area * um2}))
    for tubule in layout.tubules:
        if tubule.atrophic:
            outline = polygon_of(tubule.outer)
            features.append(make_feature(outline, "atrophic_tubule", CLASS_COLOURS["atrophic_tubule"],
                                         {"area_um2": outline.area * um2}, object_type="detection"))
    return features
