"""Vector layers read only where they touch the scenes (:func:`read_layer_near`).

A national prompt layer (building footprints, parcels: millions of features) must not
be loaded whole to prompt a few scenes. The scenes' footprints (:class:`Area`, each in
its own CRS) are reprojected into the layer's CRS with densified edges and only the
features intersecting them are read:

* **GeoPackage, FlatGeobuf, Shapefile** and every other OGR format: pyogrio with a
  ``mask`` geometry, which GDAL answers from the layer's spatial index where it has one
  (GeoPackage R-tree, FlatGeobuf packed R-tree, Shapefile ``.qix``); without one GDAL
  scans the layer feature by feature (memory stays flat) and a log line says an index
  would be faster.
* **GeoParquet** (a file, or a folder of files; hive partition keys are not added as
  columns): row group by
  row group with pyarrow. With a ``bbox`` covering column (GeoParquet 1.1) row groups
  whose statistics miss the area are skipped unread and rows are filtered on the
  covering columns; without one each row group's geometries are decoded to test them
  (one row group in memory at a time) and a log line says a covering column would be
  faster.

Every feature kept keeps its id in the layer as the index (named ``prompt_index``): the
OGR feature id (GeoPackage ``fid``; 0-based row of a Shapefile, GeoJSON or FlatGeobuf) or
the 0-based row of a GeoParquet layer (files of a folder in name order). Features are
exactly those whose geometry intersects an area (GEOS, in the layer's CRS).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pyogrio
import shapely
from pyproj import CRS, Transformer

from sam_geo.errors import CRSError, PromptError

log = logging.getLogger(__name__)

__all__ = ["Area", "LayerInfo", "area_in_crs", "layer_info", "read_layer_near"]

PARQUET_SUFFIXES = (".parquet", ".geoparquet")
EDGE_POINTS = 64
"""Points per footprint side when it is reprojected (curved edges in the layer's CRS)."""
MARGIN_FRACTION = 0.01
"""Footprints are grown by this share of their larger side before reprojection, so no
feature touching a scene is lost to the reprojected outline's chords."""
INDEX_NAME = "prompt_index"


@dataclass(frozen=True)
class Area:
    """A polygon, the CRS its coordinates are in and what it is (a scene's footprint and path)."""

    polygon: shapely.Polygon
    crs: Any
    name: str = "the area"


@dataclass(frozen=True)
class LayerInfo:
    """What a layer says of itself without reading its features: CRS (None if it has
    none), feature count and bounds (None where the format does not know them cheaply)
    and whether a spatial filter is answered from an index."""

    crs: CRS | None
    features: int | None
    bounds: tuple[float, float, float, float] | None
    indexed: bool


def is_parquet(path: Path) -> bool:
    """A GeoParquet file, or a folder of them."""
    return path.suffix.lower() in PARQUET_SUFFIXES or path.is_dir()


def layer_info(path: Path, layer: str | None = None) -> LayerInfo:
    """The layer's :class:`LayerInfo` (metadata only). Raises :class:`PromptError` for a
    missing or unreadable layer."""
    if not path.exists():
        raise PromptError(f"prompt layer {path} does not exist")
    try:
        if is_parquet(path):
            return _parquet_info(path)
        info = pyogrio.read_info(path, layer=layer)
    except PromptError:
        raise
    except Exception as exc:  # pyogrio/GDAL/arrow raise many types for unreadable files
        raise PromptError(f"cannot read prompt layer {path}: {exc}") from exc
    crs = CRS.from_user_input(info["crs"]) if info.get("crs") else None
    bounds = info.get("total_bounds")
    return LayerInfo(crs, info.get("features"), tuple(bounds) if bounds is not None else None,
                     bool(info["capabilities"].get("fast_spatial_filter")))


def area_in_crs(areas: Sequence[Area], crs: Any) -> shapely.Geometry:
    """The union of ``areas``, each grown by :data:`MARGIN_FRACTION` of its larger side,
    densified (:data:`EDGE_POINTS` per side) and reprojected to ``crs``."""
    parts = []
    target = CRS.from_user_input(crs)
    for area in areas:
        x0, y0, x1, y1 = area.polygon.bounds
        grown = area.polygon.buffer(MARGIN_FRACTION * max(x1 - x0, y1 - y0), join_style="mitre")
        dense = shapely.segmentize(grown, max(x1 - x0, y1 - y0) / EDGE_POINTS)
        source = CRS.from_user_input(area.crs)
        if source != target:
            transformer = Transformer.from_crs(source, target, always_xy=True)
            dense = shapely.transform(dense, lambda xy, t=transformer: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))
        parts.append(shapely.make_valid(dense))
    return shapely.union_all(parts)


