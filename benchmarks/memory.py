"""Peak memory of prompted segmentation: does it grow with the scene's size?

Writes synthetic tiled GeoTIFFs (uint8 RGB, 512 px blocks, deflate, ``sparse_ok``:
only the blocks around the prompts are written, the rest stays unallocated and reads
as nodata, so a 50,000 x 50,000 px scene is a few MB on disk) with a mosaic texture and
one flat "roof" rectangle (plus its shadow) per prompt location, the prompts (the
rectangles' outlines as polygons, i.e. box prompts) spread over the scene on a jittered
grid. Each scene is segmented with ``workers=1`` and default tiling in a fresh Python
process (so ``getrusage`` peaks belong to that run), while a thread polls the RSS of the
driver and of every process descended from it: the Ray model actor (``SamActor``) and
the rest of Ray (raylet, GCS, idle workers). Per scene it prints the driver's peak RSS
(``getrusage`` and polled), its RSS before ``segment`` (imports), the actor's peak RSS
(polled RSS and the kernel's VmHWM) and Ray's other processes.

    python benchmarks/memory.py                                # 50,000^2 and 5,000^2, 300 prompts
    python benchmarks/memory.py --prompts 200 --sizes 50000,5000 --keep /tmp/memscenes
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCK = 512
CRS = "EPSG:32645"
PIXEL_M = 0.3


# --- synthetic scene -------------------------------------------------------------------


def prompt_boxes(size: int, n: int, seed: int = 0) -> np.ndarray:
    """(n, 4) boxes ``col0, row0, col1, row1`` (pixels) on a jittered grid over the scene."""
    rng = np.random.default_rng(seed)
    k = math.ceil(math.sqrt(n))
    cell = size / k
    cells = np.sort(rng.choice(k * k, size=n, replace=False))
    ci, cj = cells // k, cells % k
    cy = (ci + 0.5 + rng.uniform(-0.25, 0.25, n)) * cell
    cx = (cj + 0.5 + rng.uniform(-0.25, 0.25, n)) * cell
    largest = max(24.0, min(120.0, 0.4 * cell))
    w, h = rng.uniform(min(48.0, largest), largest, n), rng.uniform(min(48.0, largest), largest, n)
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return np.clip(np.round(boxes), 0, size)


def texture(r0: int, c0: int, rows: int, cols: int) -> np.ndarray:
    """(3, rows, cols) uint8 "fields" at global pixel offsets: a mosaic of 16 px cells,
    each a colour hashed from its global cell index (textured for SAM, but rows repeat,
    so deflate packs a block into a few KB)."""
    ci = (np.arange(r0, r0 + rows) // 16)[:, None].astype(np.uint64)
    cj = (np.arange(c0, c0 + cols) // 16)[None, :].astype(np.uint64)
    h = (ci * np.uint64(73856093)) ^ (cj * np.uint64(19349663))
    h = (h * np.uint64(2654435761)) % np.uint64(2**32)
    level = (70 + (h >> np.uint64(8)) % np.uint64(90)).astype(np.int16)
    tint = ((h >> np.uint64(20)) % np.uint64(24)).astype(np.int16)
    bands = [level + 10, level + tint - 8, level - 20 + tint // 2]
    return np.clip(np.stack(bands), 20, 235).astype(np.uint8)


ROOFS = np.array([[205, 85, 60], [225, 225, 215], [90, 110, 140], [170, 160, 150]], dtype=np.uint8)


def make_scene(folder: Path, size: int, n_prompts: int, context: int, seed: int = 0) -> tuple[Path, Path, dict]:
    """Write ``scene_<size>.tif`` and ``prompts_<size>.gpkg`` into ``folder``."""
    import geopandas as gpd
    import rasterio
    import shapely
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    tif, gpkg = folder / f"scene_{size}.tif", folder / f"prompts_{size}.gpkg"
    boxes = prompt_boxes(size, n_prompts, seed)
    roofs = ROOFS[np.arange(n_prompts) % len(ROOFS)]
    transform = from_origin(300_000.0, 3_100_000.0, PIXEL_M, PIXEL_M)
    blocks: set[tuple[int, int]] = set()
    for c0, r0, c1, r1 in boxes:
        rows = range(max(0, int(r0) - context) // BLOCK, min(size - 1, int(r1) + context) // BLOCK + 1)
        cols = range(max(0, int(c0) - context) // BLOCK, min(size - 1, int(c1) + context) // BLOCK + 1)
        blocks.update((i, j) for i in rows for j in cols)
    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "crs": CRS,
        "transform": transform, "nodata": 0, "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK,
        "compress": "deflate", "predictor": 2, "interleave": "pixel", "sparse_ok": True,
    }
    with rasterio.open(tif, "w", **profile) as dst:
        for i, j in sorted(blocks):
            r0, c0 = i * BLOCK, j * BLOCK
            rows, cols = min(BLOCK, size - r0), min(BLOCK, size - c0)
            data = texture(r0, c0, rows, cols)
            hit = (boxes[:, 0] < c0 + cols + 8) & (boxes[:, 2] + 8 > c0) & (boxes[:, 1] < r0 + rows + 8) & (boxes[:, 3] + 8 > r0)
            for k in np.flatnonzero(hit):
                bc0, br0, bc1, br1 = boxes[k].astype(int)
                # shadow: 6 px to the lower right, then the roof over it
                sr0, sr1 = max(br0 + 6 - r0, 0), min(br1 + 6 - r0, rows)
                sc0, sc1 = max(bc0 + 6 - c0, 0), min(bc1 + 6 - c0, cols)
                if sr0 < sr1 and sc0 < sc1:
                    data[:, sr0:sr1, sc0:sc1] = 35
                rr0, rr1 = max(br0 - r0, 0), min(br1 - r0, rows)
                rc0, rc1 = max(bc0 - c0, 0), min(bc1 - c0, cols)
                if rr0 < rr1 and rc0 < rc1:
                    data[:, rr0:rr1, rc0:rc1] = roofs[k][:, None, None]
            dst.write(data, window=Window(c0, r0, cols, rows))
    xs0, ys0 = transform * (boxes[:, 0], boxes[:, 1])
    xs1, ys1 = transform * (boxes[:, 2], boxes[:, 3])
    polygons = shapely.box(xs0, ys1, xs1, ys0)
    gpd.GeoDataFrame({"site": np.arange(n_prompts)}, geometry=polygons, crs=CRS).to_file(gpkg, engine="pyogrio")
    meta = {"size": size, "prompts": n_prompts, "blocks_written": len(blocks),
            "blocks_total": math.ceil(size / BLOCK) ** 2, "file_mib": tif.stat().st_size / 2**20}
    return tif, gpkg, meta


# --- one measured run (child process) ---------------------------------------------------


def child(tif: str, gpkg: str, workers: int, interval: float) -> None:
    import psutil

    from _bench import MemoryMonitor
    from _common import WEIGHTS
    from sam_geo import segment

    baseline = psutil.Process().memory_info().rss / 2**20
    start = time.perf_counter()
    with MemoryMonitor(interval) as monitor:
        gdf = segment(tif, gpkg, weights=str(WEIGHTS), workers=workers, progress=False)
    wall = time.perf_counter() - start
    summary = gdf.attrs["summary"]
    out = monitor.report() | {
        "driver_rss_mib_before_segment": baseline,
        "wall_s": wall,
        "startup_s": summary["seconds"]["startup"],
        "tiles_encoded": summary["tiles"]["processed"],
        "tiles_planned": summary["tiles"]["planned"],
        "prompts_used": summary["prompts"]["used"],
        "features": summary["features"],
        "zoom": summary["settings"]["zoom"],
        "tile_size": summary["settings"]["tile_size_px"],
    }
    print("memory.child " + json.dumps(out), flush=True)


# --- driver ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50000,5000", help="scene sides in pixels, comma separated")
    parser.add_argument("--prompts", type=int, default=300, help="box prompts per scene (one per location)")
    parser.add_argument("--context", type=int, default=256,
                        help="blocks within this many pixels of a prompt box are written (others stay sparse)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.1, help="RSS polling interval, seconds")
    parser.add_argument("--keep", default=None, help="write (and reuse) the synthetic scenes here, not in a temp dir")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per segmentation run")
    parser.add_argument("--child", nargs=2, metavar=("TIF", "GPKG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, workers=args.workers, interval=args.interval)
        return

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="sam-geo-memory-")
    folder = Path(args.keep or tmp.name)  # type: ignore[union-attr]
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            start = time.perf_counter()
            tif, gpkg, meta = make_scene(folder, size, args.prompts, args.context)
            print(f"{size} x {size} px: {meta['file_mib']:.1f} MiB on disk, {meta['blocks_written']} of "
                  f"{meta['blocks_total']} blocks written, {args.prompts} prompts "
                  f"({time.perf_counter() - start:.1f} s to write)", flush=True)
            command = [sys.executable, str(Path(__file__).resolve()), "--child", str(tif), str(gpkg),
                       "--workers", str(args.workers), "--interval", str(args.interval)]
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                  cwd=Path(__file__).resolve().parent)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("memory.child ")), None)
            if proc.returncode or line is None:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                raise SystemExit(f"run on {size} x {size} failed (exit {proc.returncode})")
            result = meta | json.loads(line.split(" ", 1)[1])
            rows.append(result)
            print(format_result(result), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if len(rows) > 1:
        print("\nsize        tiles  prompts  wall s  driver peak MiB  actor peak MiB  ray other MiB")
        for r in rows:
            actor = max(r["actor_peak_rss_mib"].values(), default=float("nan"))
            print(f"{r['size']:>6}^2  {r['tiles_encoded']:>6}  {r['prompts_used']:>7}  {r['wall_s']:>6.0f}  "
                  f"{r['driver_peak_rss_mib_getrusage']:>15.0f}  {actor:>14.0f}  {r['ray_other_peak_rss_mib_sum']:>13.0f}")
    for r in rows:
        print("memory.result " + json.dumps(r))


def format_result(r: dict) -> str:
    actors = ", ".join(f"{v:.0f}" for v in r["actor_peak_rss_mib"].values()) or "none seen"
    return (
        f"  tiles encoded {r['tiles_encoded']} (planned {r['tiles_planned']}, tile {r['tile_size']} px, zoom "
        f"{r['zoom']}), prompts used {r['prompts_used']}, features {r['features']}; wall {r['wall_s']:.1f} s "
        f"(startup {r['startup_s']:.1f} s)\n"
        f"  driver RSS before segment {r['driver_rss_mib_before_segment']:.0f} MiB; driver peak RSS "
        f"{r['driver_peak_rss_mib_getrusage']:.0f} MiB (getrusage), {r['driver_peak_rss_mib_polled']:.0f} MiB (polled)\n"
        f"  actor (SamActor) peak RSS: {actors} MiB; other Ray processes: {r['ray_other_processes']}, "
        f"sum of their peaks {r['ray_other_peak_rss_mib_sum']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
