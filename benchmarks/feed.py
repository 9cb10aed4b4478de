"""How busy the runtime keeps a fast model: the real pipeline with a stand-in model.

The stand-in (:mod:`sam_geo.run.standin`) sleeps ``--standin-ms`` per encoder call and
uses no CPU, like an accelerator; everything else is the real run (Ray stages, reading,
tracing, writing). Prints the run summary's ``workers`` (``model_busy_share``: seconds
in model calls over the actor's wall seconds since its first tile), ``rates``
(``tiles_per_s``, ``cpu_ms_per_tile``) and the driver's memory.

    python benchmarks/feed.py                          # Banepa, 1,466 OSM boxes, 100 ms per tile
    python benchmarks/feed.py --tile-size 512          # same scene, ~4x the tiles
    python benchmarks/feed.py --synthetic 40 --standin-ms 5   # 40 x 40 tiles of 256 px, one box each

``--synthetic N`` writes an N x N-tile scene (256 px tiles, 32 px overlap) with one
bright square per tile and a box layer over them into a temporary folder: many tiles,
few objects, to show the driver's memory does not grow with the number of tiles
(``driver_rss_growth_mib``: peak RSS during the run minus RSS before it). Polygons go
to ``--output`` as tiles finish and no frame is kept (``return_frame=False``, what the
CLI does) unless ``--keep-frame``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.transform import from_origin

from _common import BANEPA, WEIGHTS
from sam_geo.run.standin import ENV_STANDIN_MS

SYNTHETIC_TILE = 256
SYNTHETIC_OVERLAP = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--standin-ms", type=float, default=100.0, help="stand-in model time per encoder call, ms")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tile-size", type=int, default=None, help="tile size, px (Banepa only)")
    parser.add_argument("--synthetic", type=int, default=None, metavar="N", help="an N x N-tile synthetic scene")
    parser.add_argument("--output", default="out.gpkg", help="output name in the temporary folder (.gpkg, "
                        ".geojson, .parquet, or a folder name for a partitioned dataset)")
    parser.add_argument("--keep-frame", action="store_true", help="also return the whole frame (the API default)")
    args = parser.parse_args()
    os.environ[ENV_STANDIN_MS] = str(args.standin_ms)
    from sam_geo import segment  # after the variable is set

    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            scene, prompts = synthetic_scene(Path(tmp), args.synthetic)
            tiling = {"tile_size_px": SYNTHETIC_TILE, "overlap_px": SYNTHETIC_OVERLAP}
        else:
            scene, prompts = BANEPA / "banepa_utm45n.tif", gpd.read_file(BANEPA / "osm_buildings_4326.geojson")
            tiling = {"tile_size_px": args.tile_size} if args.tile_size else {}
        rss_before = _rss_mib()
        start = time.perf_counter()
        result = segment(scene, prompts, weights=str(WEIGHTS), workers=args.workers, progress=False,
                         output=Path(tmp) / args.output, return_frame=args.keep_frame, **tiling)
        wall = time.perf_counter() - start
    summary = result.attrs["summary"] if args.keep_frame else result.summary
    print(json.dumps({
        "standin_ms": args.standin_ms,
        "output": args.output,
        "keep_frame": args.keep_frame,
        "tiles": summary["tiles"]["processed"],
        "polygons": summary["features"],
        "wall_s": round(wall, 1),
        "driver_rss_before_mib": round(rss_before),
        "driver_rss_growth_mib": round(_peak_rss_mib() - rss_before),
        "workers": summary["workers"],
        "rates": summary["rates"],
        "seconds": summary["seconds"],
    }, indent=1))


def synthetic_scene(folder: Path, n: int) -> tuple[Path, gpd.GeoDataFrame]:
    """An ``n`` x ``n``-tile uint8 RGB scene (EPSG:32631, 0.5 m/px) with one 40 px bright
    square per tile, and the squares' boxes (grown by 4 px) as a prompt layer."""
    step = SYNTHETIC_TILE - SYNTHETIC_OVERLAP
    size = step * n + SYNTHETIC_OVERLAP
    transform = from_origin(500_000.0, 5_000_000.0, 0.5, 0.5)
    path = folder / "synthetic.tif"
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "crs": "EPSG:32631",
               "transform": transform, "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    boxes = []
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(n):
            band = np.full((3, step, size), 60, dtype=np.uint8)
            for col in range(n):
                r0, c0 = 100, col * step + 100
                band[:, r0 : r0 + 40, c0 : c0 + 40] = 220
                x0, y0 = transform * (c0 - 4, row * step + r0 - 4)
                x1, y1 = transform * (c0 + 44, row * step + r0 + 44)
                boxes.append(shapely.box(x0, y1, x1, y0))
            height = min(step, size - row * step)
            dst.write(band[:, :height], window=rasterio.windows.Window(0, row * step, size, height))
    return path, gpd.GeoDataFrame({"id": np.arange(len(boxes))}, geometry=boxes, crs="EPSG:32631")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if sys.platform != "darwin" else 0.0


if __name__ == "__main__":
    main()
