"""Throughput by worker count, and the image encoder's throughput by batch size.

Default mode: prompted segmentation (``sam_geo.segment``) of a Banepa crop with small
tiles (many tiles) on 1, 2, ... model actors on the machine at hand; prints tiles/s and
prompts/s per worker count, over the run's seconds without start-up (Ray, actors and
model loads are reported separately; Ray is started once and reused across counts).

``--encoder-only``: no Ray; the same crop's tiles are read, preprocessed as
``SamBackend.encode`` does (resize to 1024, normalise, pad) and stacked; the model's
``image_encoder`` runs on batches of 1..N tiles (under ``torch.autocast`` for
``--dtype bf16|fp16``), printing tiles/s per batch size. ``backend.encode`` itself takes
one image, so this is the ceiling a batched encode path could reach.

    python benchmarks/scaling.py                              # workers 1..cpu count (max 4)
    python benchmarks/scaling.py --workers 1,2 --crop 541,1038,1280,1280 --tile-size 512
    python benchmarks/scaling.py --encoder-only --batch-sizes 1,2,4 [--device cuda --dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import rasterio
import torch

from _bench import crop_scene, driver_segmenter, parse_window, preprocess_for_encoder, shutdown_ray, sync
from _common import BANEPA, WEIGHTS
from sam_geo import segment
from sam_geo.geo.tiles import TileGrid
from sam_geo.io.scenes import compute_stretch, open_scene, read_window
from sam_geo.model.sam_backend import resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", default=str(BANEPA / "banepa_utm45n.tif"))
    parser.add_argument("--prompts", default=str(BANEPA / "osm_buildings_4326.geojson"))
    parser.add_argument("--crop", default="541,1038,1280,1280", help="col,row,width,height, or 'none' for the whole scene")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=None, help="default: sam_geo's (128 px)")
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default 1..cpu count, at most 4)")
    parser.add_argument("--encoder-only", action="store_true")
    parser.add_argument("--batch-sizes", default=None, help="encoder-only: default 1,2,4 on CPU, 1,2,4,8,16,32 on CUDA")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="encoder-only: autocast dtype")
    parser.add_argument("--iters", type=int, default=2, help="encoder-only: timed calls per batch size")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        crop = None if args.crop in (None, "", "none") else args.crop
        scene = crop_scene(args.scene, parse_window(crop), Path(tmp)) if crop else Path(args.scene)
        print(f"scene {args.scene}" + (f" crop {crop}" if crop else "") + f"; tile size {args.tile_size}; "
              f"device {resolve_device(args.device)}; {os.cpu_count()} CPUs; load avg {os.getloadavg()[0]:.1f}")
        if args.encoder_only:
            encoder_only(scene, args)
        else:
            workers(scene, args)


def workers(scene: Path, args: argparse.Namespace) -> None:
    counts = [int(w) for w in args.workers.split(",")] if args.workers else list(range(1, min(os.cpu_count() or 1, 4) + 1))
    rows = []
    for count in counts:
        load = os.getloadavg()[0]
        gdf = segment(scene, args.prompts, model=args.model, weights=args.weights, device=args.device,
                      tile_size_px=args.tile_size, overlap_px=args.overlap, workers=count, progress=False)
        summary = gdf.attrs["summary"]
        seconds = summary["seconds"]
        run = seconds["total"] - seconds["startup"]
        tiles, prompts = summary["tiles"]["processed"], summary["prompts"]["used"]
        row = {"workers": count, "tiles": tiles, "prompts": prompts, "startup_s": round(seconds["startup"], 2),
               "run_s": round(run, 2), "tiles_per_s": round(tiles / run, 4), "prompts_per_s": round(prompts / run, 3),
               "load_avg_before": round(load, 1)}
        rows.append(row)
        print(f"workers {count}: {tiles} tiles, {prompts} prompts in {run:.1f} s (startup {seconds['startup']:.1f} s "
              f"apart): {tiles / run:.3f} tiles/s, {prompts / run:.2f} prompts/s  (load avg before {load:.1f})",
              flush=True)
    shutdown_ray()
    base = rows[0]["tiles_per_s"]
    print("\nworkers  tiles/s  prompts/s  speed-up")
    for row in rows:
        print(f"{row['workers']:>7}  {row['tiles_per_s']:>7.3f}  {row['prompts_per_s']:>9.2f}  {row['tiles_per_s'] / base:>8.2f}")
    for row in rows:
        print("scaling.workers " + json.dumps(row))


def encoder_only(scene: Path, args: argparse.Namespace) -> None:
    device = torch.device(resolve_device(args.device))
    segmenter = driver_segmenter(args.model, args.weights, args.device, 1, None)
    backend = segmenter.backend
    if not hasattr(backend.model, "image_encoder") or not hasattr(backend.model, "preprocess"):
        raise SystemExit(f"--encoder-only needs a SAM-family model (segment_anything Sam); {args.model} is not one")
    sizes = [int(b) for b in (args.batch_sizes or ("1,2,4,8,16,32" if device.type == "cuda" else "1,2,4")).split(",")]

    info = open_scene(scene)
    stretch = compute_stretch(info)
    overlap = args.overlap if args.overlap is not None else 128
    grid = TileGrid(info.height, info.width, info.transform, args.tile_size, overlap)
    inputs = []
    with rasterio.open(info.path) as src:
        for tile in grid:
            window = read_window(src, info, stretch, tile.read_window)
            if window.valid.any():
                inputs.append(preprocess_for_encoder(backend, window.rgb, device))
            if len(inputs) >= max(sizes):
                break
    print(f"{len(inputs)} distinct tiles read ({tile.shape[0]} x {tile.shape[1]} px, resized to "
          f"{backend.image_size}); dtype {args.dtype}; torch threads {torch.get_num_threads()}")
    encoder = backend.model.image_encoder
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")

    # the model host's own path, one tile per call, for reference
    with torch.inference_mode():
        segmenter.encode(window.rgb)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.iters):
            segmenter.encode(window.rgb)
        sync(device)
    reference = args.iters / (time.perf_counter() - start)
    precision = str(segmenter.autocast_dtype).removeprefix("torch.")
    print(f"ModelHost.encode (the run's path, its default precision {precision}, batch 1): {reference:.3f} tiles/s")

    rows = []
    for size in sizes:
        batch = torch.cat([inputs[k % len(inputs)] for k in range(size)])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode(), autocast:
            encoder(batch)  # warm-up
            sync(device)
            start = time.perf_counter()
            for _ in range(args.iters):
                encoder(batch)
            sync(device)
        seconds = time.perf_counter() - start
        row = {"batch": size, "dtype": args.dtype, "tiles_per_s": round(size * args.iters / seconds, 4),
               "ms_per_tile": round(1000 * seconds / (size * args.iters), 1)}
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        rows.append(row)
        print(f"batch {size:>3}: {row['tiles_per_s']:.3f} tiles/s ({row['ms_per_tile']:.0f} ms/tile)"
              + (f", peak {row['peak_gib']} GiB" if "peak_gib" in row else "") + f"  (load avg {os.getloadavg()[0]:.1f})",
              flush=True)
    for row in rows:
        print("scaling.encoder " + json.dumps(row))


if __name__ == "__main__":
    main()
