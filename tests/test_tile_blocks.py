"""Tiles read in blocks against the same tiles read one by one, and put back in row-major order."""

import multiprocessing

import numpy as np
import pytest
import torch

from biopsy.infer import _row_major_batches, _start_reading
from biopsy.pyramid import write_pyramid
from biopsy.restain import StainShift
from biopsy.slide import open_slide
from biopsy.tiling import TileBlocks, TileDataset, TileGrid, grid_shape_px, make_grid

SLIDES = {  # level-0 (height, width) at 0.5 µm/px, smallest level side; whether a 1 µm/px read
    # has exactly a whole number of level pixels a pixel, so that blocks are cut from one read
    "pyramid": ((700, 900), 64, True),
    "pyramid-odd-size": ((701, 903), 64, False),  # its 2x level is 2.0014 x 2.0029
    "level-0-only": ((701, 903), 4096, True),  # 2 level-0 pixels a pixel
}


def textured_slide(path, shape_px, mpp, min_level_px):
    rng = np.random.default_rng(0)
    image = np.full(shape_px + (3,), 240, np.uint8)
    image[100:-50, 80:-100] = rng.integers(40, 230, (shape_px[0] - 150, shape_px[1] - 180, 3))
    write_pyramid(path, [image], shape_px, mpp, style="aperio", min_level_px=min_level_px)
    return open_slide(path)


@pytest.fixture(scope="module", params=list(SLIDES))
def slide(request, tmp_path_factory):
    """Textured tissue on glass, JPEG-compressed (SLIDES); ``slide.cut`` says whether blocks
    are cut from one read at 1 µm/px."""
    shape_px, min_level_px, cut = SLIDES[request.param]
    slide = textured_slide(tmp_path_factory.mktemp("blocks") / "slide.svs", shape_px, 0.5,
                           min_level_px)
    slide.cut = cut
    return slide


def grid_of(slide, keep_every: int = 1) -> TileGrid:
    """Every tile at 1 µm/px (glass and edges included), or a random 1 in ``keep_every``."""
    grid = make_grid(grid_shape_px(slide.dimensions, slide.mpp, 1.0), 1.0, 64, 0.5)
    keep = np.random.default_rng(keep_every).random(len(grid)) < 1 / keep_every
    return TileGrid(grid.mpp, grid.shape_px, grid.patch_px, grid.step_px, grid.origins_px[keep])


def assert_blocks_equal_tiles(tiles: TileDataset, rows: int = 3, cols: int = 5):
    blocks = TileBlocks(tiles, rows, cols)
    assert sorted(np.concatenate(blocks.blocks).tolist()) == list(range(len(tiles)))
    assert blocks.band_of == sorted(blocks.band_of)
    for index in range(len(blocks)):
        indices, views = blocks[index]
        assert views.shape == (len(indices), len(tiles.scales), 64, 64, 3)
        for tile, view in zip(indices.tolist(), views):
            assert torch.equal(view, tiles[tile]), (index, tile)


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 1.41, 2.0)])
@pytest.mark.parametrize("stain", [None, StainShift(haematoxylin=1.2, eosin=0.8)])
@pytest.mark.parametrize("keep_every", [1, 3])
def test_blocks_hold_the_tiles_read_one_by_one(slide, scales, stain, keep_every):
    assert_blocks_equal_tiles(TileDataset(slide, grid_of(slide, keep_every), stain, scales))


def test_a_pixel_size_just_off_a_whole_step_is_read_tile_by_tile(tmp_path):
    """1 µm/px tiles of a slide at 1 / (1 - 1/1024) µm/px: the steps are not whole, and tiles
    1024 px apart are almost but not exactly a whole number of level pixels apart."""
    slide = textured_slide(tmp_path / "slide.svs", (200, 1200), 1 / (1 - 1 / 1024), 4096)
    grid = TileGrid(1.0, grid_shape_px(slide.dimensions, slide.mpp, 1.0), 64, 32,
                    np.array([[0, 0], [0, 1024], [64, 512]]))
    tiles = TileDataset(slide, grid)
    assert slide.cut_offsets(grid.level0_xy(slide.mpp), 1.0) is None
    assert_blocks_equal_tiles(tiles, rows=4, cols=64)


