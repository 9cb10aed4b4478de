"""Prompts from vector layers: reading, reprojection, conversion to pixels, tile assignment.

A prompt layer (Shapefile, GeoJSON, GeoPackage, GeoParquet, or a GeoDataFrame) is read,
checked and reprojected **explicitly** to the scene's CRS. Each feature becomes one
prompt and keeps its row position (``prompt_index``) and every attribute, which the
pipeline joins back onto the output polygon.

How a geometry becomes a prompt (``prompt_as``):

* ``"point"``: one positive point (a polygon's point on surface);
* ``"box"``: the geometry's bounding box in scene pixels;
* ``"box+point"``: the box plus a positive point on the surface;
* ``"mask"``: for refining outdated outlines to what the image shows now: the box grown
  by :data:`MASK_BOX_GROW` of its longer side, a point on the surface and the polygon
  itself as SAM's low-resolution mask input;
* ``"auto"`` (default): points -> point prompts, polygons -> :data:`DEFAULT_POLYGON_MODE`.

Negative points from a separate layer (:func:`add_negative_points`) join every prompt
whose box (grown by :data:`NEGATIVE_MARGIN_FRACTION`) holds them.

Pixel coordinates here are full-resolution scene pixels, x = column, y = row (SAM's
convention), with pixel centres at +0.5.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from affine import Affine
from pyproj import CRS, Transformer

from sam_geo.errors import CRSError, PromptError
from sam_geo.settings import PROMPT_AS as PROMPT_MODES
from sam_geo.settings import PromptAs as PromptMode
from sam_geo.geo.tiles import PixelBox, Tile, TileGrid
from sam_geo.io.layers import Area, LayerInfo, is_parquet, read_layer_near
from sam_geo.io.prompt_batch import PromptBatch  # re-exported: it lives in its own light module


MASK_BOX_GROW = 0.25
"""How much ``mask`` prompts grow their box (fraction of its longer side): outdated
outlines are shifted and shrunk, so their own box cuts the object (benchmarks/refine_outdated.py)."""

NEGATIVE_MARGIN_FRACTION = 0.25
"""Negative points apply to a prompt when within its box grown by this fraction of its side."""

MAX_NEGATIVE_POINTS = 8
"""At most this many negative points (the nearest) are added to one prompt."""

DEFAULT_POLYGON_MODE: PromptMode = "box"
"""How polygons are prompted under ``"auto"``; chosen by measurement (see DESIGN.md)."""

BOX_MARGIN_FRACTION = 0.15
"""Context kept around a box inside its decode window, as a fraction of its longer side."""

MIN_BOX_MARGIN_PX = 16
"""Smallest context margin in scene pixels around a box or point inside its window."""

_POINT_TYPES = {"Point", "MultiPoint"}
_AREA_TYPES = {"Polygon", "MultiPolygon"}


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


def read_prompts_near(
    source: str | os.PathLike[str] | gpd.GeoDataFrame,
    areas: list[Area],
    *,
    layer: str | None = None,
    assume_crs: str | None = None,
    allow_empty: bool = False,
) -> tuple[gpd.GeoDataFrame, int | None]:
    """A prompt layer where it meets ``areas`` (the scenes' footprints).

    A GeoDataFrame is taken whole (index: its row positions); a file is read only where
    it meets the areas (:func:`sam_geo.io.layers.read_layer_near`; index: the features'
    ids in the layer). The index is named ``prompt_index``. Returns the frame and the
    number of features in the whole layer (None where the format does not say).

    Raises :class:`PromptError` for a missing, unreadable or empty layer and, unless
    ``allow_empty``, when no feature lies near the areas (the message gives the layer's
    extent and each scene's, each in its CRS: almost always a CRS mistake);
    :class:`CRSError` for a layer without CRS and no ``assume_crs``.
    """
    if isinstance(source, gpd.GeoDataFrame):
        frame = read_prompt_layer(source, assume_crs=assume_crs)
        frame.index = pd.RangeIndex(len(frame), name="prompt_index")
        return frame, len(frame)
    path = Path(source)
    frame, info = read_layer_near(path, areas, layer=layer, assume_crs=assume_crs)
    if info.features == 0:
        raise PromptError(f"{path} has no features; nothing to prompt with")
    if len(frame) == 0 and not allow_empty:
        raise _nothing_near(path, info, areas)
    return frame, info.features


def _nothing_near(path: Path, info: LayerInfo, areas: list[Area]) -> PromptError:
    """No feature of the layer lies near any scene: extents side by side."""
    count = f"{info.features:,} " if info.features is not None else ""
    spans = (f"span {_extent(info.bounds)} in {_crs_name(info.crs)}" if info.bounds is not None
             else f"are in {_crs_name(info.crs)}")
    where = "; ".join(f"{a.name} covers {_extent(a.polygon.bounds)} in {_crs_name(a.crs)}" for a in areas[:5])
    target = "the scene" if len(areas) == 1 else f"any of the {len(areas)} scenes"
    return PromptError(
        f"none of the {count}prompts of {path} intersect {target}: the prompts {spans}, while {where}. "
        "Check the prompt layer's CRS (set the right one in the file, or pass --prompts-crs for a layer "
        "without one) and that the layer covers the scene."
    )


def _read_vector_file(path: Path, layer: str | None) -> gpd.GeoDataFrame:
    if not path.exists():
        raise PromptError(f"prompt layer {path} does not exist")
    try:
        if is_parquet(path):  # a file, or a folder of parts (a partitioned dataset)
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
    box_grow: float | None = None,
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

    grow = (MASK_BOX_GROW if prompt_as == "mask" else 0.0) if box_grow is None else box_grow
    batch = _make_batch(keep, pixel_geoms, prompt_as, cols, rows, grow)
    return PromptSet(
        frame=frame,
        batch=batch,
        outside=tuple(int(i) for i in outside),
        invalid=tuple(int(i) for i in invalid),
    )


def no_usable_prompts(
    source: str,
    frame: gpd.GeoDataFrame,
    scenes: list[tuple[str, object, tuple[float, float, float, float]]],
    outside: tuple[int, ...],
    invalid: tuple[int, ...],
) -> PromptError:
    """The error for a layer none of whose prompts can be used on the scene(s).

    ``scenes``: ``(path, crs, (left, bottom, right, top))`` of each scene. Prompts that
    all miss the scenes are almost always a CRS or extent mistake, so the message shows
    the layer's extent and each scene's, each in its own CRS.
    """
    total = len(frame)
    if not outside:
        return PromptError(
            f"none of the {total} prompts of {source} has a usable geometry (all are empty, "
            "zero-area, lines or missing); give a layer of polygons or points"
        )
    usable = frame.geometry[frame.geometry.notna() & ~frame.geometry.is_empty]
    x0, y0, x1, y1 = usable.total_bounds
    where = "; ".join(f"{path} covers {_extent(b)} in {_crs_name(crs)}" for path, crs, b in scenes)
    unusable = f" ({len(invalid)} more have unusable geometry)" if invalid else ""
    target = "the scene" if len(scenes) == 1 else f"any of the {len(scenes)} scenes"
    return PromptError(
        f"none of the {total} prompts of {source} intersect {target}{unusable}: the prompts span "
        f"{_extent((x0, y0, x1, y1))} in {_crs_name(frame.crs)}, while {where}. "
        "Check the prompt layer's CRS (set the right one in the file, or pass --prompts-crs for a "
        "layer without one) and that the layer covers the scene."
    )


def _extent(bounds: tuple[float, ...]) -> str:
    """``x left..right, y bottom..top``: whole units for large (projected) values."""
    def num(v: float) -> str:
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.6g}"

    x0, y0, x1, y1 = bounds
    return f"x {num(x0)}..{num(x1)}, y {num(y0)}..{num(y1)}"


def _crs_name(crs: object) -> str:
    try:
        parsed = CRS.from_user_input(crs)
    except Exception:  # any CRS-like object; the message must not fail
        return str(crs)
    authority = parsed.to_authority()
    return f"{authority[0]}:{authority[1]}" if authority else parsed.name


def _apply_affine(affine: Affine, xy: np.ndarray) -> np.ndarray:
    a, b, c, d, e, f = affine[:6]
    x, y = xy[:, 0], xy[:, 1]
    return np.column_stack([a * x + b * y + c, d * x + e * y + f])


def _make_batch(
    index: np.ndarray, pixel_geoms: np.ndarray, prompt_as: PromptMode, width: int, height: int, grow: float = 0.0
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
    if grow:
        margin = grow * np.maximum(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1])
        bounds = bounds + np.column_stack([-margin, -margin, margin, margin])
    clipped = np.column_stack(
        [
            np.clip(bounds[:, 0], 0, width),
            np.clip(bounds[:, 1], 0, height),
            np.clip(bounds[:, 2], 0, width),
            np.clip(bounds[:, 3], 0, height),
        ]
    )
    mode = np.where(is_point, "point", DEFAULT_POLYGON_MODE if prompt_as == "auto" else prompt_as)
    use_box = np.isin(mode, ["box", "box+point", "mask"]) & ~is_point
    use_point = np.isin(mode, ["point", "box+point", "mask"]) | is_point
    use_mask = (mode == "mask") & ~is_point
    boxes[use_box] = clipped[use_box]
    points[use_point, 0, :] = surface_xy[use_point]
    labels[use_point, 0] = 1
    masks = np.full(n, None, dtype=object)
    masks[use_mask] = shapely.to_wkb(pixel_geoms[use_mask])
    return PromptBatch(index.astype(np.int64), boxes, points, labels, masks, outline_areas(pixel_geoms, is_point))


RECTANGLE_FILL = 0.98
"""A polygon covering at least this share of its axis-aligned bounding box is taken for
a drawn box: its area says nothing about the object inside (a loose box would pick
SAM's largest candidate mask), so it gets no outline area."""


def outline_areas(pixel_geoms: np.ndarray, is_point: np.ndarray) -> np.ndarray:
    """(n,) area of each prompt polygon, scene pixels^2, used to choose among SAM's
    candidate masks (:func:`sam_geo.model.masks.choose_masks`); NaN for points and for
    polygons that fill their bounding box (:data:`RECTANGLE_FILL`)."""
    areas = shapely.area(pixel_geoms)
    bounds = shapely.bounds(pixel_geoms)
    box_areas = (bounds[:, 2] - bounds[:, 0]) * (bounds[:, 3] - bounds[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        boxlike = areas >= RECTANGLE_FILL * box_areas
    return np.where(is_point | boxlike, np.nan, areas)


def add_negative_points(batch: PromptBatch, negatives_xy: np.ndarray) -> PromptBatch:
    """Add negative points (scene pixels, (m, 2) x/y) to every prompt they lie near.

    A negative point joins a prompt when it lies inside the prompt's box grown by
    :data:`NEGATIVE_MARGIN_FRACTION` of the box's longer side (or within
    ``4 * MIN_BOX_MARGIN_PX`` of a point-only prompt's points); each prompt takes at
    most :data:`MAX_NEGATIVE_POINTS`, the nearest to its centre. Points arrays are
    padded with label -1.
    """
    if len(batch) == 0 or len(negatives_xy) == 0:
        return batch
    tree = shapely.STRtree(shapely.points(negatives_xy))
    extents = [prompt_extent(batch, k, margin_fraction=NEGATIVE_MARGIN_FRACTION) for k in range(len(batch))]
    regions = shapely.box(
        [e.col_start for e in extents], [e.row_start for e in extents], [e.col_stop for e in extents],
        [e.row_stop for e in extents],
    )
    prompt_rows, neg_rows = tree.query(regions, predicate="contains")
    extra: list[list[int]] = [[] for _ in range(len(batch))]
    for k, j in zip(prompt_rows, neg_rows):
        extra[k].append(int(j))
    for k, rows in enumerate(extra):
        if len(rows) > MAX_NEGATIVE_POINTS:
            centre = np.array([extents[k].center[1], extents[k].center[0]])
            dist = np.linalg.norm(negatives_xy[rows] - centre, axis=1)
            extra[k] = [rows[i] for i in np.argsort(dist)[:MAX_NEGATIVE_POINTS]]
    width = batch.points.shape[1] + max(len(r) for r in extra)
    points = np.zeros((len(batch), width, 2))
    labels = np.full((len(batch), width), -1, dtype=np.int32)
    for k in range(len(batch)):
        own = batch.labels[k] >= 0
        n_own = int(own.sum())
        points[k, :n_own] = batch.points[k][own]
        labels[k, :n_own] = batch.labels[k][own]
        m = len(extra[k])
        points[k, n_own : n_own + m] = negatives_xy[extra[k]]
        labels[k, n_own : n_own + m] = 0
    return batch.replace(points=points, labels=labels)


def negative_points_in_pixels(
    frame: gpd.GeoDataFrame, scene_crs: CRS | str, scene_transform: Affine
) -> np.ndarray:
    """Point features of a negative-point layer as (m, 2) scene-pixel x/y (reprojected)."""
    frame = to_scene_crs(frame, scene_crs)
    geoms = clean_geometries(frame.geometry).dropna()
    pts = shapely.get_parts(np.asarray(geoms.values, dtype=object))
    pts = pts[np.isin(shapely.get_type_id(pts), [0])]
    if len(pts) == 0:
        raise PromptError("the negative-point layer holds no points; give a layer of point features")
    xy = shapely.get_coordinates(pts)
    return _apply_affine(~scene_transform, xy)


def prompt_extent(batch: PromptBatch, row: int, *, margin_fraction: float = BOX_MARGIN_FRACTION) -> PixelBox:
    """The box (scene pixels) a prompt's decode window must contain, margin included.

    Boxes grow by ``margin_fraction`` of their longer side (at least
    :data:`MIN_BOX_MARGIN_PX`); point-only prompts by ``4 * MIN_BOX_MARGIN_PX`` around
    their points (negative ones included).
    """
    valid = batch.labels[row] >= 0
    if batch.has_box[row]:
        x0, y0, x1, y1 = batch.boxes[row]
        margin = max(MIN_BOX_MARGIN_PX, margin_fraction * max(x1 - x0, y1 - y0))
        if valid.any():  # points (negative ones too) must lie in the window as well
            xy = batch.points[row][valid]
            x0, y0 = min(x0, xy[:, 0].min()), min(y0, xy[:, 1].min())
            x1, y1 = max(x1, xy[:, 0].max()), max(y1, xy[:, 1].max())
        return PixelBox(y0, x0, y1, x1).buffer(margin)
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


# --- several points per object -----------------------------------------------------------


@dataclass(frozen=True)
class GroupPoints:
    """Points of grouped prompts (:func:`group_prompt_rows`), in the layer's CRS.

    ``points[prompt_index]`` is ``(xy (k, 2), labels (k,))``: 1 positive, 0 negative.
    """

    crs: Any
    points: dict[int, tuple[np.ndarray, np.ndarray]]


def group_prompt_rows(
    frame: gpd.GeoDataFrame, group_column: str, label_column: str | None = None
) -> tuple[gpd.GeoDataFrame, GroupPoints]:
    """One prompt per value of ``group_column``: several points (and a box) per object.

    Rows that share a value of ``group_column`` are one object: at most one polygon row
    (its box, or whatever ``--prompt-as`` makes of it) and any number of point rows,
    positive where ``label_column`` is 1 and negative where it is 0 (all positive when
    ``label_column`` is None). The object keeps the attributes of its polygon row, else
    of its first positive point row; its geometry is that polygon, else the MultiPoint
    of its positive points. Rows whose group value is missing are errors, as are label
    values other than 0/1, two polygons in a group and a group without a polygon or a
    positive point. Returns the grouped frame (``prompt_index`` 0..n-1 in order of first
    appearance) and the points to add to each prompt (:func:`add_group_points`).
    """
    for column in (group_column, label_column):
        if column is not None and column not in frame.columns:
            raise PromptError(
                f"column {column!r} is not in the prompt layer; its columns are: "
                + ", ".join(map(str, frame.columns.drop(frame.geometry.name)))
            )
    if frame[group_column].isna().any():
        rows = np.flatnonzero(frame[group_column].isna().to_numpy())[:5].tolist()
        raise PromptError(f"prompt rows {rows} have no value in the group column {group_column!r}; give every row one")
    labels = _point_labels(frame, label_column)
    kinds = frame.geometry.geom_type.fillna("None").to_numpy()
    is_area = np.isin(kinds, list(_AREA_TYPES))
    is_point = np.isin(kinds, list(_POINT_TYPES))
    keep_rows: list[int] = []
    geometries: list[shapely.Geometry] = []
    points: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for group, rows in frame.groupby(group_column, sort=False).indices.items():
        areas = [r for r in rows if is_area[r]]
        point_rows = [r for r in rows if is_point[r]]
        if len(areas) > 1:
            raise PromptError(f"group {group!r} of {group_column!r} has {len(areas)} polygons; give one per object")
        xy, lab = _group_points(frame, point_rows, labels)
        positive = [r for r in point_rows if labels[r] == 1]
        if not areas and not positive:
            raise PromptError(
                f"group {group!r} of {group_column!r} has neither a polygon nor a positive point; SAM needs one"
            )
        representative = areas[0] if areas else positive[0]
        keep_rows.append(int(representative))
        geometries.append(
            frame.geometry.iloc[areas[0]] if areas
            else shapely.multipoints(shapely.get_coordinates(frame.geometry.iloc[positive].to_numpy()))
        )
        points[len(keep_rows) - 1] = (xy, lab)
    grouped = frame.iloc[keep_rows].copy()
    grouped = grouped.set_geometry(gpd.GeoSeries(geometries, index=grouped.index, crs=frame.crs))
    grouped.index = pd.RangeIndex(len(grouped), name="prompt_index")
    return grouped, GroupPoints(frame.crs, points)


def _point_labels(frame: gpd.GeoDataFrame, label_column: str | None) -> np.ndarray:
    if label_column is None:
        return np.ones(len(frame), dtype=np.int32)
    values = pd.to_numeric(frame[label_column], errors="coerce").to_numpy()
    bad = ~np.isin(values, [0, 1])
    is_point = frame.geometry.geom_type.isin(list(_POINT_TYPES)).to_numpy()
    if (bad & is_point).any():
        found = sorted({str(v) for v in frame[label_column].to_numpy()[bad & is_point]})[:5]
        raise PromptError(
            f"label column {label_column!r} must hold 1 (positive) or 0 (negative) for point rows; found {found}"
        )
    return np.where(bad, 1, values).astype(np.int32)


def _group_points(frame: gpd.GeoDataFrame, rows: list[int], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All points of a group's point rows (MultiPoints split) with their row's label."""
    if not rows:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int32)
    geoms = shapely.force_2d(frame.geometry.iloc[rows].to_numpy())
    xy, owner = shapely.get_coordinates(geoms, return_index=True)
    return xy, labels[np.asarray(rows)[owner]]


def add_group_points(
    batch: PromptBatch, group: GroupPoints, scene_crs: CRS | str, scene_transform: Affine
) -> PromptBatch:
    """Give each prompt of ``batch`` its group's points (reprojected to scene pixels).

    Box prompts keep their box (and surface point, if any) and gain every point of the
    group; point-only prompts get exactly the group's points, positive and negative.
    All points of the batch are reprojected in one call (no per-prompt transform).
    """
    if len(batch) == 0:
        return batch
    empty = (np.zeros((0, 2)), np.zeros(0, np.int32))
    found = [group.points.get(int(batch.index[k]), empty) for k in range(len(batch))]
    pixels = _group_pixels([xy for xy, _ in found], group.crs, scene_crs, scene_transform)
    per_prompt: list[tuple[np.ndarray, np.ndarray]] = []
    for k, (pixel, (_, lab)) in enumerate(zip(pixels, found)):
        if batch.has_box[k]:
            own = batch.labels[k] >= 0
            pixel = np.concatenate([batch.points[k][own], pixel])
            lab = np.concatenate([batch.labels[k][own], lab])
        per_prompt.append((pixel, lab))
    width = max(1, max(len(lab) for _, lab in per_prompt))
    points = np.zeros((len(batch), width, 2))
    labels = np.full((len(batch), width), -1, dtype=np.int32)
    for k, (xy, lab) in enumerate(per_prompt):
        points[k, : len(lab)] = xy
        labels[k, : len(lab)] = lab
    return batch.replace(points=points, labels=labels)


def _group_pixels(
    coords: list[np.ndarray], crs: Any, scene_crs: CRS | str, scene_transform: Affine
) -> list[np.ndarray]:
    """Each ``(k, 2)`` array of ``x, y`` in ``crs`` as scene pixels (col, row), same split.

    The arrays are stacked and reprojected with one :class:`pyproj.Transformer` call
    (``always_xy``; skipped when the CRSs are equal), then mapped through the inverse
    of ``scene_transform`` and split back. Empty arrays stay empty.
    """
    sizes = [len(xy) for xy in coords]
    xy = np.concatenate([np.asarray(c, dtype=np.float64).reshape(-1, 2) for c in coords] or [np.zeros((0, 2))])
    if len(xy) and not CRS.from_user_input(crs).equals(CRS.from_user_input(scene_crs)):
        transformer = Transformer.from_crs(crs, scene_crs, always_xy=True)
        xy = np.column_stack(transformer.transform(xy[:, 0], xy[:, 1]))
    pixel = _apply_affine(~scene_transform, xy) if len(xy) else xy
    return np.split(pixel, np.cumsum(sizes)[:-1])
