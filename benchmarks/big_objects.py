"""Objects larger than a tile, end to end with MobileSAM: one polygon each, on any grid?

A synthetic 1600 x 1600 px scene (0.5 m pixels) holds five flat-coloured shapes on
textured noise: a 650 x 400 px rectangle, a 740 x 680 px rectangle, an L of 1150 px
along the scene's bottom-left corner, a frame with a hole on the bottom-right corner
and a 400 x 200 px rectangle. Automatic mode runs with the defaults (plus
``--points-per-side``) on three tile grids. Per grid it prints, for each shape, the
objects lying mostly in it (1 is right; more is a fragmented object) and the IoU of the
best one, then the objects that are mostly background, and the wall seconds.

    python benchmarks/big_objects.py [--grids 512/64,768/96,1024/128] [--points-per-side 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import rasterize

from sam_geo import segment_auto

SIDE = 1600
TRANSFORM = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 3_000_000.0)
SHAPES = [  # pixels: x = column, y = row
    shapely.box(100, 150, 750, 550),
    shapely.box(820, 80, 1560, 760),
    shapely.Polygon([(0, 900), (1150, 900), (1150, 1600), (850, 1600), (850, 1200), (0, 1200)]),
    shapely.box(1250, 900, 1600, 1600).difference(shapely.box(1350, 1100, 1480, 1400)),
    shapely.box(200, 1300, 600, 1500),
]
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 30), (200, 40, 200)]


def write_scene(path: Path) -> Path:
    """The scene as an RGB uint8 GeoTIFF in EPSG:32645."""
    image = np.random.default_rng(0).normal(120, 30, (3, SIDE, SIDE)).clip(0, 255).astype(np.uint8)
    for shape, colour in zip(SHAPES, COLOURS):
        inside = rasterize([shape], out_shape=(SIDE, SIDE), transform=Affine.identity()).astype(bool)
        image[:, inside] = np.array(colour, dtype=np.uint8)[:, None]
    profile = {"driver": "GTiff", "width": SIDE, "height": SIDE, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32645", "transform": TRANSFORM, "tiled": True}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image)
    return path


def to_crs(geom: shapely.Geometry) -> shapely.Geometry:
    t = TRANSFORM
    return shapely.transform(geom, lambda xy: np.c_[t.a * xy[:, 0] + t.c, t.e * xy[:, 1] + t.f])


def report(geoms: np.ndarray) -> tuple[list[str], int]:
    """Per shape: objects mostly inside it and the best IoU; and the background count."""
    truth = [to_crs(s) for s in SHAPES]
    lines, in_shapes = [], set()
    for k, shape in enumerate(truth):
        inside = [i for i, g in enumerate(geoms) if shapely.area(shapely.intersection(g, shape)) > 0.5 * g.area]
        in_shapes.update(inside)
        best = max((shapely.area(shapely.intersection(g, shape)) / shapely.area(shapely.union(g, shape))
                    for g in geoms), default=0.0)
        lines.append(f"shape {k}: {len(inside)} object(s) mostly inside, best IoU {best:.3f}")
    return lines, len(geoms) - len(in_shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", default="512/64,768/96,1024/128", help="tile/overlap pairs, model px")
    parser.add_argument("--points-per-side", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scene = write_scene(Path(tmp) / "big_shapes.tif")
        for grid in args.grids.split(","):
            tile, overlap = (int(v) for v in grid.split("/"))
            start = time.perf_counter()
            frame = segment_auto(scene, tile_size_px=tile, overlap_px=overlap,
                                 points_per_side=args.points_per_side, workers=0, progress=False)
            seconds = time.perf_counter() - start
            lines, background = report(frame.geometry.to_numpy())
            print(f"grid {tile}/{overlap}: {len(frame)} objects, {background} mostly background, {seconds:.1f} s")
            for line in lines:
                print("  " + line)


if __name__ == "__main__":
    main()
