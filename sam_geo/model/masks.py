"""Mask arithmetic shared by the model backends: SAM's mask-prompt input, choosing one
of SAM's candidate masks, and upsampling low-resolution logits over a crop.

Coordinates: tile pixels are the pixels of the array a tile was read into (x = column,
y = row); SAM's low-resolution logits are a 256 x 256 grid over the model's input frame,
and ``frame = (fy, fx)`` is the fraction of that grid one tile pixel spans.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from sam_geo.io.prompt_batch import PromptBatch


MASK_PROMPT_LOGIT = 1.0
"""Logit magnitude of a rasterized mask prompt (inside +, outside -). A weak hint: on
outdated Banepa outlines (48 buildings, grown box + point + mask) median IoU was 0.734
at 1, 0.715 at 2, 0.687 at 8 and 0.663 at 20; a strong mask pins SAM to the old shape."""

def image_tensor(rgb: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``(rows, cols, 3)`` uint8 RGB -> ``(1, 3, rows, cols)`` float32 tensor on ``device``.

    ``rgb`` may be read-only (a Ray object store array) or a transposed view: it is
    wrapped without a copy, and the float tensor returned is always a new one, so
    nothing writes to ``rgb`` (torch's warning about read-only arrays does not apply).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(rgb)
    return source.to(device).permute(2, 0, 1)[None].float()


def mask_prompt_logits(masks: np.ndarray, frame: tuple[float, float], size: int = 256) -> np.ndarray:
    """Rasterize tile-pixel polygons (WKB) into SAM's (n, 1, size, size) mask input.

    SAM's mask input covers the model's input frame at a quarter of its resolution;
    ``frame`` (fy, fx) is the fraction of that frame one tile pixel spans.

    Needs shapely and rasterio, imported here so that the rest of the model layer
    imports without the geospatial stack (a bare GPU machine runs boxes and points).
    """
    import rasterio.features
    import shapely
    import shapely.affinity

    fy, fx = frame
    to_low = [fx * size, 0.0, 0.0, fy * size, 0.0, 0.0]  # shapely's [a, b, d, e, xoff, yoff]: a scale
    out = np.full((len(masks), 1, size, size), -MASK_PROMPT_LOGIT, dtype=np.float32)
    for k, wkb in enumerate(masks):
        if wkb is None:
            continue
        geom = shapely.affinity.affine_transform(shapely.from_wkb(wkb), to_low)
        burned = rasterio.features.rasterize([(geom, 1)], out_shape=(size, size), all_touched=False, dtype="uint8")
        out[k, 0][burned > 0] = MASK_PROMPT_LOGIT
    return out

def wants_three_masks(prompts: PromptBatch, multimask: bool | None) -> bool:
    """Whether a decode batch asks SAM for its three candidate masks.

    Point-only prompts always do (one point is ambiguous: part, object or group).
    ``multimask`` True: every batch; False: boxes get SAM's single mask; None (auto):
    box prompts without a mask prompt whose outline area is known (``prompts.areas``:
    polygons that are not their own box, :func:`sam_geo.io.prompts.outline_areas`) get
    three, and :func:`choose_masks` keeps the one closest in area to the outline.
    Measured with MobileSAM, one box per building (``python benchmarks/quality.py``):
    Banepa median IoU 0.858 -> 0.869, Inria Austin 0.765 -> 0.800, whole Banepa scene
    1.10x the time.
    """
    if not prompts.has_box.all():
        return True
    if multimask is not None:
        return multimask
    if prompts.has_mask.any():  # outdated outlines (prompt_as mask): their area may be wrong
        return False
    return bool(len(prompts)) and not np.isnan(prompts.areas).any()


def choose_masks(
    low_res: torch.Tensor, iou: torch.Tensor, areas: np.ndarray, frame: tuple[float, float]
) -> torch.Tensor:
    """Index of the mask kept per prompt among SAM's candidates.

    The rule: the candidate closest in area to the prompt polygon when the prompt has
    one (``areas``, tile pixels; areas of candidates are measured on the low-res logits,
    which for box prompts on the CPU decoder cover only the window the mask is kept in),
    else the highest predicted IoU.
    """
    best = iou.argmax(dim=1)
    if low_res.shape[1] == 1 or np.isnan(areas).all():
        return best
    fy, fx = frame
    low_px_area = 1.0 / (fy * low_res.shape[-2] * fx * low_res.shape[-1])  # tile px per low-res px
    candidate_areas = (low_res > 0).sum(dim=(-1, -2)).float().cpu().numpy() * low_px_area
    closest = np.abs(candidate_areas - areas[:, None]).argmin(axis=1)
    use_area = torch.as_tensor(~np.isnan(areas), device=best.device)
    return torch.where(use_area, torch.as_tensor(closest, device=best.device), best)

def crop_for_prompt(batch: PromptBatch, k: int, tile_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) of the tile region a prompt's mask is kept in.

    A box keeps its mask within the box grown by half its size (SAM masks rarely leave
    their box by more); a point-only prompt keeps the whole tile.
    """
    rows, cols = tile_hw
    if not batch.has_box[k]:
        return 0, 0, rows, cols
    x0, y0, x1, y1 = batch.boxes[k]
    grow = 0.5 * max(x1 - x0, y1 - y0) + 8
    r0 = int(max(0, np.floor(y0 - grow)))
    c0 = int(max(0, np.floor(x0 - grow)))
    r1 = int(min(rows, np.ceil(y1 + grow)))
    c1 = int(min(cols, np.ceil(x1 + grow)))
    return r0, c0, max(r1, r0 + 1), max(c1, c0 + 1)

