"""Prompted mode: one polygon per feature of a vector layer (points, boxes, rough masks).

Driver side (:class:`PromptedMode`): the layer is read and reprojected explicitly to each
scene's CRS, each prompt goes to the first scene it intersects, and each scene's prompts
are planned onto tiles whose read window holds the prompt's whole box plus a margin
(:func:`sam_geo.io.prompts.plan_prompt_tiles`), so no prompted object is cut by a tile
edge and no stitching is needed. Tile side (:class:`PromptedTask`): read the window,
report prompts on nodata, encode once, decode the rest. :meth:`PromptedMode.assemble`
joins the polygons to the prompts' attributes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from affine import Affine

from sam_geo.errors import ConfigError
from sam_geo.geo.tiles import ZOOMS, Tile, TileGrid
from sam_geo.geo.vectorize import geometry_area_m2
from sam_geo.io.prompts import (
    GroupPoints,
    PromptBatch,
    PromptSet,
    TilePlan,
    add_group_points,
    add_negative_points,
    build_prompts,
    group_prompt_rows,
    negative_points_in_pixels,
    no_usable_prompts,
    plan_prompt_tiles,
    read_prompts_near,
)
from sam_geo.io.layers import Area
from sam_geo.io.scenes import SceneInfo, SceneReader, Stretch, compute_stretch
from sam_geo.run.host import ModelHost, cpu_timed
from sam_geo.run.post import PromptMasks, prompt_polygons
from sam_geo.run.pipeline import COMMON_TILE_SETTINGS, reproject_geometries
from sam_geo.run.summary import RunSummary
from sam_geo.run.tasks import PostConfig, PromptResult, TileInput, TileResult, TileTask
from sam_geo.run.workdir import digest
from sam_geo.model.registry import get_spec
from sam_geo.settings import Settings

OUTPUT_COLUMNS = ("prompt_index", "score", "area_m2")
"""Columns sam-geo adds to every prompted output (after the prompt's own attributes)."""

ZOOM_THRESHOLDS_PX = ((48.0, 1), (24.0, 2))
"""Auto zoom: median prompt box side (scene px) >= 48 -> 1, >= 24 -> 2, smaller -> 4."""


# --- tile side -------------------------------------------------------------------------


@dataclass
class PromptedResult(TileResult):
    """A prompted tile's polygons (one per decoded prompt) and its prompts on nodata."""

    results: list[PromptResult] = field(default_factory=list)
    on_nodata: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class PromptedTask(TileTask):
    """A tile and the prompts planned onto it (scene pixels)."""

    prompts: PromptBatch

    def load(self, reader: SceneReader) -> TileInput:
        """Read the window, put the prompts in tile pixels, set aside those on nodata."""
        tile_input = TileInput(window=None)
        with cpu_timed(tile_input.seconds, "read"):
            window = self.read(reader)
            prompts = to_tile_pixels(self.prompts, self.tile)
            usable = prompts_on_data(prompts, window.valid) if window.valid.any() else np.zeros(len(prompts), bool)
        tile_input.window = window if window.valid.any() else None
        tile_input.payload = (prompts.take(np.flatnonzero(usable)), [int(i) for i in prompts.index[~usable]])
        tile_input.needs_model = bool(usable.any())
        return tile_input

    def infer(self, host: ModelHost, tile_input: TileInput) -> PromptMasks:
        """Encode once, decode the prompts on data (model calls only)."""
        prompts, _ = tile_input.payload
        return host.decode_prompts(tile_input.window.rgb, prompts, tile_input.seconds)

    def finish(self, tile_input: TileInput, output: PromptMasks | None, post: PostConfig) -> PromptedResult:
        """Polygons of the decoded prompts, in the scene CRS."""
        _, on_nodata = tile_input.payload
        result = self.new_result(PromptedResult, tile_input, on_nodata=on_nodata)
        if output is not None:
            with cpu_timed(result.seconds, "vectorize"):
                result.results = prompt_polygons(output, tile_input.window, self.tile, post)
            result.encoded = True
        return result


def to_tile_pixels(batch: PromptBatch, tile: Tile) -> PromptBatch:
    """Scene-pixel prompts -> prompts in the tile array's pixels (x = col, y = row)."""
    offset = np.array([tile.read.col_start, tile.read.row_start], dtype=np.float64)
    s = tile.scale
    boxes = (batch.boxes - np.tile(offset, 2)) / s
    points = (batch.points - offset) / s
    to_tile = (Affine.scale(1 / s) @ Affine.translation(-offset[0], -offset[1])).to_shapely()
    masks = np.array(
        [None if m is None else shapely.to_wkb(shapely.affinity.affine_transform(shapely.from_wkb(m), to_tile))
         for m in batch.masks],
        dtype=object,
    )
    return batch.replace(boxes=boxes, points=points, masks=masks, areas=batch.areas / (s * s))


def prompts_on_data(batch: PromptBatch, valid: np.ndarray) -> np.ndarray:
    """(n,) bool: False for prompts whose positive points or whole box fall on nodata.

    ``valid``: (rows, cols) bool of the tile array; prompts in its pixels.
    """
    rows, cols = valid.shape
    ok = np.ones(len(batch), dtype=bool)
    if valid.all():
        return ok
    for k in range(len(batch)):
        if batch.has_box[k]:
            x0, y0, x1, y1 = batch.boxes[k]
            r0, r1 = int(np.clip(np.floor(y0), 0, rows - 1)), int(np.clip(np.ceil(y1), 1, rows))
            c0, c1 = int(np.clip(np.floor(x0), 0, cols - 1)), int(np.clip(np.ceil(x1), 1, cols))
            ok[k] = bool(valid[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)].any())
        else:
            positive = batch.points[k][batch.labels[k] == 1]
            rr = np.clip(positive[:, 1].astype(int), 0, rows - 1)
            cc = np.clip(positive[:, 0].astype(int), 0, cols - 1)
            ok[k] = bool(valid[rr, cc].any())
    return ok


