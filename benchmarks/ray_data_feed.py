"""Ray Data's streaming executor against sam-geo's own stage tasks, on the same work.

Each tile goes through three stages, as in ``sam_geo.run.runtime``: a read (``--read-ms``
of numpy busy work, one CPU), a model call in one actor (``--model-ms`` of sleep: an
accelerator, no CPU) and a finish (``--post-ms`` of busy work, one CPU). Both runtimes
run the same functions on an embedded Ray with this machine's CPUs:

* ``ray_data``: ``ray.data.range(n).map(read).map_batches(Model, concurrency=1,
  batch_size=1).map(finish)``, streamed with ``iter_rows`` (the plan Ray Data's batch
  inference guide gives; the stages keep different ``num_cpus`` so they are not fused);
* ``own``: what ``run/runtime.py`` does: per tile a read task, an actor call and a
  finish task submitted together, at most ``1 + READ_AHEAD`` tiles in flight.

Prints per runtime: wall seconds, the model's busy share (seconds in model calls over
the span from its first call's start to its last call's end) and the seconds to the
first finished tile.

    python benchmarks/ray_data_feed.py [--tiles 300] [--model-ms 100] [--read-ms 20] [--post-ms 30]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import ray

from sam_geo.run.runtime import READ_AHEAD


def busy(ms: float) -> None:
    """Keep one core busy for ``ms`` milliseconds (numpy work, like a read or a trace)."""
    end = time.perf_counter() + ms / 1000
    a = np.random.default_rng(0).random((64, 64))
    while time.perf_counter() < end:
        a = np.sqrt(a * a + 1.0) - 0.5


def read(index: int, ms: float) -> dict:
    busy(ms)
    return {"index": index, "pixels": np.zeros((3, 256, 256), np.uint8)}


def finish(row: dict, ms: float) -> dict:
    busy(ms)
    return {"index": row["index"], "start": row["start"], "end": row["end"]}


class Model:
    def __init__(self, ms: float) -> None:
        self.ms = ms

    def __call__(self, batch: dict) -> dict:
        start = time.time()
        time.sleep(self.ms / 1000 * len(batch["index"]))
        n = len(batch["index"])
        return {"index": batch["index"], "start": np.full(n, start), "end": np.full(n, time.time())}

    def one(self, row: dict) -> dict:
        out = self({"index": np.array([row["index"]])})
        return {"index": row["index"], "start": float(out["start"][0]), "end": float(out["end"][0])}


def run_ray_data(args: argparse.Namespace) -> tuple[list[dict], float]:
    ds = (
        ray.data.range(args.tiles)
        .map(lambda r: read(r["id"], args.read_ms), num_cpus=1)
        .map_batches(Model, fn_constructor_args=(args.model_ms,), concurrency=1, batch_size=1, num_cpus=0.001)
        .map(lambda r: finish(r, args.post_ms), num_cpus=0.999)
    )
    start, rows, first = time.perf_counter(), [], None
    for row in ds.iter_rows():
        first = first or time.perf_counter() - start
        rows.append(row)
    return rows, first


def run_own(args: argparse.Namespace) -> tuple[list[dict], float]:
    read_task = ray.remote(num_cpus=1)(read)
    finish_task = ray.remote(num_cpus=1)(finish)
    model = ray.remote(num_cpus=0)(Model).remote(args.model_ms)
    pending, flying, rows, first = list(range(args.tiles)), [], [], None
    start = time.perf_counter()
    while pending or flying:
        while pending and len(flying) < 1 + READ_AHEAD:
            loaded = read_task.remote(pending.pop(0), args.read_ms)
            flying.append(finish_task.remote(model.one.remote(loaded), args.post_ms))
        done, flying = ray.wait(flying, num_returns=1)
        rows.append(ray.get(done[0]))
        first = first or time.perf_counter() - start
    return rows, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=300)
    parser.add_argument("--model-ms", type=float, default=100.0)
    parser.add_argument("--read-ms", type=float, default=20.0)
    parser.add_argument("--post-ms", type=float, default=30.0)
    args = parser.parse_args()
    ray.init(include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    for name, runner in (("ray_data", run_ray_data), ("own", run_own)):
        start = time.perf_counter()
        rows, first = runner(args)
        wall = time.perf_counter() - start
        span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
        model_s = sum(r["end"] - r["start"] for r in rows)
        print(json.dumps({"runtime": name, "tiles": len(rows), "wall_s": round(wall, 1),
                          "model_busy_share": round(model_s / span, 3), "first_result_s": round(first, 2)}))
    ray.shutdown()


if __name__ == "__main__":
    main()
