"""The annotated slides of a data config, and their split into training and validation by case."""

import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from biopsy.errors import ConfigError, MppError
from biopsy.geojson import read_annotations
from biopsy.restain import StainShift
from biopsy.slide import Slide, file_stem, open_slide
from biopsy.stainnorm import is_brightfield, normalising_shift, slide_stain_shift, stain_amounts
from training.annotations import LabelMapLabels, PolygonLabels, coco_image_sizes, read_coco
from training.config import IGNORE, DataConfig, SplitConfig

log = logging.getLogger(__name__)


@dataclass
class AnnotatedSlide:
    """A slide, its labels source, case id and stain. Opens the slide lazily, once per process."""

    path: Path
    case: str
    stain: str
    mpp: float  # level-0 µm/px
    dimensions: tuple[int, int]  # level-0 (width, height)
    labels: PolygonLabels | LabelMapLabels
    mpp_override: float | None = None
    fluorescence: bool = False
    stain_shift: StainShift | None = None  # applied to every read (stain normalisation)
    _slide: Slide | None = field(default=None, repr=False)

    def slide(self) -> Slide:
        if self._slide is None:
            self._slide = open_slide(self.path, mpp=self.mpp_override)
        return self._slide

    def read(self, left: float, top: float, size: tuple[int, int], mpp: float) -> np.ndarray:
        """The slide's pixels (:meth:`biopsy.slide.Slide.read`), stain-normalised when set."""
        image = self.slide().read(left, top, size, mpp)
        return image if self.stain_shift is None else self.stain_shift.apply(image)

    def whole_pixel_origin(self, x: float, y: float, mpp: float) -> tuple[float, float]:
        """:meth:`biopsy.slide.Slide.whole_pixel_origin` of the slide."""
        return self.slide().whole_pixel_origin(x, y, mpp)

    def with_mpp_scaled(self, factor: float) -> "AnnotatedSlide":
        """A copy whose pixel size (the slide's and its labels') is ``factor`` times this one's
        (:mod:`biopsy.mppsearch`); its pixels are square, as ``mpp`` takes them."""
        return replace(self, mpp=self.mpp * factor, mpp_override=self.mpp * factor,
                       labels=self.labels.with_mpp_scaled(factor), _slide=None)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None}


def normalise_stains(training: list[AnnotatedSlide], others: list[AnnotatedSlide]) -> list[float]:
    """Bring every slide's stains to the mean amounts of ``training`` (:mod:`biopsy.stainnorm`);
    returns that reference."""
    amounts = [_stain_amounts(slide) for slide in training + others]
    measured = [a for a in amounts[:len(training)] if a is not None]
    if not measured:
        raise ConfigError("model.stain_normalisation: no tissue found on the training slides")
    reference = [float(v) for v in np.mean(measured, axis=0)]
    for slide, slide_amounts in zip(training + others, amounts):
        slide.stain_shift = normalising_shift(slide_amounts, reference, slide.path)
    return reference


def _stain_amounts(slide: AnnotatedSlide) -> tuple[float, float] | None:
    if not is_brightfield(slide.slide()):
        raise ConfigError(f"{slide.path}: model.stain_normalisation needs 8-bit RGB slides")
    return stain_amounts(slide.slide())


def _warn_of_outlined_images_not_found(coco: dict, paths: list[Path], root: Path,
                                       data: DataConfig, source: str) -> None:
    """COCO images with outlines that no slide found takes: deleted, or missed by data.slides
    (they were left out without a word)."""
    taken = {p.relative_to(root).as_posix() for p in paths} | {p.name for p in paths}
    missing = sorted(name for name, outlines in coco.items() if outlines and name not in taken)
    if missing:
        log.warning("%s: %d image(s) outlined in %s are not among the slides that data.slides "
                    "%r finds under %s, and are left out: %s", source, len(missing),
                    data.annotations.path, data.slides, root, ", ".join(missing[:5])
                    + (", ..." if len(missing) > 5 else ""))


def set_stain_shifts(slides: list[AnnotatedSlide], reference: list[float] | None) -> None:
    """Have every slide's reads brought to a model's stain ``reference`` (None: left as they are)."""
    for slide in slides:
        slide.stain_shift = slide_stain_shift(slide.slide(), reference)


