"""Turn boolean masks into georeferenced polygons, and measure them in metres.

Conventions used throughout this module:

* A mask is a 2-D array indexed ``mask[row, col]`` (axis 0 = rows, top to bottom; axis 1
  = columns, left to right), as returned by rasterio and by SAM.
* A ``transform`` is an :class:`affine.Affine` mapping pixel *corner* coordinates
  ``(col, row)`` to CRS coordinates ``(x, y)``; any affine is allowed (north-up, flipped,
  rotated or sheared). ``(0, 0)`` is the upper-left corner of the upper-left pixel.
* Geometries are in the CRS's *traditional GIS* axis order: ``x`` = easting / longitude,
  ``y`` = northing / latitude, whatever order the CRS definition declares. This is the
  order rasterio, shapely and geopandas use.
* Lengths and areas are in CRS units (``CRS units`` and ``CRS units^2``) unless the name
  says metres (``_m``) or square metres (``_m2``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import affine
import geopandas
import numpy as np
import pyproj
import rasterio.features
import scipy.sparse
import scipy.sparse.csgraph
from rasterio.errors import NotGeoreferencedWarning
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape

from sam_geo.errors import CRSError

__all__ = [
    "geometry_area_m2",
    "logits_to_geometries",
    "logits_to_geometry",
    "mask_to_geometry",
    "metres_to_crs_units",
    "nodata_polygon",
]

# Ellipsoid used for geodesic areas when a CRS does not define one.
_WGS84 = pyproj.Geod(ellps="WGS84")


# --- mask -> geometry ------------------------------------------------------------------


def mask_to_geometry(
    mask: np.ndarray,
    transform: affine.Affine,
    *,
    min_area: float = 0.0,
    simplify: float | None = None,
) -> Polygon | MultiPolygon | None:
    """Vectorize a boolean mask into one valid (Multi)Polygon in CRS coordinates.

    Pixels are traced along their edges with :func:`rasterio.features.shapes` using
    4-connectivity, so pixels that touch only at a corner become separate parts (which
    may touch at that corner point). Holes in the mask are kept as interior rings.

    Steps, in order:

    1. trace the ``True`` pixels; every vertex is a pixel corner mapped through
       ``transform`` (so rotated and sheared grids are exact);
    2. repair each traced polygon with :func:`shapely.make_valid` and keep only its
       polygonal parts;
    3. fill holes whose area is below ``min_area`` (their interior ring is dropped), then
       drop parts whose area is below ``min_area`` (slivers, specks);
    4. if ``simplify`` is given, simplify each part with ``preserve_topology=True``
       (rings of a part never cross), repair again, drop parts that fell below
       ``min_area`` or became empty, and merge parts that came to overlap.

    Args:
        mask: ``(rows, cols)`` boolean array; ``True`` marks the object.
        transform: affine map from pixel ``(col, row)`` to CRS ``(x, y)``.
        min_area: area threshold in **CRS units^2** (e.g. m^2 for UTM, degrees^2 for
            EPSG:4326) applied to parts and to holes. ``0`` keeps everything. Convert a
            threshold in square metres with ``metres_to_crs_units(crs, sqrt(a_m2)) ** 2``.
        simplify: Douglas-Peucker tolerance in **CRS units**, or ``None`` for none.

    Returns:
        A :class:`~shapely.Polygon` when one part is left, a
        :class:`~shapely.MultiPolygon` when several are, ``None`` when nothing is. A
        returned geometry is always valid and non-empty.

    Raises:
        TypeError: ``mask`` is not a boolean array or ``transform`` is not an Affine.
        ValueError: ``mask`` is not 2-D, the transform is degenerate, or a threshold is
            negative or not finite.
    """
    _check_mask(mask)
    _check_transform(transform)
    min_area = _check_threshold("min_area", min_area)
    if simplify is not None:
        simplify = _check_threshold("simplify", simplify)

    if not mask.any():
        return None
    parts = _trace(mask, transform)
    parts = _filter_parts(parts, min_area)
    if simplify:
        parts = _simplify_parts(parts, simplify, min_area)
    return _assemble(parts)


LOGIT_PAD = -1.0e4
"""Value put around a logits crop so every 0-level contour closes inside the padding."""

CONTOUR_TOLERANCE_PX = 0.1
"""Douglas-Peucker tolerance, in image pixels, applied to traced contours: marching
squares puts a vertex on every cell edge an outline crosses, most of them collinear;
dropping those that move the outline by less than a tenth of a pixel cuts a building's
vertices several-fold and changes its area by far less than a pixel."""


def logits_to_geometry(
    logits: np.ndarray,
    cell_to_pixel: affine.Affine,
    pixel_to_crs: affine.Affine,
    clip: tuple[float, float, float, float],
    *,
    min_area: float = 0.0,
    simplify: float | None = None,
) -> Polygon | MultiPolygon | None:
    """Vectorize the outline of a mask given as low-resolution logits (mask = logits > 0).

    SAM's mask is its low-resolution logits bilinearly upsampled and thresholded at 0.
    Instead of upsampling to pixels and tracing pixel edges (:func:`mask_to_geometry`),
    this traces the 0-level line of the logits themselves with marching squares
    (:func:`skimage.measure.find_contours`): the outline crosses each cell edge exactly
    where the bilinear surface does, and is a straight segment inside a cell, so it is
    sub-pixel and has no staircase. The mask side is 4-connected (as in
    :func:`mask_to_geometry`). Vertices that move the outline by less than
    :data:`CONTOUR_TOLERANCE_PX` are dropped. Cost grows with the crop's cells, not
    with its pixels.

    Args:
        logits: ``(rows, cols)`` float logits, a crop of the low-res grid; index
            ``(r, c)`` is the cell *centre* ``(c, r)`` in cell coordinates.
        cell_to_pixel: affine from cell-centre coordinates ``(col, row)`` of ``logits``
            to pixel-corner coordinates of the image the mask belongs to.
        pixel_to_crs: affine from pixel-corner coordinates to CRS ``(x, y)``.
        clip: ``(col0, row0, col1, row1)`` pixel-corner rectangle the mask is kept in;
            the logits crop should cover it (values beyond the crop repeat its edge).
        min_area: as in :func:`mask_to_geometry`, CRS units^2.
        simplify: as in :func:`mask_to_geometry`, CRS units.

    Returns:
        A valid Polygon or MultiPolygon in CRS coordinates, or None when no part is left.
    """
    return logits_to_geometries(
        [logits], np.asarray([cell_to_pixel[:6]], dtype=float), pixel_to_crs, np.asarray([clip], dtype=float),
        min_area=min_area, simplify=simplify,
    )[0]


def logits_to_geometries(
    logits: Sequence[np.ndarray],
    cell_to_pixel: np.ndarray,
    pixel_to_crs: affine.Affine,
    clips: np.ndarray,
    *,
    min_area: float = 0.0,
    simplify: float | None = None,
    exclude: Sequence[shapely.Geometry | None] | None = None,
) -> list[Polygon | MultiPolygon | None]:
    """:func:`logits_to_geometry` for many masks of one image at once (one entry per
    mask, in order): the shapely steps run once over all their rings, which is what
    makes the finish stage cheap for tiles with tens of prompts.

    Args:
        logits: per mask, ``(rows, cols)`` float logits as in :func:`logits_to_geometry`.
        cell_to_pixel: ``(n, 6)`` affine coefficients ``a, b, c, d, e, f`` per mask.
        pixel_to_crs: the image's affine, pixel corners -> CRS ``(x, y)``.
        clips: ``(n, 4)`` pixel rectangles ``col0, row0, col1, row1`` per mask.
        min_area: CRS units^2; simplify: CRS units (as in :func:`mask_to_geometry`).
        exclude: per mask, None or an area in pixel coordinates taken out of its
            outline (nodata pixels, :func:`nodata_polygon`).
    """
    min_area = _check_threshold("min_area", min_area)
    if simplify is not None:
        simplify = _check_threshold("simplify", simplify)
    rings: list[Polygon] = []
    owners: list[int] = []
    for k, crop in enumerate(logits):
        if crop.ndim == 2 and (crop > 0).any():
            polys = _contour_polygons(crop, cell_to_pixel[k])
            rings += polys
            owners += [k] * len(polys)
    out: list[Polygon | MultiPolygon | None] = [None] * len(logits)
    if not rings:
        return out
    owner = np.asarray(owners)
    box = np.asarray(clips, dtype=float)[owner]
    geoms = shapely.simplify(np.asarray(rings, dtype=object), CONTOUR_TOLERANCE_PX, preserve_topology=False)
    geoms = _clip_to_boxes(geoms, box)
    if exclude is not None:
        cut = np.asarray([exclude[k] is not None for k in owner], dtype=bool)
        if cut.any():
            holes = np.asarray([exclude[k] for k in owner[cut]], dtype=object)
            geoms[cut] = shapely.difference(geoms[cut], holes)
    geoms = _make_valid(shapely.transform(geoms, _affine_function(pixel_to_crs)))
    for k in np.unique(owner):
        parts = _filter_parts(_polygonal_parts(geoms[owner == k]), min_area)
        if simplify:
            parts = _simplify_parts(parts, simplify, min_area)
        out[int(k)] = _assemble(parts)
    return out


def nodata_polygon(valid: np.ndarray, window: tuple[int, int, int, int]) -> shapely.Geometry | None:
    """The invalid pixels of ``valid[row0:row1, col0:col1]`` as one polygon in pixel
    coordinates of ``valid`` (pixel edges; 4-connected), or None when all are valid.

    ``window``: ``(row0, col0, row1, col1)``, pixels.
    """
    r0, c0, r1, c1 = window
    invalid = ~valid[r0:r1, c0:c1]
    if not invalid.any():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        traced = rasterio.features.shapes(
            invalid.view(np.uint8), mask=invalid, connectivity=4, transform=affine.Affine.translation(c0, r0)
        )
        parts = [shape(geom) for geom, _ in traced]
    return shapely.union_all(np.asarray(parts, dtype=object))


def _clip_to_boxes(geoms: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Each geometry clipped to its ``(xmin, ymin, xmax, ymax)`` box; only those reaching
    past their box are clipped (most outlines lie inside theirs)."""
    bounds = shapely.bounds(geoms)
    outside = np.flatnonzero(((bounds[:, :2] < boxes[:, :2]) | (bounds[:, 2:] > boxes[:, 2:])).any(axis=1))
    if len(outside):
        geoms = geoms.copy()
        for i in outside:
            geoms[i] = shapely.clip_by_rect(geoms[i], *boxes[i])
    return geoms


