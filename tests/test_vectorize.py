"""Tests for sam_geo.geo.vectorize: masks -> georeferenced polygons, areas in m^2."""

from __future__ import annotations

import math

import geopandas
import numpy as np
import pyproj
import pytest
import shapely
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from shapely.geometry import MultiPolygon, Polygon, box

from sam_geo.errors import CRSError
from sam_geo.geo.vectorize import geometry_area_m2, mask_to_geometry, metres_to_crs_units

# 0.5 CRS units per pixel, upper-left corner at (1000, 2000), north up.
NORTH_UP = Affine(0.5, 0, 1000, 0, -0.5, 2000)
PIXEL_AREA = 0.25  # CRS units^2 of one NORTH_UP pixel
ROTATED = NORTH_UP @ Affine.rotation(30)


def _mask(shape: tuple[int, int], *slices: tuple[slice, slice]) -> np.ndarray:
    """A (rows, cols) boolean mask with the given (row slice, col slice) blocks set."""
    mask = np.zeros(shape, dtype=bool)
    for block in slices:
        mask[block] = True
    return mask


def _pixel_box(transform: Affine, row0: int, row1: int, col0: int, col1: int) -> Polygon:
    """Polygon of the pixel block rows row0..row1-1, cols col0..col1-1 (corner coords)."""
    corners = [(col0, row0), (col1, row0), (col1, row1), (col0, row1)]
    return Polygon([transform @ corner for corner in corners])


def _same(a: shapely.Geometry, b: shapely.Geometry, tol: float = 1e-9) -> bool:
    """Same shape: normalized vertices equal within ``tol`` and no area difference."""
    return (
        a.normalize().equals_exact(b.normalize(), tolerance=tol)
        and a.symmetric_difference(b).area < tol
    )


# --- placement -------------------------------------------------------------------------


def test_square_lands_at_expected_coordinates_north_up() -> None:
    mask = _mask((8, 10), (slice(2, 5), slice(3, 7)))  # rows 2..4, cols 3..6

    geom = mask_to_geometry(mask, NORTH_UP)

    # x: 1000 + 0.5 * col, y: 2000 - 0.5 * row, at pixel corners
    assert _same(geom, box(1001.5, 1997.5, 1003.5, 1999.0))
    assert isinstance(geom, Polygon)
    assert geom.area == pytest.approx(12 * PIXEL_AREA)


def test_square_lands_at_rotated_corners() -> None:
    mask = _mask((8, 10), (slice(2, 5), slice(3, 7)))

    geom = mask_to_geometry(mask, ROTATED)

    assert geom.is_valid
    assert _same(geom, _pixel_box(ROTATED, 2, 5, 3, 7))
    assert geom.area == pytest.approx(12 * abs(ROTATED.determinant))


def test_geographic_transform_gives_lonlat_polygon_and_area() -> None:
    res = 1e-5  # degrees per pixel
    lon0, lat0 = 7.0, 45.0005
    transform = Affine(res, 0, lon0, 0, -res, lat0)
    mask = _mask((60, 60), (slice(10, 40), slice(5, 25)))  # 30 rows x 20 cols

    geom = mask_to_geometry(mask, transform)

    expected = box(lon0 + 5 * res, lat0 - 40 * res, lon0 + 25 * res, lat0 - 10 * res)
    assert _same(geom, expected, tol=1e-12)
    # independent estimate: pixel width and height in metres at the block's centre
    geod = pyproj.Geod(ellps="WGS84")
    lat_c = lat0 - 25 * res
    dx_m = geod.inv(lon0, lat_c, lon0 + res, lat_c)[2]
    dy_m = geod.inv(lon0, lat_c - res / 2, lon0, lat_c + res / 2)[2]
    expected_m2 = mask.sum() * dx_m * dy_m
    area = geometry_area_m2([geom], "EPSG:4326")
    assert area.shape == (1,)
    assert area[0] == pytest.approx(expected_m2, rel=0.01)