def read_layer_near(
    path: Path, areas: Sequence[Area], *, layer: str | None = None, assume_crs: Any = None
) -> tuple[gpd.GeoDataFrame, LayerInfo]:
    """The features of the layer at ``path`` that intersect any of ``areas``, with their
    ids as index (see the module docs), in the layer's CRS; and the layer's info.

    ``assume_crs``: the CRS of a layer that has none. Raises :class:`CRSError` for a
    layer without CRS and no ``assume_crs``, :class:`PromptError` for a missing or
    unreadable layer. The frame may be empty (nothing near the scenes).
    """
    info = layer_info(path, layer)
    crs = info.crs
    if crs is None:
        if assume_crs is None:
            raise CRSError(
                f"{path} has no CRS; pass --prompts-crs EPSG:XXXX (or assume_crs=) to say "
                "which coordinate system its coordinates are in"
            )
        crs = CRS.from_user_input(assume_crs)
        info = LayerInfo(crs, info.features, info.bounds, info.indexed)
    mask = area_in_crs(areas, crs)
    try:
        frame = _read_parquet_near(path, mask, crs) if is_parquet(path) else _read_ogr_near(path, layer, mask, info)
    except (PromptError, CRSError):
        raise
    except Exception as exc:
        raise PromptError(f"cannot read prompt layer {path}: {exc}") from exc
    return frame.set_crs(crs, allow_override=True), info


def _read_ogr_near(path: Path, layer: str | None, mask: shapely.Geometry, info: LayerInfo) -> gpd.GeoDataFrame:
    """pyogrio with a mask (GDAL's spatial filter), FIDs as the index."""
    if not info.indexed:
        log.info("%s has no spatial index, so all of its features are scanned; a GeoPackage or FlatGeobuf copy "
                 "(or `ogrinfo -sql 'CREATE SPATIAL INDEX ON <layer>'` for a Shapefile) reads faster", path)
    frame = pyogrio.read_dataframe(path, layer=layer, mask=mask, fid_as_index=True)
    frame.index = pd.Index(frame.index.to_numpy(dtype=np.int64), name=INDEX_NAME)
    return frame


# --- GeoParquet -----------------------------------------------------------------------


def _geo_metadata(schema: pa.Schema, path: Path) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(b"geo")
    if raw is None:
        raise PromptError(f"{path} is a Parquet file without GeoParquet metadata; write it with "
                          "GeoDataFrame.to_parquet (or give a GeoPackage)")
    return json.loads(raw)


