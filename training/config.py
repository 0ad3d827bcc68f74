"""Typed training configuration, loaded from YAML with every key checked.

An unknown key, a missing required key or a value of the wrong type raises
:class:`biopsy.errors.ConfigError` naming the file and the key. Relative data paths are resolved
against the current directory (run from the repository root).
"""

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from biopsy.decision import check_glomerulus_threshold
from biopsy.errors import ConfigError
from biopsy.infer import emulates_bf16
from biopsy.tile_views import check_scales
from biopsy.model import build_model
from biopsy.mppsearch import check_factors
from biopsy.resources import read_yaml_mapping
from biopsy.slide import SLIDE_MPP_RANGE_UM, is_slide_mpp
from biopsy.synth.profile import load_profile
from training.augment import build_augmentation

IGNORE = "ignore"


@dataclass
class AnnotationConfig:
    """Where a slide's annotations are and how their classes map to the model's.

    ``path``: COCO, one file relative to ``data.root``; GeoJSON and label maps, a template relative to
    the slide's folder where ``{stem}`` is the slide's file name without its suffix
    (``.ome.tif`` as one: ``S19.0001-PAS.ome.tif`` -> ``S19.0001-PAS``).
    ``class_map``: annotation class (COCO category, QuPath classification, label-map class) → model
    class name or ``ignore``; classes not listed keep their name (and must be model classes).
    """

    format: Literal["coco", "geojson", "labelmap"]
    path: str
    class_map: dict[str, str] = field(default_factory=dict)


@dataclass
class SplitConfig:
    """Train/validation split by case id, never by image."""

    validation_fraction: float = 0.2
    seed: int = 0
    validation_cases: list[str] | None = None  # explicit list; overrides the fraction
    # k-fold cross-validation: the cases validated are fold ``fold`` of ``folds`` (in an order
    # shuffled by ``seed``). Set by ``fit --folds N --fold K``, which also trains into output_dir/fold-K.
    folds: int | None = None
    fold: int = 0


@dataclass
class DataConfig:
    root: str
    slides: str  # glob relative to root
    annotations: AnnotationConfig
    case_pattern: str  # regex on the slide path relative to root; group 1 is the case id
    stain_pattern: str | None = None  # regex; group 1 is the stain, else "all"
    slide_mpp: float | None = None  # overrides the slides' own pixel size
    # regex on the slide path relative to root -> its µm/px; the first that matches wins over
    # slide_mpp (e.g. the objective in the file name of camera snapshots)
    slide_mpp_by_path: dict[str, float] = field(default_factory=dict)
    unannotated: str = IGNORE  # class of pixels outside annotations (polygon formats)
    require_annotations: bool = True  # skip slides with no annotation (they are not negatives)
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class ModelConfig:
    classes: list[str]
    architecture: str = "unet"
    arguments: dict = field(default_factory=lambda: {"encoder": "resnet18"})
    encoder_weights: str | None = None  # local torchvision state dict; never downloaded
    init_checkpoint: str | None = None  # biopsy checkpoint (same architecture and classes) to fine-tune
    in_channels: int = 3
    input_mpp: float = 1.0
    patch_size_px: int = 256
    normalisation_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    normalisation_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    stain_normalisation: bool = False  # scale every slide's stain amounts to the training mean (biopsy.stainnorm)
    class_colours: dict[str, list[int]] = field(default_factory=dict)  # default: biopsy.classes
    # Decide glomerulus first: glomerular when the glomerular classes hold more than this share of
    # a pixel's probability (biopsy.decision); null: the most probable class. Stored in checkpoints.
    glomerulus_threshold: float | None = None


@dataclass
class SamplingConfig:
    object_fraction: float = 1 / 3  # patches centred on an object of a uniformly chosen class
    object_jitter: float = 0.25  # of the patch size, so objects are not always dead centre
    tissue_mpp: float = 8.0  # resolution of the masks random positions are drawn from
    object_classes: list[str] | None = None  # default: all but background and data.unannotated
    # Magnification jitter: each patch is read at input_mpp times a factor drawn log-uniformly from
    # [low, high] (> 1 zooms out). For images of mixed or unrecorded magnification.
    mpp_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: Literal["poly", "cosine"] = "poly"
    warmup_steps: int = 0
    grad_clip_norm: float | None = 1.0


