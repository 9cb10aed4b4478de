"""Prompt layers: reading, reprojection, cleaning, pixel conversion and tile assignment."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from shapely.geometry import GeometryCollection, LineString, MultiPolygon, Point, Polygon, box

from sam_geo.errors import CRSError, PromptError
from sam_geo.io.prompts import build_prompts, plan_prompt_tiles, prompt_extent, read_prompt_layer
from sam_geo.geo.tiles import TileGrid

# A 2000 x 3000 px scene (rows x cols) at 0.5 m in UTM 45N.
SCENE_CRS = "EPSG:32645"
SCENE_TRANSFORM = Affine(0.5, 0.0, 350_000.0, 0.0, -0.5, 3_050_000.0)
SCENE_SHAPE = (2000, 3000)


def scene_xy(col: float, row: float) -> tuple[float, float]:
    return SCENE_TRANSFORM @ (col, row)


def pixel_box(c0: float, r0: float, c1: float, r1: float) -> Polygon:
    (x0, y0), (x1, y1) = scene_xy(c0, r0), scene_xy(c1, r1)
    return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def frame(geoms: list, crs: str = SCENE_CRS, **columns) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(columns, geometry=geoms, crs=crs)


def test_boxes_and_points_land_on_the_right_pixels() -> None:
    layer = frame(
        [pixel_box(100, 200, 140, 260), Point(scene_xy(500.5, 700.5))],
        osm_id=[11, 12],
    )
    prompts = build_prompts(layer, SCENE_CRS, SCENE_TRANSFORM, SCENE_SHAPE)
    batch = prompts.batch
    np.testing.assert_allclose(batch.boxes[0], [100, 200, 140, 260])
    assert batch.labels[0, 0] == -1  # boxes alone by default
    assert np.isnan(batch.boxes[1]).all()
    np.testing.assert_allclose(batch.points[1, 0], [500.5, 700.5])
    assert batch.labels[1, 0] == 1
    assert list(prompts.frame["osm_id"]) == [11, 12]


def test_prompts_in_another_crs_are_reprojected_explicitly() -> None:
    utm = frame([pixel_box(100, 200, 140, 260)])
    in_4326 = utm.to_crs("EPSG:4326")
    prompts = build_prompts(in_4326, SCENE_CRS, SCENE_TRANSFORM, SCENE_SHAPE)
    # the lon/lat box of a UTM box is slightly larger (curved edges), within a pixel
    np.testing.assert_allclose(prompts.batch.boxes[0], [100, 200, 140, 260], atol=1.0)
    assert prompts.frame.crs == SCENE_CRS


def test_rotated_scene_boxes_are_taken_in_pixel_space() -> None:
    rotated = SCENE_TRANSFORM @ Affine.rotation(30)
    corners = [rotated @ (c, r) for c, r in [(100, 100), (200, 100), (200, 150), (100, 150)]]
    prompts = build_prompts(frame([Polygon(corners)]), SCENE_CRS, rotated, SCENE_SHAPE)
    np.testing.assert_allclose(prompts.batch.boxes[0], [100, 100, 200, 150], atol=1e-6)


def test_box_plus_point_uses_a_point_inside_the_polygon() -> None:
    l_shape = Polygon([scene_xy(*p) for p in [(0, 0), (100, 0), (100, 20), (20, 20), (20, 100), (0, 100)]])
    l_shape = shapely.affinity.translate(l_shape, 50, -50)
    prompts = build_prompts(frame([l_shape]), SCENE_CRS, SCENE_TRANSFORM, SCENE_SHAPE, prompt_as="box+point")
    x, y = prompts.batch.points[0, 0]
    assert prompts.batch.labels[0, 0] == 1
    assert Polygon([(~SCENE_TRANSFORM) @ xy for xy in l_shape.exterior.coords]).contains(Point(x, y))
    assert not np.isnan(prompts.batch.boxes[0]).any()


def test_outside_and_invalid_prompts_are_reported_not_dropped() -> None:
    bow_tie = Polygon([scene_xy(*p) for p in [(10, 10), (60, 60), (60, 10), (10, 60)]])
    zero_area = Polygon([scene_xy(*p) for p in [(10, 10), (20, 10), (30, 10)]])
    collection = GeometryCollection([pixel_box(300, 300, 320, 330), LineString([(0, 0), (1, 1)])])
    geoms = [
        pixel_box(100, 100, 120, 120),  # 0 fine
        pixel_box(5000, 5000, 5100, 5100),  # 1 outside
        bow_tie,  # 2 repaired by make_valid
        zero_area,  # 3 invalid: no area
        Polygon(),  # 4 empty
        LineString([scene_xy(0, 0), scene_xy(10, 10)]),  # 5 a line: not a prompt
        collection,  # 6 polygonal part kept
        MultiPolygon([pixel_box(10, 10, 20, 20), pixel_box(40, 40, 50, 50)]),  # 7 one prompt
        None,  # 8 missing geometry
    ]
    prompts = build_prompts(frame(geoms), SCENE_CRS, SCENE_TRANSFORM, SCENE_SHAPE)
    assert prompts.outside == (1,)
    assert prompts.invalid == (3, 4, 5, 8)
    assert list(prompts.batch.index) == [0, 2, 6, 7]
    np.testing.assert_allclose(prompts.batch.boxes[3], [10, 10, 50, 50])


def test_three_d_coordinates_are_flattened() -> None:
    poly_z = Polygon([(*scene_xy(c, r), 1300.0) for c, r in [(10, 10), (30, 10), (30, 40), (10, 40)]])
    prompts = build_prompts(frame([poly_z]), SCENE_CRS, SCENE_TRANSFORM, SCENE_SHAPE)
    np.testing.assert_allclose(prompts.batch.boxes[0], [10, 10, 30, 40])


def test_boxes_partly_outside_are_clipped_to_the_scene() -> None:
    prompts = build_prompts(frame([pixel_box(-50, -20, 30, 40)]), SCENE_CRS, SCENE_TRANSFORM, SCENE_SHAPE)
    np.testing.assert_allclose(prompts.batch.boxes[0], [0, 0, 30, 40])


def test_reading_files_in_every_format_keeps_attributes(tmp_path) -> None:
    layer = frame([pixel_box(100, 200, 140, 260)], crs=SCENE_CRS, name=["Bâtiment é"], 名前=["家"])
    for suffix in (".geojson", ".gpkg", ".shp", ".parquet"):
        path = tmp_path / f"prompts{suffix}"
        if suffix == ".parquet":
            layer.to_parquet(path)
        else:
            layer.to_file(path, engine="pyogrio")
        read = read_prompt_layer(path)
        assert read.crs == SCENE_CRS
        assert read["name"].iloc[0] == "Bâtiment é"
        if suffix != ".shp":  # shapefile DBF field names are limited
            assert read["名前"].iloc[0] == "家"


def test_bad_layers_raise_clear_errors(tmp_path) -> None:
    with pytest.raises(PromptError, match="does not exist"):
        read_prompt_layer(tmp_path / "missing.gpkg")
    junk = tmp_path / "junk.geojson"
    junk.write_text("this is not json")
    with pytest.raises(PromptError, match="cannot read"):
        read_prompt_layer(junk)
    empty = frame([], crs=SCENE_CRS)
    with pytest.raises(PromptError, match="no features"):
        read_prompt_layer(empty)
    no_crs = gpd.GeoDataFrame(geometry=[Point(1, 2)])
    with pytest.raises(CRSError, match="--prompts-crs"):
        read_prompt_layer(no_crs)
    assert read_prompt_layer(no_crs, assume_crs=SCENE_CRS).crs == SCENE_CRS


def test_every_prompt_is_planned_in_a_tile_holding_its_whole_extent() -> None:
    rng = np.random.default_rng(0)
    grid = TileGrid(*SCENE_SHAPE, SCENE_TRANSFORM, 512, 64)
    geoms = []
    for _ in range(300):
        c, r = rng.uniform(0, 3000), rng.uniform(0, 2000)
        w, h = rng.uniform(2, 200), rng.uniform(2, 200)
        geoms.append(pixel_box(c, r, c + w, r + h))
    geoms.append(pixel_box(100, 100, 1500, 1200))  # larger than a tile
    geoms += [Point(scene_xy(rng.uniform(0, 3000), rng.uniform(0, 2000))) for _ in range(50)]
    prompts = build_prompts(frame(geoms), SCENE_CRS, SCENE_TRANSFORM, SCENE_SHAPE)
    plan = plan_prompt_tiles(grid, prompts.batch)
    assert plan.n_prompts == len(prompts.batch)
    seen = np.concatenate([b.index for _, b in plan.tiles])
    assert sorted(seen) == sorted(prompts.batch.index)
    scene = shapely.box(0, 0, 3000, 2000)
    for tile, batch in plan.tiles:
        for row in range(len(batch)):
            extent = prompt_extent(batch, row)
            clipped = shapely.box(extent.col_start, extent.row_start, extent.col_stop, extent.row_stop) & scene
            r = tile.read
            assert shapely.box(r.col_start, r.row_start, r.col_stop, r.row_stop).contains(clipped)
    big = [t for t, b in plan.tiles if t.scale > 1]
    assert len(big) == 1 and big[0].shape == (512, 512)


def test_mask_mode_keeps_the_polygon_in_pixels_and_its_box() -> None:
    poly = pixel_box(100, 200, 140, 260)
    prompts = build_prompts(frame([poly]), SCENE_CRS, SCENE_TRANSFORM, SCENE_SHAPE, prompt_as="mask")
    batch = prompts.batch
    assert batch.has_mask.all() and batch.has_box.all()
    pixel_poly = shapely.from_wkb(batch.masks[0])
    np.testing.assert_allclose(pixel_poly.bounds, [100, 200, 140, 260])
    assert np.isnan(batch.areas[0])  # a rectangle is a drawn box: its area says nothing


def test_outline_areas_only_for_polygons_that_are_not_their_own_box() -> None:
    """An L-shaped outline keeps its area (it chooses among SAM's candidates); a
    rectangle, a box rotated by a hair and a point get none."""
    ell = shapely.union(pixel_box(100, 100, 160, 120), pixel_box(100, 100, 120, 160))
    rect = pixel_box(300, 300, 340, 360)
    layer = frame([ell, rect, Point(scene_xy(500, 500))])
    batch = build_prompts(layer, SCENE_CRS, SCENE_TRANSFORM, SCENE_SHAPE).batch
    by_index = dict(zip(batch.index.tolist(), batch.areas.tolist()))
    assert by_index[0] == pytest.approx(60 * 20 + 20 * 40)
    assert np.isnan(by_index[1]) and np.isnan(by_index[2])


def test_negative_points_join_only_nearby_prompts() -> None:
    from sam_geo.io.prompts import MAX_NEGATIVE_POINTS, add_negative_points

    layer = frame([pixel_box(100, 100, 200, 200), pixel_box(1000, 1000, 1100, 1100), Point(scene_xy(500, 500))])
    batch = build_prompts(layer, SCENE_CRS, SCENE_TRANSFORM, SCENE_SHAPE).batch
    negatives = np.array([[210.0, 150.0], [150.0, 90.0], [700.0, 700.0], [505.0, 505.0]] + [[110.0 + i, 110.0] for i in range(10)])
    out = add_negative_points(batch, negatives)
    first = out.points[0][out.labels[0] == 0]
    assert len(first) == MAX_NEGATIVE_POINTS  # the nearest 8 of 12 candidates
    assert (out.labels[1] == 0).sum() == 0  # nothing near the second box
    point_prompt = out.labels[2]
    assert (point_prompt == 1).sum() == 1 and (point_prompt == 0).sum() == 1
    np.testing.assert_allclose(out.points[2][point_prompt == 0][0], [505, 505])


# --- several points per object (group and label columns) -----------------------------


def grouped_layer(crs: str = SCENE_CRS) -> gpd.GeoDataFrame:
    """Object "a": a polygon, a positive and a negative point; object "b": two positive
    points (one row a MultiPoint) and a negative one; rows interleaved."""
    layer = frame(
        [
            Point(scene_xy(110, 210)), pixel_box(100, 200, 140, 260), Point(scene_xy(600, 700)),
            Point(scene_xy(150, 230)), shapely.MultiPoint([scene_xy(610, 705), scene_xy(620, 710)]),
            Point(scene_xy(640, 700)),
        ],
        obj=["a", "a", "b", "a", "b", "b"],
        label=[1, 1, 1, 0, 1, 0],
        name=["a-pt", "a-roof", "b-first", "a-neg", "b-more", "b-neg"],
    )
    return layer.to_crs(crs)


@pytest.mark.parametrize("layer_crs", [SCENE_CRS, "EPSG:4326"])
def test_grouped_rows_become_one_prompt_with_all_their_points(layer_crs: str) -> None:
    from sam_geo.io.prompts import add_group_points, group_prompt_rows

    grouped, points = group_prompt_rows(grouped_layer(layer_crs), "obj", "label")
    assert list(grouped["name"]) == ["a-roof", "b-first"]  # the polygon row, else the first positive point
    assert list(grouped.index) == [0, 1] and grouped.index.name == "prompt_index"
    prompts = build_prompts(grouped, SCENE_CRS, SCENE_TRANSFORM, SCENE_SHAPE)
    batch = add_group_points(prompts.batch, points, SCENE_CRS, SCENE_TRANSFORM)
    np.testing.assert_allclose(batch.boxes[0], [100, 200, 140, 260], atol=1e-3)
    a = batch.labels[0] >= 0
    np.testing.assert_allclose(batch.points[0][a], [[110, 210], [150, 230]], atol=1e-3)
    assert batch.labels[0][a].tolist() == [1, 0]
    assert np.isnan(batch.boxes[1]).all()
    b = batch.labels[1] >= 0
    np.testing.assert_allclose(batch.points[1][b], [[600, 700], [610, 705], [620, 710], [640, 700]], atol=1e-3)
    assert batch.labels[1][b].tolist() == [1, 1, 1, 0]
    extent = prompt_extent(batch, 1)  # the negative point lies in the decode window too
    assert extent.col_stop >= 640 and extent.col_start <= 600


def test_grouped_rows_without_labels_are_all_positive() -> None:
    from sam_geo.io.prompts import group_prompt_rows

    _, points = group_prompt_rows(grouped_layer(), "obj")
    assert all((lab == 1).all() for _, lab in points.points.values())


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"obj": ["a", "a", "b", "a", None, "b"]}, "no value in the group column"),
        ({"label": [1, 1, 1, 0, 2, 0]}, "must hold 1 \\(positive\\) or 0"),
        ({"label": [1, 1, 0, 0, 0, 0]}, "neither a polygon nor a positive point"),
        ({"geometry": "two polygons"}, "has 2 polygons"),
    ],
)
def test_grouped_layer_mistakes_are_named(change: dict, needle: str) -> None:
    from sam_geo.io.prompts import group_prompt_rows

    layer = grouped_layer()
    if change.get("geometry"):
        layer.loc[0, "geometry"] = pixel_box(0, 0, 10, 10)
    else:
        for column, values in change.items():
            layer[column] = values
    with pytest.raises(PromptError, match=needle):
        group_prompt_rows(layer, "obj", "label")
    with pytest.raises(PromptError, match="column 'objekt' is not in the prompt layer"):
        group_prompt_rows(layer, "objekt")
