"""The finish stage's mask work, outside the model process: prompts' low-resolution
logits -> polygons in the scene CRS.

The model host (:meth:`sam_geo.run.host.ModelHost.decode_prompts`) sends back, per
prompt, only the cells of SAM's low-resolution logits that its mask can use
(:func:`sam_geo.model.masks.logits_windows`) as a :class:`PromptMasks`; here each is
traced into a polygon (:func:`sam_geo.geo.vectorize.logits_to_geometries`), all of a
tile's prompts at once. Where a prompt's crop holds invalid (nodata) pixels, they are
taken out of its polygon, along pixel edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

from sam_geo.geo.tiles import Tile
from sam_geo.geo.vectorize import logits_to_geometries, nodata_polygon
from sam_geo.io.scenes import WindowRead
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

    All of a tile's prompts are traced from their logits together
    (:func:`logits_to_geometries`); a prompt whose crop holds nodata pixels loses them
    (:func:`nodata_polygon`: the outline follows pixel edges there).
    """
    crops = masks.crops.astype(int)
    exclude = None if window.valid.all() else [nodata_polygon(window.valid, tuple(crop)) for crop in crops]
    geoms = logits_to_geometries(
        masks.logits, _cell_to_pixel(masks), tile.transform, crops[:, [1, 0, 3, 2]],
        min_area=post.min_area, simplify=post.simplify, exclude=exclude,
    )
    wkb = shapely.to_wkb(np.asarray(geoms, dtype=object))
    return [PromptResult(int(i), float(s), w) for i, s, w in zip(masks.index, masks.scores, wkb)]


def _cell_to_pixel(masks: PromptMasks) -> np.ndarray:
    """``(n, 6)`` affine coefficients from each crop's cell-centre coordinates to tile
    pixel corners: a tile pixel spans ``frame`` of the grid, so a cell is
    ``1 / (frame * grid)`` pixels."""
    fy, fx = masks.frame
    gh, gw = masks.grid_hw
    sx, sy = 1.0 / (fx * gw), 1.0 / (fy * gh)
    rows, cols = masks.cells[:, 0].astype(float), masks.cells[:, 1].astype(float)
    n, zeros = len(masks), np.zeros(len(masks))
    return np.column_stack([np.full(n, sx), zeros, sx * (cols + 0.5), zeros, np.full(n, sy), sy * (rows + 0.5)])
