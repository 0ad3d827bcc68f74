"""The augmentation pipeline's own transforms: the HED jitter, and albumentations' HEStain as the
config's pipeline applies it."""

import albumentations as A
import numpy as np
import PIL.Image
import pytest

from biopsy.errors import ConfigError
from biopsy.slide import open_slide
from training.augment import build_augmentation


def test_hed_jitter_scales_each_stain_and_keeps_colours_off_the_stain_plane():
    from skimage.color import hed2rgb

    concentrations = np.random.default_rng(0).uniform(0, [0.06, 0.08, 0.01], (32, 32, 3))
    image = np.rint(hed2rgb(concentrations) * 255).astype(np.uint8)  # stains only, as scikit-image sees them
    jitter = build_augmentation([{"transform": "HEDJitter", "haematoxylin": [0.7, 1.3],
                                  "eosin": [0.9, 0.9], "p": 1}], "test")
    jitter.set_random_seed(1)
    jittered = jitter(image=image)["image"]
    shift = jitter.transforms[0].get_applied_params()["shift"]
    assert 0.7 <= shift.haematoxylin <= 1.3 and shift.eosin == pytest.approx(0.9)
    expected = hed2rgb(concentrations * [shift.haematoxylin, shift.eosin, 1]) * 255
    assert np.abs(jittered - expected).max() <= 2.5  # uint8 rounding of the input, amplified
    # factors of 1 leave PAS magenta and trichrome blue as they are; albumentations' HEStain,
    # which rebuilds from two stain vectors, does not
    colours = np.array([[[200, 60, 170], [70, 90, 190]]], np.uint8)
    identity = [{"transform": "HEDJitter", "haematoxylin": [1, 1], "eosin": [1, 1], "p": 1}]
    assert np.array_equal(build_augmentation(identity, "test")(image=colours)["image"], colours)
    two_stain = [{"transform": "HEStain", "method": "preset", "preset": "ruifrok",
                  "intensity_scale_range": [1, 1], "intensity_shift_range": [0, 0],
                  "augment_background": True, "p": 1}]
    assert np.abs(build_augmentation(two_stain, "test")(image=colours)["image"].astype(int) - colours).max() > 20
    with pytest.raises(ConfigError, match="invalid arguments for HEDJitter"):
        build_augmentation([{"transform": "HEDJitter", "eosin": [1.2, 0.8]}], "test")


@pytest.mark.parametrize("background, ranges", [
    (False, {}), (True, {}),
    (False, {"intensity_scale_range": (0.0, 3.0), "intensity_shift_range": (-1.0, 1.0)})])
def test_he_stain_gives_albumentations_pixels_from_the_same_draws(shared_data, background, ranges):
    """The config's HEStain (ours: one affine map of the optical density) against albumentations'
    own, seeded alike, through a pipeline on real images (glomeruli, and an H&E slide with glass
    for the tissue mask): the same draws, and no value more than one grey level apart (float32
    against float64 before rounding), in at most 1 in 2,000; also at the widest jitter, whose
    remixed densities go far below zero where a channel is 0."""
    photos = sorted((shared_data / "real-glomeruli" / "images").glob("*.jpg"))[::20]
    images = [np.asarray(PIL.Image.open(path).convert("RGB"))[::3, ::3] for path in photos]
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        images.append(slide.read(0, 0, (740, 989), 1.5))  # a third of it tissue
    entry = {"method": "random_preset", "augment_background": background, "p": 1, **ranges}
    ours = build_augmentation([{"transform": "HEStain", **entry}], "test")
    theirs = A.Compose([A.HEStain(**entry)])
    assert type(ours.transforms[0]) is not A.HEStain
    moved = compared = 0
    for seed, image in enumerate(images * 4):
        ours.set_random_seed(seed)
        theirs.set_random_seed(seed)
        expected = theirs(image=image)["image"]
        jittered = ours(image=image)["image"]
        difference = np.abs(jittered.astype(int) - expected)
        assert difference.max() <= 1 and not np.array_equal(jittered, image)
        moved, compared = moved + np.count_nonzero(difference), compared + difference.size
    assert moved <= compared / 2000, moved / compared
