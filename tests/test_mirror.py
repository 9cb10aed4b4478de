"""Test-time mirrored views (``flip_views``): the mirror arithmetic on synthetic arrays,
the settings' checks, a stand-in run, and the real model on Banepa buildings."""

from __future__ import annotations

import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from conftest import BANEPA, WEIGHTS
from sam_geo import segment, segment_auto
from sam_geo.errors import ConfigError
from sam_geo.io.prompt_batch import PromptBatch
from sam_geo.io.scenes import open_scene
from sam_geo.model.mirror import Mirror, mirror_axis, mirror_views
from sam_geo.settings import make_settings
from test_runtime import TILING, prompts_inside, write_crop
from test_segment import per_object_iou

GRID = 256  # low-res logits cells a side
VIEWS = mirror_views(4)


def batch(boxes: np.ndarray, points: np.ndarray, masks: list | None = None) -> PromptBatch:
    n = len(boxes)
    labels = np.ones(points.shape[:2], dtype=np.int64)
    return PromptBatch(np.arange(n), boxes.astype(float), points.astype(float), labels,
                       np.array(masks if masks is not None else [None] * n, dtype=object))


def box_logits(boxes: np.ndarray, tile_hw: tuple[int, int], input_hw: tuple[int, int]) -> torch.Tensor:
    """What a perfect model gives: per low-res cell, the signed distance (model px,
    positive inside) from the cell's centre to each box as SAM sees it (half a model
    pixel added); the tile fills ``input_hw`` of a 1024 px model frame (scaled per axis:
    SAM keeps the aspect, SAM 2 stretches). A ramp, so a mirror resampled linearly
    keeps it except where its slope turns."""
    ratio = np.array([input_hw[1] / tile_hw[1], input_hw[0] / tile_hw[0]] * 2)  # x, y, x, y
    centres = (torch.arange(GRID, dtype=torch.float64) + 0.5) * 4.0  # model px
    out = torch.empty((len(boxes), GRID, GRID))
    for k, (x0, y0, x1, y1) in enumerate(boxes * ratio + 0.5):
        across = torch.minimum(centres - x0, x1 - centres)[None, :]
        down = torch.minimum(centres - y0, y1 - centres)[:, None]
        out[k] = torch.minimum(across, down).float()
    return out


def test_four_views_are_the_flip_group_and_two_add_the_up_down_mirror() -> None:
    assert mirror_views(1) == (Mirror(),)
    assert mirror_views(2) == (Mirror(), Mirror(rows=True))
    assert set(VIEWS) == {Mirror(c, r) for c in (False, True) for r in (False, True)}
    with pytest.raises(ValueError, match="1, 2, 4"):
        mirror_views(3)


def test_images_are_mirrored_along_the_right_axes() -> None:
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert Mirror().image(rgb) is rgb
    np.testing.assert_array_equal(Mirror(cols=True).image(rgb), rgb[:, ::-1])
    np.testing.assert_array_equal(Mirror(rows=True).image(rgb), rgb[::-1])
    both = Mirror(cols=True, rows=True).image(rgb)
    np.testing.assert_array_equal(both, rgb[::-1, ::-1])
    assert both.flags.c_contiguous  # torch.from_numpy refuses negative strides


@settings(max_examples=60, deadline=None)
@given(
    side=st.integers(64, 1500), aspect=st.floats(0.3, 1.0),
    x=st.floats(0, 1), y=st.floats(0, 1), w=st.floats(0, 1), h=st.floats(0, 1),
)
def test_mirroring_prompts_twice_gives_them_back(side: int, aspect: float, x: float, y: float,
                                                 w: float, h: float) -> None:
    tile_hw = (max(1, int(side * aspect)), side)
    input_hw = (int(tile_hw[0] * 1024 / side + 0.5), 1024)
    x0, y0 = x * tile_hw[1], y * tile_hw[0]
    boxes = np.array([[x0, y0, x0 + w * (tile_hw[1] - x0), y0 + h * (tile_hw[0] - y0)]])
    points = np.array([[[x0, y0], [boxes[0, 2], boxes[0, 3]]]])
    prompts = batch(boxes, points)
    for view in VIEWS:
        once = view.prompts(prompts, tile_hw, input_hw)
        twice = view.prompts(once, tile_hw, input_hw)
        np.testing.assert_allclose(twice.boxes, prompts.boxes, atol=1e-9)
        np.testing.assert_allclose(twice.points, prompts.points, atol=1e-9)
        assert (once.boxes[:, 2:] >= once.boxes[:, :2]).all()  # still x0 <= x1, y0 <= y1


def test_mask_prompts_are_mirrored_as_geometry() -> None:
    shape = shapely.Polygon([(10, 5), (40, 5), (10, 25)])
    prompts = batch(np.array([[10.0, 5, 40, 25]]), np.zeros((1, 1, 2)), [shapely.to_wkb(shape)])
    mirrored = Mirror(cols=True, rows=True).prompts(prompts, (100, 200), (512, 1024))
    expected = shapely.Polygon([(190, 95), (160, 95), (190, 75)])
    assert shapely.from_wkb(mirrored.masks[0]).equals(expected)
    assert np.isnan(mirrored.areas).all()


def test_mirror_axis_reverses_a_whole_extent_and_keeps_the_padding() -> None:
    values = torch.arange(10.0).reshape(1, 10)
    out = mirror_axis(values, 6.0, dim=-1)
    assert out[0].tolist() == [5, 4, 3, 2, 1, 0, 6, 7, 8, 9]
    assert values[0].tolist() == list(range(10))  # the input is left alone


