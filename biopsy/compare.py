"""Paired pre/post comparison of one patient: per metric, did the kidney get better?

Biopsies taken before and after treatment are different pieces of tissue, so distributions are
compared, not pixels (../shared/SCORING.md). For every metric: the baseline and follow-up values
(recomputed from each folder's glomeruli and tiles; equal to its ``summary.json``), their
difference (follow-up minus baseline) and a 95% interval of that difference:

- a share of glomeruli with a lesion: Newcombe's hybrid score interval (a bootstrap of one
  glomerulus is a single value);
- a burden (a per-glomerulus fraction averaged over glomeruli): the inverted permutation test of
  the two biopsies' glomeruli (a bootstrap's chance verdicts rose to 30 % on few glomeruli);
- an area metric of the cortex: Welch's t over 1 mm blocks of cortex tiles, each biopsy's blocks
  its units (fibrosis comes in patches: resampling tiles as if independent gave chance verdicts
  to 17-18 % of simulated unchanged patients, 48-57 % with larger patches);
- the NIH indices: a percentile bootstrap, each replicate resampling, independently for each
  biopsy, its glomeruli and its 1 mm blocks of cortex tiles and recomputing every metric with
  the scoring definitions of :mod:`biopsy.scoring` (vectorised over replicates;
  ``tests/test_compare.py`` checks it equals ``score_slide``).

The methods are in :mod:`biopsy.intervals`; each also gives the p-value of "no change", and
each row carries it adjusted by Holm's step-down over the patient's compared metrics, with the
verdict that holds when they are judged as one set.

All metrics here are lower-is-better. A metric is ``improved`` when its interval lies wholly
below zero, ``worsened`` when wholly above, ``unchanged`` otherwise, and ``not assessed`` when
either biopsy cannot give it. Activity and chronicity are reported apart, never combined: the
chronicity index may rise while activity falls.
"""

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from biopsy import scoring
from biopsy.intervals import (ALPHA, CONFIDENCE, holm, mean_difference_interval, percentile_interval,
                              proportion_difference_interval, ratio_difference_interval, verdict)
from biopsy.atomic import write_text_atomic
from biopsy.report import write_report
from biopsy.scorefolder import ScoredSlide, read_score_folder

BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0
MAX_RESAMPLED_ENTRIES = 2_000_000  # per index array of a bootstrap chunk (16 MB)
# 2: intervals by metric; 3: burdens by permutation; 4: areas over blocks, p-values and Holm
COMPARISON_FORMAT = "biopsy.comparison/4"
CSV_COLUMNS = ("name", "label", "family", "unit", "favourable", "interval", "resampled",
               "baseline", "follow_up", "difference", "ci_low", "ci_high", "verdict", "p_value",
               "p_holm", "verdict_holm")
BOOTSTRAP, NEWCOMBE, PERMUTATION, WELCH_BLOCKS = (
    "percentile bootstrap", "Newcombe hybrid score", "inverted permutation test",
    "Welch t over 1 mm blocks of cortex tiles")
BLOCK_UM = 1000.0  # about the side of the blocks of cortex tiles that area metrics are judged over


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    family: str  # "activity" or "chronicity"
    unit: str
    resampled: str  # what the bootstrap resamples or the test permutes ("none": neither)
    interval: str = BOOTSTRAP  # how the difference's interval is made
    favourable: str = "lower"


