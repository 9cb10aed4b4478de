"""The model layer runs with numpy and torch only: no geospatial or cluster stack.

A lent GPU machine has Python, numpy, torch and timm but none of ray, rasterio,
geopandas, shapely, pyproj, affine (see benchmarks/gpu_check.sh). The first tests import
``sam_geo.model`` in a subprocess where those packages are blocked
(``benchmarks/import_blocker``: to the importer they are not installed) and run a decode through the backend there.

The ``gpu`` tests compare the CUDA path with the CPU path (and bf16 autocast with fp32)
on MobileSAM's real weights. They import nothing beyond numpy, torch and pytest and do
not use ``conftest.py`` (which needs rasterio), so the GPU machine runs this file with
``pytest --noconftest``. ``SAM_GEO_TEST_GPU_DEVICE=cpu`` runs their code on CPU, to try
them without a GPU (bf16 autocast on CPU is slow: minutes on two cores).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BLOCKER = ROOT / "benchmarks" / "import_blocker"
BLOCKED = ["ray", "rasterio", "geopandas", "shapely", "pyproj", "pyogrio", "fiona", "affine",
           "pandas", "pydantic", "yaml"]
LIGHT_MODULES = ["sam_geo.model.sam_backend", "sam_geo.model.registry", "sam_geo.model.masks",
                 "sam_geo.io.prompt_batch", "sam_geo.model.checkpoints", "sam_geo.model.decoder",
                 "sam_geo.model.lowrank", "sam_geo.model.sam2_backend", "sam_geo.model.detector"]
WEIGHTS_DIR = Path(os.environ.get("SAM_GEO_WEIGHTS_DIR") or ROOT.parent / "shared" / "weights")
GPU_DEVICE = os.environ.get("SAM_GEO_TEST_GPU_DEVICE", "cuda")

_PROBE = """
import json, sys
import numpy as np, torch
modules = {modules!r}
for name in modules:
    __import__(name)
import sam_geo
from sam_geo.io.prompt_batch import PromptBatch
from sam_geo.model.registry import build_sam, known_models
from sam_geo.model.sam_backend import SamBackend
from sam_geo.model.masks import mask_prompt_logits
blocked_probe = []
for name in {blocked!r}:
    try:
        __import__(name)
    except ImportError:
        blocked_probe.append(name)
torch.manual_seed(0)
backend = SamBackend(build_sam("mobile_sam"), torch.device("cpu"))  # random weights
boxes = np.array([[100.0, 120.0, 300.0, 260.0], [500.0, 500.0, 700.0, 650.0]])
batch = PromptBatch(np.arange(2), boxes, np.zeros((2, 0, 2)), np.zeros((2, 0), np.int32))
logits, scores = backend.decode(torch.randn(1, 256, 64, 64), (1024, 1024), (1024, 1024), batch)
try:
    mask_prompt_logits(np.array([b"not wkb"], dtype=object), (1 / 1024, 1 / 1024))
    mask_error = None
except ImportError as exc:
    mask_error = type(exc).__name__
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({blocked!r}))
print(json.dumps({{"loaded_blocked": loaded, "blocked_probe": blocked_probe,
                  "models": known_models(), "logits": list(logits.shape), "scores": list(scores.shape),
                  "finite": bool(torch.isfinite(logits).all()), "mask_error": mask_error}}))
"""


def _run_blocked(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BLOCKER), str(ROOT)]),
           "SAM_GEO_BLOCK_IMPORTS": ",".join(BLOCKED)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, f"subprocess failed:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_model_layer_imports_and_decodes_without_geo_stack() -> None:
    out = _run_blocked(_PROBE.format(modules=LIGHT_MODULES, blocked=BLOCKED))
    assert out["blocked_probe"] == BLOCKED  # the blocker works: each really is unimportable
    assert out["loaded_blocked"] == []
    assert "mobile_sam" in out["models"] and "vit_b" in out["models"]
    assert out["logits"] == [2, 256, 256] and out["scores"] == [2] and out["finite"]
    # mask prompts do need the geospatial stack; it is imported only when they are used
    assert out["mask_error"] == "ModuleNotFoundError"


def test_blocker_blocks_the_geo_stack_for_the_rest_of_sam_geo() -> None:
    """Sanity check of the check: the modules that do need the stack fail under the blocker."""
    code = ("import json\ntry:\n    import sam_geo.io.prompts\n    err = None\nexcept ImportError as exc:\n"
            "    err = exc.name\nprint(json.dumps({'error': err}))")
    assert _run_blocked(code)["error"] in BLOCKED


def test_prompt_batch_is_reexported_by_io_prompts() -> None:
    from sam_geo.io.prompts import PromptBatch as FromIo
    from sam_geo.io.prompt_batch import PromptBatch

    assert FromIo is PromptBatch
    batch = PromptBatch(np.arange(3), np.full((3, 4), np.nan), np.zeros((3, 1, 2)), np.ones((3, 1), np.int32))
    again = pickle.loads(pickle.dumps(batch))
    assert len(again) == 3 and not again.has_box.any() and not again.has_mask.any()
    assert np.isnan(again.areas).all() and again.take([2]).index.tolist() == [2]


def test_mask_prompt_logits_scales_tile_pixels_to_the_low_res_grid() -> None:
    """A 512 x 256 px square on a 1024 px tile covers half x quarter of the 256 grid."""
    import shapely

    from sam_geo.model.masks import MASK_PROMPT_LOGIT, mask_prompt_logits

    square = shapely.box(0, 0, 512, 256)  # x (cols) 0..512, y (rows) 0..256
    out = mask_prompt_logits(np.array([shapely.to_wkb(square), None], dtype=object), (1 / 1024, 1 / 1024))
    assert out.shape == (2, 1, 256, 256)
    inside = out[0, 0] > 0
    assert inside[:64, :128].all() and not inside[64:, :].any() and not inside[:, 128:].any()
    assert (out[1] == -MASK_PROMPT_LOGIT).all()


# --- CUDA: the device machine ------------------------------------------------------------


def _synthetic_tile(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 1024 px RGB tile of textured ground with 24 flat-coloured rectangles (roofs), and
    their boxes x0, y0, x1, y1: prompts SAM answers with clear masks."""
    rng = np.random.default_rng(seed)
    rgb = (rng.normal(110, 12, (1024, 1024, 3))).clip(0, 255).astype(np.uint8)
    boxes = []
    for row in range(4):
        for col in range(6):
            h, w = rng.integers(60, 140, 2)
            y0, x0 = 40 + row * 250 + rng.integers(0, 40), 20 + col * 168 + rng.integers(0, 20)
            rgb[y0 : y0 + h, x0 : x0 + w] = rng.integers(150, 250, 3)
            boxes.append([x0 - 4, y0 - 4, x0 + w + 4, y0 + h + 4])
    return rgb, np.array(boxes, dtype=np.float64)