def _affine_function(transform: affine.Affine) -> Callable[[np.ndarray], np.ndarray]:
    """``(n, 2)`` coordinates -> the same through ``transform``, for :func:`shapely.transform`."""
    a, b, c, d, e, f = transform[:6]
    matrix = np.array([[a, d], [b, e]])
    offset = np.array([c, f])
    return lambda xy: xy @ matrix + offset


def _contour_polygons(logits: np.ndarray, cell_to_pixel: Sequence[float]) -> list[Polygon]:
    """Polygons (pixel coordinates) bounded by the 0-level contours of ``logits``.

    The crop is padded with one ring of its own edge values (the mask runs on past the
    crop as its edge does; :func:`logits_to_geometry` clips it) and one of
    :data:`LOGIT_PAD`, so every contour is closed. Rings winding one way are shells,
    the others holes, each put in the smallest shell holding it. ``cell_to_pixel``: the
    affine coefficients ``a, b, c, d, e, f``.
    """
    from skimage.measure import find_contours

    rows, cols = logits.shape
    padded = np.full((rows + 4, cols + 4), LOGIT_PAD, dtype=np.float32)
    padded[2:-2, 2:-2] = logits
    padded[1, 2:-2], padded[-2, 2:-2] = logits[0], logits[-1]
    padded[1:-1, 1], padded[1:-1, -2] = padded[1:-1, 2], padded[1:-1, -3]
    a, b, c, d, e, f = (float(v) for v in cell_to_pixel[:6])
    shells: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    for contour in find_contours(padded, 0.0, fully_connected="low"):
        if len(contour) < 4:
            continue
        rows, cols = contour[:, 0] - 2.0, contour[:, 1] - 2.0
        xy = np.column_stack([a * cols + b * rows + c, d * cols + e * rows + f])
        # high values (the mask) lie to the right of find_contours' direction in (row, col)
        (shells if _signed_area(contour) > 0 else holes).append(xy)
    if not holes:
        return [Polygon(ring) for ring in shells]
    return _nest(shells, holes)


