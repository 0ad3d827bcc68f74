"""Slides and toy models for the stitched-inference tests: models whose output is known from their
input, and a slide whose colour stripes encode position, with the check that a class map puts
them where they are."""

import numpy as np
import torch
from torch import nn

from biopsy.infer import segment_slide
from biopsy.model import ModelInfo
from biopsy.pyramid import write_pyramid
from biopsy.slide import open_slide
from biopsy.tissue import TissueMask

STRIPE_PX = 40  # level-0 width of the position-encoding stripes


def write_slide(path, image: np.ndarray, mpp: float):
    write_pyramid(path, [image], image.shape[:2], mpp, style="generic", compression="zlib",
                  min_level_px=64)
    return open_slide(path)


def model_info(num_classes: int, mpp: float, patch_px: int, in_channels: int = 3,
               mean: float = 0.5, std: float = 0.25) -> ModelInfo:
    names = ["background"] + [f"class{i}" for i in range(1, num_classes)]
    return ModelInfo("toy", {}, names, {name: [i, i, i] for i, name in enumerate(names)}, mpp,
                     patch_px, in_channels,
                     {"mean": [mean] * in_channels, "std": [std] * in_channels})


def tissue_mask(mask: np.ndarray, mpp: float, slide) -> TissueMask:
    return TissueMask(mask, mpp, slide.mpp)


def all_tissue(slide, mpp: float = 10.0) -> TissueMask:
    width_um, height_um = (size * mpp0 for size, mpp0 in zip(slide.dimensions, slide.mpp))
    return tissue_mask(np.ones((int(np.ceil(height_um / mpp)), int(np.ceil(width_um / mpp))), bool),
                       mpp, slide)


def random_cnn(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(),
                         nn.Conv2d(8, num_classes, 5, padding=2)).eval()


def constant_model(num_classes: int, winner: int) -> nn.Module:
    model = nn.Conv2d(3, num_classes, 1)
    nn.init.zeros_(model.weight)
    with torch.no_grad():
        model.bias.copy_(torch.arange(num_classes) == winner)
    return model.eval()


def position_model() -> nn.Module:
    """1x1 conv: class ``a + 4 b`` where red = 64 a and green = 128 b (inputs scaled 0..1)."""
    model = nn.Conv2d(3, 8, 1)
    with torch.no_grad():
        model.weight.zero_()
        for k in range(8):
            a, b = k % 4, k // 4
            model.weight[k, 0] = 10 * 2 * a * 255 / 64
            model.weight[k, 1] = 10 * 2 * b * 255 / 128
            model.bias[k] = -10 * (a * a + b * b)
    return model.eval()


def position_image(height: int, width: int) -> np.ndarray:
    """Red encodes the x stripe (4 values), green the y stripe (2 values)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = 64 * ((np.arange(width) // STRIPE_PX) % 4)[None, :]
    image[..., 1] = 128 * ((np.arange(height) // STRIPE_PX) % 2)[:, None]
    return image


def check_positions(position_slide, model_mpp: float, output_mpp: float | None, **options):
    info = model_info(8, mpp=model_mpp, patch_px=64, mean=0.0, std=1.0)
    result = segment_slide(position_slide, position_model(), info, output_mpp=output_mpp,
                           tissue=all_tissue(position_slide), **options)
    output_scale = result.mpp / 0.5  # level-0 px per output px
    height, width = round(1000 / output_scale), round(1280 / output_scale)
    assert result.labels.shape == (height, width)
    # a view at scale s != 1 blends each pixel with its neighbours up to s model pixels away
    scales = options.get("scales", (1.0,))
    blur = 0 if set(scales) == {1.0} else max(scales) * model_mpp / 0.5
    stripe_x, clear_x = stripes(width, 1280, output_scale, model_mpp / 0.5, 4, blur)
    stripe_y, clear_y = stripes(height, 1000, output_scale, model_mpp / 0.5, 2, blur)
    clear = clear_y[:, None] & clear_x[None, :]
    assert clear.mean() > (0.85 if blur == 0 else 0.3)
    expected = stripe_x[None, :] + 4 * stripe_y[:, None]
    np.testing.assert_array_equal(result.labels[clear], expected[clear])


def stripes(n_out: int, size: int, output_scale: float, model_scale: float, period: int,
            blur: float = 0):
    """Stripe index under each output pixel, and whether the model's pixel beneath it, widened
    by ``blur`` level-0 px either side, lies within one stripe (not straddling a border, where
    colours blend, or the slide's edge)."""
    model_pixel = np.floor((np.arange(n_out) + 0.5) * output_scale / model_scale)
    start, end = model_pixel * model_scale - blur, (model_pixel + 1) * model_scale + blur
    first, last = start // STRIPE_PX, np.ceil(end / STRIPE_PX) - 1
    stripe = (model_pixel * model_scale // STRIPE_PX) % period
    return stripe, (first == last) & (start >= 0) & (end <= size)