def _geometry_column(geo: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    name = geo["primary_column"]
    return name, geo["columns"][name]


def _parquet_crs(column: dict[str, Any]) -> CRS | None:
    """GeoParquet: no ``crs`` key means OGC:CRS84; an explicit null means unknown."""
    if "crs" not in column:
        return CRS.from_user_input("OGC:CRS84")
    return None if column["crs"] is None else CRS.from_user_input(column["crs"])


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(Path(f) for f in ds.dataset(path, format="parquet", partitioning="hive").files)
    return [path]


def _parquet_info(path: Path) -> LayerInfo:
    files = _parquet_files(path)
    if not files:
        raise PromptError(f"prompt layer folder {path} holds no Parquet files")
    geo = _geo_metadata(pq.read_schema(files[0]), files[0])
    _, column = _geometry_column(geo)
    count = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    bounds = tuple(column["bbox"]) if len(files) == 1 and column.get("bbox") else None
    return LayerInfo(_parquet_crs(column), count, bounds, "covering" in column)


def _read_parquet_near(path: Path, mask: shapely.Geometry, crs: CRS) -> gpd.GeoDataFrame:
    """Row groups of every file whose covering statistics meet ``mask``'s bounds; rows
    whose geometry intersects ``mask``. Index: row in the layer."""
    files = _parquet_files(path)
    frames, rows = [], []
    for file, offset, table, candidates in _row_groups_near(path, files, shapely.bounds(mask)):
        name, column = _geometry_column(_geo_metadata(table.schema, file))
        if column.get("encoding", "WKB").upper() != "WKB":
            raise PromptError(f"{file}: geometry encoding {column['encoding']!r} is not read yet; write WKB "
                              "(GeoDataFrame.to_parquet's default)")
        table = table.take(pa.array(candidates))
        geoms = shapely.from_wkb(table[name].to_numpy(zero_copy_only=False))
        keep = np.flatnonzero(shapely.intersects(geoms, mask))
        if len(keep):
            attrs = table.drop_columns(_not_attributes(table, name, column)).take(pa.array(keep)).to_pandas()
            frames.append(gpd.GeoDataFrame(attrs, geometry=gpd.GeoSeries(geoms[keep], crs=crs), crs=crs))
            rows.append(offset + candidates[keep])
    if frames:
        frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    else:
        empty = pq.read_schema(files[0]).empty_table()
        name, column = _geometry_column(_geo_metadata(empty.schema, files[0]))
        attrs = empty.drop_columns(_not_attributes(empty, name, column)).to_pandas()
        frame = gpd.GeoDataFrame(attrs, geometry=gpd.GeoSeries([], crs=crs), crs=crs)
    frame.index = pd.Index(np.concatenate(rows) if rows else np.zeros(0, np.int64), name=INDEX_NAME)
    return gpd.GeoDataFrame(frame, geometry=frame.geometry.name, crs=crs)


def _not_attributes(table: pa.Table, geometry: str, column: dict[str, Any]) -> list[str]:
    """The geometry, covering and pandas index columns of a GeoParquet table."""
    names = [geometry] + [c for c in table.column_names if c.startswith("__index_level_")]
    covering = column.get("covering", {}).get("bbox")
    if covering is not None and covering["xmin"][0] in table.column_names:
        names.append(covering["xmin"][0])
    return names


def _row_groups_near(
    path: Path, files: list[Path], bounds: np.ndarray
) -> Iterator[tuple[Path, int, pa.Table, np.ndarray]]:
    """(file, number of the group's first row in the layer, the row group, rows of it
    whose covering box meets ``bounds``) for each row group whose covering statistics
    meet ``bounds``; every row is a candidate where there is no covering column."""
    offset = 0
    for file in files:
        handle = pq.ParquetFile(file)
        _, column = _geometry_column(_geo_metadata(handle.schema_arrow, file))
        covering = column.get("covering", {}).get("bbox")
        if covering is None and offset == 0:
            log.info("%s has no bbox covering column, so every row group is decoded to find the features near the "
                     "scenes; GeoDataFrame.to_parquet(write_covering_bbox=True) makes it faster", path)
        for group in range(handle.num_row_groups):
            meta = handle.metadata.row_group(group)
            if covering is None or _group_meets(meta, covering, bounds):
                table = handle.read_row_group(group)
                candidates = np.arange(meta.num_rows) if covering is None else _covering_rows(table, covering, bounds)
                if len(candidates):
                    yield file, offset, table, candidates
            offset += meta.num_rows


def _group_meets(group: Any, covering: dict[str, list[str]], bounds: np.ndarray) -> bool:
    """False when the row group's covering statistics say no row reaches ``bounds``."""
    stats = {group.column(k).path_in_schema: group.column(k).statistics for k in range(group.num_columns)}

    def stat(key: str, which: str) -> float | None:
        found = stats.get(".".join(covering[key]))
        return getattr(found, which) if found is not None and found.has_min_max else None

    x0, y0, x1, y1 = bounds
    lows = (stat("xmin", "min"), x1), (stat("ymin", "min"), y1)
    highs = (stat("xmax", "max"), x0), (stat("ymax", "max"), y0)
    return all(v is None or v <= limit for v, limit in lows) and all(v is None or v >= limit for v, limit in highs)


def _covering_rows(table: pa.Table, covering: dict[str, list[str]], bounds: np.ndarray) -> np.ndarray:
    """Rows (positions) whose covering box meets ``bounds``."""
    def values(key: str) -> pa.Array:
        struct, field = covering[key]
        return pc.struct_field(table[struct], field)

    x0, y0, x1, y1 = bounds
    meets = pc.and_(
        pc.and_(pc.less_equal(values("xmin"), x1), pc.less_equal(values("ymin"), y1)),
        pc.and_(pc.greater_equal(values("xmax"), x0), pc.greater_equal(values("ymax"), y0)),
    )
    return np.flatnonzero(pc.fill_null(meets, False).to_numpy(zero_copy_only=False))
