"""Tests of the SAM 2.1 backend (sam_geo.model.sam2_backend) and its registry entries.

No SAM 2.1 weights are available offline, so everything runs on a randomly initialised
``sam2.1_hiera_tiny`` built from the ``sam2`` package's config: only the plumbing is
checked (shapes, frames, weights handling, georeferencing), never mask quality. Decoding
is compared with the official ``SAM2ImagePredictor`` on the same features. The model is
encoded once per module (SAM 2's input is fixed at 1024 x 1024: ~6 s on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
import torch
import torch.nn.functional as F
from shapely.geometry import Point, box

from conftest import RASTER_TEST_TRANSFORM, make_raster
from sam_geo import segment
from sam_geo.model import registry as models
from sam_geo.model.masks import upsample_crop
from sam_geo.model.sam_backend import build_backend
from sam_geo.errors import ConfigError, WeightsError, WeightsNotFoundError
from sam_geo.io.prompts import PromptBatch
from sam_geo.io.scenes import open_scene
from sam_geo.model.checkpoints import guess_sam2_model
from sam_geo.model.sam2_backend import Sam2Backend, Sam2Embedding, build_sam2_model

TINY = "sam2.1_hiera_tiny"
SAM2_NAMES = ("sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large")
TILE_HW = (200, 256)  # not square: SAM 2 stretches each axis by its own factor
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def backend() -> Sam2Backend:
    torch.manual_seed(0)
    built = build_backend(TINY, None, CPU)
    assert isinstance(built, Sam2Backend)
    return built


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    rgb = np.random.default_rng(0).integers(0, 60, (*TILE_HW, 3), dtype=np.uint8)
    rgb[40:120, 30:110] = (200, 180, 150)  # a bright "roof"
    return rgb


@pytest.fixture(scope="module")
def encoded(backend: Sam2Backend, tile: np.ndarray) -> tuple[Sam2Embedding, tuple[int, int]]:
    return backend.encode(tile)


@pytest.fixture(scope="module")
def checkpoint(backend: Sam2Backend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-init tiny model saved in the official layout ({"model": state_dict})."""
    path = tmp_path_factory.mktemp("sam2") / "random_sam2.1_hiera_tiny.pt"
    torch.save({"model": backend.model.state_dict()}, path)
    return path


def _batch(boxes: np.ndarray | None, points: np.ndarray | None, labels: np.ndarray | None, n: int) -> PromptBatch:
    return PromptBatch(
        np.arange(n),
        np.full((n, 4), np.nan) if boxes is None else boxes.astype(np.float64),
        np.zeros((n, 0, 2)) if points is None else points.astype(np.float64),
        np.zeros((n, 0), np.int32) if labels is None else labels.astype(np.int32),
    )


BOXES = np.array([[30, 40, 110, 120], [150, 20, 250, 190], [0, 0, 256, 200]], dtype=np.float64)
POINTS = np.array([[[70, 80], [0, 0]], [[200, 100], [190, 30]], [[10, 190], [0, 0]]], dtype=np.float64)
LABELS = np.array([[1, -1], [1, 0], [1, -1]], dtype=np.int32)
BATCHES = {
    "box": lambda: _batch(BOXES, None, None, 3),
    "point": lambda: _batch(None, POINTS, LABELS, 3),
    "box+point": lambda: _batch(BOXES, POINTS[:, :1], LABELS[:, :1], 3),
}


# --- registry ---------------------------------------------------------------------


def test_registry_has_the_four_sam21_models() -> None:
    for name, short in zip(SAM2_NAMES, ("t", "s", "b+", "l")):
        spec = models.get_spec(name)
        assert (spec.name, spec.family, spec.licence) == (name, "sam2", "Apache-2.0")
        assert spec.arch == f"configs/sam2.1/sam2.1_hiera_{short}.yaml"
        assert spec.filename == f"{name}.pt"
        assert spec.url == f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/{name}.pt"
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.size_bytes and spec.size_bytes > 100_000_000
    assert models.get_spec(TINY).sha256 == "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69"
    assert models.get_spec("sam2.1_hiera_large").sha256.startswith("2647878d")
    assert set(SAM2_NAMES) <= set(models.known_models())


def test_registry_configs_exist_in_the_sam2_package() -> None:
    import sam2

    root = Path(sam2.__file__).parent
    for name in SAM2_NAMES:
        assert (root / models.get_spec(name).arch).is_file()