def _signed_area(rc: np.ndarray) -> float:
    """Shoelace area of a closed (row, col) ring: positive when it winds one way."""
    r, c = rc[:, 0], rc[:, 1]
    return 0.5 * float(np.dot(c[:-1], r[1:]) - np.dot(c[1:], r[:-1]))


def _nest(shells: list[np.ndarray], holes: list[np.ndarray]) -> list[Polygon]:
    """Shell polygons with each hole in the smallest shell that contains it."""
    shell_polys = [Polygon(ring) for ring in shells]
    order = np.argsort([p.area for p in shell_polys])
    members: list[list[np.ndarray]] = [[] for _ in shells]
    for hole in holes:
        probe = shapely.Point(hole[0])
        for i in order:
            if shell_polys[i].covers(probe):
                members[i].append(hole)
                break
    return [Polygon(ring, members[i]) if members[i] else shell_polys[i] for i, ring in enumerate(shells)]


def _check_mask(mask: Any) -> None:
    """Reject anything but a 2-D boolean numpy array (rows, cols)."""
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        dtype = getattr(mask, "dtype", type(mask).__name__)
        raise TypeError(
            f"mask must be a boolean numpy array, got {dtype}; "
            "convert it first, e.g. `mask > 0` or `probabilities >= threshold`"
        )
    if mask.ndim != 2:
        raise ValueError(
            f"mask must be 2-D (rows, cols), got shape {mask.shape}; "
            "squeeze or select the band/batch axis first"
        )


