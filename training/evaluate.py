"""Validation: whole-image prediction, per-class Dice and glomerulus detection F1, per stain.

Metrics are sums of counts (intersections, true/false positives) over images, so they add across
images, stains and DDP ranks: Dice is pooled over pixels, not averaged over images.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from skimage.measure import label

from biopsy.classes import glomerular_indices
from biopsy.decision import decide_classes
from biopsy.geojson import IGNORE_INDEX
from biopsy.errors import CheckpointError, ConfigError
from biopsy.infer import check_slide_for_model
from biopsy.tile_views import batch_probabilities
from biopsy.model import ModelInfo, load_checkpoint, with_glomerulus_threshold
from biopsy.mppsearch import most_confident_mpp, searches
from biopsy.tiling import TileDataset, cell_spans, grid_shape_px, make_grid
from training.cases import AnnotatedSlide, find_slides, set_stain_shifts, split_by_case
from training.config import Config, EvaluateConfig, with_fold

log = logging.getLogger(__name__)


@torch.inference_mode()
def predict_image(model: torch.nn.Module, info: ModelInfo, tiles: TileDataset, device: torch.device,
                  batch_size: int = 8, bf16: bool = False, tta: bool = False) -> np.ndarray:
    """Class map (H, W) uint8 at the model's mpp of the area of a full grid of ``tiles``
    (:func:`image_tiles`; ``tiles.grid.shape_px``).

    Each pixel takes the class (:func:`biopsy.decision.decide_classes`) of the tile whose centre
    is nearest, so it is never predicted from a tile border; a tile's probabilities are averaged
    over its views at ``tiles.scales`` and, with ``tta``, over mirror images, as in inference
    (:func:`biopsy.tile_views.batch_probabilities`).
    """
    grid = tiles.grid
    patch = grid.patch_px
    height, width = grid.shape_px
    row_cells = cell_spans(height, patch, grid.step_px)
    col_cells = cell_spans(width, patch, grid.step_px)
    result = np.zeros((height, width), np.uint8)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
    for first in range(0, len(tiles), batch_size):
        chunk = range(first, min(first + batch_size, len(tiles)))
        batch = torch.stack([tiles[i] for i in chunk]).to(device)
        views = [info.normalise(batch[:, view]) for view in range(batch.shape[1])]
        probabilities = batch_probabilities(model, views, tiles.scales, autocast, patch, tta)
        classes = decide_classes(probabilities, info.class_names, info.glomerulus_threshold,
                                 dim=1).to(torch.uint8).cpu().numpy()
        for (top, left), tile in zip(grid.origins_px[chunk], classes):
            (row0, row1), (col0, col1) = row_cells[top], col_cells[left]
            result[row0:row1, col0:col1] = tile[row0 - top:row1 - top, col0 - left:col1 - left]
    return result


def image_tiles(slide: AnnotatedSlide, info: ModelInfo, scales: tuple[float, ...] = (1.0,)
                ) -> TileDataset:
    """Every tile of a slide at the model's mpp and patch size, step half a patch, read at
    ``scales`` as inference reads them (stain-normalised where the slide says so).

    Raises
    ------
    CheckpointError, SlideError : the model does not take the slide (:func:`check_slide_for_model`).
    """
    check_slide_for_model(slide.slide(), info)
    shape_px = grid_shape_px(slide.dimensions, (slide.mpp, slide.mpp), info.input_mpp)
    grid = make_grid(shape_px, info.input_mpp, info.patch_size_px, overlap=0.5)
    return TileDataset(slide.slide(), grid, slide.stain_shift, scales)


def count_metrics(truth: np.ndarray, prediction: np.ndarray, class_names: Sequence[str], mpp: float,
                  settings: EvaluateConfig, truth_instances: np.ndarray | None = None) -> np.ndarray:
    """Counts (3 * classes + 9) for :func:`metrics_from_counts` of one image.

    Per class [intersection, predicted, truth] pixels, the same for the glomerular union, then
    [TP, FP, FN] of glomerulus detection and of globally sclerotic glomeruli. ``truth`` may hold
    IGNORE_INDEX (those pixels count nowhere). The true glomeruli are ``truth_instances`` (the
    annotations one by one) or, without it, the connected regions of ``truth``.
    """
    valid = truth != IGNORE_INDEX
    counts = []
    for index in range(len(class_names)):
        t, p = (truth == index) & valid, (prediction == index) & valid
        counts += [(t & p).sum(), p.sum(), t.sum()]
    glomerular = glomerular_indices(class_names)
    t, p = np.isin(truth, glomerular), np.isin(prediction, glomerular) & valid
    counts += [(t & p).sum(), p.sum(), t.sum()]
    counts += _detection_counts(truth, prediction, class_names, valid, mpp, settings, truth_instances)
    return np.array(counts, np.int64)


def _detection_counts(truth, prediction, class_names, valid, mpp, settings, truth_instances) -> list[int]:
    """[TP, FP, FN] for glomeruli, then for globally sclerotic glomeruli (IoU >= threshold)."""
    truth_objects, predicted, truth_sclerotic, predicted_sclerotic = _glomeruli(
        truth, prediction, class_names, valid, mpp, settings, truth_instances)
    matches = match_instances(truth_objects, predicted, settings.iou_threshold)
    n_truth, n_predicted = truth_objects.max(), predicted.max()
    hits = len(matches)
    sclerotic_hits = sum(1 for t, p in matches if t in truth_sclerotic and p in predicted_sclerotic)
    return [hits, n_predicted - hits, n_truth - hits,
            sclerotic_hits, len(predicted_sclerotic) - sclerotic_hits, len(truth_sclerotic) - sclerotic_hits]


def _glomeruli(truth, prediction, class_names, valid, mpp, settings, truth_instances):
    """Instance labels of the true and predicted glomeruli, and the ids of the globally sclerotic."""
    glomerular = glomerular_indices(class_names)
    min_area_px = settings.min_glomerulus_area_um2 / mpp**2
    sclerosis = list(class_names).index("sclerosis") if "sclerosis" in class_names else None
    truth_objects = (label_instances(np.isin(truth, glomerular), min_area_px)
                     if truth_instances is None else kept_instances(truth_instances, min_area_px))
    predicted = label_instances(np.isin(prediction, glomerular), min_area_px, inside=valid)
    return (truth_objects, predicted,
            _sclerotic(truth_objects, truth, sclerosis, settings.global_sclerosis_fraction),
            _sclerotic(predicted, prediction, sclerosis, settings.global_sclerosis_fraction))


def object_rows(truth: np.ndarray, prediction: np.ndarray, class_names: Sequence[str], mpp: float,
                settings: EvaluateConfig, truth_instances: np.ndarray | None = None) -> list[dict]:
    """One row per true and per predicted glomerulus of an image, as :func:`count_metrics` counts
    them: its area, whether it is globally sclerotic and matched (a hit; else a miss or a false
    positive), its best IoU with a glomerulus of the other side and that one's area (much larger:
    touching glomeruli taken as one, or a prediction spilling past the outline; smaller: found in
    part)."""
    truth_objects, predicted, truth_sclerotic, predicted_sclerotic = _glomeruli(
        truth, prediction, class_names, truth != IGNORE_INDEX, mpp, settings, truth_instances)
    matches = match_instances(truth_objects, predicted, settings.iou_threshold)
    pairs, iou = _overlaps(truth_objects, predicted)
    sides = (("truth", truth_objects, predicted, truth_sclerotic, {t for t, _ in matches}),
             ("predicted", predicted, truth_objects, predicted_sclerotic, {p for _, p in matches}))
    rows = []
    for side, (name, instances, others, sclerotic, hits) in enumerate(sides):
        areas, other_areas = np.bincount(instances.ravel()), np.bincount(others.ravel())
        for index in range(1, instances.max() + 1):
            mine = pairs[side] == index
            best = int(np.argmax(np.where(mine, iou, -1.0))) if mine.any() else None
            rows.append({"side": name, "id": index, "area_um2": round(float(areas[index] * mpp**2)),
                         "globally_sclerotic": index in sclerotic, "matched": index in hits,
                         "best_iou": 0.0 if best is None else round(float(iou[best]), 3),
                         "partner_area_um2": None if best is None else
                         round(float(other_areas[pairs[1 - side, best]] * mpp**2))})
    return rows


def label_instances(mask: np.ndarray, min_area_px: float,
                    inside: np.ndarray | None = None) -> np.ndarray:
    """Instance labels 1..n of the connected regions of ``mask`` at least ``min_area_px`` large
    (and, given ``inside``, mostly within it)."""
    return kept_instances(label(mask, connectivity=2), min_area_px, inside)


def kept_instances(instances: np.ndarray, min_area_px: float,
                   inside: np.ndarray | None = None) -> np.ndarray:
    """``instances`` (0 = none) renumbered 1..n, keeping those at least ``min_area_px`` large
    (and, given ``inside``, mostly within it)."""
    areas = np.bincount(instances.ravel())
    keep = (areas >= min_area_px) & (areas > 0)  # an outline over no pixel centre is none
    if inside is not None:
        keep &= np.bincount(instances.ravel(), weights=inside.ravel(), minlength=len(areas)) > areas / 2
    keep[0] = False
    renumber = np.zeros(len(areas), np.int64)
    renumber[keep] = np.arange(1, keep.sum() + 1)
    return renumber[instances]


def _sclerotic(instances: np.ndarray, labels: np.ndarray, sclerosis: int | None, fraction: float) -> set[int]:
    if sclerosis is None or instances.max() == 0:
        return set()
    areas = np.bincount(instances.ravel())
    sclerotic = np.bincount(instances.ravel(), weights=(labels == sclerosis).ravel(), minlength=len(areas))
    return {i for i in range(1, len(areas)) if sclerotic[i] >= fraction * areas[i]}


def match_instances(truth: np.ndarray, predicted: np.ndarray, iou_threshold: float) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of instances by IoU, best first."""
    pairs, iou = _overlaps(truth, predicted)
    matches, used_truth, used_predicted = [], set(), set()
    for k in np.argsort(-iou, kind="stable"):
        t, p = int(pairs[0, k]), int(pairs[1, k])
        if iou[k] >= iou_threshold and t not in used_truth and p not in used_predicted:
            matches.append((t, p))
            used_truth.add(t)
            used_predicted.add(p)
    return matches


