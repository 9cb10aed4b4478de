"""Outline quality on the shared data: every row of issue 19's table from one command.

Rows (IoU matching at 0.5, SpaceNet style; OSM outlines; labels only where labelled):

* ``banepa-box``: whole Banepa scene, one box per OSM building (prompts in EPSG:4326);
  per-building IoU (a building with no output counts as 0);
* ``banepa-point``: the same, one point per building (its representative point), no
  outline to help;
* ``inria-box``: the Inria Austin tile, one box per building of the reference mask
  (connected components of 200 px or more, 3 m inside the tile);
* ``banepa-auto``: automatic mode over the central 2048 px of Banepa with
  ``configs/buildings.yaml``, F1 of buildings 5-2000 m^2;
* ``inria-auto``: automatic mode on the Inria tile with ``configs/buildings.yaml``,
  against the mask's polygons, F1 of 5-2000 m^2;
* ``fields-auto``: automatic mode on the Sentinel-2 scene with ``configs/fields.yaml``,
  F1 inside the 11 label boxes that lie in the scene (about 11 minutes on 2 cores).

Other sensors (stand-ins made from the shared data, written to a temporary folder):

* ``pan-box``: ``banepa-box`` on a panchromatic uint16 stand-in of Banepa (one band,
  ``0.299 R + 0.587 G + 0.114 B`` scaled to 11-bit counts, ``6 L + 150``; nodata 0);
* ``fields-box``: the Sentinel-2 scene (uint8, EPSG:32631), one box per labelled field
  polygon that lies in the scene;
* ``fields-int16-box``: the same on an int16 stand-in in EPSG:4326 (surface
  reflectance-like values ``40 DN - 500``, negative where dark, nodata -9999 on a
  band along the western edge; reprojected with nearest neighbour).

Each row prints its figures, the per-object IoU quantiles (prompted rows) and its wall
seconds. All runs use the defaults (plus the named preset) and one Ray worker;
``--config PRESET`` runs the prompted rows with that preset's ``segment`` section
(e.g. a file holding ``segment: {flip_views: 4}`` to measure mirrored views).

    python benchmarks/quality.py [--rows banepa-box,banepa-point,inria-box,banepa-auto,inria-auto,fields-auto]
                                 [--config PRESET.yaml]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.features
import shapely

from _common import BANEPA, FIELDS, SHARED, WEIGHTS, per_object_iou
from auto_banepa import AREA_RANGE_M2, load_truth, write_crop
from auto_fields import labelled_boxes_in_scene
from sam_geo import segment, segment_auto
from sam_geo.evaluate import evaluate
from sam_geo.geo.vectorize import geometry_area_m2
from sam_geo.io.scenes import open_scene
from sam_geo.settings import load_preset

INRIA = SHARED / "data" / "inria"
REPO = Path(__file__).resolve().parents[1]
PROMPTED_ROWS = ("banepa-box", "banepa-point", "inria-box", "pan-box", "fields-box", "fields-int16-box")
AUTO_ROWS = ("banepa-auto", "inria-auto", "fields-auto")
DEFAULT_ROWS = ("banepa-box", "banepa-point", "inria-box", "banepa-auto", "inria-auto")


def inria_buildings(min_pixels: int = 200) -> gpd.GeoDataFrame:
    """Connected components of the Inria building mask (EPSG:26914) with at least
    ``min_pixels`` pixels, 3 m or more inside the tile; ``bid`` 0..n-1."""
    with rasterio.open(INRIA / "austin_buildings_mask.tif") as src:
        mask = src.read(1) > 0
        shapes = rasterio.features.shapes(mask.astype(np.uint8), mask=mask, transform=src.transform)
        frame = gpd.GeoDataFrame(geometry=[shapely.geometry.shape(g) for g, _ in shapes], crs=src.crs)
        pixel_area = abs(src.transform.a * src.transform.e)
    frame = frame[frame.area >= min_pixels * pixel_area]
    frame = frame[frame.within(open_scene(INRIA / "austin_aerial.tif").footprint.buffer(-3))]
    return frame.reset_index(drop=True).assign(bid=lambda f: np.arange(len(f)))


def prompted_inputs(row: str, tmp: Path) -> tuple[gpd.GeoDataFrame, str, Path, gpd.GeoDataFrame]:
    """Truth, its key column, the scene and the prompt layer of a prompted row."""
    if row == "inria-box":
        truth = inria_buildings()
        return truth, "bid", INRIA / "austin_aerial.tif", truth.to_crs(4326)
    if row.startswith("fields"):
        scene = FIELDS / "befl_s2_nir_r_g.tif"
        truth = labelled_fields(scene)
        if row == "fields-int16-box":
            scene = write_int16_geographic(scene, tmp / "fields_int16_4326.tif")
        return truth, "fid", scene, truth
    truth, scene = gpd.read_file(BANEPA / "buildings_utm45n.geojson"), BANEPA / "banepa_utm45n.tif"
    prompts = gpd.read_file(BANEPA / "osm_buildings_4326.geojson")
    if row == "banepa-point":
        prompts = prompts.set_geometry(prompts.geometry.to_crs(32645).representative_point().to_crs(4326))
    if row == "pan-box":
        scene = write_panchromatic(scene, tmp / "banepa_pan_uint16.tif")
    return truth, "osm_id", scene, prompts


def labelled_fields(scene: Path) -> gpd.GeoDataFrame:
    """The labelled field polygons lying in the scene (3 m inside its footprint), ``fid`` 0..n-1."""
    fields = gpd.read_file(FIELDS / "fields_polygons.gpkg", layer="polygons")
    footprint = open_scene(scene).footprint.buffer(-3)
    fields = fields[fields.geometry.notna() & fields.within(footprint)]
    return fields.reset_index(drop=True).assign(fid=lambda f: np.arange(len(f)))[["fid", "geometry"]]


def write_panchromatic(rgb: Path, out: Path) -> Path:
    """A one-band uint16 panchromatic stand-in of an RGB uint8 scene (nodata 0 kept)."""
    with rasterio.open(rgb) as src:
        image = src.read().astype(np.float32)
        profile = src.profile | {"count": 1, "dtype": "uint16", "nodata": 0}
    valid = image.any(axis=0)
    luminance = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    pan = np.where(valid, 6.0 * luminance + 150.0, 0).astype(np.uint16)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(pan, 1)
    return out


def write_int16_geographic(scene: Path, out: Path) -> Path:
    """An int16 stand-in in EPSG:4326: ``40 DN - 500``, nodata -9999 on the western 5 %."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    with rasterio.open(scene) as src:
        values = src.read().astype(np.int32) * 40 - 500
        values[:, :, : src.width // 20] = -9999
        transform, width, height = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height,
                                                               *src.bounds)
        profile = src.profile | {"dtype": "int16", "nodata": -9999, "crs": "EPSG:4326", "transform": transform,
                                 "width": width, "height": height}
        dest = np.full((src.count, height, width), -9999, dtype=np.int16)
        reproject(values.astype(np.int16), dest, src_transform=src.transform, src_crs=src.crs, src_nodata=-9999,
                  dst_transform=transform, dst_crs="EPSG:4326", dst_nodata=-9999, resampling=Resampling.nearest)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(dest)
    return out