def _check_transform(transform: Any) -> None:
    """Reject non-Affine and non-invertible pixel-to-CRS transforms."""
    if not isinstance(transform, affine.Affine):
        raise TypeError(
            f"transform must be an affine.Affine, got {type(transform).__name__}; "
            "use the dataset's `.transform` (or Affine.from_gdal(*geotransform))"
        )
    if transform.is_degenerate:
        raise ValueError(
            f"transform {tuple(transform)[:6]} is degenerate (zero determinant): pixels "
            "would have no area; check the scene's georeferencing"
        )


def _check_threshold(name: str, value: float) -> float:
    """Return ``value`` as float if it is finite and >= 0, else raise ValueError."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _trace(mask: np.ndarray, transform: affine.Affine) -> list[Polygon]:
    """Trace ``True`` pixels into valid polygons in CRS coordinates (4-connectivity)."""
    with warnings.catch_warnings():
        # rasterio wraps the ``mask`` array in an in-memory dataset without a transform and
        # warns that it is not georeferenced; the transform that places the shapes is ours.
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        shapes = rasterio.features.shapes(mask.astype(np.uint8), mask=mask, transform=transform, connectivity=4)
        traced = np.asarray([shape(geojson) for geojson, _value in shapes], dtype=object)
    return _polygonal_parts(_make_valid(traced))


def _make_valid(geoms: np.ndarray) -> np.ndarray:
    """``geoms`` with the invalid ones repaired by :func:`shapely.make_valid`."""
    invalid = ~shapely.is_valid(geoms)
    if invalid.any():
        geoms = geoms.copy()
        geoms[invalid] = shapely.make_valid(geoms[invalid])
    return geoms


def _polygonal_parts(geoms: Any) -> list[Polygon]:
    """Non-empty Polygons found in ``geoms`` (a geometry or an array of them).

    Collections are flattened recursively; points and lines (which ``make_valid`` can
    produce from collapsed rings) are discarded.
    """
    flat = shapely.get_parts(np.atleast_1d(np.asarray(geoms, dtype=object)))
    out: list[Polygon] = []
    for geom in flat:
        if geom is None or geom.is_empty:
            continue
        if isinstance(geom, Polygon):
            out.append(geom)
        elif isinstance(geom, (MultiPolygon, shapely.GeometryCollection)):
            out.extend(_polygonal_parts(geom))
    return out


def _filter_parts(parts: list[Polygon], min_area: float) -> list[Polygon]:
    """Fill holes smaller than ``min_area``, then drop parts smaller than it (CRS units^2)."""
    if min_area <= 0 or not parts:
        return parts
    parts = [_fill_small_holes(part, min_area) for part in parts]
    areas = shapely.area(np.asarray(parts, dtype=object))
    return [part for part, area in zip(parts, areas) if area >= min_area]


def _fill_small_holes(polygon: Polygon, min_area: float) -> Polygon:
    """``polygon`` without interior rings whose enclosed area is < ``min_area``."""
    if not polygon.interiors:
        return polygon
    holes = [ring for ring in polygon.interiors if Polygon(ring).area >= min_area]
    if len(holes) == len(polygon.interiors):
        return polygon
    return Polygon(polygon.exterior, holes)


def _simplify_parts(parts: list[Polygon], tolerance: float, min_area: float) -> list[Polygon]:
    """Simplify each part (its own rings keep their topology), repair, re-filter.

    Parts are simplified one by one, which is fast for masks with many parts; parts that
    come to overlap are merged later by :func:`_assemble`.
    """
    if not parts:
        return parts
    simplified = shapely.simplify(
        np.asarray(parts, dtype=object), tolerance, preserve_topology=True
    )
    return _filter_parts(_polygonal_parts(_make_valid(simplified)), min_area)


def _assemble(parts: list[Polygon]) -> Polygon | MultiPolygon | None:
    """One valid Polygon/MultiPolygon from the parts, or None if there are none.

    Traced parts are disjoint (they may touch at corner points, which is valid). Parts
    that overlap or share an edge (possible only after simplification) are merged with a
    union so the MultiPolygon stays valid.
    """
    if not parts:
        return None
    geom: Polygon | MultiPolygon = parts[0] if len(parts) == 1 else MultiPolygon(parts)
    if geom.is_valid:
        return geom
    merged = _merge_overlapping(parts)
    geom = merged[0] if len(merged) == 1 else MultiPolygon(merged)
    if not geom.is_valid:  # last resort; not expected
        merged = _polygonal_parts(shapely.union_all(np.asarray(parts, dtype=object)))
        geom = merged[0] if len(merged) == 1 else MultiPolygon(merged)
    return geom


def _merge_overlapping(parts: list[Polygon]) -> list[Polygon]:
    """Union the groups of parts that overlap or share an edge; pass the others through.

    Only the offending groups are unioned, which keeps this fast for masks with tens of
    thousands of parts. Parts touching at isolated points are left apart (valid).
    """
    array = np.asarray(parts, dtype=object)
    left, right = shapely.STRtree(array).query(array, predicate="intersects")
    pairs = left < right
    left, right = left[pairs], right[pairs]
    # DE-9IM "FF*F0****": interiors disjoint, boundaries meet in points only
    bad = ~shapely.relate_pattern(array[left], array[right], "FF*F0****")
    groups = _connected_groups(len(parts), left[bad], right[bad])
    out: list[Polygon] = []
    for members in groups:
        if len(members) == 1:
            out.append(parts[members[0]])
        else:
            out.extend(_polygonal_parts(shapely.union_all(array[members])))
    return out


def _connected_groups(n: int, left: np.ndarray, right: np.ndarray) -> list[list[int]]:
    """Connected components of ``n`` nodes joined by edges ``left[i]``--``right[i]``.

    Computed with :func:`scipy.sparse.csgraph.connected_components` on the undirected
    graph. Each group lists its node indices in ascending order, groups are ordered by
    their smallest node, and a node without edges is a group of its own; ``n == 0``
    gives ``[]``.
    """
    if n == 0:
        return []
    edges = np.ones(len(left), dtype=np.int8)
    graph = scipy.sparse.coo_matrix((edges, (left, right)), shape=(n, n))
    _count, labels = scipy.sparse.csgraph.connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")  # by group, ascending node index within
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    groups = [members.tolist() for members in np.split(order, bounds)]
    groups.sort(key=lambda members: members[0])
    return groups


# --- areas in square metres -------------------------------------------------------------


def geometry_area_m2(
    geoms: geopandas.GeoSeries | Sequence[shapely.Geometry | None],
    crs: Any,
) -> np.ndarray:
    """Area of each geometry in square metres.

    * Projected CRS: planar area in CRS units^2 times the product of the two horizontal
      axes' unit-to-metre factors (``1`` for metres, ``0.3048006...^2`` for US survey
      feet ...). Fully vectorized. The area is the one on the projection plane, so it
      carries that projection's scale error (small for UTM within its zone, large for
      Web Mercator away from the equator: prefer a geographic or equal-area CRS there).
    * Geographic CRS: geodesic area on the CRS's own ellipsoid (WGS84 if it has none)
      with :class:`pyproj.Geod`, exterior ring area minus hole areas, whatever the ring
      orientation. Coordinates must be longitude/latitude in ``x``/``y`` order in the
      CRS's angular unit (degrees for EPSG:4326).

    Args:
        geoms: a GeoSeries or a sequence of shapely geometries, all in ``crs``. ``None``
            entries give ``NaN``; empty and non-polygonal geometries give ``0``.
        crs: anything :meth:`pyproj.CRS.from_user_input` accepts (EPSG code, WKT,
            ``rasterio.crs.CRS`` ...). ``None`` means "use ``geoms.crs``" for a GeoSeries.

    Returns:
        float64 array of shape ``(len(geoms),)`` in m^2.

    Raises:
        CRSError: no CRS, a CRS that is neither projected nor geographic, or geographic
            coordinates outside longitude/latitude range.
    """
    if crs is None and isinstance(geoms, geopandas.GeoSeries):
        crs = geoms.crs
    horizontal = _horizontal_crs(_to_crs(crs))
    array = _geometry_array(geoms)

    if horizontal.is_projected:
        factor_x, factor_y = _axis_factors(horizontal)
        return shapely.area(array).astype(np.float64) * (factor_x * factor_y)
    if horizontal.is_geographic:
        return _geodesic_areas(array, horizontal)
    raise CRSError(
        f"cannot compute areas in square metres in CRS {horizontal.name!r}: it is neither "
        "projected nor geographic; reproject the geometries to a projected CRS first"
    )


def _geometry_array(geoms: Any) -> np.ndarray:
    """``geoms`` as a 1-D object array of shapely geometries (or None)."""
    if isinstance(geoms, geopandas.GeoSeries):
        return np.asarray(geoms.values, dtype=object)
    array = np.empty(len(geoms), dtype=object)
    array[:] = list(geoms)
    return array


def _geodesic_areas(array: np.ndarray, crs: pyproj.CRS) -> np.ndarray:
    """Geodesic areas (m^2) of geometries in a geographic CRS, holes subtracted."""
    factor_x, factor_y = _axis_factors(crs)  # radians per CRS unit
    geod = _geod_for(crs)
    areas = np.where(shapely.is_missing(array), np.nan, 0.0)

    polygons, owner = shapely.get_parts(array, return_index=True)
    if len(polygons) == 0:
        return areas
    _check_lonlat_range(polygons, factor_x, factor_y)
    rings, ring_polygon = shapely.get_rings(polygons, return_index=True)
    # get_rings lists each polygon's exterior first, then its holes.
    is_exterior = np.r_[True, ring_polygon[1:] != ring_polygon[:-1]] if len(rings) else []
    for ring, polygon_index, exterior in zip(rings, ring_polygon, is_exterior):
        coords = shapely.get_coordinates(ring)
        lon = np.degrees(coords[:, 0] * factor_x)
        lat = np.degrees(coords[:, 1] * factor_y)
        ring_area = abs(geod.polygon_area_perimeter(lon, lat)[0])
        areas[owner[polygon_index]] += ring_area if exterior else -ring_area
    return areas


def _check_lonlat_range(polygons: np.ndarray, factor_x: float, factor_y: float) -> None:
    """Raise CRSError if coordinates cannot be longitude/latitude (wrong CRS given)."""
    xmin, ymin, xmax, ymax = shapely.total_bounds(polygons)
    lon_min, lon_max = np.degrees([xmin * factor_x, xmax * factor_x])
    lat_min, lat_max = np.degrees([ymin * factor_y, ymax * factor_y])
    if lat_min < -90 or lat_max > 90 or lon_min < -540 or lon_max > 540:
        raise CRSError(
            f"geometries span x {xmin:g}..{xmax:g}, y {ymin:g}..{ymax:g}, which is not "
            "longitude/latitude; pass the CRS the geometries are really in (or "
            "reproject them), and keep x = longitude, y = latitude"
        )


# --- metres -> CRS units ----------------------------------------------------------------


def metres_to_crs_units(crs: Any, distance_m: float, at_lat: float | None = None) -> float:
    """Convert a distance in metres into CRS units (e.g. for thresholds given in metres).

    * Projected CRS: exact, ``distance_m`` divided by the unit-to-metre factor of the
      x axis (``1`` for metres, ``0.3048`` for international feet ...).
    * Geographic CRS: **approximate**. At latitude ``at_lat`` one radian of latitude is
      ``M`` metres (meridional radius of curvature) and one radian of longitude is
      ``N * cos(lat)`` metres (``N``: prime-vertical radius), on the CRS's ellipsoid. The
      result uses their geometric mean ``sqrt(M * N * cos(lat))``, which makes areas
      exact to first order (``metres_to_crs_units(crs, sqrt(a_m2), lat) ** 2`` converts a
      square-metre threshold into degrees^2 correctly near ``at_lat``) while a length is
      over-estimated along meridians and under-estimated along parallels by a factor of
      about ``sqrt(cos(lat))`` (about 16% at 45 degrees). Good for sliver thresholds and
      simplification tolerances, not for measurement; use :func:`geometry_area_m2` to
      measure.

    To convert an area threshold: ``metres_to_crs_units(crs, math.sqrt(area_m2)) ** 2``.

    Args:
        crs: anything :meth:`pyproj.CRS.from_user_input` accepts.
        distance_m: distance in metres, finite and >= 0.
        at_lat: latitude in degrees where the conversion applies (e.g. the scene
            centre); required for geographic CRSs, ignored for projected ones.

    Returns:
        The distance in CRS units (metres, feet, degrees ...).

    Raises:
        CRSError: no CRS, or one that is neither projected nor geographic.
        ValueError: bad ``distance_m``, or ``at_lat`` missing or not in (-90, 90) for a
            geographic CRS.
    """
    distance_m = _check_threshold("distance_m", distance_m)
    horizontal = _horizontal_crs(_to_crs(crs))
    if horizontal.is_projected:
        return distance_m / _axis_factors(horizontal)[0]
    if horizontal.is_geographic:
        radians = distance_m / _metres_per_radian(horizontal, at_lat)
        return radians / _axis_factors(horizontal)[0]
    raise CRSError(
        f"cannot convert metres into units of CRS {horizontal.name!r}: it is neither "
        "projected nor geographic; use a projected CRS"
    )


def _metres_per_radian(crs: pyproj.CRS, at_lat: float | None) -> float:
    """Geometric mean of the meridian and parallel scale at ``at_lat`` (metres/radian)."""
    if at_lat is None:
        raise ValueError(
            f"CRS {crs.name!r} is geographic: pass at_lat= (degrees, e.g. the scene "
            "centre latitude) so metres can be converted into degrees"
        )
    at_lat = float(at_lat)
    if not math.isfinite(at_lat) or not -90 < at_lat < 90:
        raise ValueError(f"at_lat must be a latitude in (-90, 90) degrees, got {at_lat!r}")
    geod = _geod_for(crs)
    a, e2 = geod.a, geod.es
    phi = math.radians(at_lat)
    w2 = 1.0 - e2 * math.sin(phi) ** 2
    meridional = a * (1.0 - e2) / w2**1.5  # M, metres per radian of latitude
    prime_vertical = a / math.sqrt(w2)  # N
    return math.sqrt(meridional * prime_vertical * math.cos(phi))


# --- CRS helpers ------------------------------------------------------------------------


def _to_crs(crs: Any) -> pyproj.CRS:
    """``crs`` as a pyproj CRS; CRSError if it is missing or not understood."""
    if crs is None:
        raise CRSError(
            "no CRS given: pass the CRS the geometries are in (e.g. the scene's "
            "`dataset.crs` or an EPSG code)"
        )
    try:
        return pyproj.CRS.from_user_input(crs)
    except pyproj.exceptions.CRSError as exc:
        raise CRSError(
            f"cannot understand CRS {crs!r}: {exc}; pass an EPSG code, WKT or PROJ string"
        ) from exc


def _horizontal_crs(crs: pyproj.CRS) -> pyproj.CRS:
    """The horizontal part of ``crs`` (the first sub-CRS of a compound CRS)."""
    if crs.is_compound:
        for sub in crs.sub_crs_list:
            if sub.is_projected or sub.is_geographic:
                return sub
    if crs.is_bound and crs.source_crs is not None:
        return _horizontal_crs(crs.source_crs)
    return crs


def _axis_factors(crs: pyproj.CRS) -> tuple[float, float]:
    """Unit conversion factors of the x (east/lon) and y (north/lat) axes.

    Metres per unit for a projected CRS, radians per unit for a geographic one. The
    factors are matched to axes by direction, so CRSs declared in lat/lon or
    northing/easting order give the right factor for shapely's x and y.
    """
    axes = crs.axis_info
    if len(axes) < 2:
        raise CRSError(f"CRS {crs.name!r} has fewer than two axes; use a 2-D CRS")
    by_direction = {axis.direction.lower(): axis.unit_conversion_factor for axis in axes}
    factor_x = next(
        (by_direction[d] for d in ("east", "west") if d in by_direction),
        axes[0].unit_conversion_factor,
    )
    factor_y = next(
        (by_direction[d] for d in ("north", "south") if d in by_direction),
        axes[1].unit_conversion_factor,
    )
    if not factor_x or not factor_y:
        raise CRSError(f"CRS {crs.name!r} has an axis without a unit conversion factor")
    return float(factor_x), float(factor_y)


def _geod_for(crs: pyproj.CRS) -> pyproj.Geod:
    """Geodesic calculator on the CRS's ellipsoid, or on WGS84 if it has none."""
    try:
        geod = crs.get_geod()
    except pyproj.exceptions.CRSError:
        geod = None
    return geod if geod is not None else _WGS84
