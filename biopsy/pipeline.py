"""One slide file (or label map) into a scored-slide folder, with full provenance.

The path every command takes from a file to scores (``biopsy score``, ``batch``, ``compare``,
``demo``): open the slide, segment it with the model (:func:`biopsy.infer.segment_slide`), find
its nuclei (:func:`biopsy.nuclei.detect_nuclei`, for endocapillary hypercellularity and
interstitial inflammation; a label map alone has none), score
the class map (:func:`biopsy.scorefolder.score_class_map`) and write the folder
(:func:`biopsy.scorefolder.write_score_folder`). ``summary.json`` records where the numbers come
from: the slide (path, size, modification time, SHA-256, mpp), the model (path, SHA-256, classes,
input mpp), how inference ran (device, options, package versions), the fingerprint of all that
decides the scores beyond the slide's pixels (``recipe_sha256``, :func:`slide_recipe`) and, added
by the folder writer, the resolved scoring config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from biopsy.classes import class_index
from biopsy.errors import CheckpointError, DeviceError, TissueError
from biopsy.infer import check_slide_for_model, default_workers, prepare_model, segment_slide
from biopsy.tile_views import check_scales
from biopsy.labelmap import LabelMap, read_label_map
from biopsy.manifest import ManifestEntry
from biopsy.model import DEFAULT_CHECKPOINT, ModelInfo, load_checkpoint, read_int8_calibration
from biopsy.mppsearch import check_factors, most_confident_mpp, searches
from biopsy.nuclei import DETECTION_MPP, detect_nuclei, why_not_countable
from biopsy.provenance import file_identity, file_sha256, package_versions, recipe_sha256
from biopsy.quantize import quantized_model
from biopsy.scorefolder import score_class_map, write_score_folder
from biopsy.scoring import ScoreConfig
from biopsy.slide import open_slide, require_square_pixels
from biopsy.tissue import TissueMask, detect_tissue

TILE_OVERLAP = 0.5  # segment_slide's default, recorded in the provenance
TRAIN_CONFIG = "configs/train/synthetic-multistain-polish.yaml"  # its header: the three stages
# Packages whose versions can change a scored slide, beyond those the folder writer records.
INFERENCE_PACKAGES = ("openslide-python", "openslide-bin", "tifffile", "imagecodecs")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceOptions:
    """How a slide is segmented: where, how many tiles at a time, whether by an int8 model, whether
    with test-time augmentation by mirror images (``tta``) and reading scales (``scales``)
    (:func:`biopsy.infer.segment_slide`), and at its pixel size times which of the factors
    ``mpp_search`` (None: the slide's own; :mod:`biopsy.mppsearch`)."""

    device: str = "cpu"
    batch_size: int = 16
    workers: int | None = None  # None: biopsy.infer.default_workers for the device
    int8: bool = False
    tta: bool = False
    scales: tuple[float, ...] = (1.0,)
    mpp_search: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.workers is None:
            object.__setattr__(self, "workers", default_workers(self.device))


def resolve_device(device: str | None) -> str:
    """``device`` as given, or ``cuda`` when a GPU is available, else ``cpu``.

    Raises
    ------
    DeviceError : ``device`` is no CPU or CUDA device, or a CUDA device this machine lacks.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {device}: biopsy runs on cpu or cuda")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                          "CUDA GPU(s), numbered from 0")
    return device


def inference_options(device: str | None = None, batch_size: int = 16,
                      workers: int | None = None, int8: bool = False, tta: bool = False,
                      scales: tuple[float, ...] = (1.0,),
                      mpp_search: Sequence[float] | None = None) -> InferenceOptions:
    """Options with the defaults resolved: the device (:func:`resolve_device`; the CPU for int8),
    the tile-reading workers (:func:`biopsy.infer.default_workers`: none on CPU, up to 8 on
    CUDA) and the search factors (factor 1 alone: no search).

    Raises
    ------
    CheckpointError : int8 asked for on another device than the CPU.
    DeviceError : the device is no torch device, or not on this machine.
    ValueError : a reading scale or search factor outside 0.25-4, or no reading scale >= 1.
    """
    check_scales(scales)
    if mpp_search is not None:
        check_factors(tuple(mpp_search))
    mpp_search = tuple(map(float, mpp_search)) if searches(mpp_search) else None
    if int8 and device is not None and not device.startswith("cpu"):
        raise CheckpointError(f"--int8 runs on the CPU, not on {device}; drop --int8 or --device")
    device = "cpu" if int8 and device is None else resolve_device(device)
    return InferenceOptions(device, batch_size, workers, int8, tta, tuple(map(float, scales)),
                            mpp_search)


def checkpoint_path(path: str | Path | None) -> Path:
    """The checkpoint ``path``, or the bundled model when None.

    Raises
    ------
    CheckpointError : the bundled model is not installed; the message says how to train it.
    """
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if path == DEFAULT_CHECKPOINT and not path.is_file():
        raise CheckpointError(
            f"{path}: the bundled model is not installed; give a checkpoint with --model CKPT, or "
            f"train it: `python -m training fit CONFIG` for each of the three stages {TRAIN_CONFIG} "
            f"lists, then `python -m training export ... {path} --half`")
    return path


def load_model(path: str | Path | None, device: str,
               int8: bool = False) -> tuple[nn.Module, ModelInfo, Path]:
    """The model of checkpoint ``path`` (None: the bundled one) on ``device``, ready for inference
    (:func:`biopsy.infer.prepare_model`, once for all the slides it segments), its info and path;
    with ``int8``, quantized from the checkpoint's calibration (:mod:`biopsy.quantize`).

    Raises
    ------
    CheckpointError : the checkpoint is missing, unreadable or not a biopsy checkpoint, or has
        no int8 calibration when ``int8`` asks for one.
    """
    path = checkpoint_path(path)
    model, info = load_checkpoint(path, device)
    if int8:
        model = quantized_model(model, info, read_int8_calibration(path))
    return prepare_model(model, torch.device(device)), info, path


def model_caution(info: ModelInfo, slide_path: str | Path) -> str | None:
    """Why the model's scores of ``slide_path`` mean little, or None. A model whose training
    config has a ``synth`` section (``python -m training synth`` made its training slides, as
    for the bundled model) learnt from synthetic slides only; copies of its checkpoint, an
    int8-calibrated one too, keep that config. A synthetic slide (``biopsy synth`` writes
    truth.json beside it) gets no caution."""
    if info.training_config.get("synth") is None or (Path(slide_path).parent / "truth.json").is_file():
        return None
    return ("the model learnt from synthetic slides only (the bundled one found 6 of 38 glomeruli "
            "on real photomicrographs, detection F1 0.09), so its scores of real biopsies mean "
            "little until it is fine-tuned on annotated slides of yours (README: fine-tuning)")


def warn_of_the_model(info: ModelInfo, slide_path: str | Path) -> str | None:
    """:func:`model_caution` as a warning, where there is one; returns it to be recorded."""
    caution = model_caution(info, slide_path)
    if caution:
        log.warning("%s: %s", slide_path, caution)
    return caution


def score_slide_file(slide_path: str | Path, out_dir: str | Path, model: nn.Module,
                     info: ModelInfo, model_path: str | Path, config: ScoreConfig, *,
                     mpp: float | None = None,
                     options: InferenceOptions = InferenceOptions()) -> dict:
    """Segment a slide with ``model``, score it and write the scored-slide folder ``out_dir``.

    ``mpp`` (µm/px) overrides the slide's metadata. Returns the slide scores (``summary.json``'s
    ``scores``).

    Raises
    ------
    SlideError, MppError : the slide cannot be read, or its pixel size is unknown.
    TissueError : no tissue is found in it.
    CheckpointError : the model takes another number of channels than the slide has.
    """
    with open_slide(slide_path, mpp=mpp) as slide:
        require_square_pixels(slide, "scoring (positions and outlines in level-0 pixels)")
        check_slide_for_model(slide, info)  # before the caution about a model it cannot take
        caution = warn_of_the_model(info, slide_path)
        started = time.perf_counter()
        mpp_given = slide.mpp_given  # before the search sets another
        searched = search_mpp(slide, model, info, options)
        tissue = detect_tissue(slide)  # at the pixel size searched; for the nuclei too
        class_map = segment_slide(slide, model, info, batch_size=options.batch_size,
                                  workers=options.workers, device=options.device,
                                  overlap=TILE_OVERLAP, tissue=tissue, bf16=_bf16(options.device),
                                  tta=options.tta, scales=options.scales)
        seconds = time.perf_counter() - started
        if not class_map.tile_count:  # no tissue tile: the model saw nothing
            raise no_tissue(slide_path)
        nuclei_xy, nuclei = _find_nuclei(slide, tissue)
        level0_mpp = slide.mpp[0]
        source = {"kind": "slide", **file_identity(slide_path), "sha256": slide.sha256,
                  "mpp": list(slide.mpp), "mpp_given": mpp_given,
                  "file_mpp": list(slide.file_mpp) if slide.file_mpp else None}
    scored = score_class_map(class_map.labels, class_map.class_names, class_map.mpp, config,
                             level0_mpp=level0_mpp, nuclei_xy=nuclei_xy)
    label_map = LabelMap(class_map.labels, class_map.mpp, class_map.class_names,
                         class_map.class_colours)
    provenance = {
        "source": source,
        "model": {"path": str(model_path), "sha256": info.sha256,
                  "architecture": info.architecture, "arguments": info.arguments,
                  "class_names": list(info.class_names), "input_mpp": info.input_mpp,
                  "patch_size_px": info.patch_size_px, "code_version": info.code_version,
                  "glomerulus_threshold": info.glomerulus_threshold,
                  "caution": caution},
        "inference": {"device": options.device, "batch_size": options.batch_size,
                      "workers": options.workers, "tile_overlap": TILE_OVERLAP,
                      "bf16": _bf16(options.device),
                      "int8": options.int8, "tta": options.tta,
                      "scales": list(options.scales),
                      **searched,
                      "stain_reference": info.stain_reference,
                      "stain_factors": class_map.stain_factors,
                      "tiles": class_map.tile_count, "seconds": round(seconds, 2),
                      "packages": {"torch": torch.__version__, "cuda": torch.version.cuda}
                      | package_versions(INFERENCE_PACKAGES)},
        "nuclei": nuclei,
        "recipe_sha256": slide_recipe(info, config, options, mpp),
    }
    write_score_folder(out_dir, label_map, scored.glomeruli, scored.cortex_tiles, scored.scores,
                       provenance, instances=scored.instances, config=config,
                       level0_mpp=level0_mpp)
    return scored.scores


def search_mpp(slide, model: nn.Module, info: ModelInfo, options: InferenceOptions,
               bf16: bool | None = None) -> dict:
    """Under ``options.mpp_search``, set ``slide.mpp`` to the pixel size the model is surest at
    (:func:`biopsy.mppsearch.most_confident_mpp`, in bfloat16 where ``bf16`` says, by default
    on CUDA); its record for the provenance."""
    if options.mpp_search is None:
        return {}
    bf16 = _bf16(options.device) if bf16 is None else bf16
    choice = most_confident_mpp(slide, model, info, options.mpp_search, device=options.device,
                                batch_size=options.batch_size, bf16=bf16)
    slide.mpp = choice.mpp
    return {"mpp_search": {"factors": list(options.mpp_search), "factor": choice.factor,
                           "confidence": [choice.confidence[f] for f in options.mpp_search]}}


def _bf16(device: str) -> bool:
    """Whether slides are segmented in bfloat16 on ``device``: on CUDA (recorded, and part of
    the recipe, since it moves a few border pixels)."""
    return torch.device(device).type == "cuda"


def _find_nuclei(slide, tissue: TissueMask) -> tuple:
    """The slide's nuclei centres in its ``tissue`` (None when they cannot be counted) and their
    provenance."""
    reason = why_not_countable(slide)
    if reason is not None:
        return None, {"counted": False, "reason": reason}
    started = time.perf_counter()
    nuclei_xy = detect_nuclei(slide, tissue=tissue)
    return nuclei_xy, {"counted": True, "count": len(nuclei_xy), "mpp": DETECTION_MPP,
                       "method": "haematoxylin (skimage rgb2hed) LoG peaks, biopsy.nuclei",
                       "seconds": round(time.perf_counter() - started, 2)}


def score_label_map_file(labels_path: str | Path, out_dir: str | Path, config: ScoreConfig,
                         level0_mpp: float | None = None) -> dict:
    """Score an existing class map (``.ome.tif`` written by biopsy) into ``out_dir``; its scores.
    ``level0_mpp``: µm/px of the slide the map covers, so that the outlines and positions are in
    that slide's level-0 pixels (None: the one the map records, else the map's own pixels); a
    warning where it differs from the one the map records."""
    label_map = read_label_map(labels_path)
    given_mpp, level0_mpp = level0_mpp, _slide_mpp_of_the_map(labels_path, label_map, level0_mpp)
    background = class_index(label_map.class_names, "background")
    if background is not None and (label_map.labels == background).all():
        raise no_tissue(labels_path)
    scored = score_class_map(label_map.labels, label_map.class_names, label_map.mpp, config,
                             level0_mpp=level0_mpp)
    provenance = {"source": {"kind": "label_map", **file_identity(labels_path),
                             "sha256": file_sha256(labels_path), "mpp": label_map.mpp},
                  "model": None,
                  "nuclei": {"counted": False, "reason": "a label map has no slide pixels"},
                  "recipe_sha256": label_map_recipe(config, given_mpp)}  # as batch's is made
    write_score_folder(out_dir, label_map, scored.glomeruli, scored.cortex_tiles, scored.scores,
                       provenance, instances=scored.instances, config=config,
                       level0_mpp=level0_mpp)
    return scored.scores


def _slide_mpp_of_the_map(labels_path, label_map: LabelMap, given: float | None) -> float | None:
    recorded = label_map.slide_mpp
    if given is None or recorded is None:
        return recorded if given is None else given
    if abs(given / recorded - 1) > 0.01:  # 0.5 for a map made at a searched 0.705: outlines 1.41x off
        log.warning("%s: made from a slide read at %.4g µm/px; --mpp %.4g places its outlines and "
                    "positions %.2fx as far from the slide's corner", labels_path, recorded,
                    given, recorded / given)
    return given


def no_tissue(source: str | Path) -> TissueError:
    """The error for a slide, or label map, in which no tissue is found: nothing to score."""
    return TissueError(f"{source}: no tissue found; check that it is the biopsy's slide")


def slide_recipe(info: ModelInfo, config: ScoreConfig, options: InferenceOptions,
                 mpp: float | None) -> str:
    """Fingerprint (:func:`biopsy.provenance.recipe_sha256`) of what decides a slide's scores
    beyond its pixels: the model's bytes, int8, bf16 (on CUDA), test-time augmentation (mirror
    images, reading scales), the pixel-size search factors, the stain reference, the pixel size
    given in place of the slide's and the scoring config. Batch size, workers and which GPU change
    no score and are left out. Reading scales and search factors count only when other than the
    one scale and none, so that folders scored before they existed still match."""
    scales = {} if options.scales == (1.0,) else {"scales": list(options.scales)}
    search = {} if options.mpp_search is None else {"mpp_search": list(options.mpp_search)}
    return recipe_sha256({"model_sha256": info.sha256, "int8": options.int8,
                          "bf16": _bf16(options.device), "tta": options.tta, **scales, **search,
                          "stain_reference": info.stain_reference, "mpp_given": mpp,
                          "config": config.as_dict()})


def label_map_recipe(config: ScoreConfig, level0_mpp: float | None = None) -> str:
    """Fingerprint of what decides a label map's folder beyond its pixels: the scoring config,
    and the slide pixel size its positions are given in, where one is."""
    return recipe_sha256({"config": config.as_dict()}
                         | ({} if level0_mpp is None else {"level0_mpp": level0_mpp}))


@dataclass(frozen=True, eq=False)
class SlideScorer:
    """Batch score function (:class:`biopsy.batch.Scorer`) for manifests of slides; the
    manifest's ``mpp``, when given, overrides the slide's metadata."""

    model: nn.Module
    info: ModelInfo
    model_path: str | Path
    config: ScoreConfig
    options: InferenceOptions = InferenceOptions()

    def __call__(self, entry: ManifestEntry, out_dir: Path) -> None:
        score_slide_file(entry.slide, out_dir, self.model, self.info, self.model_path, self.config,
                         mpp=entry.mpp, options=self.options)

    def recipe(self, entry: ManifestEntry) -> str:
        return slide_recipe(self.info, self.config, self.options, entry.mpp)


@dataclass(frozen=True)
class LabelMapScorer:
    """Batch score function for manifests of label maps (as ``biopsy score --from-labels``)."""

    config: ScoreConfig

    def __call__(self, entry: ManifestEntry, out_dir: Path) -> None:
        score_label_map_file(entry.slide, out_dir, self.config, level0_mpp=entry.mpp)

    def recipe(self, entry: ManifestEntry) -> str:
        return label_map_recipe(self.config, entry.mpp)
