"""`sam-geo auto` against the official SamAutomaticMaskGenerator on one 1024 px tile.

Side by side in one run, on the same 1024 x 1024 px window of the Banepa mosaic (by
default the top-left tile of the central 2048 px crop: columns 541.., rows 1038..),
with the same MobileSAM weights, both scored against the ``buildings_utm45n.geojson``
outlines touching the window (one-to-one matching at IoU >= 0.5, predictions of
5-2000 m^2, :func:`sam_geo.evaluate.evaluate`):

* **official**: segment-anything's ``SamAutomaticMaskGenerator`` with its defaults
  (32 x 32 points, predicted IoU 0.88, stability 0.95, box NMS 0.7, 64 points per
  batch) on the window's RGB array, in this process, fp32; its masks are vectorized
  with ``rasterio.features.shapes`` on the window's affine. Timed from the generator's
  construction to its last mask (model build and weights load excluded, which favours
  it);
* **sam-geo**: the ``sam-geo auto`` console script on the window as a GeoTIFF, in a
  subprocess, timed by wall clock *including* start-up (interpreter, imports, Ray,
  model load), once with SAM's default filters and once with
  ``configs/buildings.yaml``.

    python benchmarks/auto_vs_official.py [--window 541,1038,1024,1024] [--skip-official]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.features
import shapely
import torch

from _bench import crop_scene, parse_window
from _common import BANEPA, WEIGHTS
from sam_geo.evaluate import evaluate
from sam_geo.model.registry import build_sam
from sam_geo.io.scenes import open_scene
from sam_geo.geo.vectorize import geometry_area_m2

REPO = Path(__file__).resolve().parents[1]
AREA_RANGE_M2 = (5.0, 2000.0)


def truth_in(scene: Path) -> gpd.GeoDataFrame:
    footprint = open_scene(scene).footprint
    truth = gpd.read_file(BANEPA / "buildings_utm45n.geojson")
    return truth[truth.intersects(footprint)].reset_index(drop=True)


def score(pred: gpd.GeoDataFrame, truth: gpd.GeoDataFrame) -> dict[str, float]:
    area = geometry_area_m2(pred.geometry, pred.crs) if len(pred) else np.zeros(0)
    pred = pred[(area >= AREA_RANGE_M2[0]) & (area <= AREA_RANGE_M2[1])]
    result = evaluate(pred, truth, iou=0.5)
    return {"precision": round(result.precision, 3), "recall": round(result.recall, 3), "f1": round(result.f1, 3),
            "predictions": result.n_pred, "buildings": result.n_gt}


def run_official(scene: Path) -> tuple[gpd.GeoDataFrame, float]:
    from segment_anything import SamAutomaticMaskGenerator

    torch.set_num_threads(os.cpu_count() or 1)
    model = build_sam("mobile_sam", WEIGHTS)
    with rasterio.open(scene) as src:
        rgb = np.moveaxis(src.read([1, 2, 3]), 0, -1)
        transform, crs = src.transform, src.crs
    start = time.perf_counter()
    generator = SamAutomaticMaskGenerator(model)  # segment-anything's defaults
    with torch.inference_mode():
        masks = generator.generate(rgb)
    seconds = time.perf_counter() - start
    geoms = []
    for record in masks:
        mask = record["segmentation"].astype(np.uint8)
        parts = [shapely.geometry.shape(g) for g, v in rasterio.features.shapes(mask, mask=mask > 0, transform=transform)]
        geoms.append(shapely.make_valid(shapely.union_all(parts)))
    return gpd.GeoDataFrame(geometry=gpd.GeoSeries(geoms, crs=crs), crs=crs), seconds


def run_sam_geo(scene: Path, out: Path, extra: list[str]) -> tuple[gpd.GeoDataFrame, float, dict]:
    summary = out.with_suffix(".json")
    cmd = [str(Path(sys.executable).with_name("sam-geo")), "auto", str(scene), "-o", str(out), "--weights",
           str(WEIGHTS), "--no-progress", "--summary", str(summary), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"sam-geo auto failed:\n{done.stderr}")
    return gpd.read_file(out), seconds, json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", default="541,1038,1024,1024", help="col,row,width,height in scene pixels")
    parser.add_argument("--skip-official", action="store_true", help="only run sam-geo (the official takes minutes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scene = crop_scene(BANEPA / "banepa_utm45n.tif", parse_window(args.window), folder)
        truth = truth_in(scene)
        print(f"window {args.window} of banepa_utm45n.tif, {len(truth)} buildings touching it; "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}")
        rows = []
        for label, extra in (("sam-geo auto (SAM's filters)", []),
                             ("sam-geo auto --config configs/buildings.yaml",
                              ["--config", str(REPO / "configs" / "buildings.yaml")])):
            gdf, seconds, summary = run_sam_geo(scene, folder / f"auto{len(rows)}.gpkg", extra)
            s = summary["seconds"]
            rows.append((label, seconds, score(gdf, truth),
                         f"startup {s['startup']:.1f} s, encode {s['encode']:.1f} s, decode {s['decode']:.1f} s, "
                         f"{summary['prompts']['used']} points decoded, precision {summary['model'].get('precision')}"))
        if not args.skip_official:
            gdf, seconds = run_official(scene)
            rows.append(("official SamAutomaticMaskGenerator", seconds, score(gdf, truth), "fp32, 1024 points"))
        official = rows[-1][1] if not args.skip_official else None
        for label, seconds, s, note in rows:
            ratio = f"  {seconds / official:.3f} of official" if official else ""
            print(f"{label:<46} {seconds:7.1f} s{ratio}  P {s['precision']:.3f} R {s['recall']:.3f} "
                  f"F1 {s['f1']:.3f} ({s['predictions']} predictions)  [{note}]")


if __name__ == "__main__":
    main()
