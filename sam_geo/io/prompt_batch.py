"""The prompts of one tile as arrays: :class:`PromptBatch`.

A module of its own, with numpy as its only dependency, because the model layer takes
it (:mod:`sam_geo.model.sam_backend`, :mod:`sam_geo.model.sam2_backend`,
:mod:`sam_geo.model.masks`): the model layer then imports without the geospatial stack
(geopandas, shapely, rasterio), e.g. on a bare GPU machine. Reading prompt layers into
batches is :mod:`sam_geo.io.prompts`, which re-exports the class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PromptBatch:
    """Prompts of one tile, as arrays in scene pixels (picklable, compact).

    ``index``: (n,) prompt_index of each prompt in the layer; ``boxes``: (n, 4)
    ``x0, y0, x1, y1`` (cols, rows) or NaN rows for point-only prompts; ``points``:
    (n, k, 2) ``x, y``; ``labels``: (n, k) 1 positive, 0 negative, -1 padding;
    ``masks``: (n,) WKB of the prompt polygon in scene pixels for mask prompts, else
    None; ``areas``: (n,) the prompt polygon's area in scene pixels (NaN for points and
    rectangles, :func:`sam_geo.io.prompts.outline_areas`), used to choose among SAM's
    candidate masks.
    """

    index: np.ndarray
    boxes: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None
    areas: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.index)
        if self.masks is None:
            object.__setattr__(self, "masks", np.full(n, None, dtype=object))
        if self.areas is None:
            object.__setattr__(self, "areas", np.full(n, np.nan))

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def take(self, rows: np.ndarray | list[int]) -> PromptBatch:
        rows = np.asarray(rows, dtype=np.int64)
        return PromptBatch(
            self.index[rows], self.boxes[rows], self.points[rows], self.labels[rows], self.masks[rows], self.areas[rows]
        )

    def replace(self, **changes: np.ndarray) -> PromptBatch:
        fields = {k: getattr(self, k) for k in ("index", "boxes", "points", "labels", "masks", "areas")}
        return PromptBatch(**{**fields, **changes})

    @property
    def has_box(self) -> np.ndarray:
        return ~np.isnan(self.boxes[:, 0])

    @property
    def has_mask(self) -> np.ndarray:
        return np.array([m is not None for m in self.masks], dtype=bool)
