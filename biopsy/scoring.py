"""Lesion calls per glomerulus and the NIH activity / chronicity indices of a slide.

Definitions: ../shared/SCORING.md (revised ISN/RPS, Bajema et al., Kidney Int 2018). Thresholds are
configuration (``configs/score/nih-2018.yaml``, each with its reason); the components, their
weights and the bins are the NIH definition and live here.

A component whose class the model lacks, or that light-microscopy classes cannot show, is "not
assessed": ``percent``, ``bin`` and ``points`` are None and the index is marked partial. Never 0.
Endocapillary hypercellularity and interstitial inflammation are assessed from nuclei counts
(``biopsy.nuclei``), so only when the measures carry them (a slide was read, not a label map alone).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from biopsy.classes import CLASS_NAMES
from biopsy.resources import CONFIG_DIR, read_yaml_mapping
from biopsy.errors import ConfigError

if TYPE_CHECKING:
    from biopsy.morphometry import CortexTile, GlomerulusMeasures

DEFAULT_CONFIG_PATH = CONFIG_DIR / "score" / "nih-2018.yaml"

LESIONS = ("normal", "segmental_sclerosis", "global_sclerosis", "cellular_crescent",
           "fibrous_crescent", "hyaline_deposits", "endocapillary_hypercellularity")
# Classes whose pixels count as the cellular tuft (nuclei per tuft area) and as interstitium.
CELLULAR_TUFT_CLASSES = ("tuft", "hyaline_deposit")
INTERSTITIAL_CLASSES = ("tissue", "fibrosis")
GLASS = ("background",)  # a model without it calls glass some tissue class: no cortex areas then


@dataclass(frozen=True)
class GlomerulusSettings:
    min_area_um2: float
    split_min_depth_um: float
    adequate_min_count: int


@dataclass(frozen=True)
class LesionThresholds:
    """Each lesion is called when its measure is strictly above its threshold."""

    global_sclerosis_tuft_fraction: float
    segmental_sclerosis_tuft_fraction: float
    crescent_capsule_coverage: float
    hyaline_deposit_fraction: float
    endocapillary_tuft_nuclei_per_1000um2: float


@dataclass(frozen=True)
class AreaRatio:
    """A cortex component: sum of numerator class areas / sum of denominator class areas."""

    numerator: tuple[str, ...]
    denominator: tuple[str, ...]


@dataclass(frozen=True)
class InflammationSettings:
    """A tile is inflamed when its interstitium holds more than ``nuclei_per_mm2`` nuclei per mm2
    and is at least ``min_interstitium_um2``."""

    nuclei_per_mm2: float
    min_interstitium_um2: float


@dataclass(frozen=True)
class CortexSettings:
    tile_um: float
    interstitial_fibrosis: AreaRatio
    tubular_atrophy: AreaRatio
    interstitial_inflammation: InflammationSettings


@dataclass(frozen=True)
class ScoreConfig:
    name: str
    glomeruli: GlomerulusSettings
    lesions: LesionThresholds
    cortex: CortexSettings

    def as_dict(self) -> dict:
        """The resolved configuration, JSON-ready (for ``summary.json``)."""
        return asdict(self)


@dataclass(frozen=True)
class Component:
    """One NIH component: which index, its weight, and what it is a percentage of."""

    name: str
    index: str  # "activity" or "chronicity"
    weight: int
    denominator: str  # "glomeruli" or "cortex"
    lesions: tuple[str, ...] = ()  # glomerular lesions that count; () for cortex / unassessable
    required_class: str | None = None  # glomerular class the model must carry
    from_nuclei: bool = False  # assessed from nuclei counts, when the measures carry them


COMPONENTS: tuple[Component, ...] = (
    Component("glomerulosclerosis", "chronicity", 1, "glomeruli",
              ("global_sclerosis", "segmental_sclerosis"), "sclerosis"),
    Component("fibrous_crescents", "chronicity", 1, "glomeruli", ("fibrous_crescent",),
              "fibrous_crescent"),
    Component("tubular_atrophy", "chronicity", 1, "cortex"),
    Component("interstitial_fibrosis", "chronicity", 1, "cortex"),
    Component("endocapillary_hypercellularity", "activity", 1, "glomeruli",
              ("endocapillary_hypercellularity",), "tuft", from_nuclei=True),
    Component("neutrophils_karyorrhexis", "activity", 1, "glomeruli"),
    Component("fibrinoid_necrosis", "activity", 2, "glomeruli"),
    Component("hyaline_deposits", "activity", 1, "glomeruli", ("hyaline_deposits",),
              "hyaline_deposit"),
    Component("cellular_crescents", "activity", 2, "glomeruli", ("cellular_crescent",),
              "cellular_crescent"),
    Component("interstitial_inflammation", "activity", 1, "cortex", from_nuclei=True),
)
NOT_SEGMENTED = "no light-microscopy class shows it; not estimated"
NOT_COUNTED = ("nuclei not counted: scored from a class map alone, or the slide is not RGB "
               "brightfield at 0.6 um/px or finer")


# --- configuration -----------------------------------------------------------------------------

def load_score_config(path: str | Path | None = None) -> ScoreConfig:
    """The scoring configuration: the default file, with the keys of ``path`` merged over it.

    Raises
    ------
    ConfigError
        ``path`` is missing or malformed, names an unknown setting, or holds an invalid value.
    """
    settings = read_yaml_mapping(DEFAULT_CONFIG_PATH, "scoring config")
    if path is not None:
        settings = _merge(settings, read_yaml_mapping(Path(path), "scoring config"), Path(path), "")
    return score_config_from_dict(settings, path or DEFAULT_CONFIG_PATH)


def score_config_from_dict(settings: dict, where: str | Path = "scoring config") -> ScoreConfig:
    """A validated :class:`ScoreConfig` from a complete mapping (a config file's, or the
    ``provenance.config`` that ``summary.json`` records); ``where`` names it in errors."""
    settings = _with_nuclei_defaults(settings)
    try:
        cortex = dict(settings["cortex"])
        for ratio in ("interstitial_fibrosis", "tubular_atrophy"):
            cortex[ratio] = AreaRatio(**{k: _class_list(v, where, f"cortex.{ratio}.{k}")
                                         for k, v in cortex[ratio].items()})
        cortex["interstitial_inflammation"] = _section(
            InflammationSettings, cortex["interstitial_inflammation"], where,
            "cortex.interstitial_inflammation")
        config = ScoreConfig(
            name=str(settings["name"]),
            glomeruli=_section(GlomerulusSettings, settings["glomeruli"], where, "glomeruli"),
            lesions=_section(LesionThresholds, settings["lesions"], where, "lesions"),
            cortex=_section(CortexSettings, cortex, where, "cortex"),
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{where}: malformed scoring config ({error}); compare it with "
                          f"{DEFAULT_CONFIG_PATH}") from None
    for name, value in asdict(config.lesions).items():
        if name != "endocapillary_tuft_nuclei_per_1000um2" and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}: lesions.{name} = {value} is a fraction; give 0..1")
    lesions = config.lesions
    if lesions.segmental_sclerosis_tuft_fraction > lesions.global_sclerosis_tuft_fraction:
        raise ConfigError(f"{where}: lesions.segmental_sclerosis_tuft_fraction must not exceed "
                          "lesions.global_sclerosis_tuft_fraction")
    if config.cortex.tile_um <= 0 or config.glomeruli.split_min_depth_um <= 0:
        raise ConfigError(f"{where}: cortex.tile_um and glomeruli.split_min_depth_um must be > 0")
    return config



def _with_nuclei_defaults(settings: dict) -> dict:
    """``settings`` with the nuclei thresholds of the default file where it has none: configs
    recorded before nuclei were counted (their measures carry no counts, so these change nothing)."""
    lesions, cortex = settings.get("lesions"), settings.get("cortex")
    if not (isinstance(lesions, dict) and isinstance(cortex, dict)):
        return settings
    default = read_yaml_mapping(DEFAULT_CONFIG_PATH, "scoring config")
    key = "endocapillary_tuft_nuclei_per_1000um2"
    return settings | {
        "lesions": {key: default["lesions"][key]} | lesions,
        "cortex": {"interstitial_inflammation": default["cortex"]["interstitial_inflammation"]} | cortex,
    }


def _merge(base: dict, override: dict, path: Path, prefix: str) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if key not in base:
            raise ConfigError(f"{path}: unknown setting '{prefix}{key}'; the settings are those "
                              f"of {DEFAULT_CONFIG_PATH}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            merged[key] = _merge(base[key], value, path, f"{prefix}{key}.")
        else:
            merged[key] = value
    return merged


def _section(cls, values: dict, where, prefix: str):
    """Build dataclass ``cls`` from ``values``, checking that numbers are numbers."""
    kwargs = {}
    for field in fields(cls):
        value = values[field.name]
        if field.type in ("float", "int"):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0 <= value < math.inf):
                raise ConfigError(f"{where}: {prefix}.{field.name} = {value!r}; give a number >= 0")
            if field.type == "int" and value != int(value):
                raise ConfigError(f"{where}: {prefix}.{field.name} = {value!r}; give a whole number")
            value = int(value) if field.type == "int" else float(value)
        kwargs[field.name] = value
    return cls(**kwargs)


def _class_list(value, where, name: str) -> tuple[str, ...]:
    if not (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)):
        raise ConfigError(f"{where}: {name} must be a non-empty list of class names")
    unknown = [v for v in value if v not in CLASS_NAMES]
    if unknown:
        raise ConfigError(f"{where}: {name} names {unknown[0]!r}, not a class of "
                          f"{', '.join(CLASS_NAMES)}")
    return tuple(value)


# --- lesion calls ------------------------------------------------------------------------------

def tuft_sclerosis_fraction(glomerulus: GlomerulusMeasures) -> float:
    """Sclerosis as a fraction of the tuft, the glomerulus without its crescents (ISN/RPS).

    Derived exactly from the per-glomerulus fractions: sclerosis / (1 - both crescent fractions);
    0 when crescents fill the whole glomerulus.
    """
    tuft = 1.0 - glomerulus.cellular_crescent_fraction - glomerulus.fibrous_crescent_fraction
    return glomerulus.sclerosis_fraction / tuft if tuft > 0 else 0.0


def call_lesions(glomerulus: GlomerulusMeasures, thresholds: LesionThresholds) -> list[str]:
    """Lesions of one glomerulus (several may hold), in the order of :data:`LESIONS`.

    - ``global_sclerosis``: sclerosis > ``global_sclerosis_tuft_fraction`` of the tuft;
      ``segmental_sclerosis``: above ``segmental_sclerosis_tuft_fraction`` and not global.
    - ``cellular_crescent`` / ``fibrous_crescent``: that type's capsule coverage >
      ``crescent_capsule_coverage``.
    - ``hyaline_deposits``: hyaline-deposit fraction of the glomerulus >
      ``hyaline_deposit_fraction``.
    - ``endocapillary_hypercellularity``: nuclei per 1000 µm2 of cellular tuft >
      ``endocapillary_tuft_nuclei_per_1000um2`` (never called when nuclei were not counted).
    - ``normal``: none of these.
    """
    sclerosis = tuft_sclerosis_fraction(glomerulus)
    calls = {
        "segmental_sclerosis": thresholds.segmental_sclerosis_tuft_fraction < sclerosis
        <= thresholds.global_sclerosis_tuft_fraction,
        "global_sclerosis": sclerosis > thresholds.global_sclerosis_tuft_fraction,
        "cellular_crescent":
            glomerulus.cellular_crescent_capsule_coverage > thresholds.crescent_capsule_coverage,
        "fibrous_crescent":
            glomerulus.fibrous_crescent_capsule_coverage > thresholds.crescent_capsule_coverage,
        "hyaline_deposits":
            glomerulus.hyaline_deposit_fraction > thresholds.hyaline_deposit_fraction,
        "endocapillary_hypercellularity": glomerulus.tuft_nuclei_per_1000um2 is not None
            and glomerulus.tuft_nuclei_per_1000um2 > thresholds.endocapillary_tuft_nuclei_per_1000um2,
    }
    lesions = [name for name in LESIONS if calls.get(name)]
    return lesions or ["normal"]


# --- slide scores ------------------------------------------------------------------------------

def nih_bin(percent: float) -> int:
    """NIH bin of a percentage: 0 absent, 1 below 25, 2 from 25 to 50 inclusive, 3 above 50.

    Compared at 1e-9 %: an area share summed from per-tile areas in floating point can land a
    rounding error below exactly 25 or 50 (24.999999999999996)."""
    percent = round(percent, 9)
    if percent <= 0:
        return 0
    if percent < 25:
        return 1
    return 2 if percent <= 50 else 3


def area_percent(cortex_tiles: list[CortexTile], ratio: AreaRatio,
                 class_names) -> float | None:
    """100 * numerator area / denominator area summed over tiles; None when not assessable.

    Not assessable: a class of ``ratio`` (or ``background``: glass would count as cortex)
    missing from ``class_names``, or no denominator area.
    """
    if any(name not in class_names for name in ratio.numerator + ratio.denominator + GLASS):
        return None
    numerator = sum(t.area_um2.get(name, 0.0) for t in cortex_tiles for name in ratio.numerator)
    denominator = sum(t.area_um2.get(name, 0.0) for t in cortex_tiles for name in ratio.denominator)
    return 100.0 * numerator / denominator if denominator > 0 else None


def inflamed_percent(cortex_tiles: list[CortexTile], denominator: tuple[str, ...],
                     settings: InflammationSettings, class_names) -> float | None:
    """100 * denominator area of the inflamed tiles / denominator area of all tiles; None when
    not assessable (nuclei not counted, an interstitial or denominator class missing, no cortex).

    A tile is inflamed when its interstitium (``INTERSTITIAL_CLASSES``) is at least
    ``settings.min_interstitium_um2`` and holds more than ``settings.nuclei_per_mm2`` nuclei per mm2.
    """
    if (not cortex_tiles or any(t.interstitial_nuclei is None for t in cortex_tiles)
            or any(name not in class_names for name in INTERSTITIAL_CLASSES + denominator + GLASS)):
        return None
    inflamed = total = 0.0
    for tile in cortex_tiles:
        area = sum(tile.area_um2.get(name, 0.0) for name in denominator)
        total += area
        inflamed += area if tile_is_inflamed(tile, settings) else 0.0
    return 100.0 * inflamed / total if total > 0 else None


def tile_is_inflamed(tile: CortexTile, settings: InflammationSettings) -> bool:
    """Whether a tile's interstitium is large enough and denser in nuclei than the threshold."""
    interstitium_um2 = sum(tile.area_um2.get(name, 0.0) for name in INTERSTITIAL_CLASSES)
    return (tile.interstitial_nuclei is not None
            and interstitium_um2 >= settings.min_interstitium_um2
            and tile.interstitial_nuclei > settings.nuclei_per_mm2 * interstitium_um2 / 1e6)