def test_cut_offsets_are_whole_view_pixels_apart_or_none(slide):
    xy = np.array([[64.0, 0.0], [128.0, 128.0], [320.0, 64.0]])  # level 0 at 0.5 µm/px
    offsets = slide.cut_offsets(xy, 1.0)
    if not slide.cut:
        assert offsets is None
        return
    np.testing.assert_array_equal(offsets, [[0, 0], [32, 64], [128, 32]])
    assert slide.cut_offsets(np.array([[0.0, 0.0], [2.0, 0.0]]), 1.0) is not None
    assert slide.cut_offsets(np.array([[0.0, 0.0], [1.0, 0.0]]), 1.0) is None  # half a pixel
    assert slide.cut_offsets(xy, 0.7) is None  # 1.4 level-0 pixels a pixel


def test_blocks_are_cut_from_one_read_where_that_is_exact(slide, monkeypatch):
    tiles = TileDataset(slide, grid_of(slide), scales=(1.0, 1.41))
    reads = []
    read = slide.read
    monkeypatch.setattr(tiles.slide, "read", lambda *a, **k: reads.append(a[3]) or read(*a, **k))
    indices, _ = TileBlocks(tiles, rows=3, cols=5)[0]
    # scale 1, where a whole number of level pixels make a pixel: one read; 1.41: one per tile
    assert reads.count(1.0) == (1 if slide.cut else len(indices))
    assert reads.count(1.41) == len(indices)


def test_a_sparse_block_is_read_tile_by_tile(slide, monkeypatch):
    """Two tiles at opposite corners of a block: one read of the block would decode ~10 times
    their pixels."""
    grid = TileGrid(1.0, grid_shape_px(slide.dimensions, slide.mpp, 1.0), 64, 32,
                    np.array([[0, 0], [96, 288]]))
    tiles = TileDataset(slide, grid)
    reads = []
    read = slide.read
    monkeypatch.setattr(tiles.slide, "read", lambda *a, **k: reads.append(a[2]) or read(*a, **k))
    assert_blocks_equal_tiles(tiles, rows=4, cols=16)
    assert reads == [(64, 64)] * 4  # two per tile: the block's read, then the reference's


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("batch_size", [10, 1000])  # 1000: more than a band, more than all
def test_batches_come_in_row_major_order(slide, workers, batch_size):
    tiles = TileDataset(slide, grid_of(slide, 2), scales=(1.0, 2.0))
    expected = torch.stack([tiles[index] for index in range(len(tiles))])
    blocks = TileBlocks(tiles, rows=2, cols=3)
    cpu = torch.device("cpu")
    batches = list(_row_major_batches(blocks, _start_reading(blocks, workers, cpu), batch_size, cpu))
    assert all(len(batch) == batch_size for batch in batches[:-1]) and len(batches[-1])
    assert torch.equal(torch.cat(batches), expected)


def test_no_tiles_no_blocks_no_batches(slide):
    grid = TileGrid(1.0, (10, 10), 64, 32, np.zeros((0, 2), np.int64))
    blocks = TileBlocks(TileDataset(slide, grid))
    cpu = torch.device("cpu")
    assert len(blocks) == 0
    assert list(_row_major_batches(blocks, _start_reading(blocks, 0, cpu), 8, cpu)) == []


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than 2 cores
def test_no_more_workers_than_blocks(slide):
    """A slide of a few blocks forks a worker for each, not the eight asked for."""
    blocks = TileBlocks(TileDataset(slide, grid_of(slide, 2)), rows=4, cols=16)
    before = len(multiprocessing.active_children())
    reading = _start_reading(blocks, 8, torch.device("cpu"))
    assert 1 < len(blocks) < 8 and len(multiprocessing.active_children()) - before == len(blocks)
    assert len(list(reading)) == len(blocks)