def prompted_row(row: str, settings: dict[str, Any]) -> None:
    """Segment from prompts (with ``settings`` on top of the defaults) and print the
    per-object IoU figures."""
    with tempfile.TemporaryDirectory() as tmp:
        truth, key, scene, prompts = prompted_inputs(row, Path(tmp))
        run_prompted(row, truth, key, scene, prompts, settings)


def run_prompted(
    row: str, truth: gpd.GeoDataFrame, key: str, scene: Path, prompts: gpd.GeoDataFrame, settings: dict[str, Any]
) -> None:
    """Segment ``prompts`` on ``scene`` and print per-object IoU against ``truth``."""
    start = time.perf_counter()
    gdf = segment(scene, prompts, id_column=key, weights=str(WEIGHTS), **{**settings, "workers": 1, "progress": False})
    wall = time.perf_counter() - start
    ious = per_object_iou(gdf, truth, key)
    quantiles = ", ".join(f"{q:.2f}" for q in np.quantile(ious, [0.1, 0.25, 0.5, 0.75, 0.9]))
    print(f"{row}: {len(truth)} objects, median IoU {np.median(ious):.4f}, share >= 0.5 {(ious >= 0.5).mean():.4f}, "
          f"share >= 0.75 {(ious >= 0.75).mean():.4f}; IoU deciles 10/25/50/75/90 %: {quantiles}; wall {wall:.1f} s",
          flush=True)


def auto_row(row: str) -> None:
    """Segment automatically with the row's preset and print F1 at IoU 0.5."""
    preset = "fields" if row == "fields-auto" else "buildings"
    settings = load_preset(REPO / "configs" / f"{preset}.yaml", "auto")
    aoi = None
    if row == "banepa-auto":
        scene = write_crop()
        truth = load_truth(scene)
    elif row == "inria-auto":
        scene, truth = INRIA / "austin_aerial.tif", inria_buildings(min_pixels=1)
    else:
        scene = FIELDS / "befl_s2_nir_r_g.tif"
        truth = FIELDS / "fields_polygons.gpkg"
        aoi = labelled_boxes_in_scene(scene)
    start = time.perf_counter()
    pred = segment_auto(scene, weights=str(WEIGHTS), **{**settings, "workers": 1, "progress": False})
    wall = time.perf_counter() - start
    if row != "fields-auto":
        area = geometry_area_m2(pred.geometry, pred.crs) if len(pred) else np.zeros(0)
        pred = pred[(area >= AREA_RANGE_M2[0]) & (area <= AREA_RANGE_M2[1])]
    result = evaluate(pred, truth, iou=0.5, aoi=aoi)
    print(f"{row}: F1 {result.f1:.3f} (P {result.precision:.3f}, R {result.recall:.3f}; {result.tp} matched of "
          f"{result.n_gt} objects, {result.n_pred} predictions, matched IoU {result.mean_matched_iou:.3f}); "
          f"wall {wall:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows (see above)")
    parser.add_argument("--config", type=Path, help="a preset whose segment section the prompted rows use")
    args = parser.parse_args()
    prompted_settings = load_preset(args.config, "segment") if args.config else {}
    for row in args.rows.split(","):
        if row in PROMPTED_ROWS:
            prompted_row(row, prompted_settings)
        elif row in AUTO_ROWS:
            auto_row(row)
        else:
            parser.error(f"unknown row {row!r}; rows: {', '.join(PROMPTED_ROWS + AUTO_ROWS)}")


if __name__ == "__main__":
    main()
