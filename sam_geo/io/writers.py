"""Write polygon layers to GeoJSON, GeoPackage or GeoParquet, atomically.

The format follows the output path's suffix (see :data:`SUPPORTED_SUFFIXES`). Call
:func:`check_output_path` when a run starts so a bad path fails before hours of work,
then :func:`write_vector` at the end.

Every write goes through :func:`sam_geo.io.atomic.atomic_path`: a hidden temporary
file next to the target (``.<name>.<random>.tmp<suffix>``), flushed to disk, then
renamed onto the target with :func:`os.replace`. A failed or interrupted write therefore
never leaves a half-written target: the previous file, if any, stays byte-for-byte as it
was, and the temporary file is removed (only a hard kill, e.g. SIGKILL, can leave one
behind; its name starts with a dot and contains ``.tmp``).

Per format:

* **GeoJSON** (RFC 7946): reprojected to EPSG:4326, coordinates in longitude/latitude
  order, exterior rings counter-clockwise and holes clockwise, no ``"crs"`` member,
  coordinates rounded to :data:`GEOJSON_DECIMALS` decimals (1e-7 degree is about 1 cm on
  the ground), geometries crossing the antimeridian split by GDAL. Rounding can make
  features narrower than about a centimetre degenerate: use GeoPackage or GeoParquet for
  exact coordinates. An empty layer is an empty FeatureCollection (no column names).
* **GeoPackage**: written in the layer's own CRS, layer name ``layer`` or the file stem,
  with an R-tree spatial index (table ``rtree_<layer>_<geometry column>``, the column
  being ``geom``). A layer has one geometry type, so a mix of Polygons and MultiPolygons
  is written as MultiPolygons. SQLite column names are case-insensitive: of attributes
  differing only in case the last keeps its name and the others get ``_2``, ``_3`` ...;
  an attribute called ``fid`` or ``geom`` keeps its name and values, the FID and
  geometry columns then being called ``fid_1`` and ``geometry``.
* **GeoParquet**: GeoParquet 1.x metadata via :meth:`geopandas.GeoDataFrame.to_parquet`,
  CRS (as PROJJSON), dtypes and index kept; ``object`` columns mixing value types
  (numbers and text) are written as text, as Arrow needs one type per column.

All text is UTF-8, so non-ASCII column names and values round-trip. In GeoJSON and
GeoPackage a named or non-integer index becomes column(s) (as ``GeoDataFrame.to_file``
does) and ``object`` columns of booleans or integers with ``None`` are written as
nullable booleans or integers; missing values are written as nulls.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import geopandas
import numpy as np
import pandas as pd
import pyogrio
import shapely

from sam_geo.errors import CRSError, OutputError, SamGeoError
from sam_geo.io.atomic import atomic_path, check_target, write_error

log = logging.getLogger(__name__)

__all__ = ["GEOJSON_DECIMALS", "SUPPORTED_SUFFIXES", "check_output_path", "write_vector"]

#: Output suffix (lower case) -> format name.
SUPPORTED_SUFFIXES: dict[str, str] = {
    ".geojson": "GeoJSON",
    ".json": "GeoJSON",
    ".gpkg": "GPKG",
    ".parquet": "GeoParquet",
    ".geoparquet": "GeoParquet",
}

#: Decimals kept in GeoJSON coordinates (degrees): 1e-7 degree <= 1.1 cm on the ground.
GEOJSON_DECIMALS = 7

# Advice of a WriteError for a failure that is not an OSError (a driver refusing the data).
_FORMAT_ADVICE = (
    "the data could not be stored in this format; write another one (.gpkg, .parquet "
    "or .geojson), and report it if it looks like a bug"
)


# --- path checks ------------------------------------------------------------------------


def check_output_path(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    others: dict[str, Any] | None = None,
) -> Path:
    """Validate an output path before any work is done; return it as a :class:`Path`.

    Checks that the suffix names a supported format, that the parent directory exists
    (it is never created silently) and is a writable directory, that the path is not a
    directory, that it does not exist yet unless ``overwrite`` is true, and that it is
    none of the ``others`` (even with ``overwrite``: ``-o prompts.gpkg --overwrite``
    would replace the prompt layer with the results).

    Args:
        path: output file path; ``~`` is expanded.
        overwrite: allow replacing an existing file.
        others: ``{what: path}`` of the run's other files (inputs, the summary); entries
            that are not local paths (GeoDataFrames, URLs, None) are ignored.

    Returns:
        The path, with ``~`` expanded.

    Raises:
        OutputError: unsupported suffix, missing or unwritable parent directory, or the
            path is a directory.
        OutputExistsError: the file exists and ``overwrite`` is false.
    """
    target = Path(path).expanduser()
    format_for(target)
    for what, other in (others or {}).items():
        if _same_file(target, other):
            raise OutputError(
                f"output {str(target)!r} is the same file as {what} ({other}); writing it would "
                "replace that file. Choose another output path"
            )
    return check_target(target, overwrite=overwrite)


def _same_file(target: Path, other: Any) -> bool:
    """True if ``other`` is a local path naming the same file as ``target``."""
    if not isinstance(other, (str, os.PathLike)):
        return False
    text = os.fspath(other)
    if "://" in text or text.startswith("/vsi"):
        return False
    candidate = Path(text).expanduser()
    try:
        if target.exists() and candidate.exists():
            return os.path.samefile(target, candidate)
    except OSError:
        return False
    return os.path.abspath(target) == os.path.abspath(candidate)


def format_for(path: Path) -> str:
    """Format name for ``path``'s suffix (case-insensitive), or OutputError."""
    suffix = path.suffix.lower()
    try:
        return SUPPORTED_SUFFIXES[suffix]
    except KeyError:
        supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
        raise OutputError(
            f"cannot write {str(path)!r}: unsupported suffix {suffix or '(none)'!r}; "
            f"use one of {supported}, or a folder ending with / for a partitioned GeoParquet dataset"
        ) from None


