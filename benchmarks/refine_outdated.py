"""Refining outdated footprints, and negative points on the road (issue 7 checks).

Outdated footprints: the Banepa OSM outlines shifted 1.5 m east and eroded by 1 m.
Prints the median per-building IoU against the true outlines of (a) the outdated
outlines themselves, (b) SAM prompted with them as boxes, box+point and mask prompts.
Negative points: one point 2 m outside each building, on the first side (E, S, W, N)
with no building within 1.5 m (a road or yard next to it); prints the mean IoU of box
prompts with and without them, and the share of buildings made worse by > 0.05.

    python benchmarks/refine_outdated.py [--window col,row,width,height] [--flip-views 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.windows import Window

from _common import BANEPA, WEIGHTS, per_object_iou
from sam_geo import segment


def crop_scene(window: Window, folder: Path) -> Path:
    with rasterio.open(BANEPA / "banepa_utm45n.tif") as src:
        profile = src.profile | {"width": window.width, "height": window.height,
                                 "transform": src.window_transform(window)}
        data = src.read(window=window)
    path = folder / "crop.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def negative_points(truth: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    tree = shapely.STRtree(truth.geometry.to_numpy())
    points, ids = [], []
    for oid, geom in zip(truth.osm_id, truth.geometry):
        minx, miny, maxx, maxy = geom.bounds
        cx, cy = geom.centroid.x, geom.centroid.y
        for px, py in ((maxx + 2, cy), (cx, miny - 2), (minx - 2, cy), (cx, maxy + 2)):
            candidate = shapely.Point(px, py)
            if len(tree.query(candidate.buffer(1.5), predicate="intersects")) == 0:
                points.append(candidate)
                ids.append(oid)
                break
    return gpd.GeoDataFrame({"near": ids}, geometry=points, crs=truth.crs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", default="541,1038,2048,2048")
    parser.add_argument("--flip-views", type=int, default=1, help="views per tile (1, 2 or 4), as --flip-views")
    args = parser.parse_args()
    col, row, width, height = map(int, args.window.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        scene = crop_scene(Window(col, row, width, height), Path(tmp))
        with rasterio.open(scene) as src:
            footprint = shapely.box(*src.bounds)
        truth = gpd.read_file(BANEPA / "buildings_utm45n.geojson")
        truth = truth[truth.within(footprint.buffer(-3))].reset_index(drop=True)
        outdated = truth.copy()
        outdated["geometry"] = truth.geometry.translate(1.5, 0).buffer(-1.0, join_style="mitre")
        outdated = outdated[~outdated.is_empty & outdated.is_valid].reset_index(drop=True)
        truth = truth[truth.osm_id.isin(outdated.osm_id)].reset_index(drop=True)
        base = per_object_iou(outdated, truth, "osm_id")
        print(f"{len(truth)} buildings in window {args.window}")
        print(f"outdated outlines themselves: median IoU {np.median(base):.3f}  mean {base.mean():.3f}")
        options = {"workers": 0, "progress": False, "flip_views": args.flip_views}
        results = {}
        for mode, grow in (("box", None), ("box+point", None), ("box+point", 0.25), ("mask", None)):
            gdf = segment(scene, outdated, prompt_as=mode, box_grow=grow, weights=str(WEIGHTS), **options)
            ious = per_object_iou(gdf, truth, "osm_id")
            results[mode if grow is None else f"{mode} grow {grow}"] = ious
            print(f"SAM {mode:9s} box_grow={grow}: median IoU {np.median(ious):.3f}  mean {ious.mean():.3f}  "
                  f"({np.median(ious) - np.median(base):+.3f} vs outdated)")
        negatives = negative_points(truth)
        gdf = segment(scene, outdated, prompt_as="box", negative_points=negatives, weights=str(WEIGHTS), **options)
        with_neg = per_object_iou(gdf, truth, "osm_id")
        has = truth.osm_id.isin(negatives.near).to_numpy()
        delta = with_neg[has] - results["box"][has]
        print(f"negative points: {has.sum()} buildings with one; mean IoU {results['box'][has].mean():.4f} -> "
              f"{with_neg[has].mean():.4f} ({delta.mean():+.4f}); worse by > 0.05: {(delta < -0.05).mean():.3f}")


if __name__ == "__main__":
    main()
