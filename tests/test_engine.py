"""Model-step helpers: crop upsampling, mask prompts, mask choice, decode batching."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import torch
import torch.nn.functional as F
from affine import Affine

from sam_geo.engine import _decode_batches, _to_tile_pixels, choose_masks, mask_prompt_logits, upsample_crop
from sam_geo.prompts import PromptBatch
from sam_geo.tiles import TileGrid


def sam_postprocess(low_res: torch.Tensor, input_hw: tuple[int, int], tile_hw: tuple[int, int]) -> torch.Tensor:
    """segment_anything's Sam.postprocess_masks, written out (no model needed)."""
    masks = F.interpolate(low_res[None, None], (1024, 1024), mode="bilinear", align_corners=False)
    masks = masks[..., : input_hw[0], : input_hw[1]]
    return F.interpolate(masks, tile_hw, mode="bilinear", align_corners=False)[0, 0]


@pytest.mark.parametrize("tile_hw", [(1024, 1024), (512, 512), (700, 512)])
def test_crop_upsampling_matches_sam_postprocessing(tile_hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    low_res = torch.randn(256, 256) * 5
    scale = 1024 / max(tile_hw)
    input_hw = (int(tile_hw[0] * scale + 0.5), int(tile_hw[1] * scale + 0.5))
    full = sam_postprocess(low_res, input_hw, tile_hw) > 0
    ratio = input_hw[0] / tile_hw[0] / 1024
    crop = (37, 101, 300, 400)
    ours = upsample_crop(low_res, crop, (ratio, ratio))
    expected = full[37:300, 101:400].numpy()
    if tile_hw == (1024, 1024):
        np.testing.assert_array_equal(ours, expected)
    else:  # SAM resamples twice (to 1024, then to the tile); we sample once
        assert (ours != expected).mean() < 0.02


def test_mask_prompt_logits_rasterize_in_the_model_frame() -> None:
    square = shapely.box(100, 200, 300, 400)  # tile pixels of a 1024 tile
    logits = mask_prompt_logits(np.array([shapely.to_wkb(square), None], dtype=object), (1 / 1024, 1 / 1024))
    assert logits.shape == (2, 1, 256, 256)
    inside = logits[0, 0] > 0
    rows, cols = np.nonzero(inside)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (50, 99, 25, 74)
    assert (logits[1] < 0).all()


def test_choose_masks_by_area_when_a_polygon_is_known() -> None:
    low_res = torch.full((2, 3, 256, 256), -1.0)
    low_res[:, 0, :10, :10] = 1  # 100 low-res px = 1600 tile px at 1024
    low_res[:, 1, :50, :50] = 1  # 40000 tile px
    low_res[:, 2, :100, :100] = 1
    iou = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.95]])
    areas = np.array([40000.0, np.nan])
    chosen = choose_masks(low_res, iou, areas, (1 / 1024, 1 / 1024))
    assert chosen.tolist() == [1, 2]


def test_decode_batches_never_mix_prompt_kinds() -> None:
    n = 7
    boxes = np.full((n, 4), np.nan)
    boxes[:4] = [10, 10, 50, 50]
    points = np.zeros((n, 3, 2))
    labels = np.full((n, 3), -1, dtype=np.int32)
    labels[4:, 0] = 1
    labels[6, 1] = 0
    labels[1, 2] = 1  # a box with one point, stored in the last slot
    masks = np.array([None, None, b"x", None, None, None, None], dtype=object)
    batch = PromptBatch(np.arange(n), boxes, points, labels, masks)
    groups = list(_decode_batches(batch, size=2))
    seen = sorted(int(i) for g in groups for i in g.index)
    assert seen == list(range(n))
    for g in groups:
        assert len(set(g.has_box)) == 1 and len(set(g.has_mask)) == 1
        assert (g.labels >= 0).all()  # padding trimmed: same point count in a batch
        assert len(g) <= 2


def test_prompts_move_into_tile_pixels_with_zoom() -> None:
    grid = TileGrid(2000, 2000, Affine.identity(), 512, 64, zoom=2)
    tile = grid.tile(1, 1)
    poly = shapely.box(300, 300, 340, 360)
    batch = PromptBatch(
        np.array([0]), np.array([[300.0, 300.0, 340.0, 360.0]]), np.array([[[320.0, 330.0]]]),
        np.array([[1]], dtype=np.int32), np.array([shapely.to_wkb(poly)], dtype=object), np.array([2400.0]),
    )
    moved = _to_tile_pixels(batch, tile)
    ox, oy = tile.read.col_start, tile.read.row_start
    np.testing.assert_allclose(moved.boxes[0], [(300 - ox) * 2, (300 - oy) * 2, (340 - ox) * 2, (360 - oy) * 2])
    np.testing.assert_allclose(moved.points[0, 0], [(320 - ox) * 2, (330 - oy) * 2])
    assert shapely.from_wkb(moved.masks[0]).area == pytest.approx(2400 * 4)
    assert moved.areas[0] == pytest.approx(2400 * 4)
