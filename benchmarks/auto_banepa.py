"""Automatic segmentation of the central 2048 x 2048 px of Banepa, scored against buildings.

Scores, against the outlines of ``buildings_utm45n.geojson`` that touch the crop (one-to-
one matching at IoU >= 0.5, greedy by IoU, SpaceNet style; predictions filtered to
5..2000 m^2, see ``sam_geo.evaluate``):

* **stitched**: the output of :func:`sam_geo.segment_auto`;
* **per tile, no stitching**: the same tiles' masks, each tile keeping what lies in its
  core, clipped there (what a tiled pipeline without stitching produces), with the same
  nested-mask suppression and area range as the stitched run;

with seconds per tile and the number of polygons cut along tile seams (boundary, once
simplified by one pixel to remove the pixel staircase, running for at least 1 m within
half a pixel of a read-window or core edge that faces another tile), next to how many
of those cuts the reference outlines they overlap also have. The crop is written to ``/tmp/banepa_center_2048.tif`` (columns 541.., rows
1038..). Tiles are kept in ``--work-dir``, so a rerun with the same settings only
re-stitches.

    python benchmarks/auto_banepa.py [--config configs/buildings.yaml] [--points-per-side 32]
        [--tile-size 1024] [--overlap 128] [--workers 0] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.windows import Window

from _common import BANEPA, WEIGHTS
from sam_geo import segment_auto
from sam_geo.evaluate import evaluate
from sam_geo.geo.stitch import BOTTOM, LEFT, RIGHT, TOP, interior_sides
from sam_geo.geo.tiles import Tile, TileGrid
from sam_geo.geo.vectorize import geometry_area_m2
from sam_geo.io.scenes import open_scene
from sam_geo.modes.automatic import suppress_nested
from sam_geo.settings import Settings, load_preset, make_settings

CROP = Window(541, 1038, 2048, 2048)
CROP_PATH = Path("/tmp/banepa_center_2048.tif")
AREA_RANGE_M2 = (5.0, 2000.0)
SEAM_TOLERANCE_PX = 0.5
SEAM_MIN_LENGTH_M = 1.0
SEAM_SIMPLIFY_PX = 1.0

PRESET_KEYS = (  # preset keys (Settings field names) that steer automatic mode
    "points_per_side", "pred_iou_thresh", "stability_score_thresh", "stability_score_offset", "min_area_m2",
    "max_area_m2", "box_nms_thresh", "match_iou", "max_tile_fraction", "nested_thresh", "skip_covered",
    "cover_max_fraction",
)


def write_crop(dest: Path = CROP_PATH) -> Path:
    """The central 2048 x 2048 px of the Banepa scene, with its georeferencing."""
    if dest.exists():
        return dest
    with rasterio.open(BANEPA / "banepa_utm45n.tif") as src:
        profile = src.profile | {"width": CROP.width, "height": CROP.height, "transform": src.window_transform(CROP)}
        data = src.read(window=CROP)
    with rasterio.open(dest, "w", **profile) as dst:
        dst.write(data)
    return dest


def load_truth(scene: Path) -> gpd.GeoDataFrame:
    """Building outlines that touch the scene's footprint."""
    footprint = open_scene(scene).footprint
    truth = gpd.read_file(BANEPA / "buildings_utm45n.geojson")
    return truth[truth.intersects(footprint)].reset_index(drop=True)