@dataclass
class LossConfig:
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    class_weights: dict[str, float] = field(default_factory=dict)  # cross-entropy weights by name


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 8  # per process
    workers: int = 2
    ema_decay: float | None = None  # validate and save an EMA of the weights (decay ramps up)
    compile: bool = False
    deterministic: bool = False  # deterministic CUDA kernels: repeatable runs and resumes, slower
    tensorboard: bool = False  # also log to output_dir/tensorboard (the tensorboard extra)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where native (TrainConfig.bf16)
    log_every: int = 10
    validate_every: int = 500
    save_every: int = 100  # resumable state (state.pt)
    best_metric: str = "all/mean_dice"  # "<stain or all>/<metric>", higher is better

    def bf16(self, device: str) -> bool:
        """Whether to run under bfloat16 autocast on ``device`` ("cuda" or "cpu"); ``auto``: on
        CUDA and on CPUs with bfloat16 instructions (~2x faster there), float32 on other CPUs
        (where bf16 is emulated, ~10x slower)."""
        if self.precision == "auto":
            return not emulates_bf16(device)
        return self.precision == "bf16"


@dataclass
class EvaluateConfig:
    iou_threshold: float = 0.5
    min_glomerulus_area_um2: float = 2000.0  # smaller predicted pieces are not glomeruli
    global_sclerosis_fraction: float = 0.5  # sclerosis share that makes a glomerulus global
    tta: bool = False  # predict as `biopsy ... --tta` does: averaged over mirror images
    scales: list[float] = field(default_factory=lambda: [1.0])  # as `biopsy ... --scales`
    mpp_search: list[float] | None = None  # as `biopsy ... --mpp-search` (biopsy.mppsearch)


@dataclass
class SynthConfig:
    """Synthetic training set: ``python -m training synth CONFIG`` writes it into ``data.root``."""

    slides: int
    first_seed: int = 0
    presets: list[str] = field(default_factory=lambda: ["active-ln", "remission"])  # cycled
    stains: list[str] = field(default_factory=lambda: ["pas"])  # cycled, independently of presets
    profile: dict = field(default_factory=dict)  # lesion-profile values over the preset's


@dataclass
class Config:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    output_dir: str
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: list[dict] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    synth: SynthConfig | None = None
    source: str = field(default="<memory>", compare=False)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        del data["source"]
        return data


def load_config(path: str | Path) -> Config:
    """Read and check a YAML training config."""
    path = Path(path)
    config = config_from_dict(read_yaml_mapping(path, "training config"), str(path))
    config.source = str(path)
    return config


def config_from_dict(data, source: str) -> Config:
    """Check ``data`` (parsed YAML) against :class:`Config`; ``source`` names it in errors."""
    config = _convert(data, Config, "", source)
    _check(config, source)
    return config