def logits_windows(batch: PromptBatch, tile_hw: tuple[int, int], frame: tuple[float, float],
                   size: int = 256) -> np.ndarray:
    """(n, 4) int: per box prompt, the ``(row0, col0, row1, col1)`` cells of the
    ``size`` x ``size`` low-res logits grid (end-exclusive) that :func:`upsample_crop`
    reads for the prompt's :func:`crop_for_prompt` crop: the cells under the crop's
    first and last pixel centres plus the next cell, which bilinear sampling also reads.
    ``frame`` (fy, fx) is the fraction of the logits grid one tile pixel spans."""
    fy, fx = frame
    out = np.zeros((len(batch), 4), dtype=np.int64)
    for k in range(len(batch)):
        r0, c0, r1, c1 = crop_for_prompt(batch, k, tile_hw)
        first = np.floor([(r0 + 0.5) * fy * size - 0.5, (c0 + 0.5) * fx * size - 0.5])
        last = np.floor([(r1 - 0.5) * fy * size - 0.5, (c1 - 0.5) * fx * size - 0.5]) + 2
        out[k] = np.clip(np.concatenate([first, last]), 0, size)
    return out

def upsample_crop(
    logits: torch.Tensor, crop: tuple[int, int, int, int], frame: tuple[float, float]
) -> np.ndarray:
    """Threshold low-res mask logits, bilinearly sampled at the crop's pixel centres.

    ``logits`` (h, w) cover the model's input frame; tile pixel (row, col) sits at
    fraction ``((row + 0.5) * fy, (col + 0.5) * fx)`` of it (``frame = (fy, fx)``, from
    the backend's ``logits_frame``). Same sampling as SAM's ``postprocess_masks``
    (bilinear, ``align_corners=False``) but only over the crop ``(row0, col0, row1,
    col1)``. Returns a (rows, cols) bool array.
    """
    r0, c0, r1, c1 = crop
    fy, fx = frame
    ys = (torch.arange(r0, r1, device=logits.device, dtype=torch.float32) + 0.5) * (2.0 * fy) - 1.0
    xs = (torch.arange(c0, c1, device=logits.device, dtype=torch.float32) + 0.5) * (2.0 * fx) - 1.0
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
    h, w = logits.shape[-2:]
    sampled = F.grid_sample(logits.float().reshape(1, 1, h, w), grid, mode="bilinear", align_corners=False)
    return (sampled[0, 0] > 0.0).cpu().numpy()
