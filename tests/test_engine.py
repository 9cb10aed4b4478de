"""Model-step helpers: crop upsampling, mask prompts, mask choice, decode batching."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import torch
import torch.nn.functional as F
from affine import Affine

from sam_geo.errors import ConfigError
from sam_geo.model.masks import choose_masks, mask_prompt_logits, upsample_crop, wants_three_masks
from sam_geo.modes.prompted import to_tile_pixels
from sam_geo.run.host import decode_batches
from sam_geo.io.prompts import PromptBatch
from sam_geo.geo.tiles import TileGrid


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
    groups = list(decode_batches(batch, size=2))
    seen = sorted(int(i) for g in groups for i in g.index)
    assert seen == list(range(n))
    for g in groups:
        assert len(set(g.has_box)) == 1 and len(set(g.has_mask)) == 1
        assert (g.labels >= 0).all()  # padding trimmed: same point count in a batch
        assert len(g) <= 2


def _boxes(areas: list[float], masks: list[bytes | None] | None = None) -> PromptBatch:
    n = len(areas)
    return PromptBatch(np.arange(n), np.tile([10.0, 10.0, 50.0, 50.0], (n, 1)), np.zeros((n, 1, 2)),
                       np.full((n, 1), -1, dtype=np.int32), np.array(masks or [None] * n, dtype=object),
                       np.array(areas, dtype=float))


def test_three_masks_for_outlines_points_and_when_asked() -> None:
    """Auto: box prompts with an outline area get SAM's three candidates; drawn boxes
    (no area) and outdated outlines (mask prompts) get its single mask; points always
    get three; True and False force boxes either way."""
    outlines, drawn = _boxes([900.0, 1200.0]), _boxes([np.nan, np.nan])
    points = PromptBatch(np.arange(1), np.full((1, 4), np.nan), np.ones((1, 1, 2)), np.ones((1, 1), np.int32))
    assert wants_three_masks(outlines, None) and not wants_three_masks(drawn, None)
    assert not wants_three_masks(_boxes([900.0], [b"x"]), None)
    assert wants_three_masks(points, None) and wants_three_masks(points, False)
    assert wants_three_masks(drawn, True) and not wants_three_masks(outlines, False)


def test_decode_batches_keep_outlines_apart_from_drawn_boxes() -> None:
    """Prompts with and without an outline area never share a decoder call (one asks
    for three masks, the other for one)."""
    batch = _boxes([900.0, np.nan, 1200.0, np.nan, np.nan])
    groups = list(decode_batches(batch, size=4))
    assert sorted(int(i) for g in groups for i in g.index) == list(range(5))
    for g in groups:
        assert len(set(np.isnan(g.areas))) == 1
    assert sorted(len(g) for g in groups) == [2, 3]


def test_prompts_move_into_tile_pixels_with_zoom() -> None:
    grid = TileGrid(2000, 2000, Affine.identity(), 512, 64, zoom=2)
    tile = grid.tile(1, 1)
    poly = shapely.box(300, 300, 340, 360)
    batch = PromptBatch(
        np.array([0]), np.array([[300.0, 300.0, 340.0, 360.0]]), np.array([[[320.0, 330.0]]]),
        np.array([[1]], dtype=np.int32), np.array([shapely.to_wkb(poly)], dtype=object), np.array([2400.0]),
    )
    moved = to_tile_pixels(batch, tile)
    ox, oy = tile.read.col_start, tile.read.row_start
    np.testing.assert_allclose(moved.boxes[0], [(300 - ox) * 2, (300 - oy) * 2, (340 - ox) * 2, (360 - oy) * 2])
    np.testing.assert_allclose(moved.points[0, 0], [(320 - ox) * 2, (330 - oy) * 2])
    assert shapely.from_wkb(moved.masks[0]).area == pytest.approx(2400 * 4)
    assert moved.areas[0] == pytest.approx(2400 * 4)


# --- encoder batching and autocast -------------------------------------------------------


def test_encode_batcher_gathers_concurrent_tiles_and_hands_back_each_result() -> None:
    import threading

    from sam_geo.run.host import EncodeBatcher

    calls: list[list[int]] = []

    def encode_many(rgbs: list[np.ndarray]) -> list[int]:
        calls.append([int(r[0, 0, 0]) for r in rgbs])
        return [int(r[0, 0, 0]) * 10 for r in rgbs]

    batcher = EncodeBatcher(encode_many, max_batch=3, max_wait_s=0.5)
    results: dict[int, int] = {}
    start_together = threading.Barrier(5)

    def caller(k: int) -> None:
        start_together.wait()
        results[k] = batcher.encode(np.full((2, 2, 3), k))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert results == {k: k * 10 for k in range(5)}  # every caller gets its own tile's result
    assert sum(len(c) for c in calls) == 5 and sum(batcher.batch_sizes) == 5  # each tile encoded once
    # Batches never exceed max_batch, and callers arriving together share one (how the
    # five split depends on thread timing, so not the exact sizes).
    assert max(batcher.batch_sizes) <= 3 and max(batcher.batch_sizes) >= 2


def test_encode_batcher_hands_an_exception_to_every_caller_of_the_batch() -> None:
    from sam_geo.run.host import EncodeBatcher

    def broken(rgbs: list[np.ndarray]) -> list[int]:
        raise RuntimeError("CUDA out of memory")

    batcher = EncodeBatcher(broken, max_batch=2, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="out of memory"):
        batcher.encode(np.zeros((2, 2, 3)))


@pytest.fixture(scope="module")
def mobile_sam_segmenters():
    """MobileSAM (real weights) in fp32, and in bf16 autocast with batched encoding."""
    from conftest import WEIGHTS
    from sam_geo.run.host import HostConfig, ModelHost

    fp32 = ModelHost(HostConfig("mobile_sam", str(WEIGHTS), device="cpu", precision="fp32"))
    bf16 = ModelHost(HostConfig("mobile_sam", str(WEIGHTS), device="cpu", precision="bf16", encode_batch=2))
    return fp32, bf16


def _scene_tile(seed: int) -> np.ndarray:
    """A 256 px tile: a bright square on a noisy background."""
    rgb = np.random.default_rng(seed).normal(100, 20, (256, 256, 3)).clip(0, 255).astype(np.uint8)
    rgb[64:160, 80:200] = (230, 60, 40)
    return rgb


def test_batched_encoding_equals_one_tile_at_a_time(mobile_sam_segmenters) -> None:
    fp32, _ = mobile_sam_segmenters
    tiles = [_scene_tile(0), _scene_tile(1)[:200]]  # different shapes: each padded alone
    together = fp32.backend.encode_many(tiles)
    for rgb, (embedding, input_hw) in zip(tiles, together):
        alone, alone_hw = fp32.backend.encode(rgb)
        assert input_hw == alone_hw and embedding.shape == alone.shape == (1, 256, 64, 64)
        torch.testing.assert_close(embedding, alone, atol=1e-3, rtol=1e-3)


def test_bf16_autocast_gives_the_fp32_mask(mobile_sam_segmenters) -> None:
    """bf16 (on CPU here; the CUDA path is the same autocast) changes the mask by little."""
    fp32, bf16 = mobile_sam_segmenters
    rgb = _scene_tile(2)
    box = PromptBatch(np.arange(1), np.array([[76.0, 60.0, 204.0, 164.0]]), np.zeros((1, 0, 2)),
                      np.zeros((1, 0), np.int32))
    masks = []
    for segmenter in (fp32, bf16):
        embedding, input_hw = segmenter.encode(rgb)
        logits, scores = segmenter.decode(embedding, input_hw, rgb.shape[:2], box)
        assert logits.dtype == torch.float32 and 0.5 < scores[0] <= 1.2
        assert input_hw == (1024, 1024)  # the 256 px tile fills the model frame
        full = F.interpolate(logits[:, None], (256, 256), mode="bilinear", align_corners=False)[0, 0]
        masks.append((full > 0).numpy())
    truth = np.zeros((256, 256), bool)
    truth[64:160, 80:200] = True
    iou = lambda a, b: (a & b).sum() / (a | b).sum()  # noqa: E731
    assert iou(masks[0], truth) > 0.9 and iou(masks[1], masks[0]) > 0.95
    assert bf16.autocast_dtype == torch.bfloat16 and bf16._batcher is not None and fp32._batcher is None



def _decoder_inputs(model, kind: str, n: int, seed: int) -> dict:
    """Prompt embeddings for ``n`` prompts of one kind: single points, three points with
    negatives, boxes, boxes with a point, or boxes with a low-res mask."""
    rng = np.random.default_rng(seed)
    k = 3 if kind == "points3" else 1
    points = torch.as_tensor(rng.uniform(0, 1024, (n, k, 2)), dtype=torch.float32)
    labels = torch.as_tensor(rng.integers(0, 2, (n, k)) if k > 1 else np.ones((n, 1)), dtype=torch.int64)
    boxes = torch.as_tensor(np.sort(rng.uniform(0, 1024, (n, 2, 2)), axis=1).reshape(n, 4), dtype=torch.float32)
    masks = torch.as_tensor(rng.normal(0, 1, (n, 1, 256, 256)), dtype=torch.float32) if kind == "mask" else None
    uses_points = kind in ("points", "points3", "box+point")
    sparse, dense = model.prompt_encoder(
        points=(points, labels) if uses_points else None,
        boxes=boxes if kind in ("boxes", "box+point", "mask") else None,
        masks=masks,
    )
    return {"image_pe": model.prompt_encoder.get_dense_pe(), "sparse_prompt_embeddings": sparse,
            "dense_prompt_embeddings": dense}


@pytest.mark.parametrize("kind", ["points", "points3", "boxes", "box+point", "mask"])
@pytest.mark.parametrize("n", [1, 5])
def test_cpu_mask_decoder_gives_the_official_decoder_outputs(mobile_sam_segmenters, kind: str, n: int) -> None:
    """The factorized fp32 decoder computes what segment-anything's MaskDecoder does
    (real MobileSAM weights, a real tile's embedding); the bf16 one gives the same masks
    up to bf16 rounding."""
    from sam_geo.model.sam_backend import cpu_mask_decoder

    fp32, _ = mobile_sam_segmenters
    model = fp32.model
    embedding, _ = fp32.encode(_scene_tile(4))
    fast, bf16_decoder = cpu_mask_decoder(model.mask_decoder), cpu_mask_decoder(model.mask_decoder, torch.bfloat16)
    with torch.inference_mode():
        args = {"image_embeddings": embedding, **_decoder_inputs(model, kind, n, seed=n), "multimask_output": True}
        official = model.mask_decoder(**args)
        ours = fast(**args)
        single = fast(**{**args, "multimask_output": False})
        official_single = model.mask_decoder(**{**args, "multimask_output": False})
        whole_grid = torch.tensor([[0, 0, 256, 256]] * n)  # windows given: the low-rank path
        windowed = fast(**args, logits_windows=whole_grid)
        windowed_single = fast(**{**args, "multimask_output": False}, logits_windows=whole_grid)
        bf16_args = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        bf16 = bf16_decoder(**bf16_args)
        bf16_windowed = bf16_decoder(**bf16_args, logits_windows=whole_grid)  # bf16: the factorized path
    assert ours[0].shape == official[0].shape == (n, 3, 256, 256) and single[0].shape == (n, 1, 256, 256)
    torch.testing.assert_close(ours[0], official[0], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(ours[1], official[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(single[0], official_single[0], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(windowed[0], official[0], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(windowed[1], official[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(windowed_single[0], official_single[0], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(windowed_single[1], official_single[1], atol=1e-4, rtol=1e-4)
    for low_precision in (bf16, bf16_windowed):
        a, b = official[0] > 0, low_precision[0].float() > 0
        agreement = (a & b).flatten(2).sum(-1) / (a | b).flatten(2).sum(-1).clamp(min=1)
        assert agreement.median() > 0.97 and (low_precision[1].float() - official[1]).abs().max() < 0.1


def test_box_prompts_reach_the_fast_decoder_paths_with_the_dense_prompt_still_shared(
    mobile_sam_segmenters, monkeypatch
) -> None:
    """Through the engine (``backend.decode``), box prompts take the low-rank path in fp32
    and the factorized path in bf16 with SAM's "no mask" embedding still expanded over
    the prompts (zero batch stride): a dtype cast of the expanded view would copy it per
    prompt, and in fp32 would hide from the low-rank path that it is shared. The masks
    of both precisions agree."""
    prompts = PromptBatch(np.arange(3), np.array([[20.0, 30, 90, 120], [64, 80, 160, 200], [0, 0, 40, 40]]),
                          np.zeros((3, 0, 2)), np.zeros((3, 0), np.int32))
    masks = []
    for segmenter, path in zip(mobile_sam_segmenters, ("_predict_low_rank", "_predict")):
        decoder = segmenter.backend._cpu_decoder
        calls = []
        original = getattr(decoder, path)

        def spy(image, pe, sparse, dense, *rest, original=original, calls=calls):
            calls.append((sparse.shape[0], dense.shape[0] == 1 or dense.stride(0) == 0))
            return original(image, pe, sparse, dense, *rest)

        monkeypatch.setattr(decoder, path, spy)
        embedding, input_hw = segmenter.encode(_scene_tile(9))
        with segmenter.model_call():
            logits, _ = segmenter.backend.decode(embedding, input_hw, (256, 256), prompts)
        assert calls == [(3, True)]
        masks.append(logits > 0)
    a, b = masks
    assert ((a & b).sum() / (a | b).sum()) > 0.95


def test_cpu_mask_decoder_recomputes_its_cache_for_a_new_tile(mobile_sam_segmenters) -> None:
    """The first layer's image projections (and the low-rank path's tile products) are
    cached per image embedding: a second tile (or the same tile with a mask prompt) must
    not reuse the first tile's."""
    from sam_geo.model.sam_backend import cpu_mask_decoder

    fp32, _ = mobile_sam_segmenters
    model = fp32.model
    fast = cpu_mask_decoder(model.mask_decoder)
    with torch.inference_mode():
        for tile, kind in [(4, "boxes"), (5, "boxes"), (5, "points"), (4, "boxes")]:
            embedding, _ = fp32.encode(_scene_tile(tile))
            args = {"image_embeddings": embedding, **_decoder_inputs(model, kind, 3, seed=tile),
                    "multimask_output": True}
            official = model.mask_decoder(**args)[0]
            torch.testing.assert_close(fast(**args)[0], official, atol=2e-3, rtol=1e-4)
            windowed = fast(**args, logits_windows=torch.tensor([[0, 0, 256, 256]] * 3))
            torch.testing.assert_close(windowed[0], official, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("tile_px", [256, 700])
def test_box_masks_are_the_official_ones_inside_their_kept_crop(mobile_sam_segmenters, tile_px: int) -> None:
    """The CPU decoder computes box-prompt logits only in the window of the logits grid
    that each prompt's kept crop reads: the thresholded crops equal those from the
    official decoder's full grid, for boxes of many sizes, at tile edges included.
    (700 px: the tile is resized to the model's frame and padded along no axis but one.)"""
    from sam_geo.model.decoder import OUTSIDE_WINDOW_LOGIT
    from sam_geo.model.masks import crop_for_prompt, logits_windows, upsample_crop

    fp32, _ = mobile_sam_segmenters
    backend = fp32.backend
    rgb = np.random.default_rng(7).normal(100, 20, (tile_px, tile_px - 40, 3)).clip(0, 255).astype(np.uint8)
    rgb[30:120, 20:150] = (230, 60, 40)
    rng = np.random.default_rng(8)
    corners = rng.uniform(-20, tile_px, (12, 2))
    sizes = rng.uniform(4, tile_px / 2, (12, 2))
    boxes = np.clip(np.concatenate([corners, corners + sizes], axis=1), 0, [tile_px - 40, tile_px] * 2)
    boxes[0] = [0, 0, 10, 10]  # a corner box
    prompts = PromptBatch(np.arange(12), boxes, np.zeros((12, 0, 2)), np.zeros((12, 0), np.int32))
    embedding, input_hw = backend.encode(rgb)
    frame = backend.logits_frame(rgb.shape[:2], input_hw)
    with torch.inference_mode():
        ours, ours_iou = backend.decode(embedding, input_hw, rgb.shape[:2], prompts)
        fast = backend._cpu_decoder
        backend._cpu_decoder = None
        try:
            official, official_iou = backend.decode(embedding, input_hw, rgb.shape[:2], prompts)
        finally:
            backend._cpu_decoder = fast
    np.testing.assert_allclose(ours_iou, official_iou, atol=1e-4)
    assert (ours == OUTSIDE_WINDOW_LOGIT).any()  # the windows did leave cells out
    windows = logits_windows(prompts, rgb.shape[:2], frame)
    for k in range(12):
        row0, col0, row1, col1 = windows[k]
        torch.testing.assert_close(ours[k, row0:row1, col0:col1], official[k, row0:row1, col0:col1],
                                   atol=2e-3, rtol=1e-4)
        crop = crop_for_prompt(prompts, k, rgb.shape[:2])
        a, b = upsample_crop(ours[k], crop, frame), upsample_crop(official[k], crop, frame)
        assert (a != b).mean() < 1e-3 and a.any() == b.any()


def test_factorized_decoder_matches_a_random_sam_decoder() -> None:
    """The algebra holds for any weights (SAM ViT-B/L/H share this decoder): a randomly
    initialised MaskDecoder with larger weights than a trained one, where a dropped bias
    or a wrong head split would show."""
    from sam_geo.model.decoder import FactorizedMaskDecoder

    decoder = _random_decoder(seed=3, inflate=0.05)
    image, pe = torch.randn(1, 256, 64, 64), torch.randn(1, 256, 64, 64)
    sparse = torch.randn(4, 3, 256)
    dense = torch.randn(1, 256, 1, 1).expand(4, -1, 64, 64)
    with torch.inference_mode():
        official = decoder(image, pe, sparse, dense, True)
        ours = FactorizedMaskDecoder(decoder)(image, pe, sparse, dense, True)
    torch.testing.assert_close(ours[0], official[0], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ours[1], official[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("sparse_tokens", [1, 2, 3])
def test_low_rank_decoder_matches_a_random_sam_decoder_inside_its_windows(multimask: bool, sparse_tokens: int) -> None:
    """With logits windows the decoder keeps each prompt's image tokens in low-rank form
    (sam_geo.model.lowrank): same logits inside the windows as the official decoder, and
    OUTSIDE_WINDOW_LOGIT outside, for larger-than-trained random weights, windows on the
    grid's corners, an empty window and a mask prompt (dense differing per prompt, which
    goes the factorized way)."""
    from sam_geo.model.decoder import OUTSIDE_WINDOW_LOGIT, FactorizedMaskDecoder

    decoder = _random_decoder(seed=11 + sparse_tokens, inflate=0.05)
    torch.manual_seed(11 + sparse_tokens)
    image, pe = torch.randn(1, 256, 64, 64), torch.randn(1, 256, 64, 64)
    sparse = torch.randn(5, sparse_tokens, 256)
    windows = torch.tensor([[0, 0, 30, 22], [230, 241, 256, 256], [100, 90, 140, 150], [10, 60, 170, 220],
                            [60, 60, 40, 40]])
    ours_decoder = FactorizedMaskDecoder(decoder)
    with torch.inference_mode():
        for dense in (torch.randn(1, 256, 1, 1).expand(5, -1, 64, 64), torch.randn(5, 256, 64, 64)):
            official = decoder(image, pe, sparse, dense, multimask)
            ours = ours_decoder(image, pe, sparse, dense, multimask, windows)
            assert ours[0].shape == official[0].shape
            torch.testing.assert_close(ours[1], official[1], atol=1e-4, rtol=1e-4)
            for k, (r0, c0, r1, c1) in enumerate(windows.tolist()):
                inside = torch.zeros(256, 256, dtype=torch.bool)
                inside[r0 // 4 * 4 : -(-r1 // 4) * 4, c0 // 4 * 4 : -(-c1 // 4) * 4] = True
                torch.testing.assert_close(ours[0][k][:, inside], official[0][k][:, inside], atol=1e-3, rtol=1e-4)
                assert bool((ours[0][k][:, ~inside] == OUTSIDE_WINDOW_LOGIT).all())
            assert not inside.any()  # the last window is empty


def test_low_rank_tokens_equal_the_materialised_tokens_through_attention_and_layer_norm() -> None:
    """LowRankTokens, step by step against the same steps on materialised (b, L, C)
    tokens: an image-to-token update, a LayerNorm, another update and LayerNorm; then
    attention scores and weighted sums through a projection, and the tokens themselves."""
    from sam_geo.model.lowrank import LowRankTokens, TileProducts

    torch.manual_seed(2)
    b, length, channels, heads, n = 3, 50, 32, 4, 5
    src, pe = torch.randn(length, channels) * 2 + 0.5, torch.randn(length, channels)
    tokens = LowRankTokens.of_tile(TileProducts(src, pe), b, capacity=2 * (heads * n + 2))
    explicit = src.expand(b, -1, -1)
    for step in range(2):
        out_proj, norm = torch.nn.Linear(heads * 4, channels), torch.nn.LayerNorm(channels)
        with torch.no_grad():
            norm.weight.normal_(1, 0.3)
            norm.bias.normal_(0, 0.3)
        values = torch.randn(b, heads, n, 4)
        weights = torch.randn(b, heads, n, length).softmax(dim=2)
        with torch.inference_mode():
            tokens.plus_head_values(values, out_proj, weights.reshape(b, heads * n, length), f"o{step}")
            tokens.layer_norm(norm, f"n{step}")
            rows = torch.einsum("bhnd,chd->bhnc", values, out_proj.weight.reshape(channels, heads, 4))
            rows = rows + out_proj.bias / heads
            explicit = norm(explicit + torch.einsum("bhnl,bhnc->blc", weights, rows))
    linear = torch.nn.Linear(channels, heads * 4)
    vectors = torch.randn(b, heads, n, 4)
    attention = torch.randn(b, heads, n, length).softmax(dim=3)
    with torch.inference_mode():
        projected = linear(explicit + pe).reshape(b, length, heads, 4)
        expected_scores = torch.einsum("blhd,bhnd->bhnl", projected, vectors)
        values_projected = linear(explicit).reshape(b, length, heads, 4)
        expected_sums = torch.einsum("bhnl,blhd->bhnd", attention, values_projected)
        torch.testing.assert_close(tokens.scores(linear, vectors, "k"), expected_scores, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tokens.weighted_sum(linear, attention, "v"), expected_sums, atol=1e-4, rtol=1e-4)
        for prompt in range(b):
            index = torch.tensor([0, 7, length - 1])
            torch.testing.assert_close(tokens.at(prompt, index), explicit[prompt, index], atol=1e-4, rtol=1e-4)


def test_glibc_allocator_keeps_freed_memory_unless_the_user_tuned_it(monkeypatch) -> None:
    """CPU model processes ask glibc to keep freed blocks (no page faults per tensor);
    a user's own MALLOC_* settings win, and other C libraries are left alone."""
    import ctypes
    import platform

    from sam_geo.run import host

    if platform.libc_ver()[0] == "glibc":
        assert host.keep_freed_memory_for_reuse() is True  # the real mallopt accepts both settings
    calls = []

    class FakeLibc:
        @staticmethod
        def mallopt(option: int, value: int) -> int:
            calls.append((option, value))
            return 1

    monkeypatch.setattr(host.ctypes, "CDLL", lambda name: FakeLibc())
    assert host.keep_freed_memory_for_reuse() is True
    assert calls == [(-3, 32 << 20), (-1, host.CPU_HEAP_KEEP_MB << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert host.keep_freed_memory_for_reuse() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")

    def no_glibc(name: str) -> ctypes.CDLL:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(host.ctypes, "CDLL", no_glibc)
    assert host.keep_freed_memory_for_reuse() is False


def _random_decoder(seed: int = 5, inflate: float = 0.0) -> torch.nn.Module:
    """A randomly initialised SAM MaskDecoder; ``inflate``: the standard deviation of noise
    added to every weight (larger weights than a trained decoder's, where a dropped bias
    or a wrong head split would show)."""
    from segment_anything.modeling import MaskDecoder, TwoWayTransformer

    torch.manual_seed(seed)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)).eval()
    if inflate:
        with torch.no_grad():
            for parameter in decoder.parameters():
                parameter.add_(torch.randn_like(parameter) * inflate)
    return decoder


def test_decoder_context_of_the_whole_grid_gives_the_exact_outputs_and_smaller_stays_in_windows() -> None:
    """A context as large as the embedding grid is the exact decoder (same windows, same
    logits); a small one keeps every prompt's logits inside its window, the rest at
    OUTSIDE_WINDOW_LOGIT, for windows in the grid's corners, middle and larger than the
    context (a 40-cell box with a 16-cell context)."""
    from sam_geo.model.decoder import OUTSIDE_WINDOW_LOGIT, FactorizedMaskDecoder

    decoder = _random_decoder()
    image, pe = torch.randn(1, 256, 64, 64), torch.randn(1, 256, 64, 64)
    sparse = torch.randn(4, 7, 256)
    dense = torch.randn(1, 256, 1, 1).expand(4, -1, 64, 64)
    # (row0, col0, row1, col1) of the 256 x 256 logits grid: corner, far corner, middle, large
    windows = torch.tensor([[0, 0, 30, 22], [230, 241, 256, 256], [100, 90, 140, 150], [10, 60, 170, 220]])
    with torch.inference_mode():
        exact = FactorizedMaskDecoder(decoder)(image, pe, sparse, dense, False, windows)
        whole = FactorizedMaskDecoder(decoder, context=64)(image, pe, sparse, dense, False, windows)
        local = FactorizedMaskDecoder(decoder, context=16)(image, pe, sparse, dense, False, windows)
    torch.testing.assert_close(whole[0], exact[0], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(whole[1], exact[1], atol=1e-4, rtol=1e-4)
    assert local[0].shape == exact[0].shape and local[1].shape == exact[1].shape
    for k, (r0, c0, r1, c1) in enumerate(windows.tolist()):
        inside = torch.zeros(256, 256, dtype=torch.bool)
        inside[r0 // 4 * 4 : -(-r1 // 4) * 4, c0 // 4 * 4 : -(-c1 // 4) * 4] = True
        assert bool((local[0][k, 0][~inside] == OUTSIDE_WINDOW_LOGIT).all())
        assert bool((local[0][k, 0][inside] != OUTSIDE_WINDOW_LOGIT).all())
        assert not torch.allclose(local[0][k, 0][inside], exact[0][k, 0][inside], atol=1e-3)
    with pytest.raises(ValueError, match="positive number"):
        FactorizedMaskDecoder(decoder, context=0)


def test_decoder_context_setting_is_validated_and_reaches_the_cpu_decoder(mobile_sam_segmenters) -> None:
    from sam_geo.model.sam_backend import SamBackend
    from sam_geo.settings import make_settings

    with pytest.raises(ConfigError, match="decoder context"):
        make_settings(decoder_context_px=10)
    make_settings(decoder_context_px=0)
    backend = SamBackend(mobile_sam_segmenters[0].backend.model, torch.device("cpu"))
    backend.use_cpu_decoder(torch.float32, 250)  # 250 model px -> 16 cells of 16 px
    assert backend._cpu_decoder.context == 16
    backend.use_cpu_decoder(torch.float32)
    assert backend._cpu_decoder.context is None


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_precision_resolution(monkeypatch, fast_bf16: bool) -> None:
    import sam_geo.model.sam_backend as sam_backend
    from sam_geo.model.sam_backend import resolve_precision

    monkeypatch.setattr(sam_backend, "cpu_has_fast_bf16", lambda: fast_bf16)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", cpu)


def test_cpu_bf16_probe_can_be_forced_either_way(monkeypatch) -> None:
    from sam_geo.model.sam_backend import cpu_has_fast_bf16

    monkeypatch.setenv("SAM_GEO_CPU_BF16", "0")
    assert cpu_has_fast_bf16() is False
    monkeypatch.setenv("SAM_GEO_CPU_BF16", "1")
    assert cpu_has_fast_bf16() is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path: needs a GPU (CI has none; checked on the device machine)")
def test_cuda_defaults_batch_tiles_under_autocast() -> None:
    from conftest import WEIGHTS
    from sam_geo.run.host import GPU_ENCODE_BATCH, HostConfig, ModelHost

    segmenter = ModelHost(HostConfig("mobile_sam", str(WEIGHTS), device="cuda"))
    assert segmenter.encode_batch == GPU_ENCODE_BATCH and segmenter.autocast_dtype in (torch.bfloat16, torch.float16)
    embedding, input_hw = segmenter.encode(_scene_tile(3))
    assert embedding.is_cuda and input_hw == (1024, 1024)


def test_image_tensor_takes_read_only_and_transposed_arrays_without_a_warning() -> None:
    import warnings

    from sam_geo.model.masks import image_tensor

    bands = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    bands.flags.writeable = False
    rgb = bands.transpose(1, 2, 0)  # how a window read reaches the model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = image_tensor(rgb, "cpu")
    assert image.shape == (1, 3, 4, 5) and image.dtype == torch.float32
    assert torch.equal(image[0], torch.from_numpy(bands.copy()).float())
