"""Objects larger than a tile: stitched whole on 512, 768 and 1024 px grids (pure vectors).

Each tile "returns" what MobileSAM returned per tile on a synthetic scene of flat shapes
on noise (``benchmarks/big_objects.py``): every shape cut by the read window, split into
its connected parts (the two arms of a U crossing the window edge come back as two
masks), the background around them in connected parts, and wholes made of parts: the
whole read window, and a shape together with a band of the background beside it. The
shapes are larger than two tiles of the largest grid, lie on scene corners, are
L-shaped or have a hole.
"""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from affine import Affine

from test_auto import NORTH_UP, ROTATED, iou, to_crs
from sam_geo.geo.stitch import piece_from_geometry, stitch
from sam_geo.geo.tiles import TileGrid

SCENE = (2800, 2800)  # rows, cols (pixels)
LARGE_GRIDS = [(512, 64), (768, 96), (1024, 128)]


def large_shapes() -> list[shapely.Geometry]:
    """Disjoint shapes in pixels (x = col, y = row), each larger than a 1024 px tile."""
    return [
        shapely.box(150, 200, 2450, 1400),  # 2300 x 1200 px: longer than two 1024 px tiles
        shapely.Polygon([(0, 1600), (1300, 1600), (1300, 1900), (400, 1900), (400, 2800), (0, 2800)]),  # L
        shapely.box(1500, 1600, 2800, 2800).difference(shapely.box(1800, 1900, 2400, 2400)),  # hole, corner
    ]


def small_shape() -> shapely.Geometry:
    return shapely.box(600, 2100, 1100, 2500)


def sam_like_pieces(grid: TileGrid, shapes: list[shapely.Geometry], *, jitter: float = 0.0, seed: int = 0,
                    wholes: bool = True) -> list[tuple]:
    """Per tile: shapes and background cut by the read window in connected parts, plus
    (``wholes``) the whole window and each shape with a 60 px band of background.
    ``jitter`` (px): each mask grown or shrunk by up to this, differently per tile."""
    rng = np.random.default_rng(seed)
    everything = shapely.union_all(shapes)
    out = []
    for tile in grid:
        window = shapely.box(tile.read.col_start, tile.read.row_start, tile.read.col_stop, tile.read.row_stop)
        masks = [part for s in shapes for part in shapely.get_parts(s.intersection(window))]
        masks += list(shapely.get_parts(window.difference(everything)))
        if wholes:
            masks.append(window)
            masks += [s.union(s.buffer(60, join_style="mitre").difference(everything)).intersection(window)
                      for s in shapes if s.intersects(window)]
        pieces = []
        for mask in masks:
            if jitter:
                mask = mask.buffer(rng.uniform(-jitter, jitter), join_style="mitre").intersection(window)
            piece = piece_from_geometry(to_crs(mask, grid.transform), tile, (grid.height, grid.width), score=0.95)
            if piece is not None and shapely.area(mask) > 100:
                pieces.append(piece)
        out.append((tile, pieces))
    return out


def shape_objects(geoms: np.ndarray, truth: list[shapely.Geometry]) -> list[shapely.Geometry]:
    """The one object mostly inside each truth shape (fails on none or several)."""
    found = []
    for k, shape in enumerate(truth):
        inside = [g for g in geoms if shapely.area(shapely.intersection(g, shape)) > 0.5 * shapely.area(g)]
        assert len(inside) == 1, f"shape {k}: {len(inside)} objects mostly inside it, expected 1"
        found.append(inside[0])
    return found


def cut_shapes(geoms: np.ndarray, truth: list[shapely.Geometry]) -> list[tuple[int, float]]:
    """(shape, share) for every object holding 10-90 % of a shape without lying in it."""
    cuts = []
    for g in geoms:
        for k, shape in enumerate(truth):
            shared = shapely.area(shapely.intersection(g, shape))
            share = shared / shapely.area(shape)
            if 0.1 <= share <= 0.9 and shared < 0.9 * shapely.area(g):
                cuts.append((k, round(share, 3)))
    return cuts


