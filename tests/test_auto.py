"""Automatic segmentation: stitching across tiles (pure vectors), then end to end with MobileSAM.

The stitching tests cut synthetic polygons ("what a perfect SAM would return") by the
read windows of real :class:`~sam_geo.geo.tiles.TileGrid` tiles, so they check the rule of
:mod:`sam_geo.geo.stitch` without a model. The end-to-end tests segment a small synthetic
scene (flat-coloured shapes on noise, placed across tile edges and corners, one longer
than a tile) with the real MobileSAM weights, at three tile sizes / overlaps.
"""

from __future__ import annotations

import json
from pathlib import Path

from types import SimpleNamespace

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from rasterio.features import rasterize

from conftest import make_raster
from sam_geo import segment_auto
from sam_geo.cli import EXIT_BAD_INPUT, EXIT_OK, main
from sam_geo.errors import ConfigError, OutputExistsError
from sam_geo.modes.automatic import (
    AutoMode,
    _Candidate,
    _Coverage,
    _Frame,
    _point_batches,
    coarse_to_fine_order,
    grid_points,
    object_ids,
    stitched_frame,
)
from sam_geo.io.scenes import open_scene
from sam_geo.run.summary import RunSummary
from sam_geo.settings import make_settings
from sam_geo.geo.stitch import BOTTOM, LEFT, RIGHT, TOP, Piece, interior_sides, piece_from_geometry, stitch
from sam_geo.geo.tiles import TileGrid

NORTH_UP = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 3_000_000.0)
ROTATED = Affine.translation(500_000.0, 3_000_000.0) * Affine.rotation(25.0) * Affine.scale(0.5, -0.5)
SCENE = (600, 600)  # rows, cols of the synthetic stitching scene


# --- synthetic pieces ------------------------------------------------------------------


def to_crs(geom: shapely.Geometry, transform: Affine) -> shapely.Geometry:
    """A geometry in pixel coordinates (x = col, y = row) -> CRS of ``transform``."""
    t = transform
    return shapely.transform(geom, lambda xy: np.c_[t.a * xy[:, 0] + t.b * xy[:, 1] + t.c,
                                                    t.d * xy[:, 0] + t.e * xy[:, 1] + t.f])


def stitch_shapes() -> list[shapely.Geometry]:
    """Disjoint shapes in pixels: rectangles, a disc, an L, a ring, a band longer than any tile."""
    return [
        shapely.box(100, 100, 180, 150),
        shapely.Point(250, 250).buffer(40),
        shapely.Polygon([(400, 40), (520, 40), (520, 200), (470, 200), (470, 90), (400, 90)]),
        shapely.box(20, 330, 580, 420),  # longer than every tile used here
        shapely.box(330, 460, 560, 580).difference(shapely.box(380, 490, 500, 540)),  # a ring crossing tiles
        shapely.box(30, 470, 90, 530),
    ]


def tile_pieces(
    grid: TileGrid,
    shapes: list[shapely.Geometry],
    *,
    jitter: float = 0.0,
    seed: int = 0,
    extra: dict[str, list[shapely.Geometry]] | None = None,
    skip: set[tuple[str, int]] | None = None,
) -> list[tuple]:
    """What each tile of ``grid`` would return: each shape cut by the tile's read window.

    ``jitter`` (pixels): each tile's version is grown or shrunk by a random amount up to
    this, as SAM's boundaries differ slightly from tile to tile. ``extra``: more pixel
    polygons per tile key (clipped the same way); ``skip``: (tile key, shape index)
    pairs the tile "misses".
    """
    rng = np.random.default_rng(seed)
    out = []
    for tile in grid:
        window = shapely.box(tile.read.col_start, tile.read.row_start, tile.read.col_stop, tile.read.row_stop)
        own = [s for i, s in enumerate(shapes) if (tile.key, i) not in (skip or set())]
        pieces = []
        for shape in own + (extra or {}).get(tile.key, []):
            if jitter:
                shape = shape.buffer(rng.uniform(-jitter, jitter), join_style="mitre")
            clipped = shape.intersection(window)
            if clipped.area > 0:
                geom = to_crs(clipped, grid.transform)
                pieces.append(piece_from_geometry(geom, tile, (grid.height, grid.width), score=0.95))
        out.append((tile, pieces))
    return out


def iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return shapely.area(shapely.intersection(a, b)) / shapely.area(shapely.union(a, b))


def assert_one_object_per_shape(geoms: np.ndarray, truth: list[shapely.Geometry], min_iou: float) -> None:
    """Every truth shape has exactly one object mostly inside it, a single polygon with IoU >= min_iou."""
    for k, shape in enumerate(truth):
        inside = [g for g in geoms if shapely.area(shapely.intersection(g, shape)) > 0.5 * shapely.area(g)]
        assert len(inside) == 1, f"shape {k}: {len(inside)} objects, expected 1"
        assert inside[0].geom_type == "Polygon", f"shape {k}: {inside[0].geom_type}"
        assert iou(inside[0], shape) >= min_iou, f"shape {k}: IoU {iou(inside[0], shape):.3f}"


GRIDS = [(256, 48), (200, 32), (320, 64), (128, 16), (512, 100)]


# --- stitching -------------------------------------------------------------------------


@pytest.mark.parametrize(("tile_size", "overlap"), GRIDS)
@pytest.mark.parametrize("transform", [NORTH_UP, ROTATED], ids=["north-up", "rotated"])
def test_pieces_cut_by_tiles_become_one_polygon_each(tile_size: int, overlap: int, transform: Affine) -> None:
    grid = TileGrid(*SCENE, transform, tile_size, overlap)
    truth = [to_crs(s, transform) for s in stitch_shapes()]
    objects = stitch(tile_pieces(grid, stitch_shapes()))
    assert len(objects) == len(truth)
    assert_one_object_per_shape(objects.geometry, truth, min_iou=0.999)
    ring = next(g for g in objects.geometry if iou(g, truth[4]) > 0.99)
    assert len(ring.interiors) == 1  # the hole survives being cut by tiles
    band = next(k for k, g in enumerate(objects.geometry) if iou(g, truth[3]) > 0.99)
    assert objects.n_tiles[band] >= 3  # assembled from pieces of several tiles


def test_disagreeing_tiles_still_give_one_object_per_shape() -> None:
    """Each tile's boundary differs by up to 1.5 px: duplicates and pieces are still merged."""
    for tile_size, overlap in GRIDS[:3]:
        grid = TileGrid(*SCENE, NORTH_UP, tile_size, overlap)
        truth = [to_crs(s, NORTH_UP) for s in stitch_shapes()]
        objects = stitch(tile_pieces(grid, stitch_shapes(), jitter=1.5, seed=tile_size))
        assert len(objects) == len(truth)
        assert_one_object_per_shape(objects.geometry, truth, min_iou=0.9)  # a 1.5 px error alone costs 0.07


def test_result_does_not_depend_on_the_tile_grid() -> None:
    runs = []
    for tile_size, overlap in GRIDS:
        grid = TileGrid(*SCENE, NORTH_UP, tile_size, overlap)
        runs.append(stitch(tile_pieces(grid, stitch_shapes(), jitter=0.5, seed=overlap)))
    reference = runs[0]
    for other in runs[1:]:
        assert len(other) == len(reference)
        for geom in reference.geometry:  # two 0.5 px errors on a 60 px square alone cost 0.065
            assert max(iou(geom, g) for g in other.geometry) >= 0.93


def test_part_and_whole_stay_two_objects() -> None:
    """SAM returns a part (half a roof) and the whole; matching must not chain them."""
    whole = shapely.box(230, 100, 330, 160)  # across the tile edges of a 256/48 grid
    half = shapely.box(230, 100, 280, 160)
    grid = TileGrid(*SCENE, NORTH_UP, 256, 48)
    objects = stitch(tile_pieces(grid, [whole, half]))
    assert len(objects) == 2
    assert sorted(round(iou(g, to_crs(s, NORTH_UP)), 3) for g in objects.geometry for s in (whole, half)
                  if iou(g, to_crs(s, NORTH_UP)) > 0.9) == [1.0, 1.0]


