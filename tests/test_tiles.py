"""Window arithmetic of the tile grid: property tests and hand-checked layouts."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from sam_geo.errors import ConfigError
from sam_geo.geo.tiles import PixelBox, TileGrid, validate_tiling


@st.composite
def grids(draw: st.DrawFn) -> TileGrid:
    zoom = draw(st.sampled_from([1, 1, 2, 4]))
    tile = zoom * draw(st.integers(64 // zoom, 600 // zoom))
    overlap = zoom * draw(st.integers(0, (tile // zoom - 1) // 2))
    height = draw(st.integers(1, 3000))
    width = draw(st.integers(1, 3000))
    return TileGrid(height, width, Affine(0.5, 0, 100, 0, -0.5, 900), tile, overlap, zoom)


@settings(max_examples=200, deadline=None)
@given(grids())
def test_cores_partition_the_scene(grid: TileGrid) -> None:
    covered = np.zeros((grid.height, grid.width), dtype=np.uint8)
    for tile in grid:
        w = tile.core_window
        covered[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += 1
    assert (covered == 1).all()


@settings(max_examples=200, deadline=None)
@given(grids())
def test_read_windows_are_full_size_inside_scene_and_hold_their_core(grid: TileGrid) -> None:
    for tile in grid:
        assert tile.read.row_start >= 0 and tile.read.col_start >= 0
        assert tile.read.row_stop <= grid.height and tile.read.col_stop <= grid.width
        read_h, read_w = min(grid.read_size, grid.height), min(grid.read_size, grid.width)
        assert (tile.read.height, tile.read.width) == (read_h, read_w)
        assert tile.shape == (read_h * grid.zoom, read_w * grid.zoom)
        assert tile.read.contains(tile.core)
        assert tile.scale == pytest.approx(1 / grid.zoom)


@settings(max_examples=200, deadline=None)
@given(grids())
def test_halo_is_at_least_overlap_on_interior_sides(grid: TileGrid) -> None:
    rows, cols = grid.shape
    for i in range(rows):
        for j in range(cols):
            top, left, bottom, right = grid.tile(i, j).halo
            assert min(top, left, bottom, right) >= 0
            if i > 0:
                assert top >= grid.halo
            if i < rows - 1:
                assert bottom >= grid.halo
            if j > 0:
                assert left >= grid.halo
            if j < cols - 1:
                assert right >= grid.halo


@settings(max_examples=200, deadline=None)
@given(grids(), st.data())
def test_index_of_finds_the_core_holding_a_pixel(grid: TileGrid, data: st.DataObject) -> None:
    row = data.draw(st.integers(0, grid.height - 1))
    col = data.draw(st.integers(0, grid.width - 1))
    tile = grid.tile(*grid.index_of(row + 0.5, col + 0.5))
    assert tile.core.contains(PixelBox(row, col, row + 1, col + 1))


@settings(max_examples=200, deadline=None)
@given(grids(), st.data())
def test_any_box_up_to_twice_the_overlap_fits_a_grid_tile(grid: TileGrid, data: st.DataObject) -> None:
    side_r = data.draw(st.integers(0, min(2 * grid.halo, grid.height)))
    side_c = data.draw(st.integers(0, min(2 * grid.halo, grid.width)))
    r0 = data.draw(st.integers(0, grid.height - side_r))
    c0 = data.draw(st.integers(0, grid.width - side_c))
    box = PixelBox(r0, c0, r0 + side_r, c0 + side_c)
    tile = grid.tile_for_box(box)
    assert tile is not None
    assert tile.read.contains(box)


@settings(max_examples=100, deadline=None)
@given(grids(), st.data())
def test_window_tile_holds_any_box_and_maps_pixels_consistently(grid: TileGrid, data: st.DataObject) -> None:
    r0 = data.draw(st.floats(0, grid.height - 1))
    c0 = data.draw(st.floats(0, grid.width - 1))
    r1 = data.draw(st.floats(r0, grid.height))
    c1 = data.draw(st.floats(c0, grid.width))
    box = PixelBox(r0, c0, r1, c1)
    tile = grid.window_tile(box)
    assert tile.read.contains(box)
    assert max(tile.shape) <= grid.tile_size
    # the tile's affine agrees with the scene's affine at the read window's far corner
    far_x, far_y = tile.transform @ (tile.shape[1], tile.shape[0])
    exp_x, exp_y = grid.transform @ (tile.read.col_stop, tile.read.row_stop)
    assert far_x == pytest.approx(exp_x) and far_y == pytest.approx(exp_y)


def test_hand_checked_layout_of_a_3131_x_4125_scene() -> None:
    grid = TileGrid(4125, 3131, Affine.identity(), 1024, 128)
    assert grid.shape == (6, 4)
    # read windows along columns: 0, 768, 1536, 2107 (last shifted back inside)
    assert [grid.tile(0, j).read.col_start for j in range(4)] == [0, 768, 1536, 2107]
    # core boundaries sit mid-way in the shared bands: 896, 1664, (2107+2560)//2 = 2333
    assert [grid.tile(0, j).core.col_start for j in range(4)] == [0, 896, 1664, 2333]
    assert grid.tile(0, 3).core.col_stop == 3131


def test_scene_smaller_than_a_tile_is_one_tile() -> None:
    grid = TileGrid(300, 200, Affine.identity(), 1024, 128)
    assert len(grid) == 1
    tile = grid.tile(0, 0)
    assert tile.shape == (300, 200)
    assert tile.core == tile.read == PixelBox(0, 0, 300, 200)


def test_tile_transform_maps_tile_pixels_to_scene_coordinates() -> None:
    scene_transform = Affine(0.25, 0.0, 500_000.0, 0.0, -0.25, 4_000_000.0) @ Affine.rotation(20)
    grid = TileGrid(2000, 2000, scene_transform, 512, 64)
    tile = grid.tile(1, 2)
    for col, row in [(0, 0), (10.5, 3.5), (511, 511)]:
        expected = scene_transform @ (tile.read.col_start + col, tile.read.row_start + row)
        assert tile.transform @ (col, row) == pytest.approx(expected)


def test_zoom_upsamples_read_windows_for_small_objects() -> None:
    grid = TileGrid(1500, 806, Affine(10, 0, 0, 0, -10, 0), 1024, 128, zoom=4)
    tile = grid.tile(0, 0)
    assert (tile.read.height, tile.read.width) == (256, 256)
    assert tile.shape == (1024, 1024)
    assert tile.halo[2] >= 32  # 128 model px = 32 scene px
    assert tile.transform.a == pytest.approx(2.5)  # 10 m scene pixels seen as 2.5 m
    with pytest.raises(ConfigError, match="zoom"):
        TileGrid(100, 100, tile_size=1024, overlap=130, zoom=4)


def test_window_tile_downsamples_a_box_larger_than_a_tile() -> None:
    grid = TileGrid(5000, 5000, Affine.identity(), 1024, 128)
    tile = grid.window_tile(PixelBox(1000, 1000, 3000, 2500), margin=100)
    assert tile.read.height == tile.read.width == 2202
    assert tile.shape == (1024, 1024)
    assert tile.scale == pytest.approx(2202 / 1024)
    inside = tile.to_tile_pixels(PixelBox(1000, 1000, 3000, 2500))
    assert 0 <= inside.row_start and inside.row_stop <= 1024


@pytest.mark.parametrize(
    ("tile_size", "overlap", "message"),
    [
        (512, 256, "twice the overlap"),
        (512, 300, "twice the overlap"),
        (512, -1, "non-negative"),
        (32, 0, "at least 64"),
        (100_000, 0, "larger than 8192"),
        (512.5, 0, "integer"),
    ],
)
def test_bad_tiling_is_refused_with_a_message(tile_size: int, overlap: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_tiling(tile_size, overlap)
    assert issubclass(ConfigError, ValueError)