def test_offline_resolution_names_the_official_url(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        models.resolve_weights(TINY, cache_dir=tmp_path, allow_download=False)
    message = str(info.value)
    assert models.get_spec(TINY).url in message
    assert str(tmp_path / "sam2.1_hiera_tiny.pt") in message


def test_build_sam_refuses_sam2_names() -> None:
    with pytest.raises(ConfigError, match="SAM 2.1"):
        models.build_sam(TINY)
    with pytest.raises(ConfigError, match="not a SAM 2 model"):
        build_sam2_model("vit_b")


# --- encode / decode ----------------------------------------------------------------


def test_preprocess_matches_sam2_transforms(backend: Sam2Backend, tile: np.ndarray) -> None:
    from sam2.utils.transforms import SAM2Transforms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # SAM2Transforms uses torch.jit.script
        reference = SAM2Transforms(resolution=1024, mask_threshold=0.0)(tile)[None]
    torch.testing.assert_close(backend.preprocess(tile), reference, atol=1e-5, rtol=0)


def test_encode_returns_features_in_the_square_frame(
    backend: Sam2Backend, encoded: tuple[Sam2Embedding, tuple[int, int]]
) -> None:
    embedding, input_hw = encoded
    assert backend.image_size == 1024 and input_hw == (1024, 1024)
    assert embedding.image_embed.shape == (1, 256, 64, 64)
    assert [tuple(f.shape) for f in embedding.high_res_feats] == [(1, 32, 256, 256), (1, 64, 128, 128)]
    assert embedding.image_embed.dtype == torch.float32
    assert torch.isfinite(embedding.image_embed).all()
    assert backend.logits_frame(TILE_HW, input_hw) == (1 / 200, 1 / 256)


@pytest.mark.parametrize("kind", list(BATCHES))
def test_decode_matches_the_official_predictor(
    backend: Sam2Backend, encoded: tuple[Sam2Embedding, tuple[int, int]], kind: str
) -> None:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    embedding, input_hw = encoded
    prompts = BATCHES[kind]()
    logits, scores = backend.decode(embedding, input_hw, TILE_HW, prompts)
    assert logits.shape == (3, 256, 256) and logits.dtype == torch.float32
    assert isinstance(scores, np.ndarray) and scores.shape == (3,) and scores.dtype == np.float32
    assert np.isfinite(scores).all() and logits.abs().max() <= 32

    # the official predictor on the same features, tile-pixel prompts, one call per batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its SAM2Transforms uses torch.jit.script
        predictor = SAM2ImagePredictor(backend.model)
    predictor._features = {"image_embed": embedding.image_embed, "high_res_feats": list(embedding.high_res_feats)}
    predictor._orig_hw = [TILE_HW]
    predictor._is_image_set = True
    has_points = (prompts.labels >= 0).any()
    _, ious, lows = predictor.predict(
        point_coords=prompts.points if has_points else None,
        point_labels=prompts.labels if has_points else None,
        box=prompts.boxes if prompts.has_box.all() else None,
        multimask_output=kind == "point",
        return_logits=True,
    )
    best = ious.argmax(axis=1)
    rows = np.arange(3)
    np.testing.assert_allclose(logits.numpy(), lows[rows, best], atol=1e-4)
    np.testing.assert_allclose(scores, ious[rows, best], atol=1e-5)


def test_multimask_for_boxes_and_mixed_batches(
    backend: Sam2Backend, encoded: tuple[Sam2Embedding, tuple[int, int]]
) -> None:
    embedding, input_hw = encoded
    backend.multimask = True
    try:
        logits, scores = backend.decode(embedding, input_hw, TILE_HW, BATCHES["box"]())
    finally:
        backend.multimask = False
    assert logits.shape == (3, 256, 256) and scores.shape == (3,)
    mixed = _batch(np.vstack([BOXES[:1], np.full((1, 4), np.nan)]), POINTS[:2, :1], LABELS[:2, :1], 2)
    with pytest.raises(ValueError, match="must not mix"):
        backend.decode(embedding, input_hw, TILE_HW, mixed)


def test_mask_prompts_enter_as_low_res_mask_input(
    backend: Sam2Backend, encoded: tuple[Sam2Embedding, tuple[int, int]]
) -> None:
    embedding, input_hw = encoded
    polygons = [box(30, 40, 110, 120), box(150, 20, 250, 190)]
    prompts = _batch(BOXES[:2], None, None, 2).replace(
        masks=np.array([shapely.to_wkb(p) for p in polygons], dtype=object),
        areas=np.array([p.area for p in polygons]),
    )
    logits, scores = backend.decode(embedding, input_hw, TILE_HW, prompts)
    plain, _ = backend.decode(embedding, input_hw, TILE_HW, _batch(BOXES[:2], None, None, 2))
    assert logits.shape == (2, 256, 256) and scores.shape == (2,)
    assert not torch.equal(logits, plain)  # the mask input changed the result


def test_logits_frame_samples_like_sam2_postprocess(
    backend: Sam2Backend, encoded: tuple[Sam2Embedding, tuple[int, int]]
) -> None:
    """Upsampling through logits_frame equals SAM 2's own resize of the logits to the tile."""
    embedding, input_hw = encoded
    logits, _ = backend.decode(embedding, input_hw, TILE_HW, BATCHES["box"]())
    frame = backend.logits_frame(TILE_HW, input_hw)
    for k in range(len(logits)):
        ours = upsample_crop(logits[k], (0, 0, *TILE_HW), frame)
        theirs = F.interpolate(logits[k][None, None], TILE_HW, mode="bilinear", align_corners=False)[0, 0] > 0
        assert ours.shape == TILE_HW
        assert (ours != theirs.numpy()).mean() < 1e-3  # float rounding at the 0 level only


# --- weights ----------------------------------------------------------------------


def test_checkpoint_round_trip(backend: Sam2Backend, checkpoint: Path) -> None:
    loaded = build_sam2_model(TINY, checkpoint)
    for (key, theirs), ours in zip(backend.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(theirs, ours), key
    assert guess_sam2_model(torch.load(checkpoint, weights_only=True)) == TINY


def test_wrong_keys_give_weights_error(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pt"
    torch.save({"model": {"image_encoder.foo": torch.zeros(3)}}, path)
    with pytest.raises(WeightsError) as info:
        build_sam2_model(TINY, path)
    message = str(info.value)
    assert str(path) in message and "missing keys" in message and "unexpected keys" in message
    assert "image_encoder.foo" in message


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        build_sam2_model(TINY, junk)
    with pytest.raises(WeightsNotFoundError):
        build_sam2_model(TINY, tmp_path / "missing.pt")
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(WeightsError, match="not a SAM 2 checkpoint"):
        build_sam2_model(TINY, listing)


def test_checkpoint_of_another_size_names_the_right_model(checkpoint: Path) -> None:
    with pytest.raises(WeightsError, match=r"pass --model sam2\.1_hiera_tiny"):
        build_sam2_model("sam2.1_hiera_small", checkpoint)
    with pytest.raises(WeightsError, match=r"SAM 2\.1 checkpoint; pass --model sam2\.1_hiera_tiny"):
        models.build_sam("vit_b", checkpoint)


# --- end to end ---------------------------------------------------------------------


def test_segment_end_to_end_with_sam21(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through segment(): georeferenced, valid output with the documented columns."""
    spec = dataclasses.replace(models.get_spec(TINY), sha256=models.file_sha256(checkpoint))
    monkeypatch.setitem(models.MODELS, TINY, spec)

    rows, cols = 160, 200
    data = np.random.default_rng(1).integers(10, 50, (3, rows, cols), dtype=np.uint8)
    data[:, 30:70, 40:90] = 220
    data[:, 100:140, 120:180] = 160
    scene_path = make_raster(tmp_path / "scene.tif", data)
    scene = open_scene(scene_path)

    def xy(col: float, row: float) -> tuple[float, float]:
        return RASTER_TEST_TRANSFORM * (col, row)

    prompts = gpd.GeoDataFrame(
        {"name": ["roof", "yard", "spot"], "height": [3.0, 1.5, 0.0]},
        geometry=[
            box(*xy(38, 72), *xy(92, 28)),
            box(*xy(118, 142), *xy(182, 98)),
            Point(*xy(60, 50)),
        ],
        crs=scene.crs,
    )
    gdf = segment(
        scene_path,
        prompts,
        model=TINY,
        weights=str(checkpoint),
        device="cpu",
        tile_size_px=256,
        overlap_px=32,
        zoom=1,
        min_area_m2=0.0,
        workers=0,
        progress=False,
    )
    summary = gdf.attrs["summary"]
    assert summary["model"]["name"] == TINY
    assert summary["model"]["weights_sha256"] == spec.sha256
    assert summary["prompts"]["used"] == 3
    assert summary["prompts"]["on_nodata"] == 0
    assert summary["features"] + summary["prompts"]["empty"] == 3  # random weights may give empty masks
    assert summary["tiles"]["processed"] >= 1 and summary["seconds"]["encode"] > 0

    assert gdf.crs == scene.crs
    assert {"name", "height", "prompt_index", "score", "area_m2"} <= set(gdf.columns)
    assert gdf.prompt_index.is_unique and set(gdf.prompt_index) <= {0, 1, 2}
    if len(gdf):
        footprint = scene.footprint.buffer(1e-6)
        assert gdf.geometry.is_valid.all() and not gdf.geometry.is_empty.any()
        assert gdf.geometry.within(footprint).all()
        assert np.isfinite(gdf.score).all()
        np.testing.assert_allclose(gdf.area_m2, gdf.geometry.area, rtol=1e-9)
        assert (gdf.name.to_numpy() == prompts.name.to_numpy()[gdf.prompt_index.to_numpy()]).all()
