"""Regularize building outlines: straight edges, right angles, aligned to the main axis.

Building masks from SAM come out as pixel staircases with wobbly edges.
:func:`regularize_buildings` turns them into clean outlines with the maintained library
`buildingregulariser <https://pypi.org/project/buildingregulariser/>`_
(:func:`buildingregulariser.regularize_geodataframe`): each polygon is simplified
(Douglas-Peucker, ``tolerance_m``), its main direction is found from an edge-length
weighted histogram of edge angles, every edge is snapped parallel or perpendicular (or
at 45 degrees) to it, nearly parallel neighbouring edges closer than
``parallel_threshold_m`` are merged, and near-circular shapes become circles.

What this module adds around the library:

* **metres everywhere**: tolerances are given in metres. Projected CRSs are worked in
  directly, the tolerances converted to CRS units with
  :func:`sam_geo.geo.vectorize.metres_to_crs_units` (so US-feet CRSs work). Geographic CRSs
  are regularized in the local UTM zone and projected back, because a right angle on
  the ground is not a right angle in longitude/latitude degrees (longitude degrees are
  ``cos(latitude)`` times shorter): snapping angles in degree space would skew
  buildings into parallelograms.
* **one output row per input row**: the library explodes multi-part geometries and may
  split or drop parts; the parts of a row are unioned back, and attributes, index and
  row order are kept.
* **always valid, never empty**: where regularization fails, collapses a polygon,
  returns something invalid or empty, or moves it too much (IoU with the input below
  ``min_iou``), the row keeps its input geometry (repaired with
  :func:`shapely.make_valid` if it was invalid). Those rows are counted.
* rows whose geometry is missing, empty or has no area (points, lines, collapsed
  rings) cannot be buildings: they are dropped and counted.

Counts are in ``result.attrs["regularize"]``: ``input``, ``regularized``, ``fallback``,
``dropped`` (numbers of rows) and ``fallback_index``, ``dropped_index`` (index labels).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import geopandas as gpd
import numpy as np
import pyproj
import shapely
from buildingregulariser import regularize_geodataframe

from sam_geo.errors import ConfigError, CRSError
from sam_geo.geo.vectorize import metres_to_crs_units

__all__ = ["regularize_buildings"]

_POLYGON_TYPE_IDS = (3, 6)  # Polygon, MultiPolygon
_ROW = "__sam_geo_row__"


def regularize_buildings(
    gdf: gpd.GeoDataFrame,
    *,
    tolerance_m: float = 0.5,
    parallel_threshold_m: float = 1.0,
    allow_45_degree: bool = True,
    diagonal_threshold_reduction: float = 15.0,
    allow_circles: bool = True,
    circle_threshold: float = 0.9,
    min_iou: float = 0.5,
    workers: int = 1,
) -> gpd.GeoDataFrame:
    """Regularize building polygons into clean outlines; one output row per usable input.

    Args:
        gdf: Building polygons (Polygon or MultiPolygon) with a projected or geographic
            CRS. Not modified.
        tolerance_m: Simplification tolerance in metres applied before snapping
            (also sizes the library's sliver clean-up, ``tolerance_m / 50``). About one
            to two pixels of the source imagery; larger values give fewer vertices.
        parallel_threshold_m: Nearly parallel neighbouring edges closer than this
            (metres) are merged into one.
        allow_45_degree: Also allow edges at 45 degrees to the main direction.
        diagonal_threshold_reduction: Degrees (0-22.5) that make 45-degree edges less
            likely; larger means fewer diagonals.
        allow_circles: Replace polygons whose IoU with a circle of the same area
            exceeds ``circle_threshold`` by that circle (water tanks, silos).
        circle_threshold: IoU threshold of the circle test, in ``(0, 1]``.
        min_iou: A regularized outline whose IoU with its input is below this (in
            ``[0, 1]``) is rejected and the input kept.
        workers: Processes used by the library (``1``: in this process, the default;
            ``0``: one per CPU).

    Returns:
        A new GeoDataFrame in ``gdf``'s CRS with the same columns, index labels and row
        order, minus the rows dropped for having no area; every geometry valid and
        non-empty. Counts in ``attrs["regularize"]`` (see the module docstring).

    Raises:
        TypeError: ``gdf`` is not a GeoDataFrame.
        CRSError: ``gdf`` has no CRS, or one that is neither projected nor geographic.
        ConfigError: a tolerance or threshold is out of range.
    """
    _check_frame(gdf)
    _check_args(tolerance_m, parallel_threshold_m, diagonal_threshold_reduction,
                circle_threshold, min_iou, workers)
    geoms = _clean(np.asarray(gdf.geometry.values, dtype=object))
    usable = ~shapely.is_missing(geoms)
    kept = gdf.loc[usable].copy() if not usable.all() else gdf.copy()
    inputs = geoms[usable]
    out_geoms, accepted = _regularize_geoms(
        inputs, gdf.crs, min_iou=min_iou, tolerance_m=tolerance_m,
        parallel_threshold_m=parallel_threshold_m, workers=workers,
        allow_45_degree=allow_45_degree, diagonal_threshold_reduction=diagonal_threshold_reduction,
        allow_circles=allow_circles, circle_threshold=circle_threshold,
    )
    kept[gdf.geometry.name] = gpd.GeoSeries(out_geoms, index=kept.index, crs=gdf.crs)
    kept.attrs["regularize"] = _counts(gdf, kept, usable, accepted)
    return kept


def _regularize_geoms(
    inputs: np.ndarray,
    crs: Any,
    *,
    min_iou: float,
    tolerance_m: float,
    parallel_threshold_m: float,
    workers: int,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Regularized geometry per input (in ``crs``), and where it was accepted.

    ``inputs`` are clean polygons (:func:`_clean`) in ``crs``; tolerances are in metres,
    converted to units of the working CRS (:func:`_working_crs`); ``options`` go to the
    library as they are. Where the result is rejected (below ``min_iou``, unusable, or
    broken by the reprojection back) the input geometry is returned and ``accepted`` is
    False.
    """
    work_crs, to_work, to_source = _working_crs(crs, inputs)
    work_inputs = to_work(inputs)
    regularized = _run_library(
        work_inputs,
        work_crs,
        parallel_threshold=metres_to_crs_units(work_crs, parallel_threshold_m),
        simplify_tolerance=metres_to_crs_units(work_crs, tolerance_m),
        num_cores=workers,
        **options,
    )
    accepted = _accept(regularized, work_inputs, min_iou)
    out_geoms = np.where(accepted, to_source(regularized, accepted), inputs)
    accepted &= _usable(out_geoms)  # reprojection back can, rarely, break validity
    return np.where(accepted, out_geoms, inputs), accepted


def _counts(
    gdf: gpd.GeoDataFrame, kept: gpd.GeoDataFrame, usable: np.ndarray, accepted: np.ndarray
) -> dict[str, Any]:
    """``attrs["regularize"]``: row counts and index labels (see the module docstring)."""
    return {
        "input": int(len(gdf)),
        "regularized": int(accepted.sum()),
        "fallback": int((~accepted).sum()),
        "dropped": int((~usable).sum()),
        "fallback_index": kept.index[~accepted].tolist(),
        "dropped_index": gdf.index[~usable].tolist(),
    }


def _check_frame(gdf: Any) -> None:
    """TypeError for non-GeoDataFrames, CRSError for frames without a CRS."""
    if not isinstance(gdf, gpd.GeoDataFrame):
        raise TypeError(
            f"regularize_buildings expects a geopandas.GeoDataFrame, got {type(gdf).__name__}"
        )
    if gdf.crs is None:
        raise CRSError(
            "the building layer has no CRS, so tolerances in metres cannot be applied; "
            "set it with gdf.set_crs(EPSG code) first"
        )


def _check_args(
    tolerance_m: float,
    parallel_threshold_m: float,
    diagonal_threshold_reduction: float,
    circle_threshold: float,
    min_iou: float,
    workers: int,
) -> None:
    """ConfigError for out-of-range tolerances and thresholds."""
    for name, value in (("tolerance_m", tolerance_m), ("parallel_threshold_m", parallel_threshold_m)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number of metres, got {value!r}")
    checks = (
        ("diagonal_threshold_reduction", diagonal_threshold_reduction, 0.0, 22.5),
        ("circle_threshold", circle_threshold, 0.0, 1.0),
        ("min_iou", min_iou, 0.0, 1.0),
    )
    for name, value, low, high in checks:
        if not (isinstance(value, (int, float)) and low <= value <= high):
            raise ConfigError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigError(f"workers must be an integer >= 0, got {workers!r}")


# --- geometry helpers -----------------------------------------------------------------


def _clean(geoms: np.ndarray) -> np.ndarray:
    """2-D valid polygonal geometries with area; ``None`` where there is none."""
    out = shapely.force_2d(geoms)
    present = ~shapely.is_missing(out)
    invalid = present & ~shapely.is_valid(out)
    if invalid.any():
        out[invalid] = shapely.make_valid(out[invalid], method="structure", keep_collapsed=False)
    for i in np.flatnonzero(present & ~np.isin(shapely.get_type_id(out), _POLYGON_TYPE_IDS)):
        out[i] = _polygonal(out[i])
    out[~_usable(out)] = None
    return out


def _polygonal(geom: shapely.Geometry | None) -> shapely.Geometry | None:
    """Valid union of the polygonal parts of ``geom``; ``None`` if it has none."""
    if geom is None:
        return None
    parts = [p for p in shapely.get_parts(geom) if shapely.get_type_id(p) in _POLYGON_TYPE_IDS]
    if not parts:
        return None
    merged = shapely.make_valid(shapely.union_all(parts), method="structure", keep_collapsed=False)
    return merged if shapely.get_type_id(merged) in _POLYGON_TYPE_IDS else None


def _usable(geoms: np.ndarray) -> np.ndarray:
    """True where a geometry is a valid, non-empty (Multi)Polygon with area."""
    ok = ~shapely.is_missing(geoms)
    ok[ok] = (
        np.isin(shapely.get_type_id(geoms[ok]), _POLYGON_TYPE_IDS)
        & shapely.is_valid(geoms[ok])
        & ~shapely.is_empty(geoms[ok])
        & (shapely.area(geoms[ok]) > 0)
    )
    return ok


# --- CRS handling ---------------------------------------------------------------------


def _working_crs(crs: Any, geoms: np.ndarray) -> tuple[pyproj.CRS, Any, Any]:
    """CRS to regularize in, and functions mapping geometries into it and back.

    Projected CRSs are used as they are; geographic ones are replaced by the UTM zone
    of the geometries' extent.
    """
    source = pyproj.CRS.from_user_input(crs)
    if source.is_projected:
        identity = lambda values, mask=None: values  # noqa: E731
        return source, identity, identity
    if not source.is_geographic:
        raise CRSError(
            f"cannot regularize in CRS {source.name!r}: it is neither projected nor "
            "geographic; reproject the buildings to a projected CRS first"
        )
    utm = _utm_for(source, geoms)
    forward = pyproj.Transformer.from_crs(source, utm, always_xy=True)
    backward = pyproj.Transformer.from_crs(utm, source, always_xy=True)

    def to_work(values: np.ndarray) -> np.ndarray:
        return _transform(values, forward)

    def to_source(values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        out = values.copy()
        chosen = ~shapely.is_missing(values) if mask is None else mask
        out[chosen] = _transform(values[chosen], backward)
        return out

    return utm, to_work, to_source


def _utm_for(source: pyproj.CRS, geoms: np.ndarray) -> pyproj.CRS:
    """UTM CRS for the extent of ``geoms`` (given in the geographic CRS ``source``)."""
    if len(geoms) == 0:
        return pyproj.CRS.from_epsg(32631)  # nothing to regularize; any metric CRS works
    try:
        return gpd.GeoSeries(geoms, crs=source).estimate_utm_crs()
    except (RuntimeError, ValueError, pyproj.exceptions.CRSError) as exc:
        raise CRSError(
            f"cannot find a UTM zone for the buildings in {source.name!r}: {exc}; "
            "reproject them to a projected CRS first"
        ) from exc


def _transform(values: np.ndarray, transformer: pyproj.Transformer) -> np.ndarray:
    """Geometries with coordinates transformed by ``transformer`` (x, y order)."""
    if len(values) == 0:
        return values
    return shapely.transform(values, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


# --- the library call -----------------------------------------------------------------


def _run_library(geoms: np.ndarray, crs: pyproj.CRS, **options: Any) -> np.ndarray:
    """Regularized geometry per input (parts unioned); ``None`` where the library gave none.

    Parts the library returned unchanged (its own fallback, marked ``iou == 0``) count as
    not regularized: if every part of a row is such a fallback, the row gets ``None``.
    """
    out = np.full(len(geoms), None, dtype=object)
    if len(geoms) == 0:
        return out
    frame = gpd.GeoDataFrame({_ROW: np.arange(len(geoms))}, geometry=list(geoms), crs=crs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library warns per fallback; we count them
        result = regularize_geodataframe(frame, simplify=True, include_metadata=True, **options)
    if len(result) == 0:
        return out
    result = result[result["iou"] > 0]
    for row, pieces in result.groupby(_ROW, sort=False).geometry:
        parts = list(pieces)
        merged = parts[0] if len(parts) == 1 else shapely.union_all(parts)
        out[int(row)] = _polygonal(merged) if not merged.is_valid else merged
    return out


def _accept(regularized: np.ndarray, inputs: np.ndarray, min_iou: float) -> np.ndarray:
    """True where the regularized geometry is usable and its IoU with the input >= min_iou."""
    ok = _usable(regularized)
    if ok.any():
        a, b = regularized[ok], inputs[ok]
        inter = shapely.area(shapely.intersection(a, b))
        union = shapely.area(a) + shapely.area(b) - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, 0.0)
        ok[ok] = iou >= min_iou
    return ok