def find_slides(data: DataConfig, class_names: list[str], source: str, root: str | Path | None = None
                ) -> list[AnnotatedSlide]:
    """Every annotated slide that ``data`` describes (``root`` replaces ``data.root``)."""
    root = Path(root if root is not None else data.root)
    if data.unannotated != IGNORE and data.unannotated not in class_names:  # eval: ValueError
        raise ConfigError(f"{source}: data.unannotated {data.unannotated!r} is not a class of "
                          f"the model ({', '.join(class_names)})")
    paths = sorted(p for p in root.glob(data.slides) if p.is_file())
    if not paths:
        raise ConfigError(f"{source}: no slides match data.slides {data.slides!r} under {root}")
    coco = read_coco(root / data.annotations.path) if data.annotations.format == "coco" else None
    coco_sizes = coco_image_sizes(root / data.annotations.path) if coco is not None else {}
    found, by_file_name, unannotated = [], {}, []
    for path in paths:
        relative = path.relative_to(root).as_posix()
        if coco is not None and relative not in coco and path.name in coco:  # matched by name alone
            other = by_file_name.setdefault(path.name, path)
            if other != path:
                raise ConfigError(f"{source}: {other} and {path} would both take the outlines of "
                                  f"COCO image {path.name!r}; name the images in "
                                  f"{data.annotations.path} by their paths relative to {root}")
        mpp_override = _mpp_override(data, relative)
        try:
            slide = open_slide(path, mpp=mpp_override)
        except MppError:
            raise ConfigError(f"{source}: {path}: pixel size unknown; give it with data.slide_mpp "
                              "(or data.slide_mpp_by_path, by path)") from None
        mpp, dimensions, fluorescence = slide.mpp[0], slide.dimensions, slide.is_fluorescence
        slide.close()
        stated = coco_sizes.get(relative, coco_sizes.get(path.name))
        if stated is not None and tuple(stated) != tuple(dimensions):
            raise ConfigError(f"{source}: {path} is {dimensions[0]} x {dimensions[1]} px, its COCO "
                              f"image {stated[0]} x {stated[1]}: the outlines were drawn on another "
                              "size of it and would be misplaced; export them from this image")
        labels = _labels(data, root, path, relative, coco, class_names, mpp)
        if labels is None:
            unannotated.append(relative)
            continue
        found.append(AnnotatedSlide(path, _match(data.case_pattern, relative, "data.case_pattern", source),
                                    _stain(data.stain_pattern, relative), mpp, dimensions, labels,
                                    mpp_override, fluorescence))
    if not found:
        raise ConfigError(f"{source}: none of the {len(paths)} slides under {root} has annotations")
    _warn_of_outlined_images_not_found(coco or {}, paths, root, data, source)
    if unannotated:  # info: a partly annotated set leaves them out on purpose
        log.info("%s: %d of the %d slides have no annotations and are left out (e.g. %s; "
                 "data.annotations.path says where they are looked for)", source,
                 len(unannotated), len(paths), unannotated[0])
    return found


def _labels(data: DataConfig, root: Path, path: Path, relative: str, coco, class_names, mpp):
    annotations = data.annotations
    if annotations.format == "labelmap":
        label_path = path.parent / annotations.path.format(stem=file_stem(path))
        if not label_path.is_file():
            return None  # a slide without truth is not a negative
        return LabelMapLabels(label_path, class_names, annotations.class_map, mpp)
    if annotations.format == "coco":
        polygons = coco.get(relative, coco.get(path.name))
        annotation_path = root / annotations.path
    else:
        annotation_path = path.parent / annotations.path.format(stem=file_stem(path))
        polygons = read_annotations(annotation_path) if annotation_path.is_file() else None
    if not polygons and data.require_annotations:
        return None
    return PolygonLabels(polygons or [], class_names, annotations.class_map, data.unannotated, mpp,
                         f"{annotation_path} ({path.name})")


def _mpp_override(data: DataConfig, relative: str) -> float | None:
    """The µm/px ``data`` gives the slide at ``relative``: its first matching slide_mpp_by_path
    pattern, else slide_mpp (None: the slide's own)."""
    for pattern, mpp in data.slide_mpp_by_path.items():
        if re.search(pattern, relative):
            return mpp
    return data.slide_mpp


def _match(pattern: str, text: str, key: str, source: str) -> str:
    match = re.search(pattern, text)
    if match is None or not match.groups():
        raise ConfigError(f"{source}: {key} {pattern!r} does not match {text!r} (or has no group)")
    return match.group(1)


def _stain(pattern: str | None, text: str) -> str:
    match = re.search(pattern, text) if pattern else None
    return match.group(1) if match and match.groups() else "all"


def split_by_case(slides: list[AnnotatedSlide], split: SplitConfig, source: str = "config"
                  ) -> tuple[list[AnnotatedSlide], list[AnnotatedSlide]]:
    """(training, validation) slides; all slides of a case land on the same side. The validation
    cases are those listed, else one fold of a k-fold split, else a fraction of the cases."""
    cases = sorted({s.case for s in slides})
    if split.validation_cases is not None:
        validation = set(split.validation_cases)
        unknown = sorted(validation - set(cases))
        if unknown:
            raise ConfigError(f"{source}: data.split.validation_cases names case(s) {unknown} "
                              f"that no slide has (case ids from data.case_pattern: {cases[:5]}"
                              f"{' ...' if len(cases) > 5 else ''})")
    elif split.folds is not None:
        if split.folds > len(cases):
            raise ConfigError(f"{split.folds} folds need at least as many cases; the slides have "
                              f"{len(cases)}")
        order = np.random.default_rng(split.seed).permutation(len(cases))
        validation = {cases[i] for i in order[split.fold::split.folds]}
    else:
        count = min(len(cases) - 1, max(1, math.ceil(split.validation_fraction * len(cases))))
        order = np.random.default_rng(split.seed).permutation(len(cases))
        validation = {cases[i] for i in order[:count]}
    return ([s for s in slides if s.case not in validation],
            [s for s in slides if s.case in validation])