def score_slide(glomeruli: list[GlomerulusMeasures], cortex_tiles: list[CortexTile],
                class_names, config: ScoreConfig) -> dict:
    """JSON-ready slide scores: both NIH indices by component, adequacy and continuous burdens.

    Lesions are called here from the measures with ``config.lesions`` (``glomerulus.lesions`` is
    not read), so the scores depend only on the measures and the config.
    """
    calls = [call_lesions(g, config.lesions) for g in glomeruli]
    counted = bool(glomeruli) and all(g.tuft_nuclei_per_1000um2 is not None for g in glomeruli)
    components = {c.name: _score_component(c, calls, cortex_tiles, class_names, config, counted)
                  for c in COMPONENTS}
    count = len(glomeruli)
    deposits = components["hyaline_deposits"]
    has = {name: name in class_names for name in ("hyaline_deposit", "sclerosis")}
    return {
        "chronicity_index": _index("chronicity", components),
        "activity_index": _index("activity", components),
        "glomeruli": {
            "count": count,
            "adequacy": "adequate" if count >= config.glomeruli.adequate_min_count
            else "limited sample",
            "adequate_min_count": config.glomeruli.adequate_min_count,
            "lesion_counts": {name: sum(name in c for c in calls) for name in LESIONS},
        },
        "burdens": {
            "deposit_glomeruli_percent": deposits["percent"],
            "deposit_mean_area_fraction": _mean(glomeruli, "hyaline_deposit_fraction")
            if has["hyaline_deposit"] else None,
            "sclerosis_mean_fraction": _mean(glomeruli, "sclerosis_fraction")
            if has["sclerosis"] else None,
            "interstitial_fibrosis_percent": components["interstitial_fibrosis"]["percent"],
            "tubular_atrophy_percent": components["tubular_atrophy"]["percent"],
        },
        "cortex": {
            "tiles": len(cortex_tiles),
            "area_um2": {name: sum(t.area_um2.get(name, 0.0) for t in cortex_tiles)
                         for name in class_names if name != "background"},
        },
    }


