"""Pipeline overhead: end-to-end seconds of ``sam_geo.segment`` over model-alone seconds.

Runs ``sam_geo.segment`` on a scene (prompted mode) on Ray model actors, then, in the
same process after Ray is shut down, builds the same model in the driver, reads the
same tiles (the tiles the run encoded, planned by the same function) with
``raster.read_window`` and times ``SamBackend.encode`` on each, and ``decode`` on each
tile's prompts in the model host's batches. Prints

* end-to-end seconds = ``summary.seconds.total - summary.seconds.startup`` (Ray start,
  actor creation and model load are reported separately as ``startup``);
* ratio end-to-end / encoder-alone seconds, and end-to-end / (encoder + decoder alone);
* the run's own stage seconds (read, encode, decode, vectorize, summed over workers).

A ratio of 1.0 against the encoder means the pipeline costs nothing beyond the image
encoder; against encoder + decoder, what is above 1.0 is the pipeline's own overhead
(reads, vectorizing, scheduling, assembling the output), below 1.0 the gain from
overlapping reads and vectorizing with model calls. The model-alone timing uses the
torch thread count the actors get (CPU count / workers on CPU); ``--bracket`` times the
model alone before and after the run and uses the mean (for a machine shared with other
jobs, where load changes during a run; print-outs include the load average).

Automatic mode (``sam_geo.segment_auto``) is measured the same way on the same scene: every grid tile
the run encoded, encoder alone and encoder + point-grid decoding alone.
``--points-per-side`` keeps it short on CPU (SAM decodes ``points_per_side**2`` points
with three masks each per tile: the default 32 is about a minute per tile on 2 cores).

    python benchmarks/overhead.py                         # whole Banepa scene, 1 worker
    python benchmarks/overhead.py --crop 541,1038,1536,1536 --points-per-side 8 --bracket
    python benchmarks/overhead.py --scene S.tif --prompts P.gpkg [--workers N] [--device cuda] [--no-auto]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


from _bench import (
    ModelTimes,
    crop_scene,
    driver_segmenter,
    mean_times,
    parse_window,
    plan_tasks,
    shutdown_ray,
    time_model_on_tasks,
)
from _common import BANEPA, WEIGHTS
from sam_geo import segment
from sam_geo.model.sam_backend import resolve_device
from sam_geo.run.tasks import TileResult
from sam_geo.settings import Settings, make_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", default=str(BANEPA / "banepa_utm45n.tif"))
    parser.add_argument("--prompts", default=str(BANEPA / "osm_buildings_4326.geojson"))
    parser.add_argument("--crop", default=None, help="col,row,width,height: run on this window of the scene")
    parser.add_argument("--prompt-as", default="auto")
    parser.add_argument("--model", default="mobile_sam")
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tile-size", type=int, default=None)
    parser.add_argument("--overlap", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="prompts (automatic mode: grid points) per decoder call (default: sam_geo's)")
    parser.add_argument("--decoder-context", type=int, default=None,
                        help="CPU decoder context for box prompts, model pixels (default: the whole tile, exact)")
    parser.add_argument("--no-auto", action="store_true", help="skip automatic mode even if available")
    parser.add_argument("--no-prompted", action="store_true", help="skip prompted mode")
    parser.add_argument("--bracket", action="store_true",
                        help="time the model alone before and after the run and use the mean (on a shared, "
                             "busy machine this evens out load changes; doubles the model-alone time)")
    parser.add_argument("--points-per-side", type=int, default=None,
                        help="automatic mode: prompt grid per tile (default: sam_geo's, 32; SAM decodes "
                             "points_per_side**2 points per tile, slow on CPU)")
    args = parser.parse_args()

    settings = make_settings(
        model=args.model, weights=args.weights, device=args.device, batch_size=args.batch_size,
        decoder_context_px=args.decoder_context, tile_size_px=args.tile_size, overlap_px=args.overlap,
        workers=args.workers, progress=False,
    )
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        scene = crop_scene(args.scene, parse_window(args.crop), Path(tmp)) if args.crop else Path(args.scene)
        print(f"scene {args.scene}" + (f" crop {args.crop}" if args.crop else "") + f"; device {device}; "
              f"workers {args.workers}; model {args.model}")
        if not args.no_prompted:
            prompted(scene, args, settings, device)
        if not args.no_auto:
            automatic(scene, args, settings, device)


def prompted(scene: Path, args: argparse.Namespace, settings: Settings, device: str) -> None:
    settings = settings.updated(prompt_as=args.prompt_as)
    tasks = plan_tasks(scene, args.prompts, settings)
    alone_runs = [model_alone(args, tasks, "prompted")] if args.bracket else []
    results: list[TileResult] = []
    load = os.getloadavg()[0]
    start = time.perf_counter()
    gdf = segment(scene, args.prompts, settings=settings, on_result=results.append)
    wall = time.perf_counter() - start
    shutdown_ray()
    encoded = {r.tile_key for r in results if r.encoded}
    alone_runs.append(model_alone(args, [t for t in tasks if t.key in encoded], "prompted"))
    summary = gdf.attrs["summary"]
    print("\n== prompted mode ==")
    print(f"tiles encoded {summary['tiles']['processed']} (planned {summary['tiles']['planned']}); "
          f"prompts used {summary['prompts']['used']}; features {summary['features']}")
    report("prompted", summary, wall, load, alone_runs, "prompts")


def automatic(scene: Path, args: argparse.Namespace, settings: Settings, device: str) -> None:
    from sam_geo import segment_auto
    from sam_geo.io.scenes import open_scene
    from sam_geo.modes.automatic import AutoMode

    # every grid point is decoded (skip_covered off), as the model-alone timing decodes them all;
    # skipping covered points only removes decoder work, which this ratio does not measure
    settings = settings.updated(skip_covered=False, points_per_side=args.points_per_side)
    # automatic mode encodes every tile of the grid (zoom 1 unless set) that has valid pixels
    info = open_scene(scene, bands=settings.bands, assume_crs=settings.assume_crs)
    tasks = AutoMode().plan([info], settings)
    points = (settings.points_per_side, settings.batch_size)
    alone_runs = [model_alone(args, tasks, "auto", points)] if args.bracket else []
    results: list[object] = []
    load = os.getloadavg()[0]
    start = time.perf_counter()
    gdf = segment_auto(scene, settings=settings, on_result=results.append)
    wall = time.perf_counter() - start
    shutdown_ray()
    encoded = {r.tile_key for r in results if getattr(r, "encoded", False)}
    alone_runs.append(model_alone(args, [t for t in tasks if t.key in encoded], "auto", points))
    summary = gdf.attrs["summary"]
    print("\n== automatic mode ==")
    print(f"tiles encoded {summary['tiles']['processed']} (planned {summary['tiles']['planned']}); points per "
          f"side {settings.points_per_side}; points decoded {summary['prompts']['used']}; objects {len(gdf)}")
    report("auto", summary, wall, load, alone_runs, "points")


def model_alone(args: argparse.Namespace, tasks: list, mode: str, points: tuple = (32, None)) -> ModelTimes:
    """Model-alone seconds in this process (Ray not running), on ``tasks``' tiles."""
    segmenter = driver_segmenter(args.model, args.weights, args.device, args.workers, args.batch_size,
                                 args.decoder_context)
    return time_model_on_tasks(segmenter, tasks, mode=mode, auto_points=points)