def test_flipped_transform_gives_valid_polygon() -> None:
    south_up = Affine(2.0, 0, 0, 0, 2.0, 0)  # rows go north
    mask = _mask((4, 4), (slice(1, 3), slice(1, 3)))

    geom = mask_to_geometry(mask, south_up)

    assert geom.is_valid
    assert _same(geom, box(2, 2, 6, 6))


# --- topology ---------------------------------------------------------------------------


def test_ring_keeps_its_hole() -> None:
    mask = _mask((7, 7), (slice(1, 6), slice(1, 6)))
    mask[3, 3] = False

    geom = mask_to_geometry(mask, NORTH_UP)

    assert isinstance(geom, Polygon)
    assert len(geom.interiors) == 1
    assert _same(Polygon(geom.interiors[0]), _pixel_box(NORTH_UP, 3, 4, 3, 4))
    assert geom.area == pytest.approx(24 * PIXEL_AREA)


def test_two_blobs_give_multipolygon() -> None:
    mask = _mask((10, 10), (slice(0, 3), slice(0, 3)), (slice(6, 9), slice(5, 10)))

    geom = mask_to_geometry(mask, NORTH_UP)

    assert isinstance(geom, MultiPolygon)
    assert len(geom.geoms) == 2
    assert geom.is_valid
    assert geom.area == pytest.approx((9 + 15) * PIXEL_AREA)


def test_speck_below_min_area_is_dropped() -> None:
    mask = _mask((10, 10), (slice(1, 5), slice(1, 5)))
    mask[8, 8] = True  # one pixel, 0.25 CRS units^2

    kept = mask_to_geometry(mask, NORTH_UP)
    cleaned = mask_to_geometry(mask, NORTH_UP, min_area=2 * PIXEL_AREA)

    assert isinstance(kept, MultiPolygon)
    assert isinstance(cleaned, Polygon)
    assert _same(cleaned, _pixel_box(NORTH_UP, 1, 5, 1, 5))


def test_only_specks_below_min_area_gives_none() -> None:
    mask = _mask((5, 5))
    mask[0, 0] = mask[4, 4] = True

    assert mask_to_geometry(mask, NORTH_UP, min_area=2 * PIXEL_AREA) is None


def test_small_holes_filled_large_holes_kept() -> None:
    mask = _mask((12, 12), (slice(0, 12), slice(0, 12)))
    mask[2, 2] = False  # 1-pixel hole
    mask[6:9, 6:9] = False  # 9-pixel hole

    geom = mask_to_geometry(mask, NORTH_UP, min_area=2 * PIXEL_AREA)

    assert isinstance(geom, Polygon)
    assert len(geom.interiors) == 1
    assert Polygon(geom.interiors[0]).area == pytest.approx(9 * PIXEL_AREA)
    assert geom.area == pytest.approx((144 - 9) * PIXEL_AREA)


@pytest.mark.parametrize(
    "rows",
    [
        ["10", "01"],  # two pixels touching at a corner
        ["1010", "0101", "1010", "0101"],  # checkerboard
        ["1110", "1010", "1101", "0011"],  # hole touching the shell at a corner
        ["01110", "10001", "10101", "10001", "01110"],  # diagonal ring around a pixel
    ],
)
@pytest.mark.parametrize("transform", [NORTH_UP, ROTATED], ids=["north_up", "rotated"])
def test_corner_touching_pixels_give_valid_output(rows: list[str], transform: Affine) -> None:
    mask = np.array([[c == "1" for c in row] for row in rows])

    geom = mask_to_geometry(mask, transform)

    assert geom is not None and geom.is_valid and not geom.is_empty
    assert geom.area == pytest.approx(mask.sum() * abs(transform.determinant))


def test_diagonal_pixels_are_separate_parts_with_4_connectivity() -> None:
    mask = np.array([[True, False], [False, True]])

    geom = mask_to_geometry(mask, NORTH_UP)

    assert isinstance(geom, MultiPolygon)
    assert len(geom.geoms) == 2


def test_all_false_mask_gives_none() -> None:
    assert mask_to_geometry(np.zeros((16, 16), dtype=bool), NORTH_UP) is None
    assert mask_to_geometry(np.zeros((0, 0), dtype=bool), NORTH_UP) is None


