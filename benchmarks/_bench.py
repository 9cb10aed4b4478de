"""Helpers shared by overhead.py, memory.py and scaling.py (issue 4 benchmarks).

Scene crops, tile planning identical to :func:`sam_geo.segment`, driver-side model
timing (the same tiles read with :func:`sam_geo.io.scenes.read_window` and pushed through
``SamBackend.encode`` / ``decode``), batched encoder input, and a memory monitor that
polls the driver and its Ray processes.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.enums import MaskFlags
from rasterio.windows import Window

from sam_geo.io.scenes import open_scene, read_window
from sam_geo.model.masks import image_tensor
from sam_geo.modes.prompted import PromptedMode, PromptedTask, PromptLayer, prompts_on_data, to_tile_pixels
from sam_geo.run.host import HostConfig, ModelHost, decode_batches
from sam_geo.settings import Settings


# --- scenes and tiles ------------------------------------------------------------------


def parse_window(text: str) -> Window:
    """``"col,row,width,height"`` (scene pixels) -> Window."""
    col, row, width, height = (int(v) for v in text.split(","))
    return Window(col, row, width, height)


def crop_scene(scene: str | os.PathLike[str], window: Window, folder: Path) -> Path:
    """Write ``window`` of ``scene`` to ``folder/crop.tif`` (same profile, tiling kept)."""
    with rasterio.open(scene) as src:
        window = window.intersection(Window(0, 0, src.width, src.height))
        profile = src.profile | {
            "width": int(window.width),
            "height": int(window.height),
            "transform": src.window_transform(window),
        }
        if profile.get("tiled") and min(window.width, window.height) < profile.get("blockxsize", 0):
            profile |= {"tiled": False}
            profile.pop("blockxsize", None)
            profile.pop("blockysize", None)
        data = src.read(window=window)
        internal_mask = MaskFlags.per_dataset in src.mask_flag_enums[0]
        mask = src.dataset_mask(window=window) if internal_mask else None
    path = folder / "crop.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if mask is not None:
            dst.write_mask(mask)
    return path


def plan_tasks(
    scene: str | os.PathLike[str],
    prompts: Any,
    settings: Settings,
    prompt_as: str | None = None,
) -> list[PromptedTask]:
    """The tile tasks :func:`sam_geo.segment` plans for one scene and these settings
    (``prompt_as``, when given, replaces ``settings.prompt_as``).

    Uses the same planning as ``segment`` (:meth:`sam_geo.modes.prompted.PromptedMode.plan`),
    so tile windows, zoom and prompt grouping are identical; keys match ``TileResult.tile_key``.
    """
    settings = settings.updated(prompt_as=prompt_as)
    info = open_scene(scene, bands=settings.bands, assume_crs=settings.assume_crs)
    return PromptedMode(PromptLayer(prompts)).plan([info], settings)  # type: ignore[return-value]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class ModelTimes:
    """Seconds spent by the model alone on a list of tiles (driver process)."""

    tiles: int = 0
    prompts: int = 0
    read: float = 0.0
    encode: float = 0.0
    decode: float = 0.0
    warmup_encode: float = 0.0
    per_tile_encode: list[float] = field(default_factory=list)


def time_model_on_tasks(
    segmenter: ModelHost,
    tasks: list[Any],
    *,
    mode: str = "prompted",
    auto_points: tuple[int, int | None] = (32, None),
) -> ModelTimes:
    """Read each task's window, then time the model alone on it: ``backend.encode``,
    then (``mode="prompted"``) ``backend.decode`` on the tile's prompts in the model host's
    batches, or (``mode="auto"``) the decoding of automatic mode's point grid
    (``sam_geo.modes.automatic.grid_points`` / ``_decode_points`` in its point batches,
    without its mask filtering; ``auto_points = (points_per_side, batch_size)``), or
    (``mode="encode"``) nothing more.

    A tile is encoded only where the model host encodes it: it has valid pixels and
    (prompted) a prompt not on nodata, or (auto) a grid point on valid pixels. Prompts are
    prepared as in ``PromptedTask.execute``. Reads, prompt preparation, mask filtering and
    vectorization are not model time (reads are reported separately). One untimed encode
    warms the model up first.
    """
    times = ModelTimes()
    datasets: dict[str, rasterio.DatasetReader] = {}
    points_per_side, point_batch = 0, 0
    if mode == "auto":
        from sam_geo.modes.automatic import CPU_POINTS_PER_BATCH, GPU_POINTS_PER_BATCH

        points_per_side, points_per_batch = auto_points
        on_gpu = segmenter.device.type == "cuda"
        point_batch = points_per_batch or (GPU_POINTS_PER_BATCH if on_gpu else CPU_POINTS_PER_BATCH)
    try:
        with segmenter.model_call():  # the actor's autocast precision, as in the run
            _time_tasks(segmenter, tasks, mode, times, datasets, points_per_side, point_batch)
    finally:
        for src in datasets.values():
            src.close()
    return times


def _time_tasks(
    segmenter: ModelHost,
    tasks: list[Any],
    mode: str,
    times: ModelTimes,
    datasets: dict[str, rasterio.DatasetReader],
    points_per_side: int,
    point_batch: int,
) -> None:
    """The loop of :func:`time_model_on_tasks`, adding into ``times``."""
    from sam_geo.modes.automatic import _decode_points, grid_points

    backend, device = segmenter.backend, segmenter.device
    for task in tasks:
        src = datasets.get(task.scene.path) or datasets.setdefault(task.scene.path, rasterio.open(task.scene.path))
        tile = task.tile
        start = time.perf_counter()
        out_shape = tile.shape if tile.scale != 1 else None
        window = read_window(src, task.scene, task.stretch, tile.read_window, out_shape)
        times.read += time.perf_counter() - start
        if not window.valid.any():
            continue
        if mode == "prompted":
            prompts = to_tile_pixels(task.prompts, tile)
            prompts = prompts.take(np.flatnonzero(prompts_on_data(prompts, window.valid)))
            if len(prompts) == 0:
                continue
        elif mode == "auto":
            points = grid_points(window.valid, points_per_side)
            if len(points) == 0:
                continue
        if times.tiles == 0:
            start = time.perf_counter()
            backend.encode(window.rgb)
            sync(device)
            times.warmup_encode = time.perf_counter() - start
        start = time.perf_counter()
        embedding, input_hw = backend.encode(window.rgb)
        sync(device)
        seconds = time.perf_counter() - start
        times.encode += seconds
        times.per_tile_encode.append(seconds)
        times.tiles += 1
        if mode == "prompted":
            for part in decode_batches(prompts, segmenter.batch_size):
                start = time.perf_counter()
                backend.decode(embedding, input_hw, window.rgb.shape[:2], part)
                sync(device)
                times.decode += time.perf_counter() - start
                times.prompts += len(part)
        elif mode == "auto":
            scaled = points * (input_hw[0] / window.valid.shape[0])
            for first in range(0, len(scaled), point_batch):
                start = time.perf_counter()
                _decode_points(backend, embedding, scaled[first : first + point_batch])
                sync(device)
                times.decode += time.perf_counter() - start
            times.prompts += len(scaled)


def mean_times(runs: list[ModelTimes]) -> ModelTimes:
    """Mean of several ModelTimes over the same tiles (seconds averaged)."""
    n = len(runs)
    return ModelTimes(
        tiles=runs[0].tiles,
        prompts=runs[0].prompts,
        read=sum(r.read for r in runs) / n,
        encode=sum(r.encode for r in runs) / n,
        decode=sum(r.decode for r in runs) / n,
        warmup_encode=sum(r.warmup_encode for r in runs) / n,
    )


def driver_segmenter(
    model: str, weights: str, device: str, workers: int, batch_size: int | None, decoder_context_px: int | None = None
) -> ModelHost:
    """A ModelHost built as the runtime builds an actor's (same torch thread count on CPU)."""
    threads = None
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    return ModelHost(HostConfig(model, weights, device=device, batch_size=batch_size, threads=threads,
                                decoder_context_px=decoder_context_px))