def test_a_tile_that_misses_its_part_of_a_large_object() -> None:
    """The band's owner tile in the middle finds nothing: its neighbours' pieces still
    cover it and the band comes out whole, as one polygon."""
    grid = TileGrid(*SCENE, NORTH_UP, 256, 48)
    band = stitch_shapes()[3]
    middle = grid.tile(*grid.index_of(375, 300)).key
    objects = stitch(tile_pieces(grid, [band], skip={(middle, 0)}))
    assert len(objects) == 1
    assert objects.geometry[0].geom_type == "Polygon"
    assert iou(objects.geometry[0], to_crs(band, NORTH_UP)) > 0.999


def test_mask_running_on_into_the_halo_is_dropped() -> None:
    """Two tiles of one grid row see "band + background strip down to their read edge";
    the row below owns the strip, saw it whole, and found only the band."""
    grid = TileGrid(*SCENE, NORTH_UP, 256, 48)
    band = stitch_shapes()[3]
    above = [t for t in grid if t.read.row_start < 330 < t.read.row_stop < 420]
    run_on = {t.key: [shapely.box(t.read.col_start, 330, t.read.col_stop, t.read.row_stop)] for t in above}
    objects = stitch(tile_pieces(grid, [band], extra=run_on))
    assert_one_object_per_shape(objects.geometry, [to_crs(band, NORTH_UP)], min_iou=0.999)
    assert objects.stats["disowned"] >= 1


def test_unmatched_fragment_is_kept_by_its_owner_and_dropped_elsewhere() -> None:
    grid = TileGrid(*SCENE, NORTH_UP, 256, 48)
    tile = grid.tile(0, 0)  # read cols 0..256, core cols 0..208
    owned = shapely.box(150, 20, 256, 60)  # mostly in the tile's core, cut at the read edge
    halo = shapely.box(220, 80, 256, 120)  # in the neighbour's core, cut at the read edge
    parts = [(t, []) for t in grid if t.key != tile.key]
    parts.append((tile, [piece_from_geometry(to_crs(g, NORTH_UP), tile, SCENE) for g in (owned, halo)]))
    objects = stitch(parts)
    assert len(objects) == 1
    assert iou(objects.geometry[0], to_crs(owned, NORTH_UP)) > 0.999


def test_duplicates_from_every_tile_are_removed() -> None:
    """A small object every tile sees whole (it sits in the overlap of four tiles)."""
    grid = TileGrid(*SCENE, NORTH_UP, 256, 48)
    corner = shapely.Point(208, 208).buffer(6)  # core corner shared by four tiles
    objects = stitch(tile_pieces(grid, [corner]))
    assert len(objects) == 1
    assert objects.n_tiles[0] == 4


def test_stitching_does_not_depend_on_the_order_tiles_finished_in() -> None:
    grid = TileGrid(*SCENE, NORTH_UP, 200, 32)
    parts = tile_pieces(grid, stitch_shapes(), jitter=1.0)
    first = stitch(parts)
    shuffled = [parts[i] for i in np.random.default_rng(1).permutation(len(parts))]
    second = stitch(shuffled)
    assert all(shapely.equals_exact(a, b, 0.0) for a, b in zip(first.geometry, second.geometry))
    np.testing.assert_array_equal(first.score, second.score)


def test_objects_come_in_reading_order() -> None:
    grid = TileGrid(*SCENE, NORTH_UP, 256, 48)
    objects = stitch(tile_pieces(grid, stitch_shapes()))
    ys = [-p.y for p in shapely.point_on_surface(objects.geometry)]  # rows grow downwards
    assert ys == sorted(ys)


def test_nothing_to_stitch_and_bad_thresholds() -> None:
    grid = TileGrid(*SCENE, NORTH_UP, 256, 48)
    assert len(stitch([])) == 0
    assert len(stitch([(t, []) for t in grid])) == 0
    with pytest.raises(ConfigError, match="match IoU"):
        stitch([], match_iou=0.0)
    with pytest.raises(ConfigError, match="owned"):
        stitch([], min_owned=1.5)