def test_simplify_reduces_vertices_and_stays_valid() -> None:
    rows, cols = np.mgrid[0:80, 0:80]
    mask = (rows - 40) ** 2 + (cols - 40) ** 2 < 30**2  # a pixelated disc

    raw = mask_to_geometry(mask, ROTATED)
    simple = mask_to_geometry(mask, ROTATED, simplify=1.0)

    assert simple.is_valid and isinstance(simple, Polygon)
    assert shapely.get_num_coordinates(simple) < shapely.get_num_coordinates(raw) / 3
    assert simple.area == pytest.approx(raw.area, rel=0.02)


def test_simplify_keeps_hole_and_parts_valid() -> None:
    mask = _mask((30, 30), (slice(2, 20), slice(2, 20)), (slice(22, 28), slice(22, 28)))
    mask[8:12, 8:12] = False

    geom = mask_to_geometry(mask, ROTATED, simplify=0.2)

    assert isinstance(geom, MultiPolygon) and geom.is_valid
    assert sum(len(part.interiors) for part in geom.geoms) == 1


def test_parts_overlapping_after_simplification_are_merged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sam_geo.geo.vectorize as vectorize

    rows = ["000100", "001001", "101111", "010001", "110101", "111100"]
    mask = np.array([[c == "1" for c in row] for row in rows])
    merges: list[int] = []
    real_merge = vectorize._merge_overlapping

    def spy(parts: list[Polygon]) -> list[Polygon]:
        merges.append(len(parts))
        return real_merge(parts)

    monkeypatch.setattr(vectorize, "_merge_overlapping", spy)

    geom = mask_to_geometry(mask, Affine.identity(), simplify=1.0)

    assert merges, "simplification should have made parts overlap"
    assert geom.is_valid and not geom.is_empty


@settings(max_examples=150, deadline=None)
@given(
    mask=arrays(np.bool_, st.tuples(st.integers(1, 9), st.integers(1, 9))),
    angle=st.floats(-180, 180),
    res=st.floats(0.01, 100),
    simplify=st.sampled_from([None, 0.0, 0.3, 1.5]),
    min_pixels=st.sampled_from([0, 1, 3]),
)
def test_output_always_valid_and_area_exact(
    mask: np.ndarray, angle: float, res: float, simplify: float | None, min_pixels: int
) -> None:
    transform = Affine(res, 0, 500.0, 0, -res, 800.0) @ Affine.rotation(angle)
    pixel_area = abs(transform.determinant)

    tolerance = None if simplify is None else simplify * res
    min_area = min_pixels * pixel_area * 0.999

    geom = mask_to_geometry(mask, transform, min_area=min_area, simplify=tolerance)

    if not mask.any():
        assert geom is None
        return
    if geom is None:
        assert min_pixels > 0
        return
    assert geom.is_valid and not geom.is_empty
    assert isinstance(geom, (Polygon, MultiPolygon))
    if not simplify and min_pixels == 0:
        assert geom.area == pytest.approx(mask.sum() * pixel_area, rel=1e-9)


# --- argument checks --------------------------------------------------------------------


def test_non_bool_mask_is_rejected() -> None:
    with pytest.raises(TypeError, match="boolean"):
        mask_to_geometry(np.ones((3, 3), dtype=np.uint8), NORTH_UP)


def test_non_2d_mask_is_rejected() -> None:
    with pytest.raises(ValueError, match="2-D"):
        mask_to_geometry(np.ones((1, 3, 3), dtype=bool), NORTH_UP)


def test_degenerate_transform_is_rejected() -> None:
    with pytest.raises(ValueError, match="degenerate"):
        mask_to_geometry(np.ones((3, 3), dtype=bool), Affine(1, 0, 0, 0, 0, 0))


@pytest.mark.parametrize("kwargs", [{"min_area": -1.0}, {"simplify": float("nan")}])
def test_bad_thresholds_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        mask_to_geometry(np.ones((3, 3), dtype=bool), NORTH_UP, **kwargs)


# --- geometry_area_m2 --------------------------------------------------------------------


