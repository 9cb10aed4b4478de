"""Seconds to stitch many objects across many tiles (no model; synthetic pieces).

Objects (rectangles and discs, 10-60 px, on a jittered lattice, plus a few bands longer
than a tile) are cut by the read windows of a 1024 / 128 px tile grid as a perfect SAM
would see them; every tile's copy is grown or shrunk by up to 1 px. Prints the pieces,
the stitched objects (which must equal the objects placed) and the stitching seconds.

    python benchmarks/stitch_scaling.py [--objects 20000] [--tile-size 1024] [--overlap 128]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import shapely
from affine import Affine

from sam_geo.geo.stitch import piece_from_geometry, stitch
from sam_geo.geo.tiles import TileGrid

TRANSFORM = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 3_000_000.0)


def make_objects(count: int, rng: np.random.Generator) -> tuple[list[shapely.Geometry], int]:
    """``count`` disjoint shapes in pixels on a lattice of 80 px cells; returns shapes, scene side."""
    per_side = math.ceil(math.sqrt(count))
    side = per_side * 80 + 40
    shapes = []
    for k in range(count):
        row, col = divmod(k, per_side)
        cy, cx = 60 + row * 80 + rng.uniform(-8, 8), 60 + col * 80 + rng.uniform(-8, 8)
        size = rng.uniform(10, 60)
        if k % 3 == 0:
            shapes.append(shapely.Point(cx, cy).buffer(size / 2, quad_segs=8))
        else:
            shapes.append(shapely.box(cx - size / 2, cy - size / 3, cx + size / 2, cy + size / 3))
    return shapes, side


def tile_pieces(grid: TileGrid, shapes: list[shapely.Geometry], rng: np.random.Generator) -> list[tuple]:
    """Each tile's view of the shapes: cut by its read window, boundary off by up to 1 px."""
    tree = shapely.STRtree(shapes)
    parts = []
    for tile in grid:
        window = shapely.box(tile.read.col_start, tile.read.row_start, tile.read.col_stop, tile.read.row_stop)
        pieces = []
        for index in tree.query(window, predicate="intersects"):
            seen = shapes[index].buffer(rng.uniform(-1, 1), join_style="mitre").intersection(window)
            if seen.area <= 0:
                continue
            geom = shapely.affinity.affine_transform(seen, TRANSFORM.to_shapely())
            pieces.append(piece_from_geometry(geom, tile, (grid.height, grid.width), score=rng.uniform(0.88, 1.0)))
        parts.append((tile, pieces))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=20_000)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--overlap", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shapes, side = make_objects(args.objects, rng)
    shapes += [shapely.box(20, y, side - 20, y + 12) for y in range(75, side - 40, side // 4)]  # longer than tiles
    grid = TileGrid(side, side, TRANSFORM, args.tile_size, args.overlap)
    start = time.perf_counter()
    parts = tile_pieces(grid, shapes, rng)
    built = time.perf_counter() - start
    n_pieces = sum(len(p) for _, p in parts)
    start = time.perf_counter()
    objects = stitch(parts)
    seconds = time.perf_counter() - start
    print(f"scene {side} x {side} px, {len(grid)} tiles, {len(shapes):,} objects, {n_pieces:,} pieces "
          f"(built in {built:.1f} s)")
    print(f"stitched into {len(objects):,} objects in {seconds:.2f} s; stats {objects.stats}")
    if len(objects) != len(shapes):
        raise SystemExit(f"expected {len(shapes)} objects, got {len(objects)}")


if __name__ == "__main__":
    main()