METRICS: tuple[Metric, ...] = (
    Metric("activity_index", "NIH activity index (assessed components)", "activity",
           "points", "glomeruli and 1 mm blocks of cortex tiles"),
    Metric("hyaline_deposits", "Glomeruli with hyaline deposits", "activity", "% of glomeruli",
           "none", NEWCOMBE),
    Metric("deposit_burden", "Mean hyaline-deposit area", "activity", "% of glomerular area",
           "glomeruli, permuted between the biopsies", PERMUTATION),
    Metric("cellular_crescents", "Cellular crescents", "activity", "% of glomeruli", "none",
           NEWCOMBE),
    Metric("endocapillary_hypercellularity", "Endocapillary hypercellularity", "activity",
           "% of glomeruli", "none", NEWCOMBE),
    Metric("interstitial_inflammation", "Interstitial inflammation", "activity", "% of cortex",
           "none", WELCH_BLOCKS),
    Metric("chronicity_index", "NIH chronicity index", "chronicity", "points",
           "glomeruli and 1 mm blocks of cortex tiles"),
    Metric("glomerulosclerosis", "Glomerulosclerosis (global + segmental)", "chronicity",
           "% of glomeruli", "none", NEWCOMBE),
    Metric("sclerosis_burden", "Mean sclerosis", "chronicity", "% of glomerular area",
           "glomeruli, permuted between the biopsies", PERMUTATION),
    Metric("fibrous_crescents", "Fibrous crescents", "chronicity", "% of glomeruli", "none",
           NEWCOMBE),
    Metric("interstitial_fibrosis", "Interstitial fibrosis", "chronicity", "% of cortex", "none",
           WELCH_BLOCKS),
    Metric("tubular_atrophy", "Tubular atrophy", "chronicity", "% of tubular area", "none",
           WELCH_BLOCKS),
)
# Continuous burdens: per-glomerulus measure averaged over glomeruli, shown in percent.
BURDEN_FIELDS = {"deposit_burden": ("hyaline_deposit_fraction", "hyaline_deposit"),
                 "sclerosis_burden": ("sclerosis_fraction", "sclerosis")}


@dataclass(frozen=True)
class SlideSample:
    """What the bootstrap resamples from one scored slide: per-glomerulus and per-tile arrays."""

    lesion_present: dict[str, np.ndarray]  # component name -> bool per glomerulus
    burden_fraction: dict[str, np.ndarray]  # burden metric -> fraction per glomerulus
    tile_areas_um2: dict[str, np.ndarray]  # class name -> area per cortex tile
    class_names: tuple[str, ...]
    config: scoring.ScoreConfig
    tile_block: np.ndarray  # block number per cortex tile (:func:`tile_blocks`)
    glomerular_nuclei_counted: bool = False  # every glomerulus has a tuft nuclear density
    tile_inflamed: np.ndarray | None = None  # bool per cortex tile; None: nuclei not counted

    @property
    def glomerulus_count(self) -> int:
        return len(next(iter(self.burden_fraction.values())))

    @property
    def tile_count(self) -> int:
        return len(next(iter(self.tile_areas_um2.values()), ()))

    @property
    def block_count(self) -> int:
        """The blocks of cortex tiles: the area metrics' sample size."""
        return int(self.tile_block.max()) + 1 if len(self.tile_block) else 0


def slide_sample(glomeruli, cortex_tiles, class_names, config: scoring.ScoreConfig) -> SlideSample:
    """Arrays of one slide's glomeruli and tiles, lesions called as :func:`scoring.score_slide` does."""
    calls = [scoring.call_lesions(g, config.lesions) for g in glomeruli]
    lesion_present = {c.name: np.array([any(lesion in call for lesion in c.lesions) for call in calls],
                                       dtype=bool)
                      for c in scoring.COMPONENTS if c.denominator == "glomeruli" and c.lesions}
    burden_fraction = {name: np.array([getattr(g, field) for g in glomeruli], dtype=float)
                       for name, (field, _) in BURDEN_FIELDS.items()}
    tile_areas = {name: np.array([t.area_um2.get(name, 0.0) for t in cortex_tiles], dtype=float)
                  for name in class_names}
    counted = bool(glomeruli) and all(g.tuft_nuclei_per_1000um2 is not None for g in glomeruli)
    inflamed = None
    if cortex_tiles and all(t.interstitial_nuclei is not None for t in cortex_tiles):
        settings = config.cortex.interstitial_inflammation
        inflamed = np.array([scoring.tile_is_inflamed(t, settings) for t in cortex_tiles], bool)
    return SlideSample(lesion_present, burden_fraction, tile_areas, tuple(class_names), config,
                       tile_blocks(cortex_tiles, config.cortex.tile_um), counted, inflamed)


