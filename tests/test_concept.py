"""Concept prompts (``sam-geo text --model sam3``): SAM 3 through transformers.

No real SAM 3 weights exist here: a tiny randomly initialised ``Sam3Model`` is built
from a small config, with a character-level CLIP tokenizer written in code, and saved
as a model folder the way ``hf download facebook/sam3`` lays one out. Random weights
find nothing meaningful, so the real model's path is checked for shapes, frames,
columns and errors; the stitching of instances across seams is checked with a stand-in
backend whose masks are known (it finds the painted shapes of a synthetic scene).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
import transformers
from affine import Affine
from rasterio.windows import Window
from safetensors.torch import load_file, save_file
from scipy import ndimage
from transformers.models.sam3 import configuration_sam3 as sam3_config
from transformers.models.sam3_tracker_video import configuration_sam3_tracker_video as tracker_video_config

import sam_geo
from sam_geo.cli import main
from sam_geo.errors import ConfigError, WeightsError, WeightsNotFoundError
from sam_geo.model import hf_weights
from sam_geo.model.registry import MODELS, resolve_weights
from sam_geo.model.sam3_backend import ConceptInstances, Sam3Backend, crop_instances
from sam_geo.geo.tiles import TileGrid
from sam_geo.io.scenes import WindowRead
from sam_geo.modes.concept import CONCEPT_COLUMNS, instance_masks
from sam_geo.run.post import prompt_polygons
from sam_geo.run.tasks import PostConfig
from tests.conftest import BANEPA, make_raster

EXIT_OK, EXIT_INPUT = 0, 2
IMAGE_PX = 112  # tiny model input: 8 x 8 patches of 14 px, masks on a 32 x 32 grid


def tiny_sam3_folder(folder: Path) -> Path:
    """A 1-layer, 32-wide SAM 3 with 8 queries and its tokenizer, saved into ``folder``."""
    letters = list(string.ascii_lowercase)
    vocab = {"!": 0, **{c: 1 + i for i, c in enumerate(letters)}}
    vocab |= {c + "</w>": len(vocab) + i for i, c in enumerate(letters)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32, pad_token="!")
    small = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    backbone = sam3_config.Sam3ViTConfig(num_hidden_layers=2, image_size=IMAGE_PX, patch_size=14, window_size=4,
                                         global_attn_indexes=[1], **small)
    config = transformers.Sam3Config(
        vision_config=sam3_config.Sam3VisionConfig(backbone_config=backbone, fpn_hidden_size=32),
        text_config={"vocab_size": len(vocab), "projection_dim": 32, "num_hidden_layers": 1,
                     "max_position_embeddings": 32, "bos_token_id": vocab["<|startoftext|>"],
                     "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": 0, **small},
        geometry_encoder_config=sam3_config.Sam3GeometryEncoderConfig(
            num_layers=1, mask_fuser_hidden_size=32, mask_fuser_num_layers=1, **small),
        detr_encoder_config=sam3_config.Sam3DETREncoderConfig(num_layers=1, **small),
        detr_decoder_config=sam3_config.Sam3DETRDecoderConfig(num_layers=1, num_queries=8, **small),
        mask_decoder_config=sam3_config.Sam3MaskDecoderConfig(hidden_size=32),
    )
    torch.manual_seed(0)
    transformers.Sam3Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_sam3_video_folder(folder: Path, detector_folder: Path) -> Path:
    """The layout ``transformers`` loads facebook/sam3 from: a ``sam3_video`` checkpoint holding the detector
    (``detector_model.*``) and the video tracker (``tracker_model.*``, ``tracker_neck.*``),
    here with the tiny detector of ``detector_folder`` and a tiny tracker, plus the tokenizer."""
    detector = transformers.Sam3Config.from_pretrained(detector_folder)
    decoder = {"hidden_size": 32, "num_attention_heads": 2, "mlp_dim": 64, "iou_head_hidden_dim": 32}
    tracker = tracker_video_config.Sam3TrackerVideoConfig(
        vision_config=detector.vision_config.to_dict(),
        prompt_encoder_config=tracker_video_config.Sam3TrackerVideoPromptEncoderConfig(
            hidden_size=32, image_size=IMAGE_PX, patch_size=14, mask_input_channels=8),
        mask_decoder_config=tracker_video_config.Sam3TrackerVideoMaskDecoderConfig(**decoder),
        memory_attention_hidden_size=32, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=32,
        memory_encoder_hidden_size=32, memory_encoder_output_channels=16, mask_downsampler_embed_dim=32,
        memory_fuser_embed_dim=32, memory_fuser_intermediate_dim=64, memory_fuser_num_layers=1,
    )
    config = transformers.Sam3VideoConfig(detector_config=detector.to_dict(), tracker_config=tracker.to_dict())
    torch.manual_seed(0)
    transformers.Sam3VideoModel(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(detector_folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sam3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sam3_folder(tmp_path_factory.mktemp("sam3"))


@pytest.fixture(scope="module")
def backend(sam3_folder: Path) -> Sam3Backend:
    return Sam3Backend.from_folder(sam3_folder, torch.device("cpu"))


# --- registry and weights ------------------------------------------------------------------


def test_models_lists_sam3_with_its_licence_and_source() -> None:
    from click.testing import CliRunner

    from sam_geo.cli.models import models

    out = CliRunner().invoke(models, []).output
    line = next(row for row in out.splitlines() if row.startswith("sam3 "))
    assert "SAM License (gated)" in line and "facebook/sam3" in line
    as_json = json.loads(CliRunner().invoke(models, ["--json"]).output)
    assert as_json["sam3"]["hf_repo"] == "facebook/sam3" and as_json["sam3"]["family"] == "sam3"


def test_a_model_folder_is_resolved_with_a_fingerprint(sam3_folder: Path) -> None:
    found = resolve_weights("sam3", sam3_folder)
    again = resolve_weights("sam3", sam3_folder / "model.safetensors")  # a file inside the folder
    assert found.path == again.path == sam3_folder.absolute() and found.source == "explicit"
    assert found.sha256 == again.sha256 and len(found.sha256) == 64


def test_the_published_sam3_video_layout_loads_its_detector(sam3_folder: Path, tmp_path: Path) -> None:
    """A sam3_video folder (detector + tracker): Sam3Model must take every detector weight from it."""
    video = tiny_sam3_video_folder(tmp_path / "sam3", sam3_folder)
    assert json.loads((video / "config.json").read_text())["model_type"] == "sam3_video"
    found = resolve_weights("sam3", video)
    backend = Sam3Backend.from_folder(found.path, torch.device("cpu"))
    rgb = np.random.default_rng(3).integers(0, 255, (120, 90, 3), dtype=np.uint8)
    vision, _ = backend.encode(rgb)
    assert len(backend.concepts(vision, ("roof",), rgb.shape[:2], threshold=0.0)) > 0
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (partial / name).write_bytes((video / name).read_bytes())
    state = load_file(video / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".mask_decoder." not in k}, partial / "model.safetensors")
    with pytest.raises(WeightsError, match="does not hold every weight of SAM 3"):
        Sam3Backend.from_folder(resolve_weights("sam3", partial).path, torch.device("cpu"))


def test_the_weights_cache_folder_is_used(sam3_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "sam3").symlink_to(sam3_folder, target_is_directory=True)
    found = resolve_weights("sam3", cache_dir=tmp_path, allow_download=False)
    assert found.source == "cache" and found.path == (tmp_path / "sam3").absolute()


def test_official_release_checkpoint_is_recognised_and_refused(tmp_path: Path) -> None:
    """Meta's sam3.pt layout (detector.* / tracker.* names) cannot be loaded by transformers."""
    release = tmp_path / "sam3.pt"
    torch.save({"model": {"detector.backbone.vision_backbone.trunk.patch_embed.proj.weight": torch.zeros(2),
                          "tracker.maskmem_tpos_enc": torch.zeros(2)}}, release)
    assert hf_weights.is_official_release(release)
    with pytest.raises(WeightsError, match="official release checkpoint.*hf download facebook/sam3"):
        resolve_weights("sam3", release)
    other = tmp_path / "other" / "weights.pt"
    other.parent.mkdir()
    torch.save({"image_encoder.x": torch.zeros(2)}, other)
    assert not hf_weights.is_official_release(other)
    with pytest.raises(WeightsError, match="no config.json"):
        resolve_weights("sam3", other)


