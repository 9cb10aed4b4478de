"""A Banepa crop prompted from a national layer against the same crop prompted from its own features.

The national layer holds the crop's OSM buildings plus ``--features`` synthetic 10 m
buildings spread over Nepal (EPSG:4326, none touching the crop, rows in Hilbert order as
national exports are), written as GeoParquet with a ``bbox`` covering column (row
groups of 100,000) and as a GeoPackage with its R-tree. Each run is a fresh process
(``sam_geo.segment``, ``workers=0``, the real MobileSAM weights) that prints its wall
seconds and peak RSS (own features first and last, the national layers between); the script then checks that the national runs give the polygons
of the own-features run (matched by OSM id, identical coordinates).

    python benchmarks/national_prompts.py                      # 3,000,000 features
    python benchmarks/national_prompts.py --features 300000 --keep /tmp/national
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.windows import Window

from _common import BANEPA, WEIGHTS

CROP_PX = 1536
NEPAL = (80.1, 26.4, 88.2, 30.4)  # lon/lat box the synthetic buildings are spread over

CHILD = """
import json, sys, time
import sam_geo
def peak_rss_mib():  # VmHWM: ru_maxrss would keep the parent's peak across exec
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
start = time.perf_counter()
out = sam_geo.segment(sys.argv[1], sys.argv[2], output=sys.argv[3], weights=sys.argv[4], workers=0,
                      progress=False, return_frame=False)
print(json.dumps({"wall_s": time.perf_counter() - start,
                  "peak_rss_mib": peak_rss_mib(),
                  "summary": out.summary}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=3_000_000, help="synthetic features in the national layer")
    parser.add_argument("--keep", type=Path, default=None, help="build (or reuse) the layers in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        scene, own = crop_scene(folder)
        layers = national_layers(folder, own, args.features)
        order = [("own", folder / "own.gpkg"), *layers.items(), ("own again", folder / "own.gpkg")]
        runs = {name: run(scene, layer, folder / f"out-{name.replace(' ', '-')}.parquet") for name, layer in order}
        report(runs)


def crop_scene(folder: Path) -> tuple[Path, gpd.GeoDataFrame]:
    """The central CROP_PX x CROP_PX px of the Banepa mosaic and the OSM buildings in it."""
    path = folder / "banepa_crop.tif"
    with rasterio.open(BANEPA / "banepa_utm45n.tif") as src:
        window = Window((src.width - CROP_PX) // 2, (src.height - CROP_PX) // 2, CROP_PX, CROP_PX)
        profile = {**src.profile, "width": CROP_PX, "height": CROP_PX, "transform": src.window_transform(window),
                   "tiled": True, "blockxsize": 256, "blockysize": 256}
        if not path.exists():
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(src.read(window=window))
        bounds = rasterio.windows.bounds(window, src.transform)
        crs = src.crs
    buildings = gpd.read_file(BANEPA / "osm_buildings_4326.geojson")
    footprint = gpd.GeoSeries([shapely.box(*bounds)], crs=crs).to_crs(buildings.crs).iloc[0]
    own = buildings[buildings.intersects(footprint)].reset_index(drop=True)
    if not (folder / "own.gpkg").exists():
        own.to_file(folder / "own.gpkg")
    return path, own


def national_layers(folder: Path, own: gpd.GeoDataFrame, n: int) -> dict[str, Path]:
    """The national layer as GeoParquet (covering bbox) and GeoPackage, built once per folder."""
    paths = {"parquet": folder / f"national-{n}.parquet", "gpkg": folder / f"national-{n}.gpkg"}
    if all(p.exists() for p in paths.values()):
        return paths
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    lon, lat = rng.uniform(NEPAL[0], NEPAL[2], n), rng.uniform(NEPAL[1], NEPAL[3], n)
    side = 10 / 111_000  # about 10 m
    synthetic = shapely.box(lon, lat, lon + side, lat + side)
    away = ~shapely.intersects(synthetic, shapely.box(*own.total_bounds).buffer(0.01))
    layer = gpd.GeoDataFrame(
        {"osm_id": np.concatenate([own["osm_id"].astype("int64").to_numpy(), np.full(int(away.sum()), -1)]),
         "source": ["osm"] * len(own) + ["synthetic"] * int(away.sum())},
        geometry=np.concatenate([own.geometry.to_numpy(), synthetic[away]]), crs=own.crs)
    layer = layer.iloc[layer.geometry.hilbert_distance().argsort(kind="stable")].reset_index(drop=True)
    layer.to_parquet(paths["parquet"], write_covering_bbox=True, row_group_size=100_000)
    layer.to_file(paths["gpkg"], engine="pyogrio")
    print(f"built the national layer: {len(layer):,} features in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return paths


def run(scene: Path, layer: Path, output: Path) -> dict:
    output.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-c", CHILD, str(scene), str(layer), str(output), str(WEIGHTS)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["output"] = output
    return result


def report(runs: dict[str, dict]) -> None:
    """One line per run; time and memory against the mean of the two own-feature runs
    (first and last, so cache warm-up favours neither)."""
    own = gpd.read_parquet(runs["own"]["output"]).set_index("osm_id").sort_index()
    base = {key: (runs["own"][key] + runs["own again"][key]) / 2 for key in ("wall_s", "peak_rss_mib")}
    for name, result in runs.items():
        out = gpd.read_parquet(result["output"]).set_index("osm_id").sort_index()
        same = out.index.equals(own.index) and all(a.equals_exact(b, 0) for a, b in zip(out.geometry, own.geometry))
        prompts = result["summary"]["prompts"]
        print(json.dumps({
            "layer": name,
            "layer_features": prompts.get("layer_features"),
            "prompts_read": prompts["total"],
            "polygons": len(out),
            "same_polygons_as_own": bool(same),
            "wall_s": round(result["wall_s"], 1),
            "time_ratio": round(result["wall_s"] / base["wall_s"], 3),
            "peak_rss_mib": round(result["peak_rss_mib"]),
            "peak_rss_more_mib": round(result["peak_rss_mib"] - base["peak_rss_mib"]),
        }))


if __name__ == "__main__":
    main()