def _overlaps(truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (truth, predicted) instance pairs that overlap, as a (2, n) array, and their IoU."""
    both = (truth > 0) & (predicted > 0)
    pairs, overlap = np.unique(np.stack([truth[both], predicted[both]]), axis=1, return_counts=True)
    truth_areas, predicted_areas = np.bincount(truth.ravel()), np.bincount(predicted.ravel())
    return pairs, overlap / (truth_areas[pairs[0]] + predicted_areas[pairs[1]] - overlap)


def metrics_from_counts(counts: np.ndarray, class_names: Sequence[str]) -> dict[str, float | None]:
    """Dice per class (None where a class is in neither truth nor prediction), mean Dice over classes
    present in the truth, glomerulus Dice, detection precision/recall/F1 and global-sclerosis F1."""
    n = len(class_names)
    per_class = counts[:3 * n].reshape(n, 3)
    metrics: dict[str, float | None] = {}
    for name, (i, p, t) in zip(class_names, per_class):
        metrics[f"dice_{name}"] = _ratio(2 * i, p + t)
    present = [2 * i / (p + t) for i, p, t in per_class if t > 0]
    metrics["mean_dice"] = float(np.mean(present)) if present else None
    i, p, t = counts[3 * n:3 * n + 3]
    metrics["glomerulus_dice"] = _ratio(2 * i, p + t)
    for prefix, (tp, fp, fn) in (("glomerulus", counts[3 * n + 3:3 * n + 6]),
                                 ("global_sclerosis", counts[3 * n + 6:3 * n + 9])):
        metrics[f"{prefix}_precision"] = _ratio(tp, tp + fp)
        metrics[f"{prefix}_recall"] = _ratio(tp, tp + fn)
        metrics[f"{prefix}_f1"] = _ratio(2 * tp, 2 * tp + fp + fn)
        metrics[f"{prefix}_count"] = int(tp + fn)
    return metrics


def check_best_metric(best_metric: str, class_names: Sequence[str], stains: set[str],
                      validation_stains: set[str], source: str) -> None:
    """``train.best_metric`` names a metric that validation gives, over all or one of the data's
    ``stains``; a warning when this run's validation gives no figures for that stain (one stain
    of several, or a fold without it): ``best.safetensors`` is then not written.

    Raises
    ------
    ConfigError : no such metric, or no such stain in the data.
    """
    stain, _, name = best_metric.partition("/")
    names = list(metrics_from_counts(_no_counts(class_names), class_names))
    if name not in names:
        raise ConfigError(f"{source}: train.best_metric {best_metric!r}: no metric {name!r} "
                          f"(one of {', '.join(names)})")
    if stain != "all" and stain not in stains:
        raise ConfigError(f"{source}: train.best_metric {best_metric!r}: no stain {stain!r} in the "
                          f"data (all, {', '.join(sorted(stains))})")
    if stain != "all" and (stain not in validation_stains or len(validation_stains) < 2):
        log.warning("%s: train.best_metric %r: validation gives no %s figures (its stains: %s); "
                    "no best.safetensors, last.safetensors only", source, best_metric, stain,
                    ", ".join(sorted(validation_stains)))


def _ratio(numerator, denominator) -> float | None:
    return float(numerator / denominator) if denominator else None


def evaluate_slides(model: torch.nn.Module, info: ModelInfo, slides: list[AnnotatedSlide],
                    settings: EvaluateConfig, device: torch.device, batch_size: int = 8,
                    bf16: bool = False, objects: list[dict] | None = None
                    ) -> dict[str, dict[str, float | None]]:
    """Metrics per stain and over all (key ``all``) of whole slides read at the model's mpp, with
    the test-time augmentation ``settings`` ask for (:func:`slide_counts`).

    Under torch.distributed each rank predicts its share of the slides and counts are summed
    (``objects`` gets this rank's rows only).
    """
    stains = sorted({s.stain for s in slides})
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    own = slide_counts(model, info, slides[rank::world], settings, device, batch_size, bf16, objects)
    counts = {s: own.get(s, _no_counts(info.class_names)) for s in stains}
    if world > 1 and counts:
        total = torch.from_numpy(np.stack(list(counts.values()))).to(device)
        dist.all_reduce(total)
        counts = dict(zip(stains, total.cpu().numpy()))
    return metrics_by_stain(counts, info.class_names)


def slide_counts(model: torch.nn.Module, info: ModelInfo, slides: list[AnnotatedSlide],
                 settings: EvaluateConfig, device: torch.device, batch_size: int = 8,
                 bf16: bool = False, objects: list[dict] | None = None) -> dict[str, np.ndarray]:
    """Summed :func:`count_metrics` of whole slides predicted at the model's mpp
    (:func:`predict_image`, with the mirror images and reading scales of ``settings.tta`` and
    ``settings.scales``, each slide at the pixel size of ``settings.mpp_search``:
    :func:`at_searched_mpp`), per stain; each glomerulus's :func:`object_rows` row, with its
    image, case, stain and search factor, is appended to ``objects`` when given."""
    counts: dict[str, np.ndarray] = {}
    was_training = model.training
    model.eval()
    for slide in slides:
        slide, factor = at_searched_mpp(slide, model, info, settings, device, batch_size, bf16)
        tiles = image_tiles(slide, info, tuple(settings.scales))
        height, width = tiles.grid.shape_px
        truth = slide.labels.labels(0, 0, (width, height), info.input_mpp)
        truth_instances = slide.labels.instances(0, 0, (width, height), info.input_mpp,
                                                 glomerular_indices(info.class_names))
        prediction = predict_image(model, info, tiles, device, batch_size, bf16, settings.tta)
        counts[slide.stain] = counts.get(slide.stain, 0) + count_metrics(
            truth, prediction, info.class_names, info.input_mpp, settings, truth_instances)
        if objects is not None:
            where = {"image": str(slide.path), "case": slide.case, "stain": slide.stain,
                     "mpp_factor": factor}
            objects += [where | row for row in object_rows(truth, prediction, info.class_names,
                                                            info.input_mpp, settings, truth_instances)]
    model.train(was_training)
    return counts


def at_searched_mpp(slide: AnnotatedSlide, model: torch.nn.Module, info: ModelInfo,
                    settings: EvaluateConfig, device: str | torch.device, batch_size: int = 8,
                    bf16: bool = False) -> tuple[AnnotatedSlide, float]:
    """``slide`` taken at the pixel size that ``settings.mpp_search`` finds the model surest at
    (:func:`biopsy.mppsearch.most_confident_mpp`), and the factor chosen; as it is, factor 1,
    without a search. ``model`` must be in eval mode."""
    if not searches(settings.mpp_search):
        return slide, 1.0
    choice = most_confident_mpp(slide.slide(), model, info, tuple(settings.mpp_search),
                                device=device, batch_size=batch_size, bf16=bf16)
    return slide.with_mpp_scaled(choice.factor), choice.factor


def metrics_by_stain(counts: dict[str, np.ndarray], class_names: Sequence[str]
                     ) -> dict[str, dict[str, float | None]]:
    """Metrics over all stains (key ``all``) and, where there are several, per stain."""
    total = sum(counts.values(), _no_counts(class_names))
    results = {"all": metrics_from_counts(total, class_names)}
    if len(counts) > 1:
        results.update({s: metrics_from_counts(counts[s], class_names) for s in sorted(counts)})
    return results


def evaluate_checkpoint(config: Config, checkpoint: str | Path, data_root: str | Path | None = None,
                        objects: list[dict] | None = None, glomerulus_threshold: float | None = None
                        ) -> dict[str, dict[str, float | None]]:
    """Metrics of a checkpoint on its validation cases, or on every slide under ``data_root``
    (as ``config.evaluate`` says); a row per glomerulus appended to ``objects`` when given.
    ``glomerulus_threshold`` replaces the checkpoint's (:mod:`biopsy.decision`).

    Its validation cases: those the checkpoint records that the data still holds (a split made
    again over data that has changed since would hold out cases it trained on); the config's
    split where the data holds none of them (a model trained on other data)."""
    device = _default_device()
    model, info = _load(checkpoint, device, glomerulus_threshold)
    slides = find_slides(config.data, info.class_names, config.source, root=data_root)
    if data_root is None:
        slides = validation_slides(slides, config, info, checkpoint)
    if not slides:
        raise ConfigError(f"{config.source}: no case to evaluate {checkpoint} on (data.split "
                          "holds none out); give --data, a folder of cases it was not trained on")
    set_stain_shifts(slides, info.stain_reference)
    bf16 = config.train.bf16(device.type)
    return evaluate_slides(model, info, slides, config.evaluate, device, bf16=bf16, objects=objects)


def validation_slides(slides: list[AnnotatedSlide], config: Config, info: ModelInfo,
                       checkpoint: str | Path) -> list[AnnotatedSlide]:
    """The slides of the checkpoint's recorded validation cases, or of the config's split."""
    split = split_by_case(slides, config.data.split, config.source)[1]
    validated = (info.validation_metrics or {}).get("validation_cases")
    if validated == []:
        log.warning("%s: validated on no case, so it may have trained on every one of these; "
                    "give --data, a folder of cases it was not trained on", checkpoint)
    recorded = set(validated or ())
    present = recorded & {s.case for s in slides}
    if not present:
        return split
    if present != recorded:
        log.warning("%s: evaluated on the %d of the %d cases it was validated on that the data "
                    "still holds (missing: %s)", checkpoint, len(present), len(recorded),
                    ", ".join(sorted(recorded - present)))
    elif recorded != {s.case for s in split}:
        log.warning("%s: evaluated on the %d cases it was validated on; the config's split now "
                    "holds out %d others (the data has changed since)", checkpoint, len(recorded),
                    len({s.case for s in split} - recorded))
    return [s for s in slides if s.case in present]


def evaluate_folds(config: Config, folds: int, objects: list[dict] | None = None,
                   glomerulus_threshold: float | None = None
                   ) -> dict[str, dict[str, float | None]]:
    """Cross-validation metrics: each case judged by the model of the fold that held it out
    (:func:`fold_model`), counts pooled over the folds; a row per glomerulus appended to
    ``objects`` when given. ``glomerulus_threshold`` replaces the checkpoints'.

    Raises
    ------
    ConfigError : fewer than two folds.
    CheckpointError : a fold is not trained, or was trained on another split.
    """
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}")
    counts: dict[str, np.ndarray] = {}
    device = _default_device()
    for fold in range(folds):
        model, info, slides = fold_model(config, fold, folds, device, glomerulus_threshold)
        for stain, count in slide_counts(model, info, slides, config.evaluate, device,
                                         bf16=config.train.bf16(device.type), objects=objects).items():
            counts[stain] = counts.get(stain, 0) + count
    return metrics_by_stain(counts, info.class_names)


def fold_model(config: Config, fold: int, folds: int, device: str | torch.device,
               glomerulus_threshold: float | None = None
               ) -> tuple[torch.nn.Module, ModelInfo, list[AnnotatedSlide]]:
    """Fold ``fold`` of a ``folds``-fold cross-validation trained by ``fit --folds``: the model of
    its ``last.safetensors`` (not the best, which was chosen on the very cases the fold holds out),
    on ``device``, its info (with ``glomerulus_threshold`` in place of its own, when given) and
    the held-out slides, stain-normalised as the model asks.

    Raises
    ------
    CheckpointError : the fold is not trained, or it held out other cases (another number of
        folds or ``data.split.seed``).
    """
    fold_config = with_fold(config, fold, folds)
    checkpoint = Path(fold_config.output_dir) / "last.safetensors"
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: fold {fold} is not trained; run `python -m training "
                              f"fit {config.source} --folds {folds} --fold {fold}`")
    model, info = _load(checkpoint, device, glomerulus_threshold)
    slides = split_by_case(find_slides(config.data, info.class_names, config.source),
                           fold_config.data.split, config.source)[1]
    if (info.validation_metrics or {}).get("validation_cases") != sorted({s.case for s in slides}):
        raise CheckpointError(f"{checkpoint}: trained holding out other cases than fold {fold} of "
                              f"{folds} (another number of folds or data.split.seed?)")
    set_stain_shifts(slides, info.stain_reference)
    return model, info, slides


def _no_counts(class_names: Sequence[str]) -> np.ndarray:
    """Zero counts in :func:`count_metrics`'s layout."""
    return np.zeros(3 * len(class_names) + 9, np.int64)


def _load(checkpoint: str | Path, device: str | torch.device,
          glomerulus_threshold: float | None = None) -> tuple[torch.nn.Module, ModelInfo]:
    model, info = load_checkpoint(checkpoint, device)
    info = with_glomerulus_threshold(info, glomerulus_threshold, checkpoint)
    return model.to(memory_format=torch.channels_last), info


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