def choose_zoom(batch: PromptBatch) -> int:
    """Zoom for a prompt set: upsample scenes whose prompted objects are small in pixels.

    SAM segments objects a few dozen pixels across poorly (it was trained on photos
    where objects span hundreds). Measured on the Sentinel-2 fields (10 m, median box
    20 px): median IoU 0.566 at zoom 1, 0.628 at 2, 0.656 at 4 (``benchmarks/zoom.py``).
    Point-only layers give no size and keep zoom 1.
    """
    boxes = batch.boxes[batch.has_box]
    if len(boxes) == 0:
        return 1
    median_side = float(np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))
    for threshold, zoom in ZOOM_THRESHOLDS_PX:
        if median_side >= threshold:
            return zoom
    return ZOOMS[-1]


# --- driver side -----------------------------------------------------------------------


@dataclass(frozen=True)
class PromptLayer:
    """Where the prompts come from and how its rows are read.

    ``source``: a vector file (any CRS GDAL reads; reprojected explicitly) or a
    GeoDataFrame; ``layer``: a layer name in a multi-layer file; ``crs``: the CRS of a
    layer without one; ``id_column``: names prompts in the summary; ``negative_points``:
    a point layer whose points join every prompt near them as negative points;
    ``group_column`` (and ``label_column``, 1 positive / 0 negative): rows sharing a
    group value are one prompt with several points (and a box if the group has a
    polygon).
    """

    source: str | os.PathLike[str] | gpd.GeoDataFrame
    layer: str | None = None
    crs: str | None = None
    id_column: str | None = None
    negative_points: str | os.PathLike[str] | gpd.GeoDataFrame | None = None
    group_column: str | None = None
    label_column: str | None = None


@dataclass(frozen=True)
class SceneJob:
    """One scene's share of a prompted run."""

    scene: SceneInfo
    grid: TileGrid
    stretch: Stretch
    prompts: PromptSet
    plan: TilePlan


@dataclass
class _Layer:
    """The prompt layer as read (set by :meth:`PromptedMode.plan`)."""

    frame: gpd.GeoDataFrame
    id_column: str | None
    group_points: GroupPoints | None
    negatives: gpd.GeoDataFrame | None
    layer_features: int | None