def test_mirror_axis_interpolates_a_fractional_extent() -> None:
    """A ramp whose value is a cell's centre: mirrored within extent e, cell u holds the
    value at centre e - (u + 0.5), so its value is that position."""
    centres = torch.arange(20.0) + 0.5
    extent = 12.3
    out = mirror_axis(centres[None], extent, dim=-1)[0]
    inner = torch.arange(1, 12)  # cells whose source lies between two cells
    torch.testing.assert_close(out[inner], extent - centres[inner])
    assert out[13:].tolist() == centres[13:].tolist()


@pytest.mark.parametrize(("tile_hw", "stretched"), [((256, 256), False), ((1024, 1024), False), ((300, 1024), False),
                                                     ((301, 1024), False), ((1000, 333), False),
                                                     ((300, 1024), True), ((700, 450), True)])
def test_a_box_decoded_in_every_view_comes_back_where_it_was(tile_hw: tuple[int, int], stretched: bool) -> None:
    """The model frame, the half-pixel prompt shift and the logits grid fit together:
    a perfect model's mask, decoded in a mirrored view and restored, covers the cells
    the plain view's mask covers (all but the cells the box edge cuts). ``stretched``:
    the tile resized to the whole square input, as the SAM 2 backends do."""
    if stretched:
        input_hw, frame = (1024, 1024), (1 / tile_hw[0], 1 / tile_hw[1])
    else:
        input_hw = (int(tile_hw[0] * 1024 / max(tile_hw) + 0.5), int(tile_hw[1] * 1024 / max(tile_hw) + 0.5))
        frame = (input_hw[0] / tile_hw[0] / 1024,) * 2
    boxes = np.array([[30.3, 40.0, 170.0, 101.7], [0.0, 0.0, 60.0, 50.0]])
    prompts = batch(boxes, np.zeros((2, 1, 2)))
    plain = box_logits(boxes, tile_hw, input_hw)
    rows, cols = (math.floor(tile_hw[i] * frame[i] * GRID) for i in (0, 1))  # cells wholly in the tile
    for view in VIEWS[1:]:
        seen = view.prompts(prompts, tile_hw, input_hw)
        decoded = view.restore(box_logits(seen.boxes, tile_hw, input_hw), tile_hw, frame)
        error = (decoded - plain)[:, :rows, :cols].abs()
        assert error.median() < 0.05 and error.quantile(0.9) < 0.5, (view, error.median(), error.quantile(0.9))
        assert ((decoded > 0) == (plain > 0))[:, :rows, :cols].float().mean() > 0.995


def test_flip_views_is_checked_and_refused_where_it_would_do_nothing(tmp_path: Path) -> None:
    assert make_settings(flip_views=4).flip_views == 4
    for bad in (0, 3, 8):
        with pytest.raises(ConfigError, match="flip_views"):
            make_settings(flip_views=bad)
    scene = write_crop(Window(1500, 2000, 256, 256), tmp_path / "scene.tif")
    out = tmp_path / "auto.gpkg"
    with pytest.raises(ConfigError, match="automatic mode has no prompts"):
        segment_auto(scene, output=out, flip_views=2, workers=0, progress=False)
    assert not out.exists()


def test_views_of_a_stand_in_model_give_the_plain_outlines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in answers each box with the box: every view must then restore to the
    same outline, so mirrored runs equal the plain run up to a cell at the edges."""
    from sam_geo.run.standin import ENV_STANDIN_MS

    monkeypatch.setenv(ENV_STANDIN_MS, "0")
    scene = write_crop(Window(1500, 2000, 600, 600), tmp_path / "scene.tif")
    prompts = prompts_inside(scene)
    runs = {views: segment(scene, prompts, workers=0, progress=False, flip_views=views, **TILING)
            for views in (1, 4)}
    plain, mirrored = (runs[v].sort_values("prompt_index") for v in (1, 4))
    assert list(plain.prompt_index) == list(mirrored.prompt_index) and len(plain) > 10
    a, b = plain.geometry.to_numpy(), mirrored.geometry.to_numpy()
    iou = shapely.area(shapely.intersection(a, b)) / shapely.area(shapely.union(a, b))
    assert iou.min() > 0.9 and np.median(iou) > 0.97
    assert runs[4].attrs["summary"]["settings"]["flip_views"] == 4


def test_mirrored_views_raise_banepa_box_iou() -> None:
    """The OSM buildings within 60 m of the mosaic's centre (136), one box each: the
    four views' mean mask matches the outlines better than the plain tile's (measured:
    median IoU 0.868 -> 0.882), and no building is lost."""
    scene = BANEPA / "banepa_utm45n.tif"
    truth = gpd.read_file(BANEPA / "buildings_utm45n.geojson")
    near = truth[truth.intersects(open_scene(scene).footprint.centroid.buffer(60.0))]
    ious = {}
    for views in (1, 4):
        out = segment(scene, near.to_crs(4326), id_column="osm_id", weights=str(WEIGHTS), workers=0,
                      progress=False, flip_views=views)
        assert len(out) == len(near)
        ious[views] = float(np.median(per_object_iou(out, near, "osm_id")))
    assert ious[4] > ious[1] + 0.005, ious
    assert ious[4] > 0.86, ious
