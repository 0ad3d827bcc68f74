"""Multi-scale test-time augmentation: each view read centred on its tile and resampled onto it
exactly, positions kept across tiles, coverage of views narrower than the tile, bad scales."""

import numpy as np
import pytest
import torch
from torch import nn

from biopsy.infer import segment_slide
from biopsy.tile_views import _onto_tile, batch_probabilities
from biopsy.pyramid import write_pyramid
from biopsy.slide import open_slide
from biopsy.tiling import TileDataset, make_grid
from inference_models import check_positions, model_info, position_image, random_cnn, write_slide


@pytest.fixture(scope="module")
def position_slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("position") / "position.tif",
                       position_image(1000, 1280), mpp=0.5)


class RampModel(nn.Module):
    """Logits whose class-0 probability is ``(i + 0.5) / n`` at pixel ``i`` of ``n`` along ``axis``
    (-1: columns, -2: rows), whatever the input: the probability says where in the view it is."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x):
        n = x.shape[self.axis]
        ramp = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        ramp = ramp.view(1, 1, 1, n) if self.axis == -1 else ramp.view(1, 1, n, 1)
        ramp = ramp.expand(len(x), 1, *x.shape[-2:])
        return torch.cat([ramp.log(), (1 - ramp).log()], dim=1)


@pytest.mark.parametrize("axis", [-1, -2])
def test_a_wider_views_centre_falls_on_the_tile(axis):
    """The view at scale s is the square of s tiles' side centred on the tile: the tile's pixel i
    (centre i + 0.5 px from its edge) lies at n/2 + (i + 0.5 - n/2) / s in the view's pixels, so
    the view's probabilities resampled onto the tile are the ramp at those positions (exact:
    bilinear interpolation of a linear ramp), and views average where they cover the tile."""
    n, autocast = 32, torch.autocast("cpu", enabled=False)
    batch, centres = torch.zeros(2, 3, n, n), torch.arange(n, dtype=torch.float32) + 0.5
    for scales in [(2.0,), (1.41,), (1.0, 3.0), (0.5, 1.0, 2.0)]:
        probabilities = batch_probabilities(RampModel(axis), [batch] * len(scales), scales,
                                            autocast, n, tta=False)[:, 0]
        ramps = [n / 2 + (centres - n / 2) / scale for scale in scales]
        ramps = [r.view(1, n) if axis == -1 else r.view(n, 1) for r in ramps]
        # a view at 0.5 covers the tile's rows and columns 8 to 23 whole, and no others
        inside = [((centres > n / 2 - n * s / 2) & (centres < n / 2 + n * s / 2)).float()
                  for s in scales]
        covered = [row[:, None] * row[None, :] for row in inside]
        expected = sum(r * c for r, c in zip(ramps, covered)) / sum(covered) / n
        torch.testing.assert_close(probabilities, expected.expand(2, n, n))


@pytest.fixture(scope="module")
def ramp_slide(tmp_path_factory):
    """Red rises with x, green with y: 0.2 grey levels per level-0 pixel of 0.4 µm. One level
    only, and reads at 2.5, 5, 3.5 and 1.8 level-0 pixels per pixel below: reading rounds the
    area mean, which is unbiased unless the mean can fall on a half (2x from an integer pixel, or
    a pyramid level made so), and the test measures biases of a tenth of a grey level."""
    ramp = np.round(np.arange(1280) * 255 / 1279).astype(np.uint8)
    image = np.zeros((1280, 1280, 3), np.uint8)
    image[..., 0], image[..., 1] = ramp[None, :], ramp[:, None]
    path = tmp_path_factory.mktemp("ramp") / "ramp.tif"
    write_pyramid(path, [image], image.shape[:2], 0.4, style="generic", compression="zlib",
                  min_level_px=4096)
    return open_slide(path)


def test_each_view_is_read_centred_on_its_tile(ramp_slide):
    """Views read at other scales (TileDataset at TileGrid.level0_xy) and resampled onto the tile
    as batch_probabilities does give the tile's own ramps back. A view off by d model pixels
    would bias the mean difference by d / 2 grey levels; 0.05 allows a tenth of a pixel."""
    scales = (1.0, 2.0, 1.41, 0.71)
    grid = make_grid((512, 512), 1.0, 64)  # 1 µm/px: 2.5 level-0 px per pixel
    tiles = TileDataset(ramp_slide, grid, scales=scales)
    inside = [i for i, (row, col) in enumerate(grid.origins_px)  # wider views within the slide
              if 32 <= min(row, col) and max(row, col) <= 512 - 64 - 32]
    for scale_index, scale in enumerate(scales[1:], 1):
        differences = []
        covered = _onto_tile(torch.ones(1, 1, 64, 64), scale)[0, 0] > 0.999
        for index in inside:
            views = tiles[index].permute(0, 3, 1, 2).float()  # (scales, C, 64, 64)
            on_tile = _onto_tile(views[scale_index : scale_index + 1, :2], scale)[0]
            differences.append((on_tile - views[0, :2])[:, covered])
        bias = torch.cat(differences, dim=1).mean(dim=1)
        assert bias.abs().max() < 0.05, (scale, bias)


def test_reading_scales_keep_positions_across_tiles(position_slide):
    """Views read at 0.7x to 2x the model's mpp, centred on each tile, put the stripes where they
    are (more blurred: a view's pixel spans up to 2x the model's)."""
    check_positions(position_slide, 1.5, None, workers=0, batch_size=4, scales=(1.0, 1.5))
    check_positions(position_slide, 1.0, None, workers=0, batch_size=4, scales=(2.0,), tta=True)
    check_positions(position_slide, 1.5, None, workers=0, batch_size=4, scales=(0.7, 1.0))


@pytest.mark.parametrize("scales", [(0.5,), (1.0, 0.0), (1.0, float("nan")), (1.0, 5.0)])
def test_reading_scales_that_leave_the_tile_uncovered_are_refused(position_slide, scales):
    model, info = random_cnn(5), model_info(5, mpp=1.0, patch_px=64)
    with pytest.raises(ValueError, match="multiples of the model's mpp from 0.25 to 4, at least one >= 1"):
        segment_slide(position_slide, model, info, workers=0, scales=scales)