def tile_blocks(cortex_tiles, tile_um: float) -> np.ndarray:
    """Each tile's block, numbered from 0. Each piece of tissue (tiles that touch, corners too)
    is cut along and across its principal axes into equal parts of about BLOCK_UM (a 1 mm wide
    core: slabs of its whole width), so that blocks do not depend on where the piece lies on the
    slide or at what angle: a fixed grid cut a core that straddled a grid line, or lay at an
    angle, into part-width blocks side by side, nearly alike, and gave more chance verdicts."""
    if not cortex_tiles:
        return np.zeros(0, np.int64)
    cells = np.array([(round(t.y_px / t.size_px), round(t.x_px / t.size_px)) for t in cortex_tiles],
                     dtype=np.int64)
    cells -= cells.min(axis=0)
    grid = np.zeros(cells.max(axis=0) + 1, bool)
    grid[tuple(cells.T)] = True
    pieces = ndimage.label(grid, structure=np.ones((3, 3), bool))[0][tuple(cells.T)]
    keys = np.empty((len(cortex_tiles), 3), np.int64)
    for piece in np.unique(pieces):
        inside = pieces == piece
        centres = cells[inside] * float(tile_um)
        centres -= centres.mean(axis=0)
        keys[inside, 0] = piece
        for axis, coordinate in enumerate((centres @ np.linalg.svd(centres, full_matrices=False)[2].T).T):
            extent = np.ptp(coordinate) + tile_um
            parts = max(1, round(extent / BLOCK_UM))
            keys[inside, 1 + axis] = np.minimum(
                ((coordinate - coordinate.min()) * parts // extent).astype(np.int64), parts - 1)
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)


def metric_values(sample: SlideSample, glomerulus_index: np.ndarray,
                  tile_weights: np.ndarray) -> dict[str, np.ndarray | None]:
    """Every metric for each replicate: row r of the (replicates, glomeruli) index array picks
    the glomeruli of replicate r, row r of the (replicates, tiles) weights says how many times it
    takes each tile. None: not assessed on this slide; NaN: not defined in that replicate (a
    resample without denominator area).
    """
    components = {}
    for component in scoring.COMPONENTS:
        components[component.name] = _component_percent(sample, component, glomerulus_index,
                                                         tile_weights)
    values: dict[str, np.ndarray | None] = {
        metric.name: components[metric.name] for metric in METRICS if metric.name in components}
    for name, (_, required_class) in BURDEN_FIELDS.items():
        assessable = required_class in sample.class_names and sample.glomerulus_count > 0
        values[name] = (100.0 * sample.burden_fraction[name][glomerulus_index].mean(axis=1)
                        if assessable else None)
    for index in ("activity", "chronicity"):
        values[f"{index}_index"] = _index_points(index, components)
    return values


def _component_percent(sample: SlideSample, component: scoring.Component,
                       glomerulus_index: np.ndarray, tile_weights: np.ndarray) -> np.ndarray | None:
    if component.denominator == "glomeruli":
        if (not component.lesions or component.required_class not in sample.class_names
                or sample.glomerulus_count == 0
                or (component.from_nuclei and not sample.glomerular_nuclei_counted)):
            return None
        return 100.0 * sample.lesion_present[component.name][glomerulus_index].mean(axis=1)
    parts = tile_ratio_parts(sample, component.name)
    if parts is None:
        return None
    numerator, denominator = tile_weights @ parts[0], tile_weights @ parts[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 100.0 * numerator / denominator, np.nan)


def tile_ratio_parts(sample: SlideSample, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Numerator and denominator area (µm²) per cortex tile of the area component ``name``, as
    :func:`scoring.area_percent` and :func:`scoring.inflamed_percent` sum them; None where the
    slide cannot assess it."""
    if name == "interstitial_inflammation":
        ratio = sample.config.cortex.interstitial_fibrosis
        if sample.tile_inflamed is None or any(
                n not in sample.class_names
                for n in scoring.INTERSTITIAL_CLASSES + ratio.denominator + scoring.GLASS):
            return None
    else:
        ratio = getattr(sample.config.cortex, name, None)
        if ratio is None or any(n not in sample.class_names
                                for n in ratio.numerator + ratio.denominator + scoring.GLASS):
            return None
    denominator = sum(sample.tile_areas_um2[n] for n in ratio.denominator)
    if sample.tile_count == 0 or not denominator.sum() > 0:
        return None  # no cortex on the slide, as scoring.area_percent
    numerator = (denominator * sample.tile_inflamed if name == "interstitial_inflammation"
                 else sum(sample.tile_areas_um2[n] for n in ratio.numerator))
    return numerator, denominator


_nih_bin = np.vectorize(scoring.nih_bin, otypes=[float])


def _index_points(index: str, components: dict[str, np.ndarray | None]) -> np.ndarray | None:
    """Sum of bin x weight over the assessed components of ``index`` (None: none assessed)."""
    assessed = [c for c in scoring.COMPONENTS if c.index == index and components[c.name] is not None]
    if not assessed:
        return None
    points = [np.where(np.isnan(components[c.name]), np.nan,
                       _nih_bin(np.nan_to_num(components[c.name])) * c.weight) for c in assessed]
    return np.sum(points, axis=0)


def assessed_components(sample: SlideSample) -> dict[str, bool]:
    """Which NIH components the slide assesses (an index is compared only over the same set)."""
    every_glomerulus = np.arange(sample.glomerulus_count)[None]
    every_tile = np.ones((1, sample.tile_count))
    return {c.name: _component_percent(sample, c, every_glomerulus, every_tile) is not None
            for c in scoring.COMPONENTS}


def _same_components(index: str, baseline: dict[str, bool], follow_up: dict[str, bool]) -> bool:
    """An index is compared only when both biopsies assess the same components of it."""
    return all(baseline[c.name] == follow_up[c.name] for c in scoring.COMPONENTS if c.index == index)


def point_values(sample: SlideSample) -> dict[str, float | None]:
    """Every metric on the slide's own glomeruli and tiles (no resampling)."""
    values = metric_values(sample, np.arange(sample.glomerulus_count)[None],
                           np.ones((1, sample.tile_count)))
    return {name: None if v is None or np.isnan(v[0]) else float(v[0]) for name, v in values.items()}


def bootstrap_values(sample: SlideSample, rng: np.random.Generator,
                     replicates: int) -> dict[str, np.ndarray | None]:
    """Every metric for ``replicates`` resamples (with replacement) of the slide's glomeruli and
    of its BLOCK_UM blocks of cortex tiles (neighbouring tiles are not independent), drawn in
    chunks so that memory stays bounded on slides with thousands of tiles."""
    widest = max(sample.glomerulus_count, sample.tile_count, 1)
    chunk = max(1, MAX_RESAMPLED_ENTRIES // widest)
    blocks = max(sample.block_count, 1)
    parts = []
    for start in range(0, replicates, chunk):
        count = min(chunk, replicates - start)
        glomerulus_index = rng.integers(0, max(sample.glomerulus_count, 1),
                                        size=(count, sample.glomerulus_count))
        block_draws = rng.multinomial(blocks, np.full(blocks, 1 / blocks), size=count)
        parts.append(metric_values(sample, glomerulus_index, block_draws[:, sample.tile_block]))
    return {name: None if parts[0][name] is None else np.concatenate([p[name] for p in parts])
            for name in parts[0]}


def compare_samples(baseline: SlideSample, follow_up: SlideSample,
                    replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """Per metric (in :data:`METRICS` order): values, difference, interval and verdict."""
    rng = np.random.default_rng(seed)
    base_point, follow_point = point_values(baseline), point_values(follow_up)
    base_boot = bootstrap_values(baseline, rng, replicates)
    follow_boot = bootstrap_values(follow_up, rng, replicates)
    assessed = assessed_components(baseline), assessed_components(follow_up)
    rows = []
    for metric in METRICS:
        base, follow = base_point[metric.name], follow_point[metric.name]
        comparable = base is not None and follow is not None and (
            not metric.name.endswith("_index") or _same_components(metric.family, *assessed))
        row = asdict(metric) | {"baseline": base, "follow_up": follow, "difference": None,
                                "ci_low": None, "ci_high": None, "verdict": "not assessed",
                                "p_value": None, "p_holm": None, "verdict_holm": "not assessed"}
        if metric.name.endswith("_index"):  # which components it sums: cohorts pool like with like
            row["components"] = ([c.name for c in scoring.COMPONENTS
                                  if c.index == metric.family and assessed[0][c.name]]
                                 if comparable else None)
        if comparable:
            if metric.interval == NEWCOMBE:
                interval = proportion_difference_interval(baseline.lesion_present[metric.name],
                                                          follow_up.lesion_present[metric.name])
            elif metric.interval == PERMUTATION:
                interval = mean_difference_interval(
                    100.0 * baseline.burden_fraction[metric.name],
                    100.0 * follow_up.burden_fraction[metric.name], rng, replicates, 100.0)
            elif metric.interval == WELCH_BLOCKS:
                interval = ratio_difference_interval(
                    *(tile_ratio_parts(s, metric.name) + (s.tile_block,)
                      for s in (baseline, follow_up)))
            else:
                interval = percentile_interval(follow_boot[metric.name] - base_boot[metric.name])
            row |= {"difference": follow - base, "ci_low": interval.low, "ci_high": interval.high,
                    "verdict": verdict(interval.low, interval.high, metric.favourable),
                    "p_value": interval.p_value}
        rows.append(row)
    _add_holm(rows)
    return rows


def _add_holm(rows: list[dict]) -> None:
    """Each compared metric's p-value adjusted for the patient's number of them (Holm), and the
    verdict that holds when they are judged together."""
    compared = [row for row in rows if row["p_value"] is not None]
    for row, adjusted in zip(compared, holm([row["p_value"] for row in compared])):
        row["p_holm"] = adjusted
        row["verdict_holm"] = row["verdict"] if adjusted <= ALPHA else "unchanged"


def sample_of(scored: ScoredSlide) -> SlideSample:
    return slide_sample(scored.glomeruli, scored.cortex_tiles,
                        scored.summary["label_map"]["class_names"],
                        scoring.score_config_from_dict(scored.summary["provenance"]["config"],
                                                       scored.folder / "summary.json"))


def compare_scored(baseline: ScoredSlide, follow_up: ScoredSlide, patient_id: str = "",
                   replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED) -> dict:
    """The comparison of two scored slides, JSON-ready (what ``comparison.json`` holds)."""
    samples = sample_of(baseline), sample_of(follow_up)
    return {
        "format": COMPARISON_FORMAT,
        "patient_id": patient_id,
        "baseline": _slide_header(baseline, samples[0]),
        "follow_up": _slide_header(follow_up, samples[1]),
        "bootstrap": {"replicates": replicates, "seed": seed, "confidence": CONFIDENCE,
                      "interval": "percentile", "resampled": "glomeruli and 1 mm blocks of "
                      "cortex tiles of each biopsy, independently",
                      "metrics": [m.name for m in METRICS if m.interval == BOOTSTRAP]},
        "metrics": compare_samples(*samples, replicates, seed),
        "processing_differences": processing_differences(baseline, follow_up),
    }


def processing_differences(baseline: ScoredSlide, follow_up: ScoredSlide) -> list[str]:
    """How the two biopsies were processed differently, one sentence each ("Setting: this at
    baseline, that at follow-up."): reasons a difference may owe to the processing rather than
    the tissue. Everything that changes a slide's scores (:func:`biopsy.pipeline.slide_recipe`)
    is compared but for the pixel size itself, which may differ between scanners: the model, the
    scoring settings, int8 and bfloat16 inference, test-time augmentation, reading scales, stain
    normalisation, a pixel size given by hand or searched to another factor. A setting that a
    folder from an older version did not record counts as its default then (off, one scale, no
    search), or as unknown (stain normalisation). Empty when they were processed alike."""
    base, follow = baseline.summary["provenance"], follow_up.summary["provenance"]
    differences = _config_differences(baseline, follow_up)
    segmented = [_field(provenance, "model", "sha256") is not None for provenance in (base, follow)]
    if segmented[0] != segmented[1]:
        return [_sentence("Source", *("the slide segmented by a model" if s else "a label map"
                                      for s in segmented))] + differences
    if not segmented[0]:
        return differences
    models = [_field(provenance, "model", "sha256") for provenance in (base, follow)]
    if models[0] != models[1]:
        differences.insert(0, _sentence("Model", *(f"SHA-256 {m[:12]}" for m in models)))
    return differences + [_sentence(setting, *values)
                          for setting, values in _inference_settings(base, follow)
                          if values[0] != values[1]]


def _inference_settings(base: dict, follow: dict):
    """(setting, (baseline's, follow-up's)) in words, for the settings both folders recorded."""
    inference = [provenance["inference"] for provenance in (base, follow)]
    for key, setting in (("int8", "int8 inference"), ("bf16", "bfloat16 inference"),
                         ("tta", "Mirror-image test-time augmentation")):
        yield setting, tuple("on" if i.get(key, False) else "off" for i in inference)
    yield "Reading scales", tuple(", ".join(f"{scale:g}" for scale in i.get("scales") or [1.0])
                                  for i in inference)
    if all("stain_reference" in i for i in inference):
        yield "Stain normalisation", tuple(_stain_words(i["stain_reference"]) for i in inference)
    yield "Pixel-size search", tuple(
        f"read at {_field(i, 'mpp_search', 'factor') or 1:g}x the pixel size" for i in inference)
    given = [_mpp_given(provenance) for provenance in (base, follow)]
    if None not in given:
        yield "Pixel size", tuple("given by hand" if g else "read from the file" for g in given)


def _mpp_given(provenance: dict) -> bool | None:
    """Whether a pixel size other than the file's own was given; None where unknown: folders
    from before ``file_mpp`` was recorded set ``mpp_given`` for any --mpp, even the file's own."""
    given = _field(provenance, "source", "mpp_given")
    return given if not given or "file_mpp" in provenance["source"] else None


def _stain_words(reference: list[float] | None) -> str:
    if reference is None:
        return "off"
    return f"on (reference haematoxylin {reference[0]:.3g}, eosin {reference[1]:.3g})"


def _config_differences(baseline: ScoredSlide, follow_up: ScoredSlide) -> list[str]:
    """A sentence per scoring setting (but the config's name) that differs between the two."""
    settings = [_flat(scoring.score_config_from_dict(s.summary["provenance"]["config"],
                                                     s.folder / "summary.json").as_dict())
                for s in (baseline, follow_up)]
    return [_sentence(f"Scoring setting {key}", settings[0].get(key), settings[1].get(key))
            for key in sorted(set(settings[0]) | set(settings[1]))
            if key != "name" and settings[0].get(key) != settings[1].get(key)]


def _flat(settings: dict, prefix: str = "") -> dict:
    """{"glomeruli.min_area_um2": 1500.0, ...}: a nested mapping's leaves by dotted key."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def _sentence(setting: str, at_baseline, at_follow_up) -> str:
    return f"{setting}: {at_baseline} at baseline, {at_follow_up} at follow-up."


def _field(provenance: dict, *keys: str):
    """``provenance[k1][k2]...``, None where a level is missing (a label map has no model)."""
    for key in keys:
        provenance = provenance.get(key) if isinstance(provenance, dict) else None
    return provenance


def compare_folders(baseline_dir: str | Path, follow_up_dir: str | Path, patient_id: str = "",
                    replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED) -> dict:
    """:func:`compare_scored` of two scored-slide folders (BiopsyError if one is incomplete)."""
    return compare_scored(read_score_folder(baseline_dir), read_score_folder(follow_up_dir),
                          patient_id, replicates, seed)


def _slide_header(scored: ScoredSlide, sample: SlideSample) -> dict:
    scores, provenance = scored.summary["scores"], scored.summary["provenance"]
    return {
        "folder": scored.folder.name,
        "source": provenance.get("source"),
        "model": provenance.get("model"),
        "glomeruli": scores["glomeruli"]["count"],
        "adequacy": scores["glomeruli"]["adequacy"],
        "cortex_tiles": scores["cortex"]["tiles"],
        "cortex_blocks": sample.block_count,
        "chronicity_partial": scores["chronicity_index"]["partial"],
        "activity_partial": scores["activity_index"]["partial"],
    }


def write_comparison(out_dir: str | Path, baseline: ScoredSlide, follow_up: ScoredSlide,
                     patient_id: str = "", replicates: int = BOOTSTRAP_REPLICATES,
                     seed: int = BOOTSTRAP_SEED) -> dict:
    """Compare two scored slides into ``out_dir``: ``report.html``, ``comparison.csv`` and, last,
    ``comparison.json``. Returns the comparison."""
    out_dir = Path(out_dir)
    comparison = compare_scored(baseline, follow_up, patient_id, replicates, seed)
    (out_dir / "comparison.json").unlink(missing_ok=True)
    write_report(out_dir / "report.html", comparison, baseline, follow_up)
    text = io.StringIO()
    writer = csv.DictWriter(text, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(comparison["metrics"])
    write_text_atomic(out_dir / "comparison.csv", text.getvalue())
    write_text_atomic(out_dir / "comparison.json", json.dumps(comparison, indent=2, allow_nan=False))
    return comparison