def report(mode: str, summary: dict, wall: float, load: float, runs: list[ModelTimes], unit: str) -> None:
    seconds = summary["seconds"]
    e2e = seconds["total"] - seconds["startup"]
    alone = mean_times(runs)
    print(f"startup (Ray + actors + model load): {seconds['startup']:.2f} s;  wall of the call: {wall:.2f} s  "
          f"(load avg at start {load:.1f})")
    print(f"end-to-end without startup: {e2e:.2f} s")
    print("run stage seconds (summed over workers): " + json.dumps(
        {k: round(v, 2) for k, v in seconds.items() if k not in ("total", "startup")}))
    for label, run in zip(("before the run", "after the run") if len(runs) > 1 else ("after the run",), runs):
        print(f"model alone in the driver {label}, {run.tiles} tiles: encode {run.encode:.2f} s "
              f"({run.encode / max(run.tiles, 1):.3f} s/tile; warm-up encode {run.warmup_encode:.2f} s untimed), "
              f"decode {run.decode:.2f} s for {run.prompts} {unit}, window reads {run.read:.2f} s")
    print(f"  (load avg after: {os.getloadavg()[0]:.1f})")
    if alone.tiles != summary["tiles"]["processed"]:
        print(f"WARNING: {alone.tiles} tiles timed alone, but the run encoded {summary['tiles']['processed']}")
    both = alone.encode + alone.decode
    print(f"RATIO end-to-end / encoder-alone:            {e2e / alone.encode:.3f}")
    print(f"RATIO end-to-end / (encoder + decoder alone): {e2e / both:.3f}")
    print(f"overhead.{mode} " + json.dumps({
        "tiles": alone.tiles, unit: alone.prompts, "startup_s": round(seconds["startup"], 3), "e2e_s": round(e2e, 3),
        "encode_alone_s": round(alone.encode, 3), "decode_alone_s": round(alone.decode, 3),
        "alone_runs": len(runs), "ratio_encoder": round(e2e / alone.encode, 4),
        "ratio_encoder_decoder": round(e2e / both, 4),
    }))


if __name__ == "__main__":
    main()