def test_folder_of_another_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "owlv2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="model_type 'owlv2', not 'sam3' or 'sam3_video'"):
        resolve_weights("sam3", tmp_path)


def test_missing_gated_weights_fail_with_one_clear_error_and_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SAM_GEO_WEIGHTS_DIR", str(tmp_path / "cache"))
    scene = make_raster(tmp_path / "scene.tif", np.full((3, 64, 64), 90, np.uint8))
    out = tmp_path / "out.gpkg"
    code = main(["text", scene, "solar panel", "--model", "sam3", "-o", str(out), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT == WeightsNotFoundError.exit_code
    assert err.count("error:") == 1
    assert "https://huggingface.co/facebook/sam3" in err and str(tmp_path / "cache" / "sam3") in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_sam3_refuses_layer_prompts_and_automatic_mode(tmp_path: Path, sam3_folder: Path) -> None:
    scene = make_raster(tmp_path / "scene.tif", np.full((3, 64, 64), 90, np.uint8))
    with rasterio.open(scene) as src:
        layer = gpd.GeoDataFrame(geometry=[shapely.box(*src.bounds).centroid], crs=src.crs)
    with pytest.raises(ConfigError, match="sam-geo text"):
        sam_geo.segment(scene, layer, model="sam3", weights=str(sam3_folder), workers=0, progress=False)
    with pytest.raises(ConfigError, match="SAM 3 model"):
        sam_geo.segment_auto(scene, model="sam3", weights=str(sam3_folder), workers=0, progress=False)
    assert "sam3" in MODELS


def test_sam3_refuses_detector_settings_it_would_ignore(tmp_path: Path, sam3_folder: Path) -> None:
    scene = make_raster(tmp_path / "scene.tif", np.full((3, 64, 64), 90, np.uint8))
    out = tmp_path / "out.gpkg"
    for extra in ({"detector": "IDEA-Research/grounding-dino-tiny"}, {"text_threshold": 0.3}, {"flip_views": 4}):
        with pytest.raises(ConfigError, match="--model mobile_sam"):
            sam_geo.segment_text(scene, "roof", output=out, model="sam3", weights=str(sam3_folder), workers=0,
                                 progress=False, **extra)
    assert not out.exists()


# --- the backend --------------------------------------------------------------------------


def test_one_encoder_pass_serves_every_phrase(backend: Sam3Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    encoder = backend.model.get_vision_features
    monkeypatch.setattr(backend.model, "get_vision_features", lambda **kw: calls.append(1) or encoder(**kw))
    rgb = np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    vision, input_hw = backend.encode(rgb)
    found = backend.concepts(vision, ("solar panel", "greenhouse", "pool"), rgb.shape[:2], threshold=0.0)
    assert calls == [1] and input_hw == (IMAGE_PX, IMAGE_PX)
    assert found.grid_hw == (32, 32) and len(found) > 0
    assert set(found.phrase.tolist()) == {0, 1, 2}  # threshold 0 keeps every query with a mask
    assert ((found.score >= 0) & (found.score <= 1)).all()
    assert (found.box[:, [0, 2]] <= 200).all() and (found.box[:, [1, 3]] <= 150).all() and (found.box >= 0).all()
    nothing = backend.concepts(vision, ("solar panel",), rgb.shape[:2], threshold=1.0)
    assert len(nothing) == 0 and nothing.box.shape == (0, 4)


def test_backend_refuses_box_prompts(backend: Sam3Backend) -> None:
    with pytest.raises(ConfigError, match="--model sam3"):
        backend.decode(None, (1, 1), (1, 1), None)


def test_instance_outlines_are_traced_in_tile_pixels() -> None:
    """A square of cells 8..15 on a 32-cell grid spanning a 300 x 200 px tile covers
    rows 75..150 and columns 50..100 of it (cell c spans pixels [c * px, (c + 1) * px));
    its outline is traced from the logits (sub-pixel) and loses the nodata pixels."""
    mask = torch.full((1, 32, 32), -8.0)
    mask[0, 8:16, 8:16] = 8.0
    parts = [(0, torch.tensor([0.9]), torch.tensor([[0.25, 0.25, 0.5, 0.5]]), mask)]
    found = crop_instances(parts, (32, 32), (300, 200))
    assert np.allclose(found.box, [[50, 75, 100, 150]])
    masks = instance_masks(found, (300, 200))
    assert masks.cells.tolist() == [[6, 6, 18, 18]] and masks.crops.tolist() == [[56, 37, 169, 113]]
    tile = next(iter(TileGrid(300, 200, Affine.identity(), 300, 32, 1)))
    valid = np.ones((300, 200), dtype=bool)
    outline = shapely.from_wkb(prompt_polygons(masks, WindowRead(np.zeros((3, 300, 200), np.uint8), valid), tile,
                                               PostConfig())[0].wkb)
    assert np.allclose(outline.bounds, (50, 75, 100, 150), atol=0.5) and outline.area == pytest.approx(3750, rel=0.02)
    valid[:, :75] = False  # the left half of the square is nodata
    cut = shapely.from_wkb(prompt_polygons(masks, WindowRead(np.zeros((3, 300, 200), np.uint8), valid), tile,
                                           PostConfig())[0].wkb)
    assert np.allclose(cut.bounds, (75, 75, 100, 150), atol=0.5)


# --- seams: a stand-in whose masks are known -------------------------------------------------

SHAPES = {  # phrase -> boxes (row0, col0, row1, col1) of full-resolution scene pixels
    "roof": [(40, 200, 160, 520), (400, 40, 440, 80)],  # a 320 px wide roof across seams, a small one
    "field": [(220, 260, 600, 620)],  # larger than a tile, over four tiles or more
}
STANDIN_GRID = 64  # mask cells a side


class KnownConcepts:
    """A concept backend that 'finds' the shapes painted into the scene: red 255 pixels
    are phrase ``roof``, green 255 pixels phrase ``field``; one instance per connected
    shape in the tile, mask logits on a 64 x 64 grid spanning the tile."""

    image_size = 64
    model = None

    def encode(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        return rgb, (self.image_size, self.image_size)

    def concepts(self, rgb: np.ndarray, phrases: tuple[str, ...], tile_hw: tuple[int, int],
                 threshold: float | None = None) -> ConceptInstances:
        parts = []
        for k, phrase in enumerate(phrases):
            channel = {"roof": 0, "field": 1}[phrase]
            labels, n = ndimage.label(rgb[:, :, channel] == 255)
            masks = []
            for i in range(1, n + 1):
                cells = torch.nn.functional.interpolate(torch.as_tensor(labels == i, dtype=torch.float32)[None, None],
                                                        (STANDIN_GRID, STANDIN_GRID), mode="area")[0, 0]
                masks.append(cells * 16 - 8)  # logit 0 where half a cell is covered
            if masks:
                ones = torch.ones(len(masks))
                boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * len(masks))
                parts.append((k, 0.9 * ones, boxes, torch.stack(masks)))
        return crop_instances(parts, (STANDIN_GRID, STANDIN_GRID), tile_hw)


def painted_scene(path: Path) -> str:
    rgb = np.random.default_rng(1).integers(60, 200, (3, 640, 660), dtype=np.uint8)
    for phrase, boxes in SHAPES.items():
        for r0, c0, r1, c1 in boxes:
            rgb[:, r0:r1, c0:c1] = 0
            rgb[{"roof": 0, "field": 1}[phrase], r0:r1, c0:c1] = 255
    return make_raster(path, rgb)


@pytest.mark.parametrize("tile_size, overlap", [(256, 48), (320, 64)])
def test_instances_crossing_seams_come_out_as_one_polygon_each(
    tmp_path: Path, sam3_folder: Path, monkeypatch: pytest.MonkeyPatch, tile_size: int, overlap: int
) -> None:
    monkeypatch.setattr("sam_geo.run.host.build_backend", lambda *args, **kwargs: KnownConcepts())
    scene = painted_scene(tmp_path / "painted.tif")
    gdf = sam_geo.segment_text(scene, ["roof", "field"], model="sam3", weights=str(sam3_folder), workers=0,
                               progress=False, tile_size_px=tile_size, overlap_px=overlap, min_area_m2=0)
    assert list(gdf.columns[:-1]) == list(CONCEPT_COLUMNS)
    with rasterio.open(scene) as src:
        transform, crs = src.transform, src.crs
    assert gdf.crs == crs and gdf.geometry.is_valid.all()
    for phrase, boxes in SHAPES.items():
        found = gdf[gdf.phrase == phrase]
        assert len(found) == len(boxes), (phrase, len(found))
        for r0, c0, r1, c1 in boxes:
            truth = shapely.box(*(transform * (c0, r1)), *(transform * (c1, r0)))
            iou = found.geometry.apply(lambda g: g.intersection(truth).area / g.union(truth).area).max()
            assert iou > 0.95, (phrase, (r0, c0, r1, c1), iou)
    assert (gdf[gdf.phrase == "field"].n_tiles >= 4).all() and gdf.n_tiles.max() > 1  # seen by several tiles
    assert ((gdf.score > 0.89) & (gdf.score < 0.91)).all()
    assert np.allclose(gdf.area_m2, gdf.geometry.area)


# --- end to end with the tiny random SAM 3 -------------------------------------------------------


@pytest.fixture(scope="module")
def banepa_crop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    window = Window(1500, 2000, 700, 600)
    with rasterio.open(BANEPA / "banepa_utm45n.tif") as src:
        data, transform, crs = src.read(window=window), src.window_transform(window), src.crs.to_string()
    return Path(make_raster(tmp_path_factory.mktemp("concept") / "banepa.tif", data, crs=crs, transform=transform,
                            nodata=0))


def test_text_command_with_sam3_writes_valid_polygons_with_phrases(
    banepa_crop: Path, sam3_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, summary = tmp_path / "objects.gpkg", tmp_path / "summary.json"
    code = main(["text", str(banepa_crop), "solar panel", "greenhouse", "--model", "sam3", "--weights",
                 str(sam3_folder), "--box-threshold", "0.2", "-o", str(out), "--summary", str(summary),
                 "--tile-size", "256", "--overlap", "32", "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == EXIT_OK, err
    report = json.loads(summary.read_text())
    gdf = gpd.read_file(out)
    assert report["tiles"]["processed"] >= 9 and report["tiles"]["failed"] == 0
    assert report["mode"] == "concept" and report["model"]["name"] == "sam3" and "detector" not in report["model"]
    assert len(gdf) == report["features"] > 0
    assert list(gdf.columns[:-1]) == list(CONCEPT_COLUMNS) and set(gdf.phrase) <= {"solar panel", "greenhouse"}
    with rasterio.open(banepa_crop) as src:
        assert gdf.crs == src.crs
        assert gdf.geometry.within(shapely.box(*src.bounds).buffer(1e-6)).all()
    assert gdf.geometry.is_valid.all() and not gdf.geometry.is_empty.any()
    assert ((gdf.score > 0.2) & (gdf.score <= 1)).all() and (gdf.area_m2 > 0).all()



@pytest.mark.usefixtures("ray_session")
def test_concept_tiles_run_on_ray_model_actors_like_in_process(sam3_folder: Path, tmp_path: Path) -> None:
    """Task descriptors, instances and pieces cross process boundaries; same objects."""
    scene = painted_scene(tmp_path / "painted.tif")
    common = {"model": "sam3", "weights": str(sam3_folder), "progress": False, "tile_size_px": 256,
              "overlap_px": 48, "min_area_m2": 0, "box_threshold": 0.2}
    on_ray = sam_geo.segment_text(scene, ["roof", "field"], workers=1, **common)
    in_process = sam_geo.segment_text(scene, ["roof", "field"], workers=0, **common)
    assert on_ray.attrs["summary"]["tiles"]["failed"] == 0 and len(on_ray) > 0
    key = ["phrase", "area_m2"]
    assert on_ray.sort_values(key)[key].round(6).values.tolist() == in_process.sort_values(key)[key].round(6).values.tolist()
