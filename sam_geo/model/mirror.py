"""Mirrored views of a tile for test-time augmentation: :class:`Mirror`.

With ``flip_views`` above 1 (:attr:`sam_geo.settings.Settings.flip_views`), a tile is
encoded once per view: as it is, and mirrored. Each view's prompts are mirrored with
the image, decoded, and the low-resolution logits of the mask each view chose are
mirrored back and averaged (:meth:`sam_geo.run.host.ModelHost.decode_prompts`). SAM's
edges on its low-resolution grid wander by a cell or so, differently in each view; the
mean over mirrored views cancels part of that noise.

Coordinates: tile pixels (x = column, y = row, pixel edges at whole numbers); the model
sees the tile resized by ``input_hw / tile_hw`` and adds half a model pixel to every
prompt coordinate (SAM's prompt encoder), so a mirrored coordinate is ``W - x - 1 / r``
(``r`` model pixels per tile pixel): SAM then sees each prompt at the mirror image of
where it sees it in the plain view.

Needs numpy and torch only; mask prompts (WKB) are mirrored with shapely, imported
where used, as in :mod:`sam_geo.model.masks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sam_geo.io.prompt_batch import PromptBatch
from sam_geo.settings import FLIP_VIEW_COUNTS


@dataclass(frozen=True)
class Mirror:
    """One view of a tile: mirrored across its vertical axis (``cols``: left-right),
    its horizontal axis (``rows``: up-down), both, or neither (the plain tile)."""

    cols: bool = False
    rows: bool = False

    @property
    def is_identity(self) -> bool:
        return not (self.cols or self.rows)

    def image(self, rgb: np.ndarray) -> np.ndarray:
        """The (rows, cols, bands) array as this view sees it (a new contiguous array,
        or ``rgb`` itself for the plain view)."""
        if self.is_identity:
            return rgb
        view = rgb[::-1] if self.rows else rgb
        view = view[:, ::-1] if self.cols else view
        return np.ascontiguousarray(view)

    def prompts(self, batch: PromptBatch, tile_hw: tuple[int, int], input_hw: tuple[int, int]) -> PromptBatch:
        """``batch`` (tile pixels) as this view's image shows it. Points and boxes move
        to the mirror of where SAM sees them (module docstring); mask polygons are
        mirrored as geometry. Point padding (label -1) and areas are kept."""
        if self.is_identity:
            return batch
        (height, width), (in_h, in_w) = tile_hw, input_hw
        boxes = batch.boxes.copy()
        points = batch.points.copy()
        if self.cols:
            shift = width - width / in_w
            boxes[:, [0, 2]] = shift - batch.boxes[:, [2, 0]]
            points[..., 0] = shift - batch.points[..., 0]
        if self.rows:
            shift = height - height / in_h
            boxes[:, [1, 3]] = shift - batch.boxes[:, [3, 1]]
            points[..., 1] = shift - batch.points[..., 1]
        return batch.replace(boxes=boxes, points=points, masks=self._mirror_masks(batch.masks, tile_hw))

    def _mirror_masks(self, masks: np.ndarray, tile_hw: tuple[int, int]) -> np.ndarray:
        if all(m is None for m in masks):
            return masks
        import shapely
        import shapely.affinity

        height, width = tile_hw
        sx, sy = (-1.0 if self.cols else 1.0), (-1.0 if self.rows else 1.0)
        matrix = [sx, 0.0, 0.0, sy, width if self.cols else 0.0, height if self.rows else 0.0]
        out = np.full(len(masks), None, dtype=object)
        for k, wkb in enumerate(masks):
            if wkb is not None:
                out[k] = shapely.to_wkb(shapely.affinity.affine_transform(shapely.from_wkb(wkb), matrix))
        return out

    def restore(self, logits: torch.Tensor, tile_hw: tuple[int, int], frame: tuple[float, float]) -> torch.Tensor:
        """Low-res logits ``(n, h, w)`` decoded in this view, mirrored back onto the
        plain tile's grid. The tile covers the first ``tile_px * frame * grid`` cells of
        each axis (the rest is the model's padding, left as it is); a mirror within a
        fractional extent is resampled linearly (:func:`mirror_axis`)."""
        out = logits
        if self.cols:
            out = mirror_axis(out, tile_hw[1] * frame[1] * logits.shape[-1], dim=-1)
        if self.rows:
            out = mirror_axis(out, tile_hw[0] * frame[0] * logits.shape[-2], dim=-2)
        return out


def mirror_axis(values: torch.Tensor, extent: float, dim: int) -> torch.Tensor:
    """``values`` mirrored along ``dim`` within its first ``extent`` cells.

    Cell ``u`` (centre ``u + 0.5``) takes the value at centre ``extent - u - 0.5``:
    cell ``extent - 1 - u`` when ``extent`` is whole, else the linear interpolation of
    its two neighbours (clamped at the axis ends). Cells from ``ceil(extent)`` on are
    copied unchanged. Returns a new tensor.
    """
    size = values.shape[dim]
    count = min(size, math.ceil(extent - 1e-6))
    out = values.clone()
    if count <= 0:
        return out
    source = extent - 1.0 - torch.arange(count, dtype=torch.float64)
    if abs(extent - round(extent)) < 1e-6:
        index = source.round().long().clamp(0, size - 1).to(values.device)
        out.narrow(dim, 0, count).copy_(values.index_select(dim, index))
        return out
    lower = source.floor().clamp(0, size - 1)
    weight = (source - lower).clamp(0, 1)
    upper = (lower + 1).clamp(max=size - 1)
    shape = [1] * values.dim()
    shape[dim] = count
    weight = weight.to(values.dtype).to(values.device).reshape(shape)
    low = values.index_select(dim, lower.long().to(values.device))
    high = values.index_select(dim, upper.long().to(values.device))
    out.narrow(dim, 0, count).copy_(low * (1 - weight) + high * weight)
    return out


def mirror_views(count: int) -> tuple[Mirror, ...]:
    """The views of ``flip_views`` = ``count`` (:data:`sam_geo.settings.FLIP_VIEW_COUNTS`),
    plain view first."""
    if count not in FLIP_VIEW_COUNTS:
        raise ValueError(f"flip views must be one of {FLIP_VIEW_COUNTS}, got {count}")
    views = (Mirror(), Mirror(rows=True), Mirror(cols=True), Mirror(cols=True, rows=True))
    return views[: 2 if count == 2 else count]