def test_area_projected_metres_is_planar_area() -> None:
    geoms = [box(0, 0, 10, 20), box(0, 0, 10, 10).difference(box(2, 2, 4, 4)), None]

    areas = geometry_area_m2(geoms, "EPSG:32633")

    assert areas[:2] == pytest.approx([200.0, 96.0])
    assert math.isnan(areas[2])


def test_area_projected_feet_is_converted() -> None:
    us_foot = 1200 / 3937  # metres
    series = geopandas.GeoSeries([box(0, 0, 100, 100)], crs="EPSG:2263")  # NY ftUS

    assert geometry_area_m2(series, series.crs)[0] == pytest.approx(1e4 * us_foot**2)
    assert geometry_area_m2(series, None)[0] == pytest.approx(1e4 * us_foot**2)


def test_area_geographic_subtracts_holes_whatever_orientation() -> None:
    shell = box(10.0, 50.0, 10.01, 50.01)
    hole = box(10.002, 50.002, 10.004, 50.004)
    geod = pyproj.Geod(ellps="WGS84")
    expected = abs(geod.geometry_area_perimeter(shell)[0]) - abs(
        geod.geometry_area_perimeter(hole)[0]
    )
    same_orientation = Polygon(shell.exterior.coords, [hole.exterior.coords])  # both CCW
    reversed_rings = Polygon(shell.exterior.coords[::-1], [hole.exterior.coords[::-1]])
    multi = MultiPolygon([same_orientation, box(11.0, 50.0, 11.01, 50.01)])

    areas = geometry_area_m2([same_orientation, reversed_rings, multi], 4326)

    assert areas[0] == pytest.approx(expected, rel=1e-9)
    assert areas[1] == pytest.approx(expected, rel=1e-9)
    assert areas[2] == pytest.approx(
        expected + abs(geod.geometry_area_perimeter(box(11.0, 50.0, 11.01, 50.01))[0]),
        rel=1e-9,
    )


def test_area_geographic_matches_equal_area_projection() -> None:
    geom = box(-3.0, 40.0, -2.9, 40.05)
    laea = pyproj.CRS.from_proj4("+proj=laea +lat_0=40 +lon_0=-3 +datum=WGS84")
    projected = geopandas.GeoSeries([geom], crs=4326).to_crs(laea)

    assert geometry_area_m2([geom], 4326)[0] == pytest.approx(
        geometry_area_m2(projected, laea)[0], rel=1e-4
    )


def test_area_empty_and_missing() -> None:
    areas = geometry_area_m2([Polygon(), None], 4326)

    assert areas[0] == 0.0
    assert math.isnan(areas[1])


def test_area_without_crs_raises() -> None:
    with pytest.raises(CRSError, match="no CRS"):
        geometry_area_m2([box(0, 0, 1, 1)], None)


def test_area_in_geocentric_crs_raises() -> None:
    with pytest.raises(CRSError, match="neither projected nor geographic"):
        geometry_area_m2([box(0, 0, 1, 1)], "EPSG:4978")


def test_area_of_projected_coordinates_declared_geographic_raises() -> None:
    with pytest.raises(CRSError, match="not longitude/latitude"):
        geometry_area_m2([box(500000, 5000000, 500100, 5000100)], 4326)


# --- metres_to_crs_units ----------------------------------------------------------------


def test_metres_to_projected_units() -> None:
    assert metres_to_crs_units("EPSG:32633", 12.5) == pytest.approx(12.5)
    assert metres_to_crs_units("EPSG:2263", 1.0) == pytest.approx(3937 / 1200)


def test_metres_to_degrees_converts_areas_near_latitude() -> None:
    lat = 45.0
    geom = box(7.0, lat - 0.0005, 7.001, lat + 0.0005)
    area_m2 = geometry_area_m2([geom], 4326)[0]

    side_deg = metres_to_crs_units(4326, math.sqrt(area_m2), at_lat=lat)

    assert side_deg**2 == pytest.approx(geom.area, rel=1e-3)


