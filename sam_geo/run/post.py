"""The finish stage's mask work, outside the model process: prompts' low-resolution
logits -> polygons in the scene CRS.

The model host (:meth:`sam_geo.run.host.ModelHost.decode_prompts`) sends back, per
prompt, only the cells of SAM's low-resolution logits that its mask can use
(:func:`sam_geo.model.masks.logits_windows`) as a :class:`PromptMasks`; here each is
traced into a polygon (:func:`sam_geo.geo.vectorize.logits_to_geometries`). A prompt
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
from sam_geo.geo.vectorize import logits_to_geometries, mask_to_geometry
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
    when the mask is empty or all of it is below ``post.min_area``).

    Prompts whose crop is all valid pixels are traced from their logits together
    (:func:`logits_to_geometries`); the others go the pixel way (:func:`_pixel_geometry`).
    """
    crops = masks.crops.astype(int)
    traced = np.array([bool(window.valid[r0:r1, c0:c1].all()) for r0, c0, r1, c1 in crops], dtype=bool)
    geoms: list[shapely.Geometry | None] = [None] * len(masks)
    if traced.any():
        which = np.flatnonzero(traced)
        found = logits_to_geometries(
            [masks.logits[k] for k in which], _cell_to_pixel(masks, which), tile.transform,
            crops[which][:, [1, 0, 3, 2]], min_area=post.min_area, simplify=post.simplify,
        )
        for k, geom in zip(which, found):
            geoms[k] = geom
    for k in np.flatnonzero(~traced):
        geoms[k] = _pixel_geometry(masks, int(k), window, tile, post)
    wkb = shapely.to_wkb(np.asarray(geoms, dtype=object))
    return [PromptResult(int(i), float(s), w) for i, s, w in zip(masks.index, masks.scores, wkb)]


def _cell_to_pixel(masks: PromptMasks, which: np.ndarray) -> np.ndarray:
    """``(n, 6)`` affine coefficients from each crop's cell-centre coordinates to tile
    pixel corners: a tile pixel spans ``frame`` of the grid, so a cell is
    ``1 / (frame * grid)`` pixels."""
    fy, fx = masks.frame
    gh, gw = masks.grid_hw
    sx, sy = 1.0 / (fx * gw), 1.0 / (fy * gh)
    a0, b0 = masks.cells[which, 0].astype(float), masks.cells[which, 1].astype(float)
    zeros = np.zeros(len(which))
    return np.column_stack([np.full(len(which), sx), zeros, sx * (b0 + 0.5), zeros, np.full(len(which), sy), sy * (a0 + 0.5)])


def _pixel_geometry(
    masks: PromptMasks, k: int, window: WindowRead, tile: Tile, post: PostConfig
) -> shapely.Geometry | None:
    """Prompt ``k``'s mask upsampled over its crop, ANDed with the valid pixels, traced
    along pixel edges (for crops that hold nodata)."""
    r0, c0, r1, c1 = (int(v) for v in masks.crops[k])
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