def _convert(value, kind, key: str, source: str):
    """``value`` checked and converted to the annotated type ``kind``; ``key`` locates it."""
    where = key or "top level"
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping, got {value!r}")
        hints = typing.get_type_hints(kind)
        fields = {f.name: f for f in dataclasses.fields(kind) if f.name != "source"}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown key '{_join(key, unknown[0])}' "
                              f"(known: {', '.join(sorted(fields))})")
        missing = [n for n, f in fields.items() if n not in value
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{source}: missing required key '{_join(key, missing[0])}'")
        return kind(**{n: _convert(v, hints[n], _join(key, n), source) for n, v in value.items()})
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        return _convert(value, next(o for o in options if o is not type(None)), key, source)
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise ConfigError(f"{source}: {where} must be one of {list(typing.get_args(kind))}, "
                              f"got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where} must be a list, got {value!r}")
        (item,) = typing.get_args(kind)
        return [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping, got {value!r}")
        key_kind, value_kind = typing.get_args(kind)
        return {_convert(k, key_kind, key, source): _convert(v, value_kind, _join(key, str(k)), source)
                for k, v in value.items()}
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is dict and isinstance(value, dict) or kind in (int, str, bool) and type(value) is kind:
        return value
    raise ConfigError(f"{source}: {where} must be {getattr(kind, '__name__', kind)}, got {value!r}")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def with_fold(config: Config, fold: int, folds: int) -> Config:
    """``config`` for fold ``fold`` of a ``folds``-fold cross-validation by case: that split, and
    ``output_dir/fold-<fold>``.

    Raises
    ------
    ConfigError : ``fold`` is not one of ``0 .. folds - 1``, or ``folds`` < 2.
    """
    split = SplitConfig(seed=config.data.split.seed, folds=folds, fold=fold)
    _check_split(split, config.source)
    data = dataclasses.replace(config.data, split=split)
    return dataclasses.replace(config, data=data, output_dir=f"{config.output_dir}/fold-{fold}")


def _check_data(data: DataConfig, source: str) -> None:
    """The data section's regular expressions compile and its pixel sizes are plausible."""
    patterns = {"data.case_pattern": data.case_pattern, "data.stain_pattern": data.stain_pattern}
    patterns.update({f"data.slide_mpp_by_path[{p!r}]": p for p in data.slide_mpp_by_path})
    for key, pattern in patterns.items():
        try:
            re.compile(pattern or "")
        except re.error as error:
            raise ConfigError(f"{source}: {key} is not a regular expression: {error}") from None
    sizes = {"data.slide_mpp": data.slide_mpp}
    sizes.update({f"data.slide_mpp_by_path[{p!r}]": mpp for p, mpp in data.slide_mpp_by_path.items()})
    low, high = SLIDE_MPP_RANGE_UM
    for key, mpp in sizes.items():
        if mpp is not None and not is_slide_mpp(mpp):
            raise ConfigError(f"{source}: {key} must be a slide's pixel size ({low:g} to {high:g} "
                              f"µm/px), got {mpp}")


def _check_split(split: SplitConfig, source: str) -> None:
    if split.folds is not None:
        if split.validation_cases is not None:
            raise ConfigError(f"{source}: data.split.folds and data.split.validation_cases exclude "
                              "each other")
        if split.folds < 2 or not 0 <= split.fold < split.folds:
            raise ConfigError(f"{source}: data.split needs folds >= 2 and 0 <= fold < folds, got "
                              f"fold {split.fold} of {split.folds}")
    elif split.fold != 0:
        raise ConfigError(f"{source}: data.split.fold needs data.split.folds")
    elif not 0 < split.validation_fraction < 1 and split.validation_cases is None:
        raise ConfigError(f"{source}: data.split.validation_fraction must lie in (0, 1)")


def _check(config: Config, source: str) -> None:
    """Checks that span several keys."""
    model = config.model
    if len(set(model.classes)) != len(model.classes) or len(model.classes) < 2:
        raise ConfigError(f"{source}: model.classes must hold at least two distinct names")
    targets = set(config.data.annotations.class_map.values()) | {config.data.unannotated}
    unknown = sorted(targets - set(model.classes) - {IGNORE})
    if unknown:
        raise ConfigError(f"{source}: class '{unknown[0]}' (data.annotations.class_map or "
                          f"data.unannotated) is not in model.classes {model.classes}")
    for name in ("normalisation_mean", "normalisation_std"):
        if len(getattr(model, name)) != model.in_channels:
            raise ConfigError(f"{source}: model.{name} needs {model.in_channels} values "
                              "(one per input channel)")
    if not 0 <= config.sampling.object_fraction <= 1:
        raise ConfigError(f"{source}: sampling.object_fraction must lie in [0, 1]")
    scale = config.sampling.mpp_scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ConfigError(f"{source}: sampling.mpp_scale must be [low, high] with 0 < low <= high, "
                          f"got {scale}")
    if not all(0 < std < math.inf for std in model.normalisation_std):  # 0 made every loss NaN
        raise ConfigError(f"{source}: model.normalisation_std must be positive, got "
                          f"{model.normalisation_std}")
    _check_split(config.data.split, source)
    _check_data(config.data, source)
    if config.synth is not None:
        _check_synth(config.synth, source)
    if config.train.steps < 1 or config.train.batch_size < 1:
        raise ConfigError(f"{source}: train.steps and train.batch_size must be positive")
    unknown = sorted(set(config.sampling.object_classes or []) - set(model.classes))
    if unknown:
        raise ConfigError(f"{source}: sampling.object_classes names '{unknown[0]}', not in model.classes")
    unknown = sorted(set(config.loss.class_weights) - set(model.classes))
    if unknown:
        raise ConfigError(f"{source}: loss.class_weights names '{unknown[0]}', not in model.classes")
    for name, colour in model.class_colours.items():
        if name not in model.classes or len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
            raise ConfigError(f"{source}: model.class_colours.{name} must be a class of "
                              f"model.classes with [red, green, blue] from 0 to 255, got {colour}")
    if model.glomerulus_threshold is not None:
        try:
            check_glomerulus_threshold(model.glomerulus_threshold, model.classes)
        except ValueError as error:
            raise ConfigError(f"{source}: model.glomerulus_threshold: {error}") from None
    try:
        check_scales(tuple(config.evaluate.scales))
    except ValueError as error:
        raise ConfigError(f"{source}: evaluate.scales: {error}") from None
    if config.evaluate.mpp_search is not None:
        try:
            check_factors(tuple(config.evaluate.mpp_search))
        except ValueError as error:
            raise ConfigError(f"{source}: evaluate.mpp_search: {error}") from None
    build_augmentation(config.augment, source)
    _check_ranges(config, source)
    _check_architecture(model, source)


def _check_synth(synth: SynthConfig, source: str) -> None:
    """The synth section makes a profile of each preset and stain (each of these crashed in
    ``python -m training synth``)."""
    if synth.slides < 1 or synth.first_seed < 0 or not synth.presets or not synth.stains:
        raise ConfigError(f"{source}: synth needs slides >= 1, first_seed >= 0 and at least one "
                          "of presets and of stains")
    for key, instead in (("stain", "list it in synth.stains"), ("seed", "give synth.first_seed")):
        if key in synth.profile:  # the seed: TypeError, load_profile got it twice
            raise ConfigError(f"{source}: synth.profile sets the {key}; {instead}")
    for preset in synth.presets:
        for stain in synth.stains:
            try:
                load_profile(None, preset, **{**synth.profile, "stain": stain})
            except ConfigError as error:
                raise ConfigError(f"{source}: synth: {error}") from None


def _check_ranges(config: Config, source: str) -> None:
    """Sizes, rates and counts in their ranges (each of these crashed deep in training)."""
    model, train, optim = config.model, config.train, config.optim
    positive = {"model.input_mpp": model.input_mpp, "model.in_channels": model.in_channels,
                "sampling.tissue_mpp": config.sampling.tissue_mpp,
                "train.log_every": train.log_every, "train.validate_every": train.validate_every,
                "train.save_every": train.save_every}
    non_negative = {"seed": config.seed, "data.split.seed": config.data.split.seed,
                    "train.workers": train.workers, "optim.lr": optim.lr,
                    "optim.weight_decay": optim.weight_decay,
                    "optim.warmup_steps": optim.warmup_steps,
                    "sampling.object_jitter": config.sampling.object_jitter,
                    "evaluate.min_glomerulus_area_um2": config.evaluate.min_glomerulus_area_um2}
    fractions = {"evaluate.iou_threshold": config.evaluate.iou_threshold,
                 "evaluate.global_sclerosis_fraction": config.evaluate.global_sclerosis_fraction}
    if optim.grad_clip_norm is not None:
        non_negative["optim.grad_clip_norm"] = optim.grad_clip_norm  # 0: off, as null
    if optim.optimizer == "sgd":
        positive["optim.momentum"] = optim.momentum  # Nesterov momentum
    if train.ema_decay is not None and not 0 <= train.ema_decay < 1:
        raise ConfigError(f"{source}: train.ema_decay must lie in [0, 1) (0 or null: no average), "
                          f"got {train.ema_decay}")
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{source}: {key} must be positive, got {value}")
    for key, value in non_negative.items():
        if not value >= 0:
            raise ConfigError(f"{source}: {key} must be 0 or more, got {value}")
    for key, value in fractions.items():
        if not 0 < value <= 1:
            raise ConfigError(f"{source}: {key} must lie in (0, 1], got {value}")
    if not 32 <= model.patch_size_px <= 4096:  # 100,000 px asked numpy for 45 GiB a patch
        raise ConfigError(f"{source}: model.patch_size_px must be from 32 (the encoder halves "
                          f"it five times) to 4096, got {model.patch_size_px}")
    if model.input_mpp > 64:
        raise ConfigError(f"{source}: model.input_mpp must be at most 64 µm/px, got "
                          f"{model.input_mpp}")
    stain, _, metric = train.best_metric.partition("/")
    if not stain or not metric:
        raise ConfigError(f"{source}: train.best_metric must be '<stain or all>/<metric>', e.g. "
                          f"'all/glomerulus_dice', got {train.best_metric!r}")


def _check_architecture(model: ModelConfig, source: str) -> None:
    """model.architecture and model.arguments build a model (on the meta device: no memory)."""
    try:
        with torch.device("meta"):
            build_model(model.architecture, len(model.classes), model.in_channels, **model.arguments)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ConfigError(f"{source}: model.architecture / model.arguments: {error}") from None
