"""Running tile tasks: three streamed stages on Ray (or all in this process for debugging).

Each tile goes through the stages of :class:`~sam_geo.run.tasks.TileTask`::

    load (Ray task, 1 CPU, any node)  -> pixels in the object store
      -> infer (model actor: encoder + decoder calls only)  -> logits crops
      -> finish (Ray task, 1 CPU, any node)  -> TileResult (WKB polygons)

The three calls of a tile are submitted together (Ray runs each when its inputs are
ready), to the model actor with the fewest tiles in flight; at most
:func:`tiles_in_flight` tiles per actor are in flight at once, which bounds the pixels
held in the object store however many tiles a run has (backpressure), and keeps the next
tiles read while the model works. Tasks are descriptors (scene path, tile, prompts),
never pixels; results come back to the driver as they finish (in no order) and are
handed on one by one.

Model actors: one model each, built when the actor starts; on its GPU when the cluster
has GPUs (``num_gpus=1`` per actor, one actor per GPU by default; Ray puts them on GPU
nodes), on CPU otherwise, spread over the nodes, each with torch threads from its own
node's CPU count (:func:`plan_cpu_actors`). On a GPU an actor is threaded
(``encode_batch + 1`` calls at once) so that tiles of several calls go through the image
encoder in one batch (:class:`~sam_geo.run.host.EncodeBatcher`). On CPU an actor runs
one call at a time: its torch threads already use the cores it has.

Why not Ray Data: measured on this project's 2-core CI machine
(``benchmarks/ray_data_feed.py``: 300 tiles, a 100 ms stand-in model), its streaming
executor took 36.1 s against 31.0 s for these plain tasks and actors, and handed back
the first tile after 21.2 s against 0.6 s (DESIGN.md, "Ray, in three stages"); and it
has no place for what this loop does: pin
model actors to nodes by their own resources, replace an actor that is gone for good,
and tell a dead worker from a failing tile.

The CPU stages' worker processes are warmed (their imports) while the model actors load.

Fault tolerance, in two layers:

* Ray restarts a crashed actor (the model reloads) and retries the calls it held, and
  reruns a load or finish task whose worker died (``max_restarts`` /
  ``max_task_retries`` / ``max_retries`` = :data:`MAX_RESTARTS`);
* the scheduling loop here replaces an actor that is gone for good (killed, or out of
  restarts) and resubmits its tiles, and retries a tile whose stage raised up to
  ``Settings.retries`` times; a tile that keeps failing comes back as a
  :class:`~sam_geo.run.tasks.TileResult` with ``error`` set, and the job goes on.

Ray is started embedded on the local machine unless ``address`` names a cluster
(``"auto"`` joins the cluster this machine belongs to, as started by ``ray start``).
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from sam_geo.errors import ConfigError
from sam_geo.io.scenes import scene_reader
from sam_geo.run.host import GPU_ENCODE_BATCH, HostConfig, ModelHost
from sam_geo.run.tasks import ModelOutput, PostConfig, TileInput, TileResult, TileTask, finish_tile
from sam_geo.settings import Settings

log = logging.getLogger(__name__)

MAX_RESTARTS = 3
"""How often Ray restarts an actor, and retries the tasks it held, after a crash."""

STATS_TIMEOUT_S = 10.0
"""How long the driver waits for the actors' stats at the end of a run."""

TASKS_PER_ACTOR = 2
"""Fewest calls in an actor's hands at once on a GPU: one decoding while the next is
encoded."""


READ_AHEAD = 2
"""Tiles per model actor loaded (or being finished) beyond those the actor works on."""


def tiles_in_flight(config: HostConfig, on_gpu: bool) -> int:
    """Tiles in flight per model actor, all stages together: what the actor works on at
    once (:func:`tasks_per_actor`) plus :data:`READ_AHEAD`."""
    return tasks_per_actor(config, on_gpu) + READ_AHEAD