def test_metres_to_degrees_is_between_meridian_and_parallel_scales() -> None:
    geod = pyproj.Geod(ellps="WGS84")
    metres_per_deg_lat = geod.inv(0, 59.5, 0, 60.5)[2]
    metres_per_deg_lon = geod.inv(0, 60, 1, 60)[2]

    deg = metres_to_crs_units(4326, 1000.0, at_lat=60.0)

    assert 1000 / metres_per_deg_lat < deg < 1000 / metres_per_deg_lon


def test_metres_to_degrees_needs_latitude() -> None:
    with pytest.raises(ValueError, match="at_lat"):
        metres_to_crs_units(4326, 10.0)
    with pytest.raises(ValueError, match="at_lat"):
        metres_to_crs_units(4326, 10.0, at_lat=90.0)


def test_metres_to_crs_units_rejects_negative_distance() -> None:
    with pytest.raises(ValueError, match="distance_m"):
        metres_to_crs_units(32633, -1.0)


@pytest.mark.parametrize(
    ("n", "edges", "groups"),
    [
        (0, [], []),
        (3, [], [[0], [1], [2]]),
        (5, [(3, 1), (4, 0), (1, 3)], [[0, 4], [1, 3], [2]]),
        (6, [(5, 4), (4, 2), (2, 0), (3, 3)], [[0, 2, 4, 5], [1], [3]]),
    ],
)
def test_connected_groups_are_sorted_components(n: int, edges: list[tuple[int, int]], groups: list[list[int]]) -> None:
    from sam_geo.geo import vectorize

    left = np.array([a for a, _ in edges], dtype=np.int64)
    right = np.array([b for _, b in edges], dtype=np.int64)
    assert vectorize._connected_groups(n, left, right) == groups


# --- outlines traced from low-resolution logits -----------------------------------------

from sam_geo.geo.vectorize import logits_to_geometries, logits_to_geometry  # noqa: E402

CELL = 4.0  # image pixels per logits cell (SAM: a 256 grid over a 1024 px tile)
CELL_TO_PIXEL = Affine.scale(CELL) * Affine.translation(0.5, 0.5)  # cell centres -> pixel corners


