"""Running tile tasks on Ray model actors (or in-process for debugging).

Each actor builds one model when it starts (on its GPU when the cluster has GPUs:
``num_gpus=1`` per actor, one actor per GPU by default; on CPU otherwise) and opens the
scenes it is asked to read. Tasks are :class:`~sam_geo.engine.TileTask` descriptors
(path, window, prompts), never pixels; results are polygons as WKB.

Ray is started embedded on the local machine unless ``address`` names a cluster
(``"auto"`` joins the cluster this machine belongs to, as started by ``ray start``).
Actors restart after a crash (the model reloads) and a task that died with its actor is
retried, up to :data:`MAX_RESTARTS` times.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm.auto import tqdm

from .engine import EngineConfig, TileResult, TileSegmenter, TileTask

MAX_RESTARTS = 3
"""How often an actor is restarted and a task retried after a crash."""


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how wide to run.

    ``workers``: number of model actors (None: one per GPU, or 1 on CPU; 0: no Ray, run
    in this process, for debugging); ``address``: Ray cluster address or None for an
    embedded local Ray; ``progress``: show a progress bar over tiles on stderr.
    """

    workers: int | None = None
    address: str | None = None
    progress: bool = True


class RunTimer:
    """Seconds spent in driver-side stages."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def run_tiles(
    tasks: list[TileTask],
    config: EngineConfig,
    options: RuntimeOptions,
    timer: RunTimer,
) -> Iterator[TileResult]:
    """Run ``tasks`` and yield their results as they finish (in no particular order)."""
    if not tasks:
        return
    if options.workers == 0:
        yield from _run_in_process(tasks, config, options, timer)
    else:
        yield from _run_on_ray(tasks, config, options, timer)


def _progress(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, unit="tile", desc="segmenting", disable=not enabled or None, leave=False)


def _run_in_process(
    tasks: list[TileTask], config: EngineConfig, options: RuntimeOptions, timer: RunTimer
) -> Iterator[TileResult]:
    start = time.perf_counter()
    segmenter = TileSegmenter(config)
    timer.add("startup", time.perf_counter() - start)
    try:
        with _progress(len(tasks), options.progress) as bar:
            for task in tasks:
                yield segmenter.run(task)
                bar.update(1)
    finally:
        segmenter.close()


def ensure_ray(address: str | None) -> None:
    """Start an embedded local Ray, or join ``address``; reuse one already running."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, object] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        "configure_logging": True,
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=os.cpu_count() or 1, **kwargs)


def _actor_class():  # built lazily so importing sam_geo does not import ray
    import ray

    @ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
    class SamActor:
        """A Ray actor holding one :class:`TileSegmenter` (one model)."""

        def __init__(self, config: EngineConfig) -> None:
            self.segmenter = TileSegmenter(config)

        def ready(self) -> bool:
            return True

        def run(self, task: TileTask) -> TileResult:
            return self.segmenter.run(task)

    return SamActor


def _run_on_ray(
    tasks: list[TileTask], config: EngineConfig, options: RuntimeOptions, timer: RunTimer
) -> Iterator[TileResult]:
    import ray
    from ray.util import ActorPool

    start = time.perf_counter()
    ensure_ray(options.address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = options.workers or max(gpus, 1)
    workers = min(workers, len(tasks))
    if gpus:
        actor_options = {"num_gpus": 1, "num_cpus": 1}
        actor_config = config
    else:
        threads = config.threads or max(1, cpus // workers)
        actor_options = {"num_cpus": 1}
        actor_config = EngineConfig(**{**config.__dict__, "threads": threads, "device": "cpu"})
    actors = [_actor_class().options(**actor_options).remote(actor_config) for _ in range(workers)]
    ray.get([a.ready.remote() for a in actors])
    timer.add("startup", time.perf_counter() - start)
    pool = ActorPool(actors)
    try:
        with _progress(len(tasks), options.progress) as bar:
            for result in pool.map_unordered(lambda actor, task: actor.run.remote(task), tasks):
                bar.update(1)
                yield result
    finally:
        for actor in actors:
            ray.kill(actor)