class PromptedMode:
    """Prompted segmentation as a :class:`~sam_geo.run.tasks.Mode`."""

    name = "prompted"
    order_by = "prompt_index"
    tile_settings = (*COMMON_TILE_SETTINGS, "min_area_m2", "prompt_as", "box_grow", "multimask", "flip_views")

    def __init__(self, prompts: PromptLayer) -> None:
        self.prompts = prompts
        self.layer: _Layer | None = None
        self.jobs: list[SceneJob] = []
        self.outside: tuple[int, ...] = ()
        self.invalid: tuple[int, ...] = ()
        self.scene_of_tile: dict[str, SceneInfo] = {}
        self.on_nodata: list[int] = []
        self.empty: list[int] = []

    @property
    def inputs(self) -> dict[str, Any]:
        """Input files an output must not overwrite, by what they are."""
        return {"the prompt layer": self.prompts.source, "the negative-point layer": self.prompts.negative_points}

    def check(self, settings: Settings) -> None:
        """A model that takes box and point prompts (not SAM 3's phrases) and, for mask
        prompts, mask inputs; else ConfigError."""
        family = get_spec(settings.model).family
        if family in ("sam2_hf", "edgetam") and settings.prompt_as == "mask":
            raise ConfigError(
                f"--prompt-as mask needs a SAM, MobileSAM or sam2-package SAM 2.1 model; {settings.model!r} takes "
                "boxes and points only: use --prompt-as box (or point)"
            )
        if family == "sam3":
            raise ConfigError(
                f"{settings.model!r} outlines every instance of a phrase (sam-geo text SCENE \"phrase\" --model "
                f"{settings.model}); prompts from a layer need a SAM or SAM 2.1 model, e.g. --model mobile_sam"
            )

    def check_outputs(self, overwrite: bool) -> None:
        """No outputs besides the vector layer."""

    def write_outputs(self, overwrite: bool, summary: RunSummary) -> None:
        """No outputs besides the vector layer."""

    def plan(self, scenes: list[SceneInfo], settings: Settings) -> list[TileTask]:
        """Read the layer near the scenes, give each prompt to the first scene it
        intersects, plan tiles.

        Raises :class:`~sam_geo.errors.PromptError` when no prompt can be used (almost
        always a CRS or extent mistake; the message says which).
        """
        self.layer = self._read_layer(scenes)
        self.jobs, self.outside, self.invalid = self._plan_scenes(scenes, settings)
        if not self.jobs:
            source = self.prompts.source
            name = "the prompt GeoDataFrame" if isinstance(source, gpd.GeoDataFrame) else str(source)
            extents = [(i.path, i.crs, tuple(i.bounds)) for i in scenes]
            raise no_usable_prompts(name, self.layer.frame, extents, self.outside, self.invalid)
        tasks = [PromptedTask(j.scene, j.stretch, tile, batch) for j in self.jobs for tile, batch in j.plan.tiles]
        self.scene_of_tile = {task.key: task.scene for task in tasks}
        return list(tasks)

    def _read_layer(self, scenes: list[SceneInfo]) -> _Layer:
        """The prompt layer: a GeoDataFrame whole, a file only near the scenes
        (:func:`~sam_geo.io.layers.read_layer_near`), index = the features' ids."""
        p = self.prompts
        areas = [Area(shapely.box(*info.bounds), info.crs, info.path) for info in scenes]
        frame, layer_features = read_prompts_near(p.source, areas, layer=p.layer, assume_crs=p.crs)
        if p.id_column is not None and p.id_column not in frame.columns:
            raise ConfigError(
                f"id column {p.id_column!r} is not in the prompt layer; its columns are: "
                + ", ".join(map(str, frame.columns.drop(frame.geometry.name)))
            )
        group_points, id_column = None, p.id_column
        if p.group_column is not None:
            frame, group_points = group_prompt_rows(frame, p.group_column, p.label_column)
            id_column = id_column or p.group_column
        elif p.label_column is not None:
            raise ConfigError("a label column needs a group column naming which object each point belongs to")
        negatives = None
        if p.negative_points is not None:
            negatives, _ = read_prompts_near(p.negative_points, areas, allow_empty=True)
        return _Layer(frame, id_column, group_points, negatives, layer_features)

    def _plan_scenes(
        self, infos: list[SceneInfo], settings: Settings
    ) -> tuple[list[SceneJob], tuple[int, ...], tuple[int, ...]]:
        """Each scene's prompts and tiles; prompts outside every scene and invalid ones."""
        jobs: list[SceneJob] = []
        remaining = self.layer.frame
        invalid: tuple[int, ...] = ()
        for n, info in enumerate(infos):
            prompt_set = build_prompts(
                remaining, info.crs, info.transform, (info.height, info.width), prompt_as=settings.prompt_as,
                box_grow=settings.box_grow,
            )
            if n == 0:
                invalid = prompt_set.invalid
            remaining = remaining.loc[list(prompt_set.outside)]
            if len(prompt_set.batch):
                jobs.append(self._scene_job(info, self._with_extra_points(prompt_set, info), settings))
        return jobs, tuple(int(i) for i in remaining.index), invalid

    def _with_extra_points(self, prompt_set: PromptSet, info: SceneInfo) -> PromptSet:
        """Group points and negative points added to a scene's prompts."""
        batch = prompt_set.batch
        if self.layer.group_points is not None:
            batch = add_group_points(batch, self.layer.group_points, info.crs, info.transform)
        if self.layer.negatives is not None:
            batch = add_negative_points(batch, negative_points_in_pixels(self.layer.negatives, info.crs, info.transform))
        return replace(prompt_set, batch=batch)

    @staticmethod
    def _scene_job(info: SceneInfo, prompt_set: PromptSet, settings: Settings) -> SceneJob:
        zoom = settings.zoom or choose_zoom(prompt_set.batch)
        grid = TileGrid(info.height, info.width, info.transform, settings.tile_size_px, settings.overlap_px, zoom)
        stretch = compute_stretch(info, method=settings.stretch)
        return SceneJob(info, grid, stretch, prompt_set, plan_prompt_tiles(grid, prompt_set.batch))

    def fingerprint(self) -> dict[str, Any]:
        """Digests of the prompts (geometry, CRS, columns), negative and group points."""
        layer = self.layer
        return {
            "prompts": geometry_digest(layer.frame),
            "negative_points": None if layer.negatives is None else geometry_digest(layer.negatives),
            "group_points": None if layer.group_points is None else points_digest(layer.group_points),
        }

    def summary_settings(self) -> dict[str, Any]:
        """The zoom each scene ran at (auto zoom depends on the prompts)."""
        return {"zoom": [job.grid.zoom for job in self.jobs]}

    def accept(self, result: TileResult) -> gpd.GeoDataFrame | None:
        """The tile's polygons joined to their prompts' attributes (a prompt is decoded
        in one tile only, so its row is final); prompts on nodata or empty are noted."""
        self.on_nodata += getattr(result, "on_nodata", [])
        results = getattr(result, "results", [])
        self.empty += [r.prompt_index for r in results if r.wkb is None]
        done = sorted((r for r in results if r.wkb is not None), key=lambda r: r.prompt_index)
        if not done:
            return None
        return self._frame([(self.scene_of_tile[result.tile_key], r) for r in done])

    def finish(self, summary: RunSummary) -> Iterator[gpd.GeoDataFrame]:
        """Nothing left to give (every row went out with its tile); the prompt counts.

        Several scenes are merged into the first scene's CRS (reprojected explicitly)
        with a ``scene`` column naming each row's scene.
        """
        self._count_prompts(summary, sorted(set(self.on_nodata)), sorted(self.empty))
        yield self._frame([])

    def _count_prompts(self, summary: RunSummary, on_nodata: list[int], empty: list[int]) -> None:
        frame, id_column = self.layer.frame, self.layer.id_column
        counts = summary.prompts
        counts.total = len(frame)
        counts.layer_features = self.layer.layer_features
        counts.used = sum(len(j.prompts.batch) for j in self.jobs)
        counts.outside, counts.outside_ids = len(self.outside), prompt_ids(frame, self.outside, id_column)
        counts.invalid, counts.invalid_ids = len(self.invalid), prompt_ids(frame, self.invalid, id_column)
        counts.on_nodata, counts.on_nodata_ids = len(on_nodata), prompt_ids(frame, on_nodata, id_column)
        counts.empty, counts.empty_ids = len(empty), prompt_ids(frame, empty, id_column)

    def _frame(self, done: list[tuple[SceneInfo, PromptResult]]) -> gpd.GeoDataFrame:
        frame = self.layer.frame
        out_crs = self.jobs[0].scene.crs
        index = np.array([r.prompt_index for _, r in done], dtype=np.int64)
        attrs = pd.DataFrame(frame.drop(columns=frame.geometry.name)).loc[index]
        attrs = attrs.rename(columns={c: f"prompt_{c}" for c in (*OUTPUT_COLUMNS, "scene") if c in attrs.columns})
        attrs = attrs.reset_index()
        if len(self.jobs) > 1:
            attrs["scene"] = [s.path for s, _ in done]
        attrs["score"] = np.array([r.score for _, r in done], dtype=np.float64)
        geoms = shapely.from_wkb([r.wkb for _, r in done])
        geoms = reproject_geometries(geoms, [s.crs for s, _ in done], out_crs)
        gdf = gpd.GeoDataFrame(attrs, geometry=gpd.GeoSeries(geoms, crs=out_crs), crs=out_crs)
        gdf["area_m2"] = geometry_area_m2(gdf.geometry, out_crs) if len(gdf) else np.zeros(0)
        return gdf


def prompt_ids(frame: pd.DataFrame, rows: list[int] | tuple[int, ...], id_column: str | None) -> list[Any]:
    """The ids of prompt rows: values of ``id_column``, else the row numbers."""
    if id_column is None:
        return [int(r) for r in rows]
    return [v.item() if hasattr(v, "item") else v for v in frame.loc[list(rows), id_column].tolist()]


def geometry_digest(frame: gpd.GeoDataFrame) -> str:
    """sha256 over a layer's geometries (WKB), CRS and column names."""
    wkb = shapely.to_wkb(frame.geometry.to_numpy(), hex=False)
    return digest(
        b"".join(g if g is not None else b"-" for g in wkb),
        str(frame.crs).encode(),
        ",".join(map(str, frame.columns)).encode(),
    )


def points_digest(group: GroupPoints) -> str:
    """A digest of grouped prompts' points and labels (for the work-dir fingerprint)."""
    parts = [np.ascontiguousarray(a).tobytes() for k in sorted(group.points) for a in group.points[k]]
    return digest(*parts)
