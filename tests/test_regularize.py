"""Tests of sam_geo.geo.regularize: mask-like buildings become clean, valid outlines."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from rasterio.features import rasterize
from shapely import affinity
from shapely.geometry import Point, Polygon, box

from sam_geo.errors import ConfigError, CRSError
from sam_geo.geo.regularize import regularize_buildings
from sam_geo.geo.vectorize import mask_to_geometry

UTM = "EPSG:32645"
PIXEL_M = 0.3

#: A 20 m x 10 m building rotated by 30 degrees, in UTM 45N (near Banepa, Nepal).
CLEAN = affinity.translate(affinity.rotate(box(0, 0, 20, 10), 30, origin="centroid"), 350_000, 3_050_000)


def mask_like(seed: int, noise_m: float = 0.1) -> Polygon:
    """CLEAN with wobbly edges, rasterized at 0.3 m and traced back: a SAM-like mask outline."""
    rng = np.random.default_rng(seed)
    coords = shapely.get_coordinates(shapely.segmentize(CLEAN, 0.5))
    coords[:-1] += rng.normal(0.0, noise_m, coords[:-1].shape)
    coords[-1] = coords[0]
    centre = CLEAN.centroid
    transform = Affine(PIXEL_M, 0, centre.x - 15, 0, -PIXEL_M, centre.y + 15)
    mask = rasterize([Polygon(coords)], out_shape=(100, 100), transform=transform).astype(bool)
    return mask_to_geometry(mask, transform)


def iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return a.intersection(b).area / a.union(b).area


def corner_angles(polygon: Polygon) -> np.ndarray:
    """Interior turning angles (degrees) at each vertex of the exterior ring."""
    xy = np.asarray(polygon.exterior.coords)[:-1]
    incoming, outgoing = xy - np.roll(xy, 1, axis=0), np.roll(xy, -1, axis=0) - xy
    cos = (incoming * outgoing).sum(1) / np.linalg.norm(incoming, axis=1) / np.linalg.norm(outgoing, axis=1)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def n_vertices(polygon: Polygon) -> int:
    return len(polygon.exterior.coords) - 1


@pytest.fixture(scope="module")
def masks() -> gpd.GeoDataFrame:
    geoms = [mask_like(seed) for seed in range(12)]
    return gpd.GeoDataFrame({"name": [f"b{i}" for i in range(12)]}, geometry=geoms, crs=UTM, index=range(100, 112))


def test_inputs_are_staircases(masks: gpd.GeoDataFrame) -> None:
    assert all(n_vertices(g) > 100 for g in masks.geometry)
    assert all(iou(g, CLEAN) > 0.95 for g in masks.geometry)


def test_noisy_rotated_rectangles_become_near_rectangles(masks: gpd.GeoDataFrame) -> None:
    out = regularize_buildings(masks)
    assert out.attrs["regularize"]["regularized"] == len(masks)
    for geom in out.geometry:
        assert geom.geom_type == "Polygon" and geom.is_valid
        assert 4 <= n_vertices(geom) <= 6
        assert iou(geom, CLEAN) >= 0.9
        # every corner is a right angle or a 45-degree cut, aligned with the building
        angles = corner_angles(geom)
        assert np.all(np.abs(angles / 45 - np.round(angles / 45)) * 45 < 1.0)
    assert sum(n_vertices(g) == 4 for g in out.geometry) >= 6


def test_attributes_index_and_order_are_kept(masks: gpd.GeoDataFrame) -> None:
    out = regularize_buildings(masks)
    assert list(out.index) == list(masks.index)
    assert list(out["name"]) == list(masks["name"])
    assert out.crs == masks.crs
    assert masks.geometry.iloc[0].equals(mask_like(0))  # the input is not modified


def test_geographic_crs_is_regularized_in_metres(masks: gpd.GeoDataFrame) -> None:
    lonlat = masks.to_crs(4326)
    out = regularize_buildings(lonlat)
    assert out.crs.to_epsg() == 4326
    back = out.to_crs(UTM)
    for geom in back.geometry:
        assert geom.is_valid and 4 <= n_vertices(geom) <= 6
        assert iou(geom, CLEAN) >= 0.9
        angles = corner_angles(geom)  # right angles on the ground, not in degrees
        assert np.all(np.abs(angles / 45 - np.round(angles / 45)) * 45 < 1.0)


def test_invalid_empty_and_degenerate_inputs() -> None:
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    geoms = [
        affinity.translate(bowtie, 350_000, 3_050_000),  # invalid: repaired, then regularized
        None,  # dropped
        Polygon(),  # dropped
        Point(350_000, 3_050_000),  # no area: dropped
        affinity.translate(box(0, 0, 10, 0.1), 350_000, 3_050_000),  # sliver: collapses, kept as is
        CLEAN.difference(CLEAN.centroid.buffer(2)),  # a hole is fine
    ]
    gdf = gpd.GeoDataFrame({"id": range(6)}, geometry=geoms, crs=UTM)
    out = regularize_buildings(gdf)
    stats = out.attrs["regularize"]
    assert list(out["id"]) == [0, 4, 5]
    assert stats["dropped"] == 3 and stats["dropped_index"] == [1, 2, 3]
    assert stats["input"] == 6 and stats["regularized"] + stats["fallback"] == 3
    assert 4 in stats["fallback_index"]
    assert out.geometry.iloc[1].equals(geoms[4])
    assert all(g.is_valid and not g.is_empty and g.area > 0 for g in out.geometry)
    assert len(out.geometry.iloc[2].interiors) == 1


def test_fallback_keeps_the_input_when_the_change_is_too_large(masks: gpd.GeoDataFrame) -> None:
    out = regularize_buildings(masks, min_iou=1.0)  # no regularized outline is that close
    assert out.attrs["regularize"]["fallback"] == len(masks)
    assert all(a.equals(b) for a, b in zip(out.geometry, masks.geometry))


def test_multipolygon_rows_stay_one_row() -> None:
    parts = shapely.MultiPolygon([mask_like(0), affinity.translate(mask_like(1), 40, 0)])
    out = regularize_buildings(gpd.GeoDataFrame(geometry=[parts], crs=UTM))
    assert len(out) == 1
    geom = out.geometry.iloc[0]
    assert geom.geom_type == "MultiPolygon" and len(geom.geoms) == 2 and geom.is_valid
    assert all(n_vertices(p) <= 6 for p in geom.geoms)


def test_empty_frame_and_bad_arguments(masks: gpd.GeoDataFrame) -> None:
    empty = regularize_buildings(masks.iloc[:0])
    assert len(empty) == 0 and empty.attrs["regularize"]["input"] == 0
    with pytest.raises(CRSError, match="no CRS"):
        regularize_buildings(gpd.GeoDataFrame(geometry=[CLEAN]))
    with pytest.raises(ConfigError, match="tolerance_m"):
        regularize_buildings(masks, tolerance_m=0)
    with pytest.raises(ConfigError, match="min_iou"):
        regularize_buildings(masks, min_iou=2)
    with pytest.raises(TypeError, match="GeoDataFrame"):
        regularize_buildings([CLEAN])
