"""Running tile tasks on Ray model actors (or in-process for debugging).

Each actor builds one model when it starts (on its GPU when the cluster has GPUs:
``num_gpus=1`` per actor, one actor per GPU by default; on CPU otherwise) and opens the
scenes it is asked to read. Tasks are descriptors (scene path, tile, prompts), never
pixels; results are polygons as WKB.

Keeping the model busy: on a GPU every actor is a threaded actor with several tasks in
flight (:func:`tasks_per_actor`: ``encode_batch + 1``);
:class:`~sam_geo.run.host.ModelHost` serialises model calls with a lock, so one task's
window read and vectorization overlap another's encoder and decoder work, and the tiles
of several tasks go through the image encoder in one batch
(:class:`~sam_geo.run.host.EncodeBatcher`). On CPU an actor runs one task at a time: its
torch threads already use every core it has, so there is nothing to overlap with, and a
second Python thread reading or vectorizing holds the GIL that each of the decoder's
many small torch calls needs (measured: the decoder ran 40-55 % slower inside the
actor than alone; one task at a time brings it back to its alone speed).

Fault tolerance, in two layers:

* Ray restarts a crashed actor (the model reloads) and retries the tasks it held
  (``max_restarts`` / ``max_task_retries`` = :data:`MAX_RESTARTS`);
* the scheduling loop here replaces an actor that is gone for good (killed, or out of
  restarts) and resubmits its tasks, and retries a task that raised up to
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
from typing import Any

from tqdm.auto import tqdm

from sam_geo.errors import ConfigError
from sam_geo.run.host import GPU_ENCODE_BATCH, HostConfig, ModelHost
from sam_geo.run.tasks import TileResult, TileTask
from sam_geo.settings import Settings

log = logging.getLogger(__name__)

MAX_RESTARTS = 3
"""How often Ray restarts an actor, and retries the tasks it held, after a crash."""

STATS_TIMEOUT_S = 10.0
"""How long the driver waits for the actors' stats at the end of a run."""

TASKS_PER_ACTOR = 2
"""Fewest tasks in flight per GPU actor: one using the model, one reading or vectorizing."""


def tasks_per_actor(config: HostConfig, on_gpu: bool) -> int:
    """Tasks in flight per actor. On a GPU: enough to fill an encoder batch while one
    more task reads or vectorizes (``encode_batch + 1``), at least
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
    timer.add("startup", time.perf_counter() - start)
    try:
        for task in tasks:
            for attempt in range(1, settings.retries + 2):
                try:
                    result = host.run(task)
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
        host.close()


def ensure_ray(address: str | None) -> None:
    """Start an embedded local Ray, or join ``address``; reuse one already running.

    An embedded Ray is for this run alone: it runs with Ray's token authentication and
    a token made for this process (:func:`private_ray_token`), so a client that
    connects to its ports without that token cannot run anything in it. A cluster
    joined with ``address`` uses its own authentication settings (see README).
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
        ray.init(num_cpus=os.cpu_count() or 1, **kwargs)


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
        """A Ray actor holding one :class:`ModelHost` (one model)."""

        def __init__(self, config: HostConfig) -> None:
            self.host = ModelHost(config)

        def ready(self) -> bool:
            return True

        def run(self, task: Any) -> TileResult:
            return self.host.run(task)

        def stats(self) -> dict[str, Any]:
            return self.host.stats()

    return SamActor


class _ActorFleet:
    """Model actors, replaced when one is gone for good."""

    def __init__(self, workers: int, config: HostConfig, gpus: int, cpus: int) -> None:
        if gpus:
            self.options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
            self.config = config
        else:
            threads = config.threads or max(1, cpus // workers)
            self.options = {"num_cpus": 1}
            self.config = HostConfig(**{**config.__dict__, "threads": threads, "device": "cpu"})
        self.tasks_per_actor = tasks_per_actor(self.config, gpus > 0)
        self.options["max_concurrency"] = self.tasks_per_actor
        self.run_id = uuid.uuid4().hex[:8]
        self.actors = [self._new(i) for i in range(workers)]

    def _new(self, slot: int) -> Any:
        name = f"sam-geo-{self.run_id}-{slot}-{uuid.uuid4().hex[:4]}"
        return _actor_class().options(name=name, **self.options).remote(self.config)

    def wait_ready(self) -> None:
        import ray

        ray.get([actor.ready.remote() for actor in self.actors])

    def replace(self, slot: int, dead: Any) -> None:
        """Start a new actor in ``slot`` unless that was done already for ``dead``."""
        if self.actors[slot] is dead:
            log.warning("model actor %d died; starting a new one", slot)
            self.actors[slot] = self._new(slot)

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


def _run_on_ray(
    tasks: list[TileTask], config: HostConfig, settings: Settings, timer: RunTimer
) -> Iterator[TileResult]:
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    start = time.perf_counter()
    ensure_ray(settings.address)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    workers = min(settings.workers or max(gpus, 1), len(tasks))
    fleet = _ActorFleet(workers, config, gpus, cpus)
    fleet.wait_ready()
    timer.add("startup", time.perf_counter() - start)

    pending: deque[tuple[int, Any]] = deque(enumerate(tasks))
    attempts = [0] * len(tasks)
    in_flight: dict[Any, tuple[int, Any, int]] = {}  # ref -> (slot, actor, task index)

    def submit(slot: int) -> None:
        while pending and sum(1 for s, _, _ in in_flight.values() if s == slot) < fleet.tasks_per_actor:
            index, task = pending.popleft()
            attempts[index] += 1
            actor = fleet.actors[slot]
            in_flight[actor.run.remote(task)] = (slot, actor, index)

    try:
        for slot in range(workers):
            submit(slot)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            slot, actor, index = in_flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
                fleet.replace(slot, actor)
                if attempts[index] > settings.retries:
                    yield _failed(tasks[index], f"worker died: {_reason(exc)}", attempts[index])
                else:
                    pending.appendleft((index, tasks[index]))
            except Exception as exc:  # the task raised: retry, then record
                log.warning("tile %s failed (attempt %d): %s", tasks[index].key, attempts[index], _reason(exc))
                if attempts[index] > settings.retries:
                    yield _failed(tasks[index], _reason(exc), attempts[index])
                else:
                    pending.append((index, tasks[index]))
            else:
                result.attempts = attempts[index]
                yield result
            for s in range(workers):
                submit(s)
    finally:
        timer.workers += fleet.stats()
        fleet.kill_all()