def _masks(device: str, dtype: torch.dtype, tiles: list[np.ndarray], boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Low-res masks (tiles, n, 256, 256) and scores of MobileSAM's real weights for the
    same boxes on each tile, through SamBackend (encode_many, decode) under ``dtype``."""
    from sam_geo.io.prompt_batch import PromptBatch
    from sam_geo.model.sam_backend import build_backend

    weights = WEIGHTS_DIR / "mobile_sam.pt"
    assert weights.is_file(), f"MobileSAM weights not found at {weights} (set SAM_GEO_WEIGHTS_DIR)"
    backend = build_backend("mobile_sam", weights, torch.device(device))
    n = len(boxes)
    batch = PromptBatch(np.arange(n), boxes, np.zeros((n, 0, 2)), np.zeros((n, 0), np.int32))
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    masks, scores = [], []
    with autocast:
        for embedding, input_hw in backend.encode_many(tiles):
            logits, score = backend.decode(embedding, input_hw, tiles[0].shape[:2], batch)
            masks.append((logits > 0).cpu().numpy())
            scores.append(score)
    return np.stack(masks), np.stack(scores)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).sum(axis=(-1, -2))
    union = (a | b).sum(axis=(-1, -2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def needs_gpu(test):  # noqa: ANN001, ANN201
    """Mark ``test`` as a CUDA test, skipped without CUDA (unless SAM_GEO_TEST_GPU_DEVICE=cpu)."""
    skip = pytest.mark.skipif(GPU_DEVICE == "cuda" and not torch.cuda.is_available(),
                              reason="CUDA path: needs a GPU (CI has none; checked on the device machine)")
    return pytest.mark.gpu(skip(test))


@needs_gpu
def test_gpu_fp32_masks_match_cpu() -> None:
    rgb, boxes = _synthetic_tile()
    cpu_masks, cpu_scores = _masks("cpu", torch.float32, [rgb], boxes)
    gpu_masks, gpu_scores = _masks(GPU_DEVICE, torch.float32, [rgb], boxes)
    iou = _iou(cpu_masks, gpu_masks)
    assert cpu_masks.sum(axis=(-1, -2)).min() > 0  # real masks, not empty ones
    # TF32 convolutions (cuDNN's default) move a few boundary cells of the 256 px grid
    assert iou.min() > 0.9 and np.median(iou) > 0.98, iou
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=0.03)


@needs_gpu
def test_gpu_bf16_autocast_close_to_fp32_and_batch_invariant() -> None:
    """bf16 (what ``--precision auto`` picks on a GPU) keeps the fp32 masks; two tiles in
    one encoder call give the masks each gives alone."""
    (rgb0, boxes), rgb1 = _synthetic_tile(0), _synthetic_tile(1)[0]
    fp32_masks, _ = _masks(GPU_DEVICE, torch.float32, [rgb0], boxes)
    bf16_masks, bf16_scores = _masks(GPU_DEVICE, torch.bfloat16, [rgb0, rgb1], boxes)
    iou = _iou(fp32_masks[0], bf16_masks[0])
    assert np.median(iou) > 0.95 and iou.min() > 0.8, iou
    assert np.isfinite(bf16_scores).all() and bf16_scores[0].mean() > 0.5
    alone, _ = _masks(GPU_DEVICE, torch.bfloat16, [rgb1], boxes)
    assert np.median(_iou(alone[0], bf16_masks[1])) > 0.97
