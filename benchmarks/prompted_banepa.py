"""Prompted segmentation of the whole Banepa scene from the OSM outlines (EPSG:4326).

Prints per-building IoU figures against ``buildings_utm45n.geojson`` (a building with no
output counts as 0) and the run summary's stage seconds.

    python benchmarks/prompted_banepa.py [--prompt-as box|box+point|point] [--workers N] [--precision bf16] [--decoder-context 256] [--output out.gpkg]

Also prints the same figures, plus SpaceNet-style F1 (``sam_geo.evaluate``), for the
outlines after ``regularize_buildings`` at 0.5 and 1.0 m tolerance, so ``--regularize``
can be judged on the same SAM output.
"""

from __future__ import annotations

import argparse
import json
import time

import geopandas as gpd
import numpy as np

from _common import BANEPA, WEIGHTS, per_object_iou
from sam_geo import segment
from sam_geo.evaluate import evaluate
from sam_geo.geo.regularize import regularize_buildings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt-as", default="auto")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--decoder-context", type=int, default=None,
                        help="CPU decoder context, model pixels (default: the whole tile, exact)")
    parser.add_argument("--output", default=None, help="also write the polygons here (.gpkg, .geojson, .parquet)")
    args = parser.parse_args()
    prompts = gpd.read_file(BANEPA / "osm_buildings_4326.geojson")
    if args.prompt_as == "point":
        prompts = prompts.set_geometry(prompts.geometry.to_crs(32645).representative_point().to_crs(4326))
    start = time.perf_counter()
    gdf = segment(
        BANEPA / "banepa_utm45n.tif",
        prompts,
        prompt_as="auto" if args.prompt_as == "point" else args.prompt_as,
        id_column="osm_id",
        weights=str(WEIGHTS),
        precision=args.precision,
        decoder_context_px=args.decoder_context,
        workers=args.workers,
        progress=False,
        output=args.output,
        overwrite=args.output is not None,
    )
    wall = time.perf_counter() - start
    truth = gpd.read_file(BANEPA / "buildings_utm45n.geojson")
    ious = per_object_iou(gdf, truth, "osm_id")
    summary = gdf.attrs["summary"]
    print(f"prompt_as={args.prompt_as} workers={args.workers} precision={args.precision} decoder_context={args.decoder_context} buildings={len(truth)}")
    print(f"median IoU {np.median(ious):.4f}  mean {ious.mean():.4f}  share>=0.5 {(ious >= 0.5).mean():.4f}"
          f"  share>=0.75 {(ious >= 0.75).mean():.4f}")
    print(f"wall {wall:.1f} s; per prompt {1000 * summary['seconds']['decode'] / summary['prompts']['used']:.1f} ms decode")
    print(json.dumps({k: summary[k] for k in ("tiles", "seconds", "rates", "workers") if k in summary}))
    print(json.dumps({k: v for k, v in summary["prompts"].items() if not k.endswith("_ids")}))
    report("raw", gdf, truth)
    for tolerance in (0.5, 1.0):
        start = time.perf_counter()
        regular = regularize_buildings(gdf, tolerance_m=tolerance)
        report(f"regularized {tolerance} m ({time.perf_counter() - start:.1f} s)", regular, truth)


def report(label: str, gdf: gpd.GeoDataFrame, truth: gpd.GeoDataFrame) -> None:
    ious = per_object_iou(gdf, truth, "osm_id")
    scores = evaluate(gdf, truth)
    print(f"{label}: median IoU {np.median(ious):.4f}  share>=0.5 {(ious >= 0.5).mean():.4f}  "
          f"F1 {scores.f1:.4f} (P {scores.precision:.4f}, R {scores.recall:.4f})")


if __name__ == "__main__":
    main()