def in_area_range(gdf: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    area = geometry_area_m2(gdf.geometry, gdf.crs) if len(gdf) else np.zeros(0)
    return gdf[(area >= AREA_RANGE_M2[0]) & (area <= AREA_RANGE_M2[1])]


def score(pred: gpd.GeoDataFrame, truth: gpd.GeoDataFrame) -> dict[str, float]:
    result = evaluate(in_area_range(pred), truth, iou=0.5)
    return {"precision": result.precision, "recall": result.recall, "f1": result.f1, "tp": result.tp,
            "predictions": result.n_pred, "buildings": result.n_gt, "mean_iou": result.mean_matched_iou}


def tile_results(work_dir: Path) -> list[Any]:
    """Every finished tile result kept in a work dir."""
    out = []
    for path in sorted((work_dir / "tiles").glob("*.pkl")):
        with path.open("rb") as fh:
            out.append(pickle.load(fh))
    return out


def tiles_by_key(grid: TileGrid) -> dict[str, Tile]:
    return {tile.key: tile for tile in grid}


def per_tile_frame(results: list[Any], grid: TileGrid, crs: Any, params: Settings) -> gpd.GeoDataFrame:
    """No stitching: every tile keeps its masks clipped to its core, with the same
    per-tile filters (nested suppression) and area range as the stitched run."""
    tiles = tiles_by_key(grid)
    geoms: list[shapely.Geometry] = []
    for result in results:
        tile = tiles[result.tile_key.split("-", 1)[1]]
        core = core_polygon(tile)
        pieces = result.objects
        if params.nested_thresh is not None:
            pieces = suppress_nested(pieces, params.nested_thresh)
        for piece in pieces:
            clipped = shapely.intersection(shapely.from_wkb(piece.wkb), core)
            if shapely.area(clipped) > 0:
                geoms.append(clipped)
    frame = gpd.GeoDataFrame(geometry=gpd.GeoSeries(geoms, crs=crs), crs=crs)
    area = geometry_area_m2(frame.geometry, crs) if len(frame) else np.zeros(0)
    keep = area >= params.min_area_m2
    if params.max_area_m2 is not None:
        keep &= area <= params.max_area_m2
    return frame[keep]


def core_polygon(tile: Tile) -> shapely.Geometry:
    c, t = tile.core, tile.scene_transform
    return shapely.Polygon([t * xy for xy in ((c.col_start, c.row_start), (c.col_stop, c.row_start),
                                               (c.col_stop, c.row_stop), (c.col_start, c.row_stop))])


def seam_lines(grid: TileGrid) -> shapely.Geometry:
    """Read-window sides facing another tile and interior core edges, as CRS lines."""
    t = grid.transform
    lines = []
    for tile in grid:
        sides = interior_sides(tile, (grid.height, grid.width))
        for box in (tile.read, tile.core):
            r0, c0, r1, c1 = box.row_start, box.col_start, box.row_stop, box.col_stop
            for bit, a, b in ((TOP, (c0, r0), (c1, r0)), (BOTTOM, (c0, r1), (c1, r1)),
                              (LEFT, (c0, r0), (c0, r1)), (RIGHT, (c1, r0), (c1, r1))):
                if sides & bit:
                    lines.append(shapely.LineString([t * a, t * b]))
    return shapely.union_all(lines)


def seam_cut_mask(geoms: np.ndarray, grid: TileGrid) -> np.ndarray:
    """(n,) bool: polygons whose boundary runs along a seam for at least SEAM_MIN_LENGTH_M.

    Outlines are first simplified by SEAM_SIMPLIFY_PX (Douglas-Peucker): a polygon
    vectorized from pixels has a staircase boundary whose steps lie on pixel edges, so
    any natural edge within a few degrees of the grid's axes that crosses a seam would
    otherwise have a step lying on it; a cut made by a tile edge is a straight run and
    survives the simplification."""
    if len(geoms) == 0:
        return np.zeros(0, dtype=bool)
    pixel = abs(grid.transform.a)
    zone = seam_lines(grid).buffer(SEAM_TOLERANCE_PX * pixel, cap_style="flat")
    outlines = shapely.boundary(shapely.simplify(geoms, SEAM_SIMPLIFY_PX * pixel))
    along = shapely.length(shapely.intersection(outlines, zone))
    return along >= SEAM_MIN_LENGTH_M


def seam_cut_count(gdf: gpd.GeoDataFrame, grid: TileGrid) -> int:
    """Polygons whose boundary runs along a seam for at least SEAM_MIN_LENGTH_M."""
    return int(seam_cut_mask(gdf.geometry.to_numpy(), grid).sum())


def seam_cuts_not_in_truth(gdf: gpd.GeoDataFrame, truth: gpd.GeoDataFrame, grid: TileGrid) -> int:
    """Predictions cut along a seam where no reference outline they overlap (by half of
    either's area) runs along a seam too: cuts the truth does not also have."""
    pred = gdf.geometry.to_numpy()
    cut = np.flatnonzero(seam_cut_mask(pred, grid))
    if len(cut) == 0:
        return 0
    ref = truth.geometry.to_numpy()
    ref_cut = seam_cut_mask(ref, grid)
    left, right = shapely.STRtree(ref).query(pred[cut], predicate="intersects")
    shared = shapely.area(shapely.intersection(pred[cut][left], ref[right]))
    same = (shared >= 0.5 * np.minimum(shapely.area(pred[cut][left]), shapely.area(ref[right]))) & ref_cut[right]
    explained = np.zeros(len(cut), dtype=bool)
    explained[left[same]] = True
    return int((~explained).sum())


def params_from(args: argparse.Namespace) -> Settings:
    values: dict[str, Any] = {"min_area_m2": AREA_RANGE_M2[0], "max_area_m2": AREA_RANGE_M2[1]}
    if args.config:
        preset = load_preset(args.config, "auto")
        values |= {k: v for k, v in preset.items() if k in PRESET_KEYS}
    for key in ("points_per_side", "pred_iou_thresh", "stability_score_thresh"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.no_skip_covered:
        values["skip_covered"] = False
    return make_settings(**values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML preset with an auto: section")
    parser.add_argument("--points-per-side", type=int, default=None)
    parser.add_argument("--pred-iou-thresh", type=float, default=None)
    parser.add_argument("--stability-score-thresh", type=float, default=None)
    parser.add_argument("--no-skip-covered", action="store_true", help="decode every grid point")
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/auto_banepa_work"))
    args = parser.parse_args()

    scene = write_crop()
    params = params_from(args)
    start = time.perf_counter()
    gdf = segment_auto(
        scene,
        settings=params,
        weights=str(WEIGHTS),
        tile_size_px=args.tile_size,
        overlap_px=args.overlap,
        work_dir=args.work_dir,
        workers=args.workers,
        progress=False,
    )
    wall = time.perf_counter() - start
    summary = gdf.attrs["summary"]
    truth = load_truth(scene)
    info = open_scene(scene)
    grid = TileGrid(info.height, info.width, info.transform, args.tile_size, args.overlap)
    per_tile = per_tile_frame(tile_results(args.work_dir), grid, info.crs, params)
    seconds, tiles = summary["seconds"], max(summary["tiles"]["processed"], 1)
    model_seconds = sum(seconds.get(k, 0.0) for k in ("read", "encode", "decode", "vectorize"))
    print(f"scene {scene} ({info.width} x {info.height} px), {len(grid)} tiles of {args.tile_size} px, "
          f"overlap {args.overlap}, {len(truth)} buildings touching it")
    print(f"settings {json.dumps(params.model_dump(mode='json'))}")
    for name, frame in (("stitched", gdf), ("per tile, no stitching", per_tile)):
        s = score(frame, truth)
        print(f"{name:<24} P {s['precision']:.3f}  R {s['recall']:.3f}  F1 {s['f1']:.3f}  "
              f"(TP {s['tp']}, {s['predictions']} predictions in 5..2000 m^2, mean IoU {s['mean_iou']:.3f}); "
              f"cut at seams: {seam_cut_count(in_area_range(frame), grid)}, of which the truth is not: "
              f"{seam_cuts_not_in_truth(in_area_range(frame), truth, grid)}")
    print(f"reference outlines running along a seam: {seam_cut_count(truth, grid)} of {len(truth)}")
    print(f"seconds per tile: {model_seconds / tiles:.1f} (encode {seconds['encode'] / tiles:.1f}, decode "
          f"{seconds['decode'] / tiles:.1f}, vectorize {seconds['vectorize'] / tiles:.1f}); stitch "
          f"{seconds.get('stitch', 0.0):.2f} s; wall {wall:.0f} s ({summary['tiles']['resumed']} tiles resumed)")
    print(json.dumps({"tiles": summary["tiles"], "objects": summary["objects"]}))


if __name__ == "__main__":
    main()
