"""Training patches: about a third centred on an annotated object, the rest at random tissue positions.

Patch ``i`` of rank ``r`` is a pure function of ``(seed, r, i)``: its position, slide and
augmentation come from a generator seeded with those three numbers. So the stream is reproducible
whatever the number of workers, differs between ranks, and a resumed run continues it exactly by
starting at the next index. Slides are opened lazily in the worker that reads them.
"""

import math

import albumentations as A
import numpy as np
import torch

from biopsy.errors import ConfigError
from biopsy.geojson import IGNORE_INDEX
from training.cases import AnnotatedSlide
from training.config import IGNORE, ModelConfig, SamplingConfig


class PatchDataset(torch.utils.data.Dataset):
    """``dataset[i]`` is ``(image, labels)``: uint8 (H, W, C) and uint8 (H, W) tensors at the model mpp."""

    def __init__(self, slides: list[AnnotatedSlide], model: ModelConfig, sampling: SamplingConfig,
                 object_classes: list[str], augment: A.Compose, seed: int, rank: int, length: int):
        self.slides = slides
        self.patch_size_px = model.patch_size_px
        self.mpp = model.input_mpp
        self.sampling = sampling
        self.augment = augment
        self.seed, self.rank, self.length = seed, rank, length
        self.objects = _objects_by_class(slides, [model.classes.index(n) for n in object_classes])
        excluded = {IGNORE_INDEX} | ({model.classes.index("background")} if "background" in model.classes else set())
        self.cells = [_labelled_cells(s, sampling.tissue_mpp, excluded) for s in slides]
        self.cell_weights = np.array([len(c) for c in self.cells], float)
        if self.cell_weights.sum() == 0:
            raise ConfigError("no labelled tissue in any training slide: check data.annotations "
                              "and data.unannotated (every pixel ignore?)")
        self.cell_weights /= self.cell_weights.sum()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, index])
        slide_index, x, y = self._centre(rng)
        slide = self.slides[slide_index]
        mpp = self.mpp * self._scale(rng)
        extent = self.patch_size_px * mpp / slide.mpp  # level-0 px
        left = int(round(_clamp(x - extent / 2, slide.dimensions[0] - extent)))
        top = int(round(_clamp(y - extent / 2, slide.dimensions[1] - extent)))
        left, top = slide.whole_pixel_origin(left, top, mpp)  # no resampling between pixels
        size = (self.patch_size_px, self.patch_size_px)
        image = slide.read(left, top, size, mpp)
        labels = slide.labels.labels(left, top, size, mpp)
        self.augment.set_random_seed(int(rng.integers(2**31)))
        out = self.augment(image=image, mask=labels)
        return torch.from_numpy(np.ascontiguousarray(out["image"])), torch.from_numpy(out["mask"])

    def _scale(self, rng: np.random.Generator) -> float:
        """The patch's magnification jitter factor (no random draw without jitter, so that such a
        config's patch stream is as it was before the option existed)."""
        low, high = self.sampling.mpp_scale
        return low if low == high else float(np.exp(rng.uniform(np.log(low), np.log(high))))

    def _centre(self, rng: np.random.Generator) -> tuple[int, float, float]:
        """(slide index, level-0 x, y) of the next patch centre."""
        if self.objects and rng.random() < self.sampling.object_fraction:
            candidates = self.objects[rng.integers(len(self.objects))]
            slide_index, x, y = candidates[rng.integers(len(candidates))]
            slide = self.slides[int(slide_index)]
            jitter = self.sampling.object_jitter * self.patch_size_px * self.mpp / slide.mpp
            return int(slide_index), x + rng.uniform(-jitter, jitter), y + rng.uniform(-jitter, jitter)
        slide_index = int(rng.choice(len(self.slides), p=self.cell_weights))
        cells = self.cells[slide_index]
        cell_px = self.sampling.tissue_mpp / self.slides[slide_index].mpp
        x, y = cells[rng.integers(len(cells))] + rng.uniform(0, cell_px, 2)
        return slide_index, x, y


def _clamp(start: float, last: float) -> float:
    """``start`` kept within [0, last] (the slide); centred when the slide is smaller than the patch."""
    return last / 2 if last < 0 else min(max(start, 0.0), last)


def _objects_by_class(slides: list[AnnotatedSlide], class_indices: list[int]) -> list[np.ndarray]:
    """Per object class (those present): array of (slide index, level-0 x, level-0 y) rows."""
    rows: dict[int, list] = {i: [] for i in class_indices}
    for slide_index, slide in enumerate(slides):
        for obj in slide.labels.objects(class_indices):
            rows[obj.class_index].append((slide_index, obj.x, obj.y))
    return [np.array(r, float) for r in rows.values() if r]


def _labelled_cells(slide: AnnotatedSlide, cell_mpp: float, excluded: set[int]) -> np.ndarray:
    """Level-0 (x, y) top-left corners of the ``cell_mpp`` cells labelled with a non-excluded class."""
    width, height = slide.dimensions
    size = (max(1, math.ceil(width * slide.mpp / cell_mpp)), max(1, math.ceil(height * slide.mpp / cell_mpp)))
    coarse = slide.labels.labels(0, 0, size, cell_mpp)
    rows, cols = np.nonzero(~np.isin(coarse, list(excluded)))
    return np.column_stack([cols, rows]) * (cell_mpp / slide.mpp)


def default_object_classes(classes: list[str], unannotated: str) -> list[str]:
    """Classes worth centring patches on: all but background and the unannotated rest."""
    return [c for c in classes if c not in ("background", unannotated, IGNORE)]