def shutdown_ray() -> None:
    """Stop the embedded Ray the run started, so it takes no CPU or memory from what follows."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


# --- batched encoder -------------------------------------------------------------------


def preprocess_for_encoder(backend: Any, rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """(1, 3, S, S) float encoder input, exactly as ``SamBackend.encode`` prepares it."""
    h, w = rgb.shape[:2]
    size = backend.image_size
    scale = size / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    image = image_tensor(rgb, device)
    if (new_h, new_w) != (h, w):
        image = F.interpolate(image, (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return backend.model.preprocess(image)


# --- memory ----------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/<pid>/status in KiB (Linux), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def driver_peak_rss_mib() -> float:
    """Peak RSS of this process over its life (``getrusage``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryMonitor:
    """Polls the RSS of this process and of every process descended from it.

    Each process's peak is the larger of the RSS polled and the kernel's ``VmHWM``
    (its own peak RSS since it started, read at every poll), so a spike between polls
    is still seen as long as the process lives to the next poll. Descendants are
    classified by their command line (Ray sets it to ``ray::SamActor...`` for the
    actors): ``actor`` if it ever showed "SamActor", else ``ray`` (raylet, GCS, idle
    workers, ...). Processes outside this tree are ignored, so other users' Ray jobs on
    the machine do not count.
    """

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.me = psutil.Process()
        self.driver_peak = 0
        self.peaks: dict[int, int] = {}
        self.titles: dict[int, str] = {}
        self.actor_pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def poll(self) -> None:
        psutil = self.psutil
        try:
            self.driver_peak = max(self.driver_peak, self.me.memory_info().rss)
        except psutil.Error:
            pass
        try:
            children = self.me.children(recursive=True)
            own_cmdline = self.me.cmdline()
        except psutil.Error:
            return
        for proc in children:
            try:
                cmdline = proc.cmdline()
                if cmdline == own_cmdline:  # forked by subprocess, not exec'd yet: shares our pages
                    continue
                rss = proc.memory_info().rss
                title = " ".join(cmdline) or proc.name()
            except psutil.Error:
                continue
            hwm = _status_kib(proc.pid, "VmHWM")
            peak = max(rss, (hwm or 0) * 1024)
            self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), peak)
            if "SamActor" in title or "SamActor" in proc.name():
                self.actor_pids.add(proc.pid)
                self.titles[proc.pid] = title[:60]
            else:
                self.titles.setdefault(proc.pid, title[:60])

    def report(self) -> dict[str, Any]:
        mib = 1024 * 1024
        actors = {pid: self.peaks[pid] / mib for pid in sorted(self.actor_pids)}
        others = {pid: p / mib for pid, p in self.peaks.items() if pid not in self.actor_pids}
        top = sorted(others.items(), key=lambda kv: -kv[1])[:4]
        return {
            "driver_peak_rss_mib_polled": self.driver_peak / mib,
            "driver_peak_rss_mib_getrusage": driver_peak_rss_mib(),
            "actor_peak_rss_mib": actors,
            "ray_other_processes": len(others),
            "ray_other_peak_rss_mib_sum": sum(others.values()),
            "ray_other_top": {f"{pid} {self.titles.get(pid, '')}": round(v, 1) for pid, v in top},
        }