def tasks_per_actor(config: HostConfig, on_gpu: bool) -> int:
    """Model calls an actor holds at once. On a GPU: enough to fill an encoder batch
    while one more call decodes (``encode_batch + 1``), at least
    :data:`TASKS_PER_ACTOR`. On CPU: 1 (see the module docstring for why)."""
    if not on_gpu:
        return 1
    encode_batch = config.encode_batch or GPU_ENCODE_BATCH
    return max(TASKS_PER_ACTOR, encode_batch + 1)


class RunTimer:
    """Seconds spent in driver-side stages."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.workers: list[dict[str, Any]] = []
        """Each model host's :meth:`~sam_geo.run.host.ModelHost.stats` at the end."""

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def run_tiles(
    tasks: list[TileTask],
    config: HostConfig,
    settings: Settings,
    timer: RunTimer,
) -> Iterator[TileResult]:
    """Run ``tasks`` and yield one result per task as they finish (in no order).

    A task that failed ``settings.retries + 1`` times yields a result with ``error``.
    """
    if not tasks:
        return
    runner = _run_in_process if settings.workers == 0 else _run_on_ray
    with _progress(len(tasks), settings.progress) as bar:
        for result in runner(tasks, config, settings, timer):
            bar.update(1)
            yield result


def _progress(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, unit="tile", desc="segmenting", disable=not enabled or None, leave=False)


def _failed(task: Any, reason: str, attempts: int) -> TileResult:
    return TileResult(tile_key=task.key, error=reason, attempts=attempts)


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the original
    return f"{type(cause).__name__}: {cause}"


def _run_in_process(
    tasks: list[TileTask], config: HostConfig, settings: Settings, timer: RunTimer
) -> Iterator[TileResult]:
    start = time.perf_counter()
    host = ModelHost(config)
    reader = scene_reader()
    timer.add("startup", time.perf_counter() - start)
    try:
        for task in tasks:
            for attempt in range(1, settings.retries + 2):
                try:
                    result = task.execute(host, reader, config.post)
                except Exception as exc:  # any failure of one tile is recorded, not fatal
                    log.warning("tile %s failed (attempt %d): %s", task.key, attempt, _reason(exc))
                    if attempt > settings.retries:
                        yield _failed(task, _reason(exc), attempt)
                else:
                    result.attempts = attempt
                    yield result
                    break
    finally:
        timer.workers.append(host.stats())


def warm_stage() -> int:
    """Run once in stage workers while the model actors load: the stages' imports
    (rasterio, shapely, scikit-image, torch) take seconds in a new worker process,
    which the first tiles would otherwise wait for. Returns the worker's pid."""
    import skimage.measure  # noqa: F401  (the finish stage's contour tracer)

    import sam_geo.run.post  # noqa: F401

    scene_reader()
    return os.getpid()


def load_stage(task: TileTask) -> TileInput:
    """Stage 1, in a Ray task: read the tile with this worker process's reader."""
    return task.load(scene_reader())


def finish_stage(task: TileTask, tile_input: TileInput, output: ModelOutput | None, post: PostConfig) -> TileResult:
    """Stage 3, in a Ray task."""
    return finish_tile(task, tile_input, output, post)


def ensure_ray(address: str | None) -> None:
    """Start an embedded local Ray, or join ``address``; reuse one already running.

    An embedded Ray is for this run alone: it runs with Ray's token authentication and
    a token made for this process (:func:`private_ray_token`), so a client that
    connects to its ports without that token cannot run anything in it. A cluster
    joined with ``address`` uses its own authentication settings (see README). Without
    ``address`` a new local Ray is started even when a ``ray start`` cluster runs on this
    machine (``ray.init()`` alone would join it): joining is asked for with ``--address``.
    """
    if not address:
        private_ray_token()  # before Ray reads its configuration
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    if address:
        join_cluster(address, kwargs)
    else:
        ray.init(address="local", num_cpus=os.cpu_count() or 1, **kwargs)


