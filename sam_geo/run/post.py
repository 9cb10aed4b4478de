"""The finish stage's mask work, outside the model process: prompts' low-resolution
logits -> polygons in the scene CRS.

The model host (:meth:`sam_geo.run.host.ModelHost.decode_prompts`) sends back, per
prompt, only the cells of SAM's low-resolution logits that its mask can use
(:func:`sam_geo.model.masks.logits_windows`) as a :class:`PromptMasks`; here each is
traced into a polygon (:func:`sam_geo.geo.vectorize.logits_to_geometry`). A prompt
whose crop holds invalid (nodata) pixels goes the pixel way instead: upsampled over
its crop, ANDed with the valid pixels and traced along pixel edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
import torch
from affine import Affine

from sam_geo.geo.tiles import Tile
from sam_geo.geo.vectorize import logits_to_geometry, mask_to_geometry
from sam_geo.io.scenes import WindowRead
from sam_geo.model.masks import upsample_crop
from sam_geo.run.tasks import PostConfig, PromptResult


@dataclass
class PromptMasks:
    """Decoded prompts of one tile, as crops of SAM's low-resolution logits (numpy).

    Per prompt ``k``: ``index[k]`` (the prompt layer's row), ``scores[k]`` (predicted
    IoU), ``crops[k]`` (``row0, col0, row1, col1`` tile pixels its mask is kept in),
    ``cells[k]`` (``row0, col0, row1, col1`` cells of the logits grid sent) and
    ``logits[k]`` (float32 array of those cells). ``frame`` (fy, fx): fraction of the
    ``grid_hw`` logits grid one tile pixel spans.
    """

    index: np.ndarray
    scores: np.ndarray
    crops: np.ndarray
    cells: np.ndarray
    logits: list[np.ndarray]
    frame: tuple[float, float]
    grid_hw: tuple[int, int]

    def __len__(self) -> int:
        return len(self.index)


def prompt_polygons(masks: PromptMasks, window: WindowRead, tile: Tile, post: PostConfig) -> list[PromptResult]:
    """One :class:`PromptResult` per decoded prompt: its polygon (WKB, scene CRS; None
    when the mask is empty or all of it is below ``post.min_area``)."""
    out = []
    for k in range(len(masks)):
        geom = _prompt_geometry(masks, k, window, tile, post)
        out.append(PromptResult(int(masks.index[k]), float(masks.scores[k]), None if geom is None else shapely.to_wkb(geom)))
    return out


def _prompt_geometry(
    masks: PromptMasks, k: int, window: WindowRead, tile: Tile, post: PostConfig
) -> shapely.Geometry | None:
    r0, c0, r1, c1 = (int(v) for v in masks.crops[k])
    a0, b0, _, _ = (int(v) for v in masks.cells[k])
    fy, fx = masks.frame
    gh, gw = masks.grid_hw
    if window.valid[r0:r1, c0:c1].all():
        cell_to_pixel = Affine.scale(1.0 / (fx * gw), 1.0 / (fy * gh)) * Affine.translation(b0 + 0.5, a0 + 0.5)
        return logits_to_geometry(
            masks.logits[k], cell_to_pixel, tile.transform, (c0, r0, c1, r1),
            min_area=post.min_area, simplify=post.simplify,
        )
    mask = upsample_crop(torch.as_tensor(_full_grid(masks, k)), (r0, c0, r1, c1), masks.frame)
    mask &= window.valid[r0:r1, c0:c1]
    return mask_to_geometry(
        mask, tile.transform * Affine.translation(c0, r0), min_area=post.min_area, simplify=post.simplify
    )


def _full_grid(masks: PromptMasks, k: int) -> np.ndarray:
    """The prompt's logits crop put back on the whole grid, its edge values repeated."""
    a0, b0, a1, b1 = (int(v) for v in masks.cells[k])
    gh, gw = masks.grid_hw
    return np.pad(masks.logits[k], ((a0, gh - a1), (b0, gw - b1)), mode="edge")
