"""The segmentation classes of ../shared/SCORING.md: the contract between models and scoring.

A label map stores class *indices*; the list of class names that gives them meaning travels with
the map (checkpoint metadata, label-map metadata). Scoring asks for classes by name.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class SegmentationClass:
    name: str
    colour_rgb: tuple[int, int, int]
    description: str


CLASSES: tuple[SegmentationClass, ...] = (
    SegmentationClass("background", (255, 255, 255), "glass, no tissue"),
    SegmentationClass("tissue", (230, 200, 160), "other cortex: interstitium, vessels"),
    SegmentationClass("tubule", (80, 160, 230), "non-atrophic tubule (epithelium + lumen)"),
    SegmentationClass("atrophic_tubule", (30, 60, 160), "small tubule, thick wrinkled basement membrane"),
    SegmentationClass("fibrosis", (140, 220, 110), "expanded collagenous interstitium, few cells"),
    SegmentationClass("tuft", (250, 150, 200), "glomerular tuft without lesions"),
    SegmentationClass("sclerosis", (150, 40, 150), "solidified acellular matrix obliterating loops"),
    SegmentationClass("cellular_crescent", (240, 60, 40), "cells and fibrin filling Bowman's space"),
    SegmentationClass("fibrous_crescent", (240, 170, 30), "fibrous matrix in Bowman's space"),
    SegmentationClass("hyaline_deposit", (20, 200, 200), "wire loops and hyaline thrombi"),
    SegmentationClass("artery", (200, 30, 90), "arteries and arterioles"),
)

CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {c.name: c.colour_rgb for c in CLASSES}

# A glomerulus instance is a connected region of these classes (SCORING.md).
GLOMERULAR_CLASSES: frozenset[str] = frozenset(
    {"tuft", "sclerosis", "cellular_crescent", "fibrous_crescent", "hyaline_deposit"}
)


def glomerular_indices(class_names) -> list[int]:
    """Indices of the glomerular classes among ``class_names``."""
    return [i for i, name in enumerate(class_names) if name in GLOMERULAR_CLASSES]


def class_index(class_names: tuple[str, ...] | list[str], name: str) -> int | None:
    """Index of ``name`` in a model's class list, or None when the model does not carry it."""
    return list(class_names).index(name) if name in class_names else None
