"""Prompts from vector layers: reading, reprojection, conversion to pixels, tile assignment.

A prompt layer (Shapefile, GeoJSON, GeoPackage, GeoParquet, or a GeoDataFrame) is read,
checked and reprojected **explicitly** to the scene's CRS. Each feature becomes one
prompt and keeps its row position (``prompt_index``) and every attribute, which the
pipeline joins back onto the output polygon.

How a geometry becomes a prompt (``prompt_as``):

* ``"point"``: one positive point (a polygon's point on surface);
* ``"box"``: the geometry's bounding box in scene pixels;
* ``"box+point"``: the box plus a positive point on the surface;
* ``"auto"`` (default): points -> point prompts, polygons -> :data:`DEFAULT_POLYGON_MODE`.

Pixel coordinates here are full-resolution scene pixels, x = column, y = row (SAM's
convention), with pixel centres at +0.5.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from affine import Affine
from pyproj import CRS

from .errors import CRSError, PromptError
from .tiles import PixelBox, Tile, TileGrid

PromptMode = Literal["auto", "point", "box", "box+point"]
PROMPT_MODES: tuple[str, ...] = ("auto", "point", "box", "box+point")

DEFAULT_POLYGON_MODE: PromptMode = "box"
"""How polygons are prompted under ``"auto"``; chosen by measurement (see DESIGN.md)."""

BOX_MARGIN_FRACTION = 0.15
"""Context kept around a box inside its decode window, as a fraction of its longer side."""

MIN_BOX_MARGIN_PX = 16
"""Smallest context margin in scene pixels around a box or point inside its window."""

_POINT_TYPES = {"Point", "MultiPoint"}
_AREA_TYPES = {"Polygon", "MultiPolygon"}


@dataclass(frozen=True)
class PromptBatch:
    """Prompts of one tile, as arrays in scene pixels (picklable, compact).

    ``index``: (n,) prompt_index of each prompt in the layer; ``boxes``: (n, 4)
    ``x0, y0, x1, y1`` (cols, rows) or NaN rows for point-only prompts; ``points``:
    (n, k, 2) ``x, y``; ``labels``: (n, k) 1 positive, 0 negative, -1 padding.
    """

    index: np.ndarray
    boxes: np.ndarray
    points: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def take(self, rows: np.ndarray | list[int]) -> PromptBatch:
        rows = np.asarray(rows, dtype=np.int64)
        return PromptBatch(self.index[rows], self.boxes[rows], self.points[rows], self.labels[rows])

    @property
    def has_box(self) -> np.ndarray:
        return ~np.isnan(self.boxes[:, 0])


@dataclass(frozen=True)
class PromptSet:
    """All prompts of a layer, in scene pixels, plus what could not be used.

    ``frame`` holds the layer's attributes (geometry in the scene CRS) indexed by
    ``prompt_index``; ``batch`` the usable prompts; ``outside`` / ``invalid`` the
    ``prompt_index`` values that lie outside the scene or have no usable geometry.
    """

    frame: gpd.GeoDataFrame
    batch: PromptBatch
    outside: tuple[int, ...] = ()
    invalid: tuple[int, ...] = ()


@dataclass
class TilePlan:
    """Prompts grouped by the tile they are decoded in."""

    tiles: list[tuple[Tile, PromptBatch]] = field(default_factory=list)

    @property
    def n_prompts(self) -> int:
        return sum(len(b) for _, b in self.tiles)


def read_prompt_layer(
    source: str | os.PathLike[str] | gpd.GeoDataFrame,
    *,
    layer: str | None = None,
    assume_crs: str | None = None,
) -> gpd.GeoDataFrame:
    """Read a prompt layer (any OGR format or GeoParquet) or take a GeoDataFrame.

    Raises :class:`PromptError` if it is missing, unreadable or empty, and
    :class:`CRSError` if it has no CRS and ``assume_crs`` is not given.
    """
    if isinstance(source, gpd.GeoDataFrame):
        frame = source.copy()
        name = "the prompt GeoDataFrame"
    else:
        frame = _read_vector_file(Path(source), layer)
        name = str(source)
    if frame.crs is None:
        if assume_crs is None:
            raise CRSError(
                f"{name} has no CRS; pass --prompts-crs EPSG:XXXX (or assume_crs=) to say "
                "which coordinate system its coordinates are in"
            )
        frame = frame.set_crs(assume_crs)
    if len(frame) == 0:
        raise PromptError(f"{name} has no features; nothing to prompt with")
    return frame.reset_index(drop=True)


def _read_vector_file(path: Path, layer: str | None) -> gpd.GeoDataFrame:
    if not path.exists():
        raise PromptError(f"prompt layer {path} does not exist")
    try:
        if path.suffix.lower() in {".parquet", ".geoparquet"}:
            return gpd.read_parquet(path)
        return gpd.read_file(path, layer=layer, engine="pyogrio")
    except Exception as exc:  # pyogrio/GDAL/arrow raise many types for unreadable files
        raise PromptError(f"cannot read prompt layer {path}: {exc}") from exc


def to_scene_crs(frame: gpd.GeoDataFrame, scene_crs: CRS | str) -> gpd.GeoDataFrame:
    """Reproject ``frame`` to ``scene_crs`` (explicitly; a no-op if they are equal)."""
    target = CRS.from_user_input(scene_crs)
    if frame.crs is None:
        raise CRSError("the prompt layer has no CRS; set one before reprojecting")
    if CRS.from_user_input(frame.crs) == target:
        return frame
    try:
        return frame.to_crs(target)
    except Exception as exc:
        raise CRSError(f"cannot reproject prompts from {frame.crs} to {target}: {exc}") from exc


def clean_geometries(geoms: gpd.GeoSeries) -> gpd.GeoSeries:
    """2D, valid, point-or-area geometries; unusable ones become None.

    Z coordinates are dropped; invalid polygons are repaired with ``make_valid`` and
    reduced to their polygonal part; GeometryCollections keep their polygonal parts (or
    their points if they have no area); lines, empty and zero-area geometries become
    None (reported as invalid prompts by the caller).
    """
    values = shapely.force_2d(np.asarray(geoms.values, dtype=object))
    out: list[shapely.Geometry | None] = []
    for geom in values:
        out.append(_usable_part(geom))
    return gpd.GeoSeries(out, index=geoms.index, crs=geoms.crs)


def _usable_part(geom: shapely.Geometry | None) -> shapely.Geometry | None:
    if geom is None or geom.is_empty:
        return None
    kind = geom.geom_type
    if kind in _POINT_TYPES:
        return geom
    if kind in _AREA_TYPES and geom.is_valid and geom.area > 0:
        return geom
    if kind in _AREA_TYPES or kind == "GeometryCollection":
        repaired = shapely.make_valid(geom) if kind in _AREA_TYPES else geom
        parts = list(shapely.get_parts(repaired))
        polygons = [p for p in parts if p.geom_type in _AREA_TYPES and p.area > 0]
        if polygons:
            merged = shapely.union_all(polygons)
            return merged if merged.area > 0 else None
        points = [p for p in parts if p.geom_type in _POINT_TYPES]
        if points:
            return shapely.union_all(points)
    return None


def build_prompts(
    frame: gpd.GeoDataFrame,
    scene_crs: CRS | str,
    scene_transform: Affine,
    scene_shape: tuple[int, int],
    *,
    prompt_as: PromptMode = "auto",
) -> PromptSet:
    """Turn a prompt layer into pixel prompts for a scene of ``scene_shape`` (rows, cols).

    ``prompt_index`` is the frame's index when it is named so (a subset of a larger
    layer keeps its row numbers), else the row position. The layer is reprojected to
    ``scene_crs``; geometries are cleaned
    (:func:`clean_geometries`) and mapped to scene pixels with the inverse of
    ``scene_transform`` (rotated transforms included: boxes are taken in pixel space).
    Prompts whose geometry does not intersect the scene are reported in
    ``PromptSet.outside``; boxes partly outside are clipped to the scene.
    """
    if prompt_as not in PROMPT_MODES:
        raise PromptError(f"unknown prompt mode {prompt_as!r}; use one of {', '.join(PROMPT_MODES)}")
    frame = to_scene_crs(frame, scene_crs).copy()
    if frame.index.name != "prompt_index":
        frame.index = pd.RangeIndex(len(frame), name="prompt_index")
    labels = frame.index.to_numpy()
    cleaned = clean_geometries(frame.geometry)
    invalid = labels[np.flatnonzero(cleaned.isna().to_numpy())]

    inverse = ~scene_transform
    usable = np.flatnonzero(cleaned.notna().to_numpy())
    pixel_geoms = shapely.transform(
        np.asarray(cleaned.values[usable], dtype=object),
        lambda xy: _apply_affine(inverse, xy),
    )
    rows, cols = scene_shape
    scene_box = shapely.box(0, 0, cols, rows)
    inside = shapely.intersects(pixel_geoms, scene_box)
    outside = labels[usable[~inside]]
    keep = labels[usable[inside]]
    pixel_geoms = pixel_geoms[inside]

    batch = _make_batch(keep, pixel_geoms, prompt_as, cols, rows)
    return PromptSet(
        frame=frame,
        batch=batch,
        outside=tuple(int(i) for i in outside),
        invalid=tuple(int(i) for i in invalid),
    )


def _apply_affine(affine: Affine, xy: np.ndarray) -> np.ndarray:
    a, b, c, d, e, f = affine[:6]
    x, y = xy[:, 0], xy[:, 1]
    return np.column_stack([a * x + b * y + c, d * x + e * y + f])


def _make_batch(
    index: np.ndarray, pixel_geoms: np.ndarray, prompt_as: PromptMode, width: int, height: int
) -> PromptBatch:
    n = len(index)
    is_point = np.isin(shapely.get_type_id(pixel_geoms), [0, 4]) if n else np.zeros(0, bool)
    boxes = np.full((n, 4), np.nan, dtype=np.float64)
    points = np.zeros((n, 1, 2), dtype=np.float64)
    labels = np.full((n, 1), -1, dtype=np.int32)
    if n == 0:
        return PromptBatch(index.astype(np.int64), boxes, points, labels)

    surface = shapely.point_on_surface(pixel_geoms)
    surface_xy = shapely.get_coordinates(surface)
    bounds = shapely.bounds(pixel_geoms)
    clipped = np.column_stack(
        [
            np.clip(bounds[:, 0], 0, width),
            np.clip(bounds[:, 1], 0, height),
            np.clip(bounds[:, 2], 0, width),
            np.clip(bounds[:, 3], 0, height),
        ]
    )
    mode = np.where(is_point, "point", DEFAULT_POLYGON_MODE if prompt_as == "auto" else prompt_as)
    use_box = np.isin(mode, ["box", "box+point"]) & ~is_point
    use_point = np.isin(mode, ["point", "box+point"]) | is_point
    boxes[use_box] = clipped[use_box]
    points[use_point, 0, :] = surface_xy[use_point]
    labels[use_point, 0] = 1
    return PromptBatch(index.astype(np.int64), boxes, points, labels)


def prompt_extent(batch: PromptBatch, row: int) -> PixelBox:
    """The box (scene pixels) a prompt's decode window must contain, margin included."""
    if batch.has_box[row]:
        x0, y0, x1, y1 = batch.boxes[row]
        margin = max(MIN_BOX_MARGIN_PX, BOX_MARGIN_FRACTION * max(x1 - x0, y1 - y0))
        return PixelBox(y0, x0, y1, x1).buffer(margin)
    valid = batch.labels[row] >= 0
    xy = batch.points[row][valid]
    return PixelBox(xy[:, 1].min(), xy[:, 0].min(), xy[:, 1].max(), xy[:, 0].max()).buffer(
        4 * MIN_BOX_MARGIN_PX
    )