def test_piece_edges_only_count_sides_facing_another_tile() -> None:
    grid = TileGrid(*SCENE, NORTH_UP, 256, 48)
    corner = grid.tile(0, 0)
    assert interior_sides(corner, SCENE) == BOTTOM | RIGHT
    assert interior_sides(grid.tile(1, 1), SCENE) == TOP | LEFT | BOTTOM | RIGHT
    at_scene_edge = piece_from_geometry(to_crs(shapely.box(0, 0, 50, 50), NORTH_UP), corner, SCENE)
    assert at_scene_edge is not None and at_scene_edge.edges == 0 and not at_scene_edge.truncated
    cut = piece_from_geometry(to_crs(shapely.box(200, 10, 256, 50), NORTH_UP), corner, SCENE)
    assert cut is not None and cut.edges == RIGHT
    assert cut.bbox == pytest.approx((10, 200, 50, 256))
    assert piece_from_geometry(shapely.Polygon(), corner, SCENE) is None
    assert Piece(b"", 1.0, 1.0, (0, 0, 1, 1), LEFT).truncated


def test_grid_points_skip_nodata() -> None:
    valid = np.ones((100, 200), dtype=bool)
    valid[:, :100] = False
    points = grid_points(valid, 4)
    assert len(points) == 8 and (points[:, 0] > 100).all()
    assert points[:, 1].min() == pytest.approx(12.5) and points[:, 0].max() == pytest.approx(175.0)