def join_cluster(address: str, kwargs: dict[str, Any]) -> None:
    """``ray.init(address=...)``; a cluster that cannot be reached or refuses this client
    is a :class:`ConfigError` saying what to check."""
    import ray

    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
        raise ConfigError(
            f"cannot join the Ray cluster at {address!r} ({type(exc).__name__}: {exc}). Check that it runs "
            "(`ray status`) and that this machine reaches it; a cluster with token authentication needs its "
            "token here too (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or ~/.ray/auth_token), one with TLS the "
            "same RAY_USE_TLS and RAY_TLS_* settings as its nodes"
        ) from exc


def private_ray_token() -> None:
    """Turn on Ray's token authentication with a fresh random token for the embedded Ray
    of this process, unless the user chose an authentication mode or token themselves
    (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``).

    The token lives in this process's environment (readable by the user alone, through
    ``/proc``), which Ray hands to the processes it starts; it is not written to
    ``~/.ray``, so it differs from run to run and from other users' runs.
    """
    if any(name in os.environ for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    raylet = sys.modules.get("ray._raylet")
    if raylet is not None:  # Ray imported already: it cached its configuration
        raylet.Config.initialize("")


def _actor_class() -> Any:  # built lazily so importing sam_geo does not import ray
    import ray

    @ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS, max_concurrency=TASKS_PER_ACTOR)
    class SamActor:
        """A Ray actor holding one :class:`ModelHost` (one model): model calls only."""

        def __init__(self, config: HostConfig) -> None:
            self.host = ModelHost(config)

        def ready(self) -> bool:
            return True

        def infer(self, task: Any, tile_input: TileInput) -> Any:
            if not tile_input.needs_model:
                return None
            return self.host.infer(task, tile_input)

        def stats(self) -> dict[str, Any]:
            return self.host.stats()

    return SamActor


def _stage_functions() -> tuple[Any, Any]:
    """The load and finish stages as Ray remote functions (1 CPU each)."""
    import ray

    options = {"num_cpus": 1, "max_retries": MAX_RESTARTS}
    return ray.remote(**options)(load_stage), ray.remote(**options)(finish_stage)


