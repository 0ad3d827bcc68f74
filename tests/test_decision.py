"""The class decision (biopsy.decision): argmax, or glomerulus first."""

import numpy as np
import pytest
import torch

from biopsy.classes import GLOMERULAR_CLASSES
from biopsy.decision import check_glomerulus_threshold, decide_classes
from biopsy.errors import CheckpointError
from biopsy.model import with_glomerulus_threshold
from inference_models import model_info

NAMES = ["background", "tissue", "tuft", "sclerosis", "artery", "cellular_crescent"]


def _probabilities(shape, seed=0) -> torch.Tensor:
    logits = torch.from_numpy(np.random.default_rng(seed).normal(0, 2, shape)).float()
    return logits.softmax(dim=1)


def _pixel_by_pixel(probabilities: np.ndarray, names, threshold: float) -> np.ndarray:
    """The rule written out for one pixel at a time: (N, C, H, W) -> (N, H, W)."""
    glomerular = [i for i, name in enumerate(names) if name in GLOMERULAR_CLASSES]
    other = [i for i in range(len(names)) if i not in glomerular]
    result = np.zeros((probabilities.shape[0],) + probabilities.shape[2:], np.int64)
    for n, row, col in np.ndindex(*result.shape):
        p = probabilities[n, :, row, col]
        pool = glomerular if sum(p[i] for i in glomerular) > threshold * p.sum() else other
        result[n, row, col] = max(pool, key=lambda i: p[i])
    return result


def test_without_a_threshold_each_pixel_takes_its_most_probable_class():
    probabilities = _probabilities((2, len(NAMES), 7, 9))
    assert torch.equal(decide_classes(probabilities, NAMES, dim=1), probabilities.argmax(dim=1))
    tied = torch.tensor([0.1, 0.3, 0.3, 0.1, 0.1, 0.1]).view(6, 1)
    assert decide_classes(tied, NAMES).item() == 1  # the first of equal maxima, as argmax


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_glomerulus_first_follows_the_rule_pixel_by_pixel(threshold):
    probabilities = _probabilities((2, len(NAMES), 7, 9), seed=1)
    expected = _pixel_by_pixel(probabilities.numpy(), NAMES, threshold)
    assert np.array_equal(decide_classes(probabilities, NAMES, threshold, dim=1).numpy(), expected)
    # Weighted sums of probabilities, as the stitcher holds them, decide as the probabilities do.
    weights = torch.from_numpy(np.random.default_rng(2).uniform(0.01, 3, (7, 9))).float()
    for n in range(2):
        sums = probabilities[n] * weights
        assert np.array_equal(decide_classes(sums, NAMES, threshold).numpy(), expected[n])


def test_probability_split_between_glomerular_classes_still_makes_a_glomerulus():
    names = ["tissue", "tuft", "sclerosis"]
    probabilities = torch.tensor([0.4, 0.3, 0.3]).view(3, 1, 1)
    assert decide_classes(probabilities, names).item() == 0  # argmax: tissue
    assert decide_classes(probabilities, names, 0.5).item() == 1  # 0.6 glomerular: tuft first
    assert decide_classes(probabilities, names, 0.7).item() == 0


@pytest.mark.parametrize("threshold, names, message", [
    (0.0, NAMES, r"probability in \(0, 1\)"),
    (1.0, NAMES, r"probability in \(0, 1\)"),
    (0.5, ["tuft", "sclerosis"], "needs glomerular classes .* and others"),
    (0.5, ["background", "tissue"], "needs glomerular classes .* and others"),
])
def test_a_threshold_needs_a_probability_and_classes_to_choose_between(threshold, names, message):
    with pytest.raises(ValueError, match=message):
        check_glomerulus_threshold(threshold, names)


def test_a_model_without_glomerular_classes_takes_no_threshold():
    info = model_info(3, mpp=1.0, patch_px=32)  # background, class1, class2
    with pytest.raises(CheckpointError, match="toy.safetensors: a glomerulus threshold needs"):
        with_glomerulus_threshold(info, 0.7, "toy.safetensors")
    info.class_names = ["tissue", "tuft", "sclerosis"]
    assert with_glomerulus_threshold(info, 0.7, "toy.safetensors").glomerulus_threshold == 0.7
    assert info.glomerulus_threshold is None  # a copy
    assert with_glomerulus_threshold(info, None, "toy.safetensors") is info  # none given
