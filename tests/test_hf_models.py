"""SAM 2.1 and EdgeTAM through ``transformers`` (``Sam2Model``, ``EdgeTamModel``): one backend.

No real weights exist here: tiny randomly initialised models are built from small
configs and saved as model folders. Random models outline nothing meaningful, so the
tests check loading, the prompt frames, batching, output shapes and a whole prompted
run's rows and columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.edgetam import configuration_edgetam as edgetam_config
from transformers.models.sam2 import configuration_sam2 as sam2_config

import sam_geo
from sam_geo.errors import ConfigError, WeightsError
from sam_geo.io.prompt_batch import PromptBatch
from sam_geo.model.hf_backend import HFPromptBackend
from sam_geo.model.registry import MODELS, get_spec, resolve_weights
from sam_geo.model.sam_backend import build_backend
from tests.conftest import make_raster

CPU = torch.device("cpu")
SMALL_DECODER = {"hidden_size": 32, "num_attention_heads": 2, "mlp_dim": 64, "iou_head_hidden_dim": 32}


def tiny_sam2(folder: Path) -> Path:
    """A Hiera of width 12 (5 blocks), 128 px input: 8 x 8 embedding, 32 x 32 mask logits."""
    backbone = sam2_config.Sam2HieraDetConfig(
        hidden_size=12, image_size=128, blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[12, 24, 48, 96],
        num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[4, 4, 4, 4], global_attention_blocks=[3],
        window_positional_embedding_background_size=[4, 4])
    vision = sam2_config.Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[96, 48, 24, 12],
                                          backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]], fpn_hidden_size=32)
    config = transformers.Sam2Config(
        vision_config=vision,
        prompt_encoder_config=sam2_config.Sam2PromptEncoderConfig(hidden_size=32, image_size=128, patch_size=16,
                                                                  mask_input_channels=8),
        mask_decoder_config=sam2_config.Sam2MaskDecoderConfig(**SMALL_DECODER), image_size=128,
        memory_attention_hidden_size=12, memory_encoder_hidden_size=32, mask_downsampler_embed_dim=32,
        memory_fuser_embed_dim=32, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=32,
    )
    torch.manual_seed(0)
    transformers.Sam2Model(config).save_pretrained(folder)
    return folder


def tiny_edgetam(folder: Path) -> Path:
    """EdgeTAM's RepViT-M1 backbone (timm, random), 256 px input, a 32-wide decoder."""
    backbone = transformers.TimmWrapperConfig(
        architecture="repvit_m1", model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]})
    vision = edgetam_config.EdgeTamVisionConfig(backbone_config=backbone, backbone_channel_list=[384, 192, 96, 48],
                                                backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]], fpn_hidden_size=32)
    config = transformers.EdgeTamConfig(
        vision_config=vision,
        prompt_encoder_config=edgetam_config.EdgeTamPromptEncoderConfig(hidden_size=32, image_size=256, patch_size=16,
                                                                        mask_input_channels=8),
        mask_decoder_config=edgetam_config.EdgeTamMaskDecoderConfig(**SMALL_DECODER),
    )
    torch.manual_seed(0)
    transformers.EdgeTamModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "sam2.1_hiera_tiny_hf": tiny_sam2(tmp_path_factory.mktemp("sam2hf")),
        "edgetam": tiny_edgetam(tmp_path_factory.mktemp("edgetam")),
    }


def box_batch(boxes: list[list[float]]) -> PromptBatch:
    n = len(boxes)
    return PromptBatch(np.arange(n), np.asarray(boxes, float), np.zeros((n, 0, 2)), np.zeros((n, 0), np.int32))


def point_batch(points: list[list[list[float]]], labels: list[list[int]]) -> PromptBatch:
    n = len(points)
    return PromptBatch(np.arange(n), np.full((n, 4), np.nan), np.asarray(points, float), np.asarray(labels, np.int32))


def test_registry_lists_the_transformers_models_with_licence_and_source() -> None:
    for name in ("sam2.1_hiera_tiny_hf", "sam2.1_hiera_small_hf", "sam2.1_hiera_base_plus_hf",
                 "sam2.1_hiera_large_hf", "edgetam"):
        spec = get_spec(name)
        assert spec.hf_repo is not None and spec.licence == "Apache-2.0" and spec.url.endswith(spec.hf_repo)
    assert get_spec("sam2.1_hiera_large_hf").hf_repo == "facebook/sam2.1-hiera-large"
    assert {MODELS[n].arch for n in MODELS if MODELS[n].family in ("sam2_hf", "edgetam")} == {"sam2", "edgetam"}