def _radial_logits(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """Logits ``radius - distance`` (cells) to ``centre`` (row, col): > 0 inside a disc."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    return radius - np.hypot(rows - centre[0], cols - centre[1])


def _upsampled_mask(logits: np.ndarray) -> np.ndarray:
    """The pixel mask SAM's bilinear upsampling gives for ``logits`` (pixel centres)."""
    import torch

    size = (int(logits.shape[0] * CELL), int(logits.shape[1] * CELL))
    up = torch.nn.functional.interpolate(torch.as_tensor(logits)[None, None], size=size, mode="bilinear", align_corners=False)
    return up[0, 0].numpy() > 0


def test_traced_disc_matches_its_analytic_outline_and_the_pixel_mask() -> None:
    logits = _radial_logits((16, 16), (7.5, 7.5), 5.0)
    geom = logits_to_geometry(logits, CELL_TO_PIXEL, NORTH_UP, (0, 0, 64, 64))
    assert isinstance(geom, Polygon) and geom.is_valid
    disc_px = math.pi * (5.0 * CELL) ** 2
    assert geom.area == pytest.approx(disc_px * PIXEL_AREA, rel=0.02)
    assert geom.centroid.x == pytest.approx(1000 + 32 * 0.5, abs=0.05)  # centre 32 px from the left
    pixel = mask_to_geometry(_upsampled_mask(logits), NORTH_UP)
    iou = geom.intersection(pixel).area / geom.union(pixel).area
    assert iou > 0.97  # the same mask, outline sub-pixel instead of along pixel edges


def test_traced_outline_has_no_staircase_vertices() -> None:
    logits = _radial_logits((32, 32), (15.5, 15.5), 12.0)
    traced = logits_to_geometry(logits, CELL_TO_PIXEL, NORTH_UP, (0, 0, 128, 128))
    pixel = mask_to_geometry(_upsampled_mask(logits), NORTH_UP)
    assert len(traced.exterior.coords) < len(pixel.exterior.coords) / 2


def test_a_ring_of_logits_gives_a_polygon_with_a_hole_and_two_blobs_two_parts() -> None:
    outer = _radial_logits((20, 20), (9.5, 9.5), 8.0)
    ring = np.minimum(outer, -_radial_logits((20, 20), (9.5, 9.5), 3.0))
    holed = logits_to_geometry(ring, CELL_TO_PIXEL, NORTH_UP, (0, 0, 80, 80))
    assert isinstance(holed, Polygon) and len(holed.interiors) == 1 and holed.is_valid
    hole_px = math.pi * (3.0 * CELL) ** 2
    assert Polygon(holed.interiors[0]).area == pytest.approx(hole_px * PIXEL_AREA, rel=0.05)
    two = np.maximum(_radial_logits((12, 24), (5.5, 5.5), 3.0), _radial_logits((12, 24), (5.5, 17.5), 3.0))
    parts = logits_to_geometry(two, CELL_TO_PIXEL, NORTH_UP, (0, 0, 96, 48))
    assert isinstance(parts, MultiPolygon) and len(parts.geoms) == 2


def test_traced_outline_is_clipped_to_its_rectangle_and_crop_edges_run_on() -> None:
    logits = _radial_logits((16, 16), (7.5, 7.5), 6.0)
    clip = (8, 12, 40, 30)  # col0, row0, col1, row1 in pixels
    geom = logits_to_geometry(logits, CELL_TO_PIXEL, NORTH_UP, clip)
    xmin, ymin, xmax, ymax = geom.bounds
    assert xmin >= 1000 + 8 * 0.5 - 1e-9 and xmax <= 1000 + 40 * 0.5 + 1e-9
    assert ymax <= 2000 - 12 * 0.5 + 1e-9 and ymin >= 2000 - 30 * 0.5 - 1e-9
    # a mask covering the whole crop continues past it: clipped, it is the clip rectangle
    full = logits_to_geometry(np.ones((4, 4), np.float32), CELL_TO_PIXEL, NORTH_UP, (0, 0, 16, 16))
    assert full.equals(box(1000, 2000 - 8, 1008, 2000))


def test_batched_tracing_equals_one_mask_at_a_time_and_empty_masks_are_none() -> None:
    crops = [_radial_logits((10, 10), (4.5, 4.5), r) for r in (2.0, 3.5, -1.0)]
    offsets = [(0, 0), (3, 5), (1, 1)]
    cell_to_pixel = [Affine.translation(c * CELL, r * CELL) * CELL_TO_PIXEL for r, c in offsets]
    clips = np.array([(0, 0, 64, 64)] * 3, dtype=float)
    batch = logits_to_geometries(crops, np.array([t[:6] for t in cell_to_pixel]), NORTH_UP, clips, min_area=1.0)
    singles = [logits_to_geometry(c, t, NORTH_UP, tuple(b), min_area=1.0) for c, t, b in zip(crops, cell_to_pixel, clips)]
    assert batch[2] is None and singles[2] is None
    for got, want in zip(batch[:2], singles[:2]):
        assert got.equals_exact(want, 1e-9)
    assert batch[1].centroid.x > batch[0].centroid.x  # each mask placed by its own affine


def test_nodata_pixels_are_taken_out_of_a_traced_outline_along_pixel_edges() -> None:
    from sam_geo.geo.vectorize import nodata_polygon

    logits = _radial_logits((16, 16), (7.5, 7.5), 6.0)
    valid = np.ones((64, 64), dtype=bool)
    valid[:, 40:] = False  # a nodata strip from column 40 on
    assert nodata_polygon(valid, (0, 0, 64, 32)) is None
    nodata = nodata_polygon(valid, (0, 0, 64, 64))
    assert nodata.equals(box(40, 0, 64, 64))
    whole, cut = logits_to_geometries(
        [logits, logits], np.array([CELL_TO_PIXEL[:6]] * 2), NORTH_UP, np.array([(0, 0, 64, 64)] * 2, dtype=float),
        exclude=[None, nodata],
    )
    assert cut.bounds[2] == pytest.approx(1000 + 40 * 0.5)  # ends at the nodata edge, a pixel edge
    assert cut.area == pytest.approx(whole.difference(box(1020, 1960, 1032, 2000)).area)
    assert not cut.intersects(box(1020.001, 1960, 1032, 2000))