@pytest.mark.parametrize(("tile_size", "overlap"), LARGE_GRIDS)
@pytest.mark.parametrize("transform", [NORTH_UP, ROTATED], ids=["north-up", "rotated"])
def test_objects_larger_than_two_tiles_are_one_polygon(tile_size: int, overlap: int, transform: Affine) -> None:
    shapes = large_shapes() + [small_shape()]
    grid = TileGrid(*SCENE, transform, tile_size, overlap)
    truth = [to_crs(s, transform) for s in shapes]
    objects = stitch(sam_like_pieces(grid, shapes, jitter=1.0, seed=tile_size))
    for k, (found, shape) in enumerate(zip(shape_objects(objects.geometry, truth), truth)):
        assert found.geom_type == "Polygon", f"shape {k}: {found.geom_type}"
        assert iou(found, shape) >= 0.99, f"shape {k}: IoU {iou(found, shape):.3f}"
    ring = shape_objects(objects.geometry, truth)[2]
    assert len(ring.interiors) == 1  # the hole survives
    assert cut_shapes(objects.geometry, truth) == []  # no whole-window or shape+background object
    assert objects.stats["crossing_wholes"] >= 1


def test_large_objects_do_not_depend_on_the_grid() -> None:
    shapes = large_shapes()
    truth = [to_crs(s, NORTH_UP) for s in shapes]
    runs = []
    for tile_size, overlap in LARGE_GRIDS:
        grid = TileGrid(*SCENE, NORTH_UP, tile_size, overlap)
        runs.append(shape_objects(stitch(sam_like_pieces(grid, shapes, jitter=1.0, seed=overlap)).geometry, truth))
    for other in runs[1:]:
        assert all(iou(a, b) >= 0.99 for a, b in zip(runs[0], other))


def test_arms_of_one_object_cut_apart_by_a_tile_are_joined() -> None:
    """A U whose base lies outside one tile: that tile sees two separate arms, both cut
    by its window; neighbours see the base joining them. One polygon comes out."""
    u_shape = shapely.box(100, 100, 450, 900).difference(shapely.box(200, 100, 350, 700))
    grid = TileGrid(1000, 1000, NORTH_UP, 512, 64)
    top_left = grid.tile(0, 0)
    arms = shapely.get_parts(u_shape.intersection(shapely.box(0, 0, 512, 512)))
    assert len(arms) == 2 and all(p.edges for p in (
        piece_from_geometry(to_crs(a, NORTH_UP), top_left, (1000, 1000)) for a in arms))
    objects = stitch(sam_like_pieces(grid, [u_shape], wholes=False))
    found = shape_objects(objects.geometry, [to_crs(u_shape, NORTH_UP)])[0]
    assert found.geom_type == "Polygon" and iou(found, to_crs(u_shape, NORTH_UP)) > 0.999


# --- end to end with MobileSAM ---------------------------------------------------------

E2E_SIDE = 1600
E2E_LARGE = [  # pixels; the same scene as benchmarks/big_objects.py
    shapely.box(100, 150, 750, 550),  # 650 x 400 px
    shapely.box(820, 80, 1560, 760),  # 740 x 680 px
    shapely.Polygon([(0, 900), (1150, 900), (1150, 1600), (850, 1600), (850, 1200), (0, 1200)]),  # L, corner
    shapely.box(1250, 900, 1600, 1600).difference(shapely.box(1350, 1100, 1480, 1400)),  # frame, corner
    shapely.box(200, 1300, 600, 1500),
]


@pytest.fixture(scope="module")
def large_scene(tmp_path_factory: pytest.TempPathFactory):
    from test_auto import paint_scene

    return paint_scene(tmp_path_factory.mktemp("large") / "large.tif", E2E_LARGE, (E2E_SIDE, E2E_SIDE))


def test_shapes_larger_than_a_tile_come_out_whole_with_mobilesam(large_scene) -> None:
    """Default 1024 / 128 px grid (2 x 2 tiles), 16 x 16 points per tile: every shape is
    one polygon, and nothing that holds part of a shape and the ground beside it."""
    from sam_geo import segment_auto

    frame = segment_auto(large_scene, points_per_side=16, workers=0, progress=False)
    truth = [to_crs(s, NORTH_UP) for s in E2E_LARGE]
    found = shape_objects(frame.geometry.to_numpy(), truth)
    ious = [iou(g, t) for g, t in zip(found, truth)]
    assert all(g.geom_type == "Polygon" for g in found)
    assert min(ious[:3] + ious[4:]) >= 0.95, ious
    assert ious[3] >= 0.8, ious  # MobileSAM fills the frame's hole of noise (0.84 when filled)
    assert cut_shapes(frame.geometry.to_numpy(), truth) == []
    assert frame.n_tiles.max() >= 2