# --- writing ----------------------------------------------------------------------------


def write_vector(
    gdf: geopandas.GeoDataFrame,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    layer: str | None = None,
) -> Path:
    """Write ``gdf`` atomically to ``path`` in the format its suffix names.

    See the module docstring for what each format keeps. ``gdf`` itself is not modified.

    Args:
        gdf: features to write; must have a CRS. May be empty (zero rows).
        path: output file (``.geojson``/``.json``, ``.gpkg``, ``.parquet``/``.geoparquet``).
        overwrite: replace an existing file (atomically) instead of refusing.
        layer: layer name for GeoPackage (default: the file stem) and the GeoJSON
            FeatureCollection ``"name"``; ignored for GeoParquet.

    Returns:
        The path written.

    Raises:
        TypeError: ``gdf`` is not a GeoDataFrame with an active geometry column.
        CRSError: ``gdf`` has no CRS, or (GeoJSON) it cannot be reprojected to EPSG:4326.
        OutputError, OutputExistsError: as :func:`check_output_path`.
        WriteError: writing failed (disk full, permission, driver error); the previous
            target is untouched and the temporary file removed.
    """
    _check_frame(gdf)
    target = check_output_path(path, overwrite=overwrite)
    fmt = format_for(target)
    layer_name = _layer_name(layer, target)
    try:
        with atomic_path(target, suffix=target.suffix, overwrite=overwrite) as tmp:
            _WRITERS[fmt](gdf, tmp, layer_name)
    except SamGeoError:
        raise
    except Exception as exc:  # driver errors (not OSError): atomic_path wrapped those
        raise write_error(target, exc, _FORMAT_ADVICE) from exc
    return target


def _check_frame(gdf: Any) -> None:
    """Reject non-GeoDataFrames and frames without a CRS."""
    if not isinstance(gdf, geopandas.GeoDataFrame):
        raise TypeError(
            f"expected a geopandas.GeoDataFrame, got {type(gdf).__name__}; wrap it with "
            "geopandas.GeoDataFrame(df, geometry=..., crs=...)"
        )
    try:
        crs = gdf.crs
    except AttributeError as exc:  # no active geometry column
        raise TypeError(
            "the GeoDataFrame has no active geometry column; call .set_geometry(...) first"
        ) from exc
    if crs is None:
        raise CRSError(
            "the GeoDataFrame has no CRS, so its coordinates cannot be georeferenced; "
            "set it with gdf.set_crs(<the scene's CRS>) before writing"
        )


def _layer_name(layer: str | None, target: Path) -> str:
    """``layer`` if given (non-empty), else the target's stem."""
    if layer is None:
        return target.stem
    if not isinstance(layer, str) or not layer.strip():
        raise OutputError(f"layer name must be a non-empty string, got {layer!r}")
    return layer


def _write_geojson(gdf: geopandas.GeoDataFrame, tmp: Path, layer_name: str) -> None:
    """RFC 7946 GeoJSON: EPSG:4326, lon/lat, CCW shells/CW holes, 7 decimals, no crs."""
    geojson_chunk(gdf, tmp, layer_name, append=False)