@pytest.mark.parametrize("n", [4, 5, 16, 32, 48])
def test_coarse_to_fine_order_is_a_permutation_starting_in_the_middle(n: int) -> None:
    points = grid_points(np.ones((1000, 600), dtype=bool), n)
    order = coarse_to_fine_order((1000, 600), points, n)
    assert sorted(order.tolist()) == list(range(n * n))
    middle = points[order[0]]
    assert middle[0] == pytest.approx((n // 2 + 0.5) * 600 / n) and middle[1] == pytest.approx((n // 2 + 0.5) * 1000 / n)
    # the first quarter of the order spreads over the whole array: every quadrant gets points
    first = points[order[: max(4, n * n // 4)]]
    quadrants = {(bool(x < 300), bool(y < 500)) for x, y in first}
    assert len(quadrants) == 4


def test_covered_points_are_not_decoded() -> None:
    """A point's best kept mask covering the left half of the tile's cells hides the grid
    points under it; its other, lower-scored masks cover nothing."""
    frame = _Frame((256, 256), (1024, 1024))
    left_half = _Candidate(torch.full((256, 128), 5.0), (0, 0), (0, 0, 127, 255), 0.95, 0.97, (10.0, 10.0))
    whole = _Candidate(torch.full((256, 256), 5.0), (0, 0), (0, 0, 255, 255), 0.90, 0.97, (10.0, 10.0))
    points = grid_points(np.ones((256, 256), dtype=bool), 8)

    def decoded(candidates: list[_Candidate], **params) -> np.ndarray:
        coverage = _Coverage(frame, make_settings(**params))
        coverage.add(candidates)
        batches = list(_point_batches(points, 3, coverage))
        assert all(len(b) <= 3 for b in batches)
        return np.concatenate(batches) if batches else np.zeros((0, 2))

    right = decoded([whole, left_half], cover_max_fraction=0.6)
    assert len(right) == 32 and (right[:, 0] > 128).all()
    assert len(decoded([left_half], cover_max_fraction=0.4)) == 64  # too large to cover
    assert len(decoded([whole], cover_max_fraction=1.0)) == 0

def test_auto_params_are_validated() -> None:
    with pytest.raises(ConfigError, match="points_per_side"):
        make_settings(points_per_side=0)
    with pytest.raises(ConfigError, match="max area"):
        make_settings(min_area_m2=10, max_area_m2=5)
    with pytest.raises(ConfigError, match="pred_iou_thresh"):
        make_settings(pred_iou_thresh=1.5)


# --- end to end with MobileSAM ---------------------------------------------------------
# A 512 x 512 px synthetic scene: flat-coloured, non-touching shapes on grey noise, placed
# across tile edges and on tile corners of the grids below, one band longer than any
# tile. Every shape is at least 64 px across (the prompt-grid spacing used here) and the
# discs' inscribed squares too, so some grid point falls inside each shape in every tile
# that sees it whole.

E2E_SHAPES = [
    shapely.box(180, 30, 260, 100),  # across the 256-px grid's core and read edges
    shapely.Point(208, 208).buffer(48),  # on a core corner of the 256-px grid
    shapely.Polygon([(360, 30), (490, 30), (490, 170), (420, 170), (420, 100), (360, 100)]),  # an L
    shapely.box(20, 300, 490, 380),  # longer than every tile below
    shapely.box(300, 410, 420, 500),  # on a read-window corner
    shapely.box(40, 150, 120, 230),
    shapely.Point(90, 452).buffer(48),
]
E2E_COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 30), (200, 40, 200), (30, 200, 200),
               (250, 140, 20)]
E2E_PARAMS = {"min_area_m2": 100.0, "max_area_m2": 10_000.0}
TILINGS = {  # (tile size, overlap, points per side: one point every 64 px) -> workers
    (256, 48, 4): 0,
    (320, 64, 5): 0,
    (384, 96, 6): 1,  # through Ray
}


def paint_scene(path: Path, shapes: list[shapely.Geometry], shape_hw: tuple[int, int], **kwargs) -> Path:
    rows, cols = shape_hw
    image = np.random.default_rng(0).normal(120, 30, (3, rows, cols)).clip(0, 255).astype(np.uint8)
    for shape, colour in zip(shapes, E2E_COLOURS):
        inside = rasterize([shape], out_shape=shape_hw, transform=Affine.identity()).astype(bool)
        image[:, inside] = np.array(colour, dtype=np.uint8)[:, None]
    return Path(make_raster(path, image, transform=NORTH_UP, **kwargs))


@pytest.fixture(scope="module")
def shapes_scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return paint_scene(tmp_path_factory.mktemp("auto") / "shapes.tif", E2E_SHAPES, (512, 512))


@pytest.fixture(scope="module")
def auto_runs(shapes_scene: Path, ray_session: None) -> dict[tuple[int, int, int], gpd.GeoDataFrame]:
    runs = {}
    for (tile_size, overlap, points), workers in TILINGS.items():
        runs[tile_size, overlap, points] = segment_auto(
            shapes_scene,
            tile_size_px=tile_size,
            overlap_px=overlap,
            points_per_side=points,
            workers=workers,
            progress=False,
            **E2E_PARAMS,
        )
    return runs


@pytest.mark.ray
@pytest.mark.parametrize("tiling", list(TILINGS), ids=[f"{t}px-{o}-{p}pts" for t, o, p in TILINGS])
def test_every_shape_is_one_polygon(auto_runs, tiling) -> None:
    gdf = auto_runs[tiling]
    truth = [to_crs(s, NORTH_UP) for s in E2E_SHAPES]
    assert_one_object_per_shape(gdf.geometry.to_numpy(), truth, min_iou=0.9)
    assert list(gdf.columns) == ["object_id", "score", "stability", "area_m2", "n_tiles", "geometry"]
    assert gdf.object_id.is_unique and gdf.object_id.is_monotonic_increasing  # pixel numbers, reading order
    band = gdf.iloc[int(np.argmax([iou(g, truth[3]) for g in gdf.geometry]))]
    assert band.n_tiles >= 2 and band.area_m2 == pytest.approx(470 * 80 * 0.25, rel=0.05)
    assert ((gdf.area_m2 >= 100) & (gdf.area_m2 <= 10_000)).all()
    summary = gdf.attrs["summary"]
    assert summary["mode"] == "auto" and summary["tiles"]["processed"] == summary["tiles"]["planned"]
    grid = summary["tiles"]["planned"] * tiling[2] ** 2  # skip_covered is on: some are not decoded
    assert summary["prompts"]["used"] + summary["prompts"]["skipped_covered"] == grid
    assert 0 < summary["prompts"]["used"] <= grid
    assert {"read", "encode", "decode", "vectorize", "stitch", "total"} <= set(summary["seconds"])


def test_streamed_stitching_equals_one_pass_in_any_order(shapes_scene: Path) -> None:
    """Objects stitched cluster by cluster as tiles come back (SeamBuffer), in three
    random arrival orders, equal stitching all pieces at once: same ids, same polygons."""
    results = []
    segment_auto(shapes_scene, tile_size_px=256, overlap_px=48, points_per_side=4, workers=0, progress=False,
                 on_result=results.append, **E2E_PARAMS)
    mode = AutoMode()
    settings = make_settings(None, tile_size_px=256, overlap_px=48, points_per_side=4, **E2E_PARAMS)
    info = open_scene(shapes_scene)
    mode.plan([info], settings)
    tiles = {t.key: t.tile for t in mode.tasks}
    one_pass = stitched_frame(info, [(tiles[r.tile_key], r.objects) for r in results], settings, {}, None)
    assert len(one_pass) >= len(E2E_SHAPES) and len(results) == 9
    for seed in range(3):
        mode = AutoMode()
        mode.plan([info], settings)
        chunks = [mode.accept(results[k]) for k in np.random.default_rng(seed).permutation(len(results))]
        chunks += list(mode.finish(RunSummary(scene="s", mode="auto")))
        streamed = pd.concat([c for c in chunks if c is not None]).sort_values("object_id")
        assert streamed.object_id.tolist() == one_pass.object_id.tolist()
        for a, b in zip(streamed.geometry, one_pass.geometry):
            assert a.equals(b)


def test_object_ids_are_pixel_numbers_and_unique() -> None:
    scene = SimpleNamespace(transform=Affine(0.5, 0, 100, 0, -0.5, 200), width=40, height=30)
    same_pixel = [shapely.box(101.0, 195.0, 101.5, 195.5), shapely.box(101.0, 195.0, 101.5, 195.5)]
    ids = object_ids(np.array(same_pixel + [shapely.box(110, 190, 112, 192)], dtype=object), scene)
    # box 1: pixel row 9, col 2 -> 9 * 40 + 2 + 1; its twin takes the next number
    assert ids.tolist() == [363, 364, 18 * 40 + 22 + 1]  # centre (111, 191): row 18, col 22


@pytest.mark.ray
def test_same_objects_whatever_the_tiling(auto_runs) -> None:
    truth = [to_crs(s, NORTH_UP) for s in E2E_SHAPES]
    found = []
    for gdf in auto_runs.values():
        geoms = gdf.geometry.to_numpy()
        found.append([next(g for g in geoms if iou(g, shape) >= 0.9) for shape in truth])
    for other in found[1:]:
        assert all(iou(a, b) >= 0.9 for a, b in zip(found[0], other))


def test_cli_auto_writes_objects_labels_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """512 x 1024 px, the right half nodata: 3 tiles of 512 px, the last one all nodata."""
    valid = np.zeros((512, 1024), dtype=bool)
    valid[:, :512] = True
    scene = paint_scene(tmp_path / "half.tif", E2E_SHAPES, (512, 1024), mask=valid)
    out, labels, summary = tmp_path / "objects.gpkg", tmp_path / "labels.tif", tmp_path / "summary.json"
    args = ["auto", str(scene), "-o", str(out), "--tile-size", "512", "--overlap", "64", "--points-per-side", "8",
            "--min-area", "100", "--max-area", "10000", "--labels-raster", str(labels), "--summary", str(summary),
            "--workers", "0", "--no-progress"]
    assert main(args) == EXIT_OK
    err = capsys.readouterr().err
    assert f"objects to {out}" in err and "1 all nodata" in err
    gdf = gpd.read_file(out)
    assert len(gdf) >= 5 and set(gdf.columns) >= {"object_id", "score", "stability", "area_m2", "n_tiles"}
    scene_box = shapely.box(*shapely.bounds(to_crs(shapely.box(0, 0, 512, 512), NORTH_UP)))
    assert gdf.geometry.within(scene_box.buffer(0.01)).all()  # nothing on nodata
    with rasterio.open(labels) as src:
        assert src.dtypes[0] == "uint32" and src.block_shapes[0] == (512, 512) and src.crs == "EPSG:32645"
        assert src.compression.name == "deflate" and (src.height, src.width) == (512, 1024)
        ids, counts = np.unique(src.read(1), return_counts=True)
    pixels = dict(zip(ids.tolist(), counts.tolist()))
    for object_id, area in zip(gdf.object_id, gdf.area_m2):
        assert pixels.get(object_id, 0) == pytest.approx(area / 0.25, rel=0.1, abs=40)
    report = json.loads(summary.read_text())
    assert report["tiles"]["skipped_nodata"] == 1 and report["tiles"]["processed"] == 2
    assert report["objects"]["pieces"] >= len(gdf)
    assert main(args) == EXIT_BAD_INPUT  # the output exists: refused before any work
    assert "exists" in capsys.readouterr().err


def test_segment_auto_refuses_bad_settings_before_work(shapes_scene: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="overlap"):
        segment_auto(shapes_scene, tile_size_px=256, overlap_px=8)
    with pytest.raises(ConfigError, match="unknown setting"):
        segment_auto(shapes_scene, points_per_tile=4)
    existing = tmp_path / "out.gpkg"
    existing.write_text("")
    with pytest.raises(OutputExistsError):
        segment_auto(shapes_scene, output=existing)
    labels = tmp_path / "labels.tif"
    labels.write_text("")
    with pytest.raises(OutputExistsError, match="labels raster"):
        segment_auto(shapes_scene, labels_raster=labels)


def test_cli_auto_several_scenes_with_a_preset_merge_and_resume(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Two one-tile scenes in different UTM zones -> one layer in the first one's CRS."""
    shapes = [shapely.box(40, 40, 120, 120), shapely.Point(180, 180).buffer(40)]
    first = paint_scene(tmp_path / "a.tif", shapes, (256, 256))
    second = paint_scene(tmp_path / "b.tif", shapes, (256, 256), crs="EPSG:32644")
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"{first}\n{second}\n")
    preset = tmp_path / "auto.yaml"
    preset.write_text("auto:\n  points_per_side: 4\n  tile_size_px: 256\n  overlap_px: 48\n  min_area_m2: 100\n"
                      "  max_area_m2: 10000\n  workers: 0\n")
    out, work = tmp_path / "objects.geojson", tmp_path / "work"
    args = ["auto", str(listing), "-o", str(out), "--config", str(preset), "--work-dir", str(work), "--no-progress"]
    assert main(args) == EXIT_OK
    gdf = gpd.read_file(out).to_crs("EPSG:32645")
    assert sorted(gdf.scene.unique()) == sorted([str(first), str(second)])
    truth = [to_crs(s, NORTH_UP) for s in shapes]
    for scene, crs in ((first, "EPSG:32645"), (second, "EPSG:32644")):
        found = gpd.GeoSeries(gdf[gdf.scene == str(scene)].geometry.to_numpy(), crs="EPSG:32645").to_crs(crs)
        assert_one_object_per_shape(found.to_numpy(), truth, min_iou=0.9)
    # both scenes run as one job: one work dir with one manifest, each scene's tile in it
    assert sorted(p.name for p in work.iterdir()) == ["manifest.json", "tiles"]
    assert len(list((work / "tiles").glob("*.pkl"))) == 2
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == EXIT_OK  # resumed: no tile encoded again
    err = capsys.readouterr().err
    assert "(0 tiles encoded" in err and "2 resumed" in err
    assert_geometries_equal(gpd.read_file(out).to_crs("EPSG:32645"), gdf)
    # filters applied after the tiles come back reuse the tiles: only the stitching reruns
    assert main([*args, "--overwrite", "--nested-thresh", "0.8", "--max-area", "5000"]) == EXIT_OK
    assert "(0 tiles encoded" in capsys.readouterr().err
    preset.write_text("auto:\n  points_per_sid: 4\n")
    assert main([*args, "--overwrite"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "section 'auto'" in err and "unknown setting 'points_per_sid'" in err


def assert_geometries_equal(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame) -> None:
    assert len(a) == len(b)
    assert all(x.equals_exact(y, 1e-6) for x, y in zip(a.geometry, b.geometry))


def test_nested_masks_keep_the_higher_scored_one_only() -> None:
    from sam_geo.modes.automatic import suppress_nested

    def piece(geom: shapely.Geometry, score: float) -> Piece:
        return Piece(shapely.to_wkb(geom), score, 0.97, (0.0, 0.0, 1.0, 1.0))

    whole = piece(shapely.box(0, 0, 10, 10), 0.90)
    part = piece(shapely.box(1, 1, 5, 5), 0.95)  # inside the whole, better scored: wins
    roof = piece(shapely.box(20, 0, 30, 10), 0.97)
    fixture = piece(shapely.box(21, 1, 23, 3), 0.93)  # inside the roof, worse scored: dropped
    neighbour = piece(shapely.box(8, 8, 18, 18), 0.91)  # overlaps the whole by 4 %: not nested
    kept = suppress_nested([whole, part, roof, fixture, neighbour], 0.8)
    assert kept == [part, roof, neighbour]
    assert suppress_nested([whole, part], 1.0) == [part]  # fully inside also counts at 1.0
    assert suppress_nested([], 0.8) == [] and suppress_nested([whole], 0.8) == [whole]



def test_greedy_suppression_by_iou_and_by_containment() -> None:
    from sam_geo.geo.stitch import greedy_suppression

    whole = shapely.box(0, 0, 10, 10)
    part = shapely.box(0, 0, 5, 10)  # half of the whole: IoU 0.5, all of it inside
    sub = shapely.box(0, 0, 2, 2)  # inside the part and the whole
    apart = shapely.box(20, 0, 25, 5)
    geoms = np.array([whole, part, sub, apart], dtype=object)
    score = np.array([0.9, 0.95, 0.8, 0.7])
    assert greedy_suppression(geoms, score, 0.7, overlap="iou").tolist() == [0, 1, 2, 3]
    assert greedy_suppression(geoms, score, 0.4, overlap="iou").tolist() == [1, 2, 3]
    # containment: the part (best) drops the whole and the sub-part nested in it
    assert greedy_suppression(geoms, score, 0.8, overlap="ios").tolist() == [1, 3]
    # the whole best scored: it drops the part and the sub-part, both nested in it
    assert greedy_suppression(geoms, np.array([0.99, 0.95, 0.8, 0.7]), 0.8, overlap="ios").tolist() == [0, 3]
    # a suppressed object suppresses nothing: the part (best) drops the whole, and the
    # whole then cannot drop the object it overlaps by half, which the part does not reach
    right = shapely.box(5, 0, 10, 10)
    chain = np.array([part, whole, right], dtype=object)
    assert greedy_suppression(chain, np.array([0.95, 0.9, 0.8]), 0.8, overlap="ios").tolist() == [0, 2]
    # ties: the larger first
    assert greedy_suppression(geoms[:2], np.array([0.9, 0.9]), 0.8, overlap="ios").tolist() == [0]
    assert greedy_suppression(geoms[:1], score[:1], 0.5).tolist() == [0]
    with pytest.raises(ValueError, match="overlap"):
        greedy_suppression(geoms, score, 0.5, overlap="dice")

def test_automatic_mode_refuses_sam2_models_before_any_work(shapes_scene: Path) -> None:
    with pytest.raises(ConfigError, match="SAM 2.1 model"):
        segment_auto(shapes_scene, model="sam2.1_hiera_tiny")
