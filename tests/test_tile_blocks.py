"""Tiles read in blocks against the same tiles read one by one, and put back in row-major order."""

import numpy as np
import pytest
import torch

from biopsy.infer import _row_major_batches
from biopsy.pyramid import write_pyramid
from biopsy.restain import StainShift
from biopsy.slide import open_slide
from biopsy.tiling import TileBlocks, TileDataset, make_grid

SHAPE_PX = (700, 900)  # level 0 at 0.5 µm/px


@pytest.fixture(scope="module", params=[64, 4096], ids=["pyramid", "level-0-only"])
def slide(request, tmp_path_factory):
    """Textured tissue on glass, JPEG-compressed; with a 2x level, or level 0 alone (so that a
    1 µm/px read averages 2 x 2 level-0 pixels)."""
    rng = np.random.default_rng(0)
    image = np.full(SHAPE_PX + (3,), 240, np.uint8)
    image[100:650, 80:800] = rng.integers(40, 230, (550, 720, 3))
    path = tmp_path_factory.mktemp("blocks") / "slide.svs"
    write_pyramid(path, [image], SHAPE_PX, 0.5, style="aperio", min_level_px=request.param)
    return open_slide(path)


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 1.41, 2.0)])
@pytest.mark.parametrize("stain", [None, StainShift(haematoxylin=1.2, eosin=0.8)])
def test_blocks_hold_the_tiles_read_one_by_one(slide, scales, stain):
    grid = make_grid((350, 450), 1.0, 64, 0.5)  # 1 µm/px; every tile, glass and edges included
    tiles = TileDataset(slide, grid, stain, scales)
    blocks = TileBlocks(tiles, rows=3, cols=5)
    assert sorted(np.concatenate(blocks.blocks).tolist()) == list(range(len(tiles)))
    assert blocks.band_of == sorted(blocks.band_of)
    for index in range(len(blocks)):
        indices, views = blocks[index]
        assert views.shape == (len(indices), len(scales), 64, 64, 3)
        for tile, view in zip(indices.tolist(), views):
            assert torch.equal(view, tiles[tile]), (index, tile)


def test_blocks_are_cut_from_one_read_where_that_is_exact(slide, monkeypatch):
    tiles = TileDataset(slide, make_grid((350, 450), 1.0, 64, 0.5), scales=(1.0, 1.41))
    reads = []
    read = slide.read
    monkeypatch.setattr(tiles.slide, "read", lambda *a, **k: reads.append(a[3]) or read(*a, **k))
    indices, _ = TileBlocks(tiles, rows=3, cols=5)[0]
    # scale 1 (a whole number of level pixels per view pixel): one read; 1.41: one per tile
    assert reads.count(1.0) == 1 and reads.count(1.41) == len(indices)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_come_in_row_major_order(slide, workers):
    grid = make_grid((350, 450), 1.0, 64, 0.5)
    tiles = TileDataset(slide, grid)
    expected = torch.stack([tiles[index] for index in range(len(tiles))])
    batches = list(_row_major_batches(TileBlocks(tiles, rows=2, cols=3), 10, workers,
                                      torch.device("cpu")))
    assert [len(batch) for batch in batches[:-1]] == [10] * (len(batches) - 1)
    assert torch.equal(torch.cat(batches), expected)