def _rfc7946_ready(gdf: geopandas.GeoDataFrame) -> geopandas.GeoDataFrame:
    """``gdf`` in EPSG:4326 with CCW shells / CW holes and OGR-friendly columns."""
    lonlat = _to_wgs84(gdf)  # a copy: safe to modify
    oriented = shapely.orient_polygons(np.asarray(lonlat.geometry.values), exterior_cw=False)
    lonlat[lonlat.geometry.name] = geopandas.GeoSeries(
        oriented, index=lonlat.index, crs=lonlat.crs
    )
    return _for_ogr(lonlat)


def geojson_chunk(gdf: geopandas.GeoDataFrame, path: Path, layer_name: str, *, append: bool = False) -> None:
    """Write an RFC 7946 FeatureCollection at ``path`` (``append``: not supported here,
    GDAL rereads the whole file per append; stream with :func:`geojson_features`)."""
    if append:
        raise ValueError("append GeoJSON features with geojson_features, not by reopening the file")
    pyogrio.write_dataframe(
        _rfc7946_ready(gdf), path, driver="GeoJSON", layer=layer_name,
        layer_options={"RFC7946": "YES", "COORDINATE_PRECISION": str(GEOJSON_DECIMALS)},
    )


def geojson_features(gdf: geopandas.GeoDataFrame) -> list[bytes]:
    """RFC 7946 GeoJSON Features of ``gdf`` (one UTF-8 text each, EPSG:4326, rounded to
    :data:`GEOJSON_DECIMALS`), written by GDAL's GeoJSONSeq driver into memory: what a
    streamed FeatureCollection is made of."""
    buffer = io.BytesIO()
    pyogrio.write_dataframe(
        _rfc7946_ready(gdf), buffer, driver="GeoJSONSeq", layer="features",
        layer_options={"RS": "NO", "COORDINATE_PRECISION": str(GEOJSON_DECIMALS)},
    )
    return [line for line in buffer.getvalue().splitlines() if line.strip()]


def _to_wgs84(gdf: geopandas.GeoDataFrame) -> geopandas.GeoDataFrame:
    """``gdf`` reprojected to EPSG:4326 (x = longitude, y = latitude), or CRSError."""
    try:
        out = gdf.to_crs(4326)
    except Exception as exc:
        raise CRSError(
            f"cannot reproject from {gdf.crs.name!r} to EPSG:4326 for GeoJSON: {exc}; "
            "write .gpkg or .parquet instead, which keep the original CRS"
        ) from exc
    bounds = out.total_bounds
    if len(out) and not np.all(np.isfinite(bounds) | np.isnan(bounds)):
        raise CRSError(
            f"reprojecting from {gdf.crs.name!r} to EPSG:4326 gave non-finite "
            "coordinates (geometries outside the CRS's area of use?); write .gpkg or "
            ".parquet instead, which keep the original CRS"
        )
    return out


def _write_gpkg(gdf: geopandas.GeoDataFrame, tmp: Path, layer_name: str) -> None:
    """GeoPackage layer in the frame's CRS, with an R-tree spatial index.

    SQLite column names are case-insensitive and GPKG reserves two of them (the FID
    column ``fid`` and the geometry column ``geom``), so attributes such as ``Score``
    beside ``score``, ``FID`` or ``geom`` would make the write fail at the very end of a
    run: see :func:`_gpkg_names`.
    """
    frame, fid_name, geometry_name = _gpkg_names(_for_ogr(gdf))
    pyogrio.write_dataframe(
        frame,
        tmp,
        driver="GPKG",
        layer=layer_name,
        layer_options={"SPATIAL_INDEX": "YES", "FID": fid_name, "GEOMETRY_NAME": geometry_name},
    )


def gpkg_chunk(gdf: geopandas.GeoDataFrame, path: Path, layer_name: str, *, append: bool) -> None:
    """Write (or append to, one transaction) a MultiPolygon GeoPackage layer at ``path``
    with an R-tree; names as :func:`_write_gpkg`."""
    frame, fid_name, geometry_name = _gpkg_names(_for_ogr(gdf))
    options = {} if append else {"SPATIAL_INDEX": "YES", "FID": fid_name, "GEOMETRY_NAME": geometry_name}
    pyogrio.write_dataframe(
        frame, path, driver="GPKG", layer=layer_name, layer_options=options, append=append,
        geometry_type="MultiPolygon", promote_to_multi=True,
    )


