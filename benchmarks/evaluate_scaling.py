"""Time :func:`sam_geo.evaluate.evaluate` on synthetic building layers.

Ground truth: ``n`` rotated rectangles (4-40 m sides) scattered over a square UTM area
at a realistic urban density. Predictions: the same rectangles shifted by 0-3 m
(so IoUs straddle 0.5), 10% dropped, 10% split in two, plus 5% spurious boxes.
Prints seconds per size; the default runs 10k and 100k polygons per side.

    python benchmarks/evaluate_scaling.py            # 10000 and 100000
    python benchmarks/evaluate_scaling.py 100000     # one size
"""

from __future__ import annotations

import sys
import time

import geopandas as gpd
import numpy as np
import shapely
from shapely import affinity

from sam_geo.evaluate import evaluate

CRS = "EPSG:32645"


def rectangles(rng: np.random.Generator, n: int, side_m: float) -> np.ndarray:
    """``n`` rotated rectangles with centres uniform over a ``side_m`` square (metres)."""
    cx, cy = rng.uniform(0, side_m, n) + 300_000, rng.uniform(0, side_m, n) + 3_000_000
    w, h = rng.uniform(4, 40, n), rng.uniform(4, 40, n)
    boxes = shapely.box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    angles = rng.uniform(0, 90, n)
    return np.array([affinity.rotate(b, a, origin="centroid") for b, a in zip(boxes, angles)])


def layers(n: int, seed: int = 0) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """GT and prediction layers of about ``n`` polygons each."""
    rng = np.random.default_rng(seed)
    side = np.sqrt(n) * 60.0  # ~ one building per 60 m x 60 m cell
    gt = rectangles(rng, n, side)
    keep = rng.random(n) >= 0.10
    shift = rng.uniform(0, 3, (n, 2))
    pred = np.array([affinity.translate(g, dx, dy) for g, (dx, dy) in zip(gt, shift)])[keep]
    split = rng.random(len(pred)) < 0.10
    halves = []
    for g in pred[split]:
        minx, miny, maxx, maxy = g.bounds
        midx = (minx + maxx) / 2
        halves += [g.intersection(shapely.box(minx, miny, midx, maxy)),
                   g.intersection(shapely.box(midx, miny, maxx, maxy))]
    spurious = rectangles(rng, n // 20, side)
    pred = np.concatenate([pred[~split], np.array(halves, dtype=object), spurious])
    return gpd.GeoDataFrame(geometry=pred, crs=CRS), gpd.GeoDataFrame(geometry=gt, crs=CRS)


def main(sizes: list[int]) -> None:
    for n in sizes:
        pred, gt = layers(n)
        start = time.perf_counter()
        result = evaluate(pred, gt, iou=0.5)
        seconds = time.perf_counter() - start
        print(
            f"{len(pred):>7} pred vs {len(gt):>7} gt: {seconds:6.2f} s  "
            f"(tp={result.tp} fp={result.fp} fn={result.fn} f1={result.f1:.3f})"
        )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10_000, 100_000])