def _warm_stage_workers() -> list[Any]:
    """Refs of :func:`warm_stage` tasks, one per cluster CPU (at most 16): started
    before the model actors load, so both happen at once."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    warm = ray.remote(num_cpus=1, max_retries=0)(warm_stage)
    return [warm.remote() for _ in range(max(1, min(cpus, 16)))]


@dataclass(frozen=True)
class ActorSlot:
    """Where one model actor runs and what it gets: a node (None: where Ray chooses,
    e.g. any GPU node) and its torch threads (None: the config's)."""

    node_id: str | None
    threads: int | None


def plan_cpu_actors(workers: int, node_cpus: dict[str, int], threads: int | None = None) -> list[ActorSlot]:
    """Spread ``workers`` CPU model actors over nodes, in proportion to their CPUs.

    Each actor goes to the node with the most CPUs per actor placed so far (ties: the
    order of ``node_cpus``), and gets ``threads`` torch threads, or when None its node's
    CPUs divided by the actors on that node (at least 1): threads come from each node's
    own size, not the cluster's total.
    """
    if not node_cpus:
        return [ActorSlot(None, threads) for _ in range(workers)]
    placed = {node: 0 for node in node_cpus}
    order: list[str] = []
    for _ in range(workers):
        node = max(node_cpus, key=lambda n: node_cpus[n] / (placed[n] + 1))
        placed[node] += 1
        order.append(node)
    return [ActorSlot(node, threads or max(1, node_cpus[node] // placed[node])) for node in order]


def _alive_cpu_nodes() -> dict[str, int]:
    """Node id -> CPUs of the alive Ray nodes that have CPUs."""
    import ray

    out = {}
    for node in ray.nodes():
        cpus = int(node.get("Resources", {}).get("CPU", 0))
        if node.get("Alive") and cpus > 0:
            out[node["NodeID"]] = cpus
    return out


class _ActorFleet:
    """Model actors, replaced when one is gone for good."""

    def __init__(self, workers: int, config: HostConfig, gpus: int) -> None:
        self.on_gpu = gpus > 0
        # Model actors hold no CPU slot: the slots are for the stage tasks, which would
        # never run if the actors took all of a small node's; an actor's own CPU use is
        # its torch threads, sized to its node (plan_cpu_actors).
        if self.on_gpu:
            self.options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 0}
            self.slots = [ActorSlot(None, config.threads) for _ in range(workers)]
        else:
            self.options = {"num_cpus": 0}
            self.slots = plan_cpu_actors(workers, _alive_cpu_nodes(), config.threads)
            config = HostConfig(**{**config.__dict__, "device": "cpu"})
        self.config = config
        self.tasks_per_actor = tasks_per_actor(config, self.on_gpu)
        self.in_flight = tiles_in_flight(config, self.on_gpu)
        self.options["max_concurrency"] = self.tasks_per_actor
        self.run_id = uuid.uuid4().hex[:8]
        self.actors = [self._new(i) for i in range(workers)]

    def _new(self, slot: int) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        placement = self.slots[slot]
        options = dict(self.options, name=f"sam-geo-{self.run_id}-{slot}-{uuid.uuid4().hex[:4]}")
        if placement.node_id is not None:
            # Pinned: with soft affinity Ray 2.x put zero-CPU actors on any node (two on
            # one node of two, seen in tests/test_cluster.py). A node that leaves is
            # handled by replace().
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(placement.node_id, soft=False)
        config = HostConfig(**{**self.config.__dict__, "threads": placement.threads})
        return _actor_class().options(**options).remote(config)

    def wait_ready(self) -> None:
        import ray

        ray.get([actor.ready.remote() for actor in self.actors])

    def replace(self, slot: int, dead: Any) -> None:
        """Start a new actor in ``slot`` unless that was done already for ``dead``."""
        if self.actors[slot] is dead:
            log.warning("model actor %d died; starting a new one", slot)
            self._replan_if_node_gone(slot)
            self.actors[slot] = self._new(slot)

    def _replan_if_node_gone(self, slot: int) -> None:
        """Move ``slot`` to an alive node when its node left the cluster (actors are
        pinned to their planned node, so a replacement there would never start)."""
        node = self.slots[slot].node_id
        if node is None:
            return
        alive = _alive_cpu_nodes()
        if node in alive or not alive:
            return
        others = [s.node_id for i, s in enumerate(self.slots) if i != slot]
        target = max(alive, key=lambda n: alive[n] / (others.count(n) + 1))
        threads = self.config.threads or max(1, alive[target] // (others.count(target) + 1))
        self.slots[slot] = ActorSlot(target, threads)

    def stats(self) -> list[dict[str, Any]]:
        """Each live actor's host stats (actors that do not answer in time are left out)."""
        import ray

        refs = [actor.stats.remote() for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STATS_TIMEOUT_S)
        out = []
        for ref in ready:
            try:
                out.append(ray.get(ref))
            except Exception as exc:  # a dead actor has no stats; the run's results stand
                log.warning("no stats from a model actor: %s", _reason(exc))
        return out

    def kill_all(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


@dataclass
class _InFlight:
    """One tile on its way through the stages; holds its refs so their objects live."""

    index: int
    slot: int
    actor: Any
    refs: tuple[Any, ...]


class _StageScheduler:
    """Submits tiles through the three stages, at most ``fleet.in_flight`` per actor."""

    def __init__(self, tasks: list[TileTask], fleet: _ActorFleet, post: PostConfig, retries: int) -> None:
        self.tasks, self.fleet, self.post, self.retries = tasks, fleet, post, retries
        self.load, self.finish = _stage_functions()
        self.pending: deque[int] = deque(range(len(tasks)))
        self.attempts = [0] * len(tasks)
        self.flying: dict[Any, _InFlight] = {}  # finish ref -> tile
        self.per_slot = [0] * len(fleet.actors)

    def fill(self) -> None:
        """Submit pending tiles to the least busy actors while they have room."""
        while self.pending:
            slot = min(range(len(self.per_slot)), key=self.per_slot.__getitem__)
            if self.per_slot[slot] >= self.fleet.in_flight:
                return
            index = self.pending.popleft()
            self.attempts[index] += 1
            task, actor = self.tasks[index], self.fleet.actors[slot]
            loaded = self.load.remote(task)
            output = actor.infer.remote(task, loaded)
            finished = self.finish.remote(task, loaded, output, self.post)
            self.flying[finished] = _InFlight(index, slot, actor, (loaded, output))
            self.per_slot[slot] += 1

    def next_done(self) -> tuple[_InFlight, Any]:
        """Wait for a tile to finish; its record and its finish ref."""
        import ray

        ready, _ = ray.wait(list(self.flying), num_returns=1)
        tile = self.flying.pop(ready[0])
        self.per_slot[tile.slot] -= 1
        return tile, ready[0]

    def outcome(self, tile: _InFlight, ref: Any) -> TileResult | None:
        """The tile's result; a failure is retried (None) until out of attempts."""
        import ray

        task, attempts = self.tasks[tile.index], self.attempts[tile.index]
        try:
            result = ray.get(ref)
        except Exception as exc:  # the actor died, or a stage raised
            died = _actor_died(exc)
            if died:
                self.fleet.replace(tile.slot, tile.actor)
            else:
                log.warning("tile %s failed (attempt %d): %s", task.key, attempts, _reason(exc))
            if attempts > self.retries:
                return _failed(task, f"worker died: {_reason(exc)}" if died else _reason(exc), attempts)
            (self.pending.appendleft if died else self.pending.append)(tile.index)
            return None
        result.attempts = attempts
        return result


def _actor_died(exc: BaseException) -> bool:
    """Whether ``exc`` (or the error it wraps) says a model actor is gone."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    kinds = (RayActorError, ActorDiedError, ActorUnavailableError)
    return isinstance(exc, kinds) or isinstance(getattr(exc, "cause", None), kinds)


def model_actor_count(requested: int | None, gpus: int, tiles: int) -> int:
    """How many model actors to start: ``requested`` (default: one per GPU, else 1),
    no more than the tiles, and on a cluster with GPUs no more than its GPUs (each
    GPU actor holds one; more would wait for a GPU forever)."""
    workers = requested or max(gpus, 1)
    if gpus and workers > gpus:
        log.warning("%d model workers asked for, but the cluster has %d GPUs: starting %d", workers, gpus, gpus)
        workers = gpus
    return max(1, min(workers, tiles))


def _run_on_ray(
    tasks: list[TileTask], config: HostConfig, settings: Settings, timer: RunTimer
) -> Iterator[TileResult]:
    import ray

    start = time.perf_counter()
    ensure_ray(settings.address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = model_actor_count(settings.workers, gpus, len(tasks))
    warming = _warm_stage_workers()
    fleet = _ActorFleet(workers, config, gpus)
    fleet.wait_ready()
    ray.wait(warming, num_returns=len(warming), timeout=STATS_TIMEOUT_S)
    timer.add("startup", time.perf_counter() - start)
    scheduler = _StageScheduler(tasks, fleet, config.post, settings.retries)
    try:
        scheduler.fill()
        while scheduler.flying:
            tile, ref = scheduler.next_done()
            result = scheduler.outcome(tile, ref)
            if result is not None:
                yield result
            scheduler.fill()
    finally:
        timer.workers += fleet.stats()
        fleet.kill_all()