def _gpkg_names(gdf: geopandas.GeoDataFrame) -> tuple[geopandas.GeoDataFrame, str, str]:
    """Attribute names SQLite accepts, plus FID and geometry column names not in use.

    * Attributes whose names differ only in case: the last one (sam-geo's own columns
      come last) keeps its name, the others get ``_2``, ``_3`` ... (a logged warning).
    * The FID column is ``fid`` and the geometry column ``geom`` unless an attribute is
      called so (in any case); then ``fid_1`` / ``geometry`` (or the next free name) are
      used and the attribute keeps its name and values.
    """
    geometry = gdf.geometry.name
    names = [str(c) for c in gdf.columns if c != geometry]
    taken = {n.lower() for n in names}
    renames: dict[str, str] = {}
    seen: set[str] = set()
    for name in reversed(names):
        if name.lower() in seen:
            k = 2
            while f"{name}_{k}".lower() in taken:
                k += 1
            renames[name] = f"{name}_{k}"
            taken.add(renames[name].lower())
        seen.add(name.lower())
    if renames:
        log.warning(
            "GeoPackage column names are case-insensitive; renamed %s",
            ", ".join(f"{old!r} to {new!r}" for old, new in renames.items()),
        )
        gdf = gdf.rename(columns=renames)
    fid_name = _free_name(("fid", "fid_1", "fid_2", "sam_geo_fid"), taken)
    geometry_name = _free_name(("geom", "geometry", "geom_1", "sam_geo_geom"), taken)
    return gdf, fid_name, geometry_name


def _free_name(candidates: tuple[str, ...], taken: set[str]) -> str:
    """The first candidate not in ``taken`` (lower-case names)."""
    return next((c for c in candidates if c.lower() not in taken), candidates[-1])


def _write_parquet(gdf: geopandas.GeoDataFrame, tmp: Path, layer_name: str) -> None:
    """GeoParquet 1.x (``layer_name`` unused: the format has a single table)."""
    del layer_name
    parquet_ready(gdf).to_parquet(tmp)


def parquet_ready(gdf: geopandas.GeoDataFrame) -> geopandas.GeoDataFrame:
    """``gdf`` as Arrow can store it (see :func:`_uniform_objects`)."""
    return _uniform_objects(gdf)


def _uniform_objects(gdf: geopandas.GeoDataFrame) -> geopandas.GeoDataFrame:
    """``gdf`` with ``object`` columns of mixed value types (e.g. ``1`` and ``"a"``) as text.

    Arrow needs one type per column and would fail the write; numbers of mixed int and
    float, and columns of one type, are left as they are. Missing values stay missing.
    """
    out = gdf
    for name in gdf.columns:
        column = gdf[name]
        if name == gdf.geometry.name or column.dtype != object:
            continue
        kinds = {_value_kind(v) for v in column[column.notna()]}
        if len(kinds) > 1:
            if out is gdf:
                out = gdf.copy()
            out[name] = column.where(column.isna(), column.astype(str))
    return out


def _value_kind(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "number"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "list"
    return type(value).__name__


_WRITERS: dict[str, Callable[[geopandas.GeoDataFrame, Path, str], None]] = {
    "GeoJSON": _write_geojson,
    "GPKG": _write_gpkg,
    "GeoParquet": _write_parquet,
}


def _for_ogr(gdf: geopandas.GeoDataFrame) -> geopandas.GeoDataFrame:
    """Copy of ``gdf`` whose columns map cleanly onto OGR field types.

    * A named or non-integer index becomes column(s), as ``GeoDataFrame.to_file`` does
      (OGR has no index; a default integer index is dropped).
    * ``object`` columns holding only booleans (or only integers) and missing values
      become pandas nullable ``boolean`` (``Int64``) so they are written as booleans
      (integers) with nulls, rather than as the strings ``"True"``/``"False"``.
    """
    out = gdf
    index = gdf.index
    if index.nlevels > 1 or index.name is not None or not pd.api.types.is_integer_dtype(index):
        out = gdf.reset_index()
    geometry_name = out.geometry.name
    dtypes: dict[Any, str] = {}
    for name in out.columns:
        if name != geometry_name and out[name].dtype == object:
            nullable = _nullable_dtype(out[name])
            if nullable is not None:
                dtypes[name] = nullable
    return out.astype(dtypes) if dtypes else out


def _nullable_dtype(column: pd.Series) -> str | None:
    """``"boolean"``/``"Int64"`` if an object column holds only bools/ints and nulls."""
    values = column.dropna()
    if values.empty:
        return None
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return "boolean"
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return "Int64"
    return None