def _score_component(component: Component, calls: list[list[str]], cortex_tiles, class_names,
                     config: ScoreConfig, glomerular_nuclei_counted: bool) -> dict:
    result = {"index": component.index, "weight": component.weight,
              "denominator": component.denominator, "assessed": False, "percent": None,
              "bin": None, "points": None, "count": None, "of": None, "reason": None}
    if component.name == "interstitial_inflammation":
        percent = inflamed_percent(cortex_tiles, config.cortex.interstitial_fibrosis.denominator,
                                   config.cortex.interstitial_inflammation, class_names)
        if percent is None:
            counted = cortex_tiles and all(t.interstitial_nuclei is not None for t in cortex_tiles)
            return result | {"reason": "no cortex in the class map or model lacks an interstitial "
                             "or the background class" if counted else NOT_COUNTED}
    elif component.denominator == "cortex":
        ratio = getattr(config.cortex, component.name, None)
        if ratio is None:
            return result | {"reason": NOT_SEGMENTED}
        percent = area_percent(cortex_tiles, ratio, class_names)
        if percent is None:
            missing = [n for n in dict.fromkeys(ratio.numerator + ratio.denominator + GLASS)
                       if n not in class_names]
            reason = (f"model lacks class(es) {', '.join(missing)}" if missing
                      else "no cortex in the class map")
            return result | {"reason": reason}
    else:
        if not component.lesions:
            return result | {"reason": NOT_SEGMENTED}
        if component.required_class not in class_names:
            return result | {"reason": f"model lacks class {component.required_class}"}
        if not calls:
            return result | {"reason": "no glomeruli"}
        if component.from_nuclei and not glomerular_nuclei_counted:
            return result | {"reason": NOT_COUNTED}
        count = sum(any(lesion in c for lesion in component.lesions) for c in calls)
        percent = 100.0 * count / len(calls)
        result |= {"count": count, "of": len(calls)}
    grade = nih_bin(percent)
    return result | {"assessed": True, "percent": percent, "bin": grade,
                     "points": grade * component.weight}


def _index(index: str, components: dict[str, dict]) -> dict:
    mine = {name: c for name, c in components.items() if c["index"] == index}
    assessed = [c for c in mine.values() if c["assessed"]]
    return {
        "score": sum(c["points"] for c in assessed) if assessed else None,
        "max": sum(3 * c["weight"] for c in mine.values()),
        "assessed_max": sum(3 * c["weight"] for c in assessed),
        "partial": len(assessed) < len(mine),
        "components": {name: {k: v for k, v in c.items() if k != "index"}
                       for name, c in mine.items()},
    }


def _mean(glomeruli: list[GlomerulusMeasures], field: str) -> float | None:
    return float(np.mean([getattr(g, field) for g in glomeruli])) if glomeruli else None