@pytest.mark.parametrize("name, grid", [("sam2.1_hiera_tiny_hf", 32), ("edgetam", 64)])
def test_one_backend_decodes_boxes_and_points_of_both_models(folders: dict[str, Path], name: str, grid: int) -> None:
    weights = resolve_weights(name, folders[name])
    backend = build_backend(name, weights.path, CPU)
    assert isinstance(backend, HFPromptBackend)
    rgb = np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    embedding, input_hw = backend.encode(rgb)
    assert input_hw == (backend.image_size, backend.image_size)
    logits, iou = backend.decode(embedding, input_hw, rgb.shape[:2], box_batch([[10, 20, 90, 150], [0, 0, 199, 299]]))
    assert logits.shape == (2, grid, grid) and iou.shape == (2,) and np.isfinite(iou).all()
    prompts = point_batch([[[50, 60], [120, 200]], [[10, 10], [0, 0]]], [[1, 0], [1, -1]])  # second: one padding
    logits, iou = backend.decode(embedding, input_hw, rgb.shape[:2], prompts)
    assert logits.shape == (2, grid, grid) and iou.shape == (2,)


def test_prompts_are_scaled_to_the_model_frame_per_axis(folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A 300 x 200 px (rows x cols) tile is stretched to 128 x 128: x by 128 / 200, y by 128 / 300."""
    backend = build_backend("sam2.1_hiera_tiny_hf", folders["sam2.1_hiera_tiny_hf"], CPU)
    seen: list[dict[str, Any]] = []
    forward = backend.model.forward
    monkeypatch.setattr(backend.model, "forward", lambda **kw: seen.append(kw) or forward(**kw))
    rgb = np.zeros((300, 200, 3), np.uint8)
    embedding, input_hw = backend.encode(rgb)
    backend.decode(embedding, input_hw, (300, 200), box_batch([[100, 150, 200, 300]]))
    backend.decode(embedding, input_hw, (300, 200), point_batch([[[100, 150]]], [[1]]))
    assert torch.allclose(seen[0]["input_boxes"], torch.tensor([[[64.0, 64.0, 128.0, 128.0]]]))
    assert torch.allclose(seen[1]["input_points"], torch.tensor([[[[64.0, 64.0]]]]))
    assert seen[1]["input_labels"].tolist() == [[[1]]] and seen[1]["multimask_output"] is True
    assert backend.logits_frame((300, 200), input_hw) == (1 / 300, 1 / 200)


def test_a_folder_missing_weights_or_of_another_model_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    source = folders["sam2.1_hiera_tiny_hf"]
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((source / "config.json").read_bytes())
    state = load_file(source / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("mask_decoder.")}, partial / "model.safetensors")
    with pytest.raises(WeightsError, match="does not hold every weight.*mask_decoder"):
        build_backend("sam2.1_hiera_tiny_hf", resolve_weights("sam2.1_hiera_tiny_hf", partial).path, CPU)
    with pytest.raises(WeightsError, match="model_type 'sam2', not 'edgetam'"):
        resolve_weights("edgetam", source)
    with pytest.raises(WeightsError, match="hf download facebook/sam2.1-hiera-tiny"):
        resolve_weights("sam2.1_hiera_tiny_hf", tmp_path / "nowhere")


@pytest.mark.parametrize(("name", "flip_views"), [("sam2.1_hiera_tiny_hf", 1), ("edgetam", 1), ("edgetam", 4)])
def test_prompted_run_keeps_every_prompt_id(folders: dict[str, Path], tmp_path: Path, name: str,
                                            flip_views: int) -> None:
    rgb = np.random.default_rng(2).integers(0, 255, (3, 400, 500), dtype=np.uint8)
    scene = make_raster(tmp_path / "scene.tif", rgb)
    with rasterio.open(scene) as src:
        x0, y0, x1, y1 = src.bounds
    boxes = [shapely.box(x0 + 500, y0 + 500, x0 + 1500, y0 + 1500), shapely.box(x1 - 2000, y1 - 1200, x1 - 300, y1 - 200)]
    layer = gpd.GeoDataFrame({"bid": [17, 42]}, geometry=boxes, crs="EPSG:32645")
    gdf = sam_geo.segment(scene, layer, model=name, weights=str(folders[name]), workers=0, progress=False,
                          tile_size_px=256, overlap_px=32, min_area_m2=0, id_column="bid", flip_views=flip_views)
    assert sorted(gdf.bid.tolist()) == [17, 42] and gdf.crs == "EPSG:32645"
    assert gdf.geometry.dropna().is_valid.all()
    assert gdf.attrs["summary"]["model"]["name"] == name
    assert gdf.attrs["summary"]["settings"]["flip_views"] == flip_views


def test_mask_prompts_are_refused_before_any_work(folders: dict[str, Path], tmp_path: Path) -> None:
    scene = make_raster(tmp_path / "scene.tif", np.full((3, 64, 64), 90, np.uint8))
    layer = gpd.GeoDataFrame(geometry=[shapely.box(500_100, 2_999_500, 500_400, 2_999_800)], crs="EPSG:32645")
    with pytest.raises(ConfigError, match="--prompt-as box"):
        sam_geo.segment(scene, layer, model="edgetam", weights=str(folders["edgetam"]), workers=0, progress=False,
                        prompt_as="mask")