def plan_prompt_tiles(grid: TileGrid, batch: PromptBatch) -> TilePlan:
    """Assign every prompt to one tile whose read window holds its whole extent.

    Grid tiles are used where possible (see :meth:`TileGrid.tile_for_box`); a prompt
    too large for any grid tile gets a window tile around it
    (:meth:`TileGrid.window_tile`, downsampled if larger than a tile), shared with other
    large prompts it fits in. Extents are clipped to the scene first, so prompts on the
    scene edge are not pushed into window tiles.
    """
    scene = PixelBox(0, 0, grid.height, grid.width)
    groups: dict[str, list[int]] = defaultdict(list)
    tiles: dict[str, Tile] = {}
    window_tiles: list[Tile] = []
    for row in range(len(batch)):
        extent = _clip(prompt_extent(batch, row), scene)
        tile = grid.tile_for_box(extent)
        if tile is None:
            tile = next((t for t in window_tiles if t.read.contains(extent)), None)
        if tile is None:
            tile = grid.window_tile(extent)
            window_tiles.append(tile)
        tiles[tile.key] = tile
        groups[tile.key].append(row)
    return TilePlan([(tiles[key], batch.take(rows)) for key, rows in groups.items()])


def _clip(box: PixelBox, scene: PixelBox) -> PixelBox:
    return PixelBox(
        max(box.row_start, scene.row_start),
        max(box.col_start, scene.col_start),
        min(box.row_stop, scene.row_stop),
        min(box.col_stop, scene.col_stop),
    )
