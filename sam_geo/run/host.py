"""The model host: what runs inside a model actor (or in-process with ``workers=0``).

:class:`ModelHost` holds one model (built once from a :class:`HostConfig`), the open
datasets of the scenes it reads, and a lock so that tasks sharing the actor take turns
on the model. A :class:`~sam_geo.run.tasks.TileTask` runs on it through
:meth:`ModelHost.run`; the task's mode decides what to do with the window (read it,
encode it once, decode prompts, vectorize) using the host's methods.

Decoding uses the backend's prompt encoder and mask decoder in batches of
``batch_size`` prompts against the tile's one image embedding; masks are upsampled from
SAM's 256 x 256 low-resolution logits only over each prompt's crop (bilinear, as SAM's
``postprocess_masks``), so memory per batch does not grow with the tile size.
"""

from __future__ import annotations

import ctypes
import os
import platform
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam_geo.io.prompts import PromptBatch
from sam_geo.model.masks import crop_for_prompt, logits_windows
from sam_geo.model.mirror import Mirror, mirror_views
from sam_geo.model.sam_backend import SamBackend, build_backend, resolve_device, resolve_precision
from sam_geo.run.post import PromptMasks
from sam_geo.run.standin import StandinBackend
from sam_geo.run.tasks import ModelOutput, PostConfig, TileInput, TileTask

CPU_HEAP_KEEP_MB = 1024
"""Freed memory (MiB) that glibc's allocator keeps for reuse in a CPU model process
instead of handing it back to the kernel (see :func:`keep_freed_memory_for_reuse`)."""


GPU_BATCH_SIZE = 64
"""Prompts per mask-decoder call on CUDA, where batching pays."""


CPU_BATCH_SIZE = 4
"""Prompts per mask-decoder call on CPU: the decoder's per-prompt tensors over 4,096
image tokens outgrow the caches in larger batches (MobileSAM, :func:`cpu_mask_decoder`,
fp32, 2 AMD EPYC cores: boxes 32 / 20 / 22 / 27 ms per prompt at 1 / 4 / 8 / 16 per call;
points with three masks 43 / 37 / 36 / 49 ms; ``benchmarks/decoder_batch.py``)."""


GPU_ENCODE_BATCH = 4
"""Tiles per image-encoder call on CUDA: the actor's task threads hand their tiles to one
:class:`EncodeBatcher`, which runs them through the encoder together. On CPU the encoder
is compute-bound at batch 1 already, so tiles are encoded one by one there."""


ENCODE_BATCH_WAIT_S = 0.02
"""Longest wait (seconds) for more tiles to fill an encoder batch once one tile is ready."""


@dataclass(frozen=True)
class HostConfig:
    """What a model actor needs to build its model (picklable)."""

    model: str
    weights: str
    device: str = "cpu"
    batch_size: int | None = None
    """Prompts per decoder call; None: :data:`GPU_BATCH_SIZE` on CUDA, else :data:`CPU_BATCH_SIZE`."""
    threads: int | None = None
    multimask: bool | None = None
    """Three candidate masks for box prompts: True always, False never, None where the
    prompt's outline area can choose (:func:`~sam_geo.model.masks.wants_three_masks`)."""
    detector: str | None = None
    """Text detector name or folder (``sam-geo text``), loaded on first use."""
    min_area: float = 0.0
    """Smallest polygon part kept, in square CRS units of the scene."""
    simplify: float | None = None
    """Simplification tolerance in CRS units, or None."""
    precision: str = "auto"
    """Model arithmetic: ``fp32``, ``bf16`` or ``fp16`` (``torch.autocast``); ``auto``: bf16
    on a CUDA GPU that supports it (else fp16), fp32 on CPU."""
    encode_batch: int | None = None
    """Tiles per image-encoder call; None: :data:`GPU_ENCODE_BATCH` on CUDA, 1 on CPU."""
    decoder_context_px: int | None = None
    """CPU mask decoder (SAM and MobileSAM): each box prompt's decoder attends to a square
    of this many model pixels a side around its box (at least the box's mask window),
    not the whole tile; None or 0: the whole tile, SAM's own outputs. No effect on CUDA
    or on point-only prompts."""
    flip_views: int = 1
    """Views per tile for prompts (:func:`~sam_geo.model.mirror.mirror_views`): 1 the
    tile alone; 2 or 4 add mirrored copies, each encoded and decoded, their chosen
    masks' logits averaged."""

    standin_ms: float | None = None
    """Build the stand-in model (:mod:`sam_geo.run.standin`, this many ms per encoder
    call) instead of ``model``: for measuring the runtime, never for results."""

    @property
    def post(self) -> PostConfig:
        """What the finish stage needs of this configuration."""
        return PostConfig(min_area=self.min_area, simplify=self.simplify)


@contextmanager
def timed(seconds: dict[str, float], stage: str, clock: Callable[[], float] = time.perf_counter) -> Iterator[None]:
    """Add the seconds the block took to ``seconds[stage]``: wall seconds by default
    (model calls: the time the model was busy)."""
    start = clock()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + clock() - start


def cpu_timed(seconds: dict[str, float], stage: str) -> AbstractContextManager[None]:
    """:func:`timed` with the calling thread's CPU seconds (:func:`time.thread_time`):
    what a CPU stage (read, vectorize, write) costs in cores, not counting the time it
    waited for a core the model or another stage held, nor for I/O."""
    return timed(seconds, stage, time.thread_time)


class EncodeBatcher:
    """Gathers the tiles an actor's task threads want encoded into image-encoder batches.

    A thread calling :meth:`encode` blocks until its tile's embedding is ready. One
    background thread takes the first waiting tile, waits up to ``max_wait_s`` seconds
    for more (at most ``max_batch`` in all) and encodes them in one call of
    ``encode_many``; an exception is handed to every caller of that batch.
    """

    def __init__(
        self,
        encode_many: Any,
        max_batch: int,
        max_wait_s: float = ENCODE_BATCH_WAIT_S,
    ) -> None:
        self._encode_many = encode_many
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batch_sizes: list[int] = []
        """Sizes of the batches run so far (for tests and benchmarks)."""
        self._queue: queue.Queue[tuple[np.ndarray, Future[Any]]] = queue.Queue()
        threading.Thread(target=self._loop, name="sam-geo-encoder", daemon=True).start()

    def encode(self, rgb: np.ndarray) -> Any:
        future: Future[Any] = Future()
        self._queue.put((rgb, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self.batch_sizes.append(len(batch))
            try:
                outputs = self._encode_many([rgb for rgb, _ in batch])
            except BaseException as exc:  # handed to the callers, who raise it
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), output in zip(batch, outputs):
                future.set_result(output)


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's ``malloc`` keep freed large blocks for reuse: serve blocks of up to
    32 MiB (glibc's ceiling) from the heap rather than fresh ``mmap`` pages, and keep up
    to :data:`CPU_HEAP_KEEP_MB` of freed heap instead of trimming it.

    A CPU forward pass allocates and frees tensors of several MiB per layer; by default
    each comes back as new zeroed pages (a page fault per 4 KiB). Measured with
    MobileSAM's image encoder on a 1024 px tile, fp32, 2 AMD EPYC cores: 1.80-2.18 s
    median per tile by default, 1.29-1.45 s with this (6 timed encodes per run, 2 runs
    each way; README.md, "Allocator"). The process's peak memory stays about the same (``benchmarks/memory.py``);
    its resident size stays near that peak between tiles.

    Does nothing, and returns False, off glibc (macOS, Windows, musl) or where the
    user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` themselves.
    """
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, CPU_HEAP_KEEP_MB << 20))


class ModelHost:
    """Holds one model; segments the prompts of tiles handed to :meth:`run`."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.device = torch.device(resolve_device(config.device))
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.standin_ms is not None:
            self.backend: Any = StandinBackend(config.standin_ms)
        else:
            self.backend = build_backend(config.model, Path(config.weights), self.device, multimask=config.multimask)
        self._model_lock = threading.Lock()  # one model call at a time per actor
        self._model_seconds = 0.0
        self._encoder_calls = 0
        self._tiles = 0
        self._first_tile: float | None = None
        self._detector: Any = None
        default_batch = GPU_BATCH_SIZE if self.device.type == "cuda" else CPU_BATCH_SIZE
        self.batch_size = config.batch_size or default_batch
        self.autocast_dtype = resolve_precision(config.precision, self.device)
        if self.device.type == "cpu" and isinstance(self.backend, SamBackend):
            self.backend.use_cpu_decoder(self.autocast_dtype, config.decoder_context_px)
        self.encode_batch = config.encode_batch or (GPU_ENCODE_BATCH if self.device.type == "cuda" else 1)
        self._batcher = EncodeBatcher(self._encode_timed, self.encode_batch) if self.encode_batch > 1 else None

    @property
    def model(self) -> torch.nn.Module:
        return self.backend.model

    @property
    def image_size(self) -> int:
        return self.backend.image_size

    def detector(self) -> Any:
        """The text detector of ``config.detector``, loaded once per actor on first use."""
        if self._detector is None:
            from sam_geo.model.detector import TextDetector

            if self.config.detector is None:
                raise ValueError("this segmenter was built without a text detector")
            self._detector = TextDetector.from_pretrained(self.config.detector, device=self.device)
        return self._detector

    @property
    def model_lock(self) -> threading.Lock:
        """Held around each model call, so tasks sharing this actor take turns on it."""
        return self._model_lock

    @contextmanager
    def model_call(self) -> Iterator[None]:
        """Hold the model (see :meth:`hold_model`) under the configured autocast precision."""
        with self.hold_model(), self._autocast():
            yield

    @contextmanager
    def hold_model(self) -> Iterator[None]:
        """Hold :attr:`model_lock` (no autocast: the text detector keeps its own precision);
        the time it is held counts as model time in :meth:`stats`."""
        with self._model_lock:
            start = time.perf_counter()
            try:
                yield
            finally:
                self._model_seconds += time.perf_counter() - start

    def stats(self) -> dict[str, Any]:
        """This host's share of the run: node, device, tiles run, image-encoder calls
        (fewer than tiles when tiles were batched), seconds in model calls and
        ``model_busy_share`` (model seconds over the wall seconds since its first
        tile started; model loading is not counted)."""
        wall = time.perf_counter() - self._first_tile if self._first_tile is not None else 0.0
        return {
            "node_id": _node_id(),
            "device": str(self.device),
            "tiles": self._tiles,
            "encoder_calls": self._encoder_calls,
            "model_seconds": round(self._model_seconds, 3),
            "wall_seconds": round(wall, 3),
            "model_busy_share": round(self._model_seconds / wall, 3) if wall > 0 else 0.0,
        }

    def _autocast(self) -> Any:
        if self.autocast_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def encode(
        self, rgb: np.ndarray, seconds: dict[str, float] | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The tile's image embedding and resized (h, w); batched with other tasks'
        tiles when ``encode_batch > 1`` (see :class:`EncodeBatcher`).

        ``seconds["encode"]`` gains the encoder time of this tile (its share of a
        batch), not the time spent waiting for the model or for a batch to fill.
        """
        if self._batcher is not None:
            (embedding, input_hw), spent = self._batcher.encode(rgb)
        else:
            (embedding, input_hw), spent = self._encode_timed([rgb])[0]
        if seconds is not None:
            seconds["encode"] = seconds.get("encode", 0.0) + spent
        return embedding, input_hw

    def _encode_timed(self, rgbs: list[np.ndarray]) -> list[tuple[tuple[Any, tuple[int, int]], float]]:
        """Encode tiles in one call; each output with its share of the call's seconds."""
        with self.model_call():
            start = time.perf_counter()
            encode_many = getattr(self.backend, "encode_many", None)
            outputs = encode_many(rgbs) if encode_many is not None else [self.backend.encode(r) for r in rgbs]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            share = (time.perf_counter() - start) / len(rgbs)
            self._encoder_calls += 1
        return [(output, share) for output in outputs]

    def decode(
        self,
        embedding: Any,
        input_hw: tuple[int, int],
        tile_hw: tuple[int, int],
        prompts: PromptBatch,
        seconds: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Low-res logits (float32) and scores of a prompt batch, under the model lock;
        ``seconds["decode"]`` gains the time the decoder ran (not the wait for it)."""
        with self.model_call(), timed(seconds if seconds is not None else {}, "decode"):
            logits, scores = self.backend.decode(embedding, input_hw, tile_hw, prompts)
        return logits.float(), scores

    # -- one tile ------------------------------------------------------------------

    def infer(self, task: TileTask, tile_input: TileInput) -> ModelOutput:
        """Run a tile task's model stage (:meth:`TileTask.infer`) on this host's model;
        the seconds it records come back with its output, not in ``tile_input``."""
        if self._first_tile is None:
            self._first_tile = time.perf_counter()
        before, tile_input.seconds = tile_input.seconds, {}
        try:
            value = task.infer(self, tile_input)
        finally:
            spent, tile_input.seconds = tile_input.seconds, before
        self._tiles += 1
        return ModelOutput(value, spent)

    def decode_prompts(self, rgb: np.ndarray, prompts: PromptBatch, seconds: dict[str, float]) -> PromptMasks:
        """Encode the tile once per view and decode ``prompts`` (tile pixels) against it.

        Prompts go in batches of one kind (:func:`decode_batches`). With
        ``config.flip_views`` above 1, each batch is decoded in every mirrored view
        (:meth:`decode_views`). Per prompt, only the cells of the low-resolution logits
        its mask can use come back (:func:`~sam_geo.model.masks.logits_windows`), on
        the CPU, for the finish stage (:func:`sam_geo.run.post.prompt_polygons`).
        ``seconds`` gains encode and decode.
        """
        views = mirror_views(self.config.flip_views)
        encoded = self.encode_views(rgb, views, seconds)
        tile_hw = rgb.shape[:2]
        frame = self.backend.logits_frame(tile_hw, encoded[0][1])
        index, scores, crops, cells, logits_out = [], [], [], [], []
        grid_hw = (0, 0)
        for part in decode_batches(prompts, self.batch_size):
            logits, part_scores = self.decode_views(views, encoded, tile_hw, part, seconds)
            grid_hw = (int(logits.shape[-2]), int(logits.shape[-1]))
            windows = logits_windows(part, tile_hw, frame, size=grid_hw[0])
            with timed(seconds, "decode"):
                host_logits = logits.cpu()
            for k, (a0, b0, a1, b1) in enumerate(windows.tolist()):
                logits_out.append(host_logits[k, a0:a1, b0:b1].numpy().copy())
                crops.append(crop_for_prompt(part, k, tile_hw))
            index.append(part.index)
            scores.append(part_scores)
            cells.append(windows)
        if not index:
            return PromptMasks(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4), np.int64),
                               np.zeros((0, 4), np.int64), [], frame, grid_hw)
        return PromptMasks(np.concatenate(index), np.concatenate(scores), np.asarray(crops, np.int64).reshape(-1, 4),
                           np.concatenate(cells), logits_out, frame, grid_hw)

    def encode_views(
        self, rgb: np.ndarray, views: tuple[Mirror, ...], seconds: dict[str, float]
    ) -> list[tuple[Any, tuple[int, int]]]:
        """Each view's (embedding, input_hw): the plain tile through :meth:`encode`
        (batched with other tiles where that is on), several views in one encoder call."""
        if len(views) == 1:
            return [self.encode(views[0].image(rgb), seconds)]
        outputs = self._encode_timed([view.image(rgb) for view in views])
        seconds["encode"] = seconds.get("encode", 0.0) + sum(spent for _, spent in outputs)
        return [output for output, _ in outputs]

    def decode_views(
        self,
        views: tuple[Mirror, ...],
        encoded: list[tuple[Any, tuple[int, int]]],
        tile_hw: tuple[int, int],
        prompts: PromptBatch,
        seconds: dict[str, float],
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Logits (n, h, w) on the plain tile's grid and scores (n,) of a prompt batch:
        the mean over ``views`` of the mask each view chose, mirrored back
        (:meth:`~sam_geo.model.mirror.Mirror.restore`), and of its predicted IoU.
        ``encoded``: each view's (embedding, input_hw)."""
        total: torch.Tensor | None = None
        score_sum = np.zeros(len(prompts))
        for view, (embedding, input_hw) in zip(views, encoded):
            seen = view.prompts(prompts, tile_hw, input_hw)
            logits, scores = self.decode(embedding, input_hw, tile_hw, seen, seconds)
            with timed(seconds, "decode"):
                logits = view.restore(logits, tile_hw, self.backend.logits_frame(tile_hw, input_hw))
                total = logits if total is None else total + logits
            score_sum += scores
        if len(views) > 1:
            total = total / len(views)
        return total, score_sum / len(views)


def decode_batches(batch: PromptBatch, size: int) -> Iterator[PromptBatch]:
    """Batches of at most ``size`` prompts that share one shape (box or not, point count).

    SAM's prompt encoder takes one tensor per batch, and padding a box-only prompt with
    a "not a point" token (or giving it an empty mask) would change its embedding, so
    kinds (box or not, mask or not, point count) are never mixed; nor are prompts with
    and without an outline area (those with one may get three candidate masks,
    :func:`~sam_geo.model.masks.wants_three_masks`). Point
    arrays are trimmed to the group's point count.
    """
    n_points = (batch.labels >= 0).sum(axis=1)
    has_area = ~np.isnan(batch.areas)
    kinds = np.stack([batch.has_box, batch.has_mask, has_area, n_points], axis=1)
    for kind in np.unique(kinds, axis=0):
        rows = np.flatnonzero((kinds == kind).all(axis=1))
        group = batch.take(rows)
        k = int(kind[3])
        order = np.argsort(group.labels < 0, axis=1, kind="stable")[:, :k]
        points = np.take_along_axis(group.points, order[..., None], axis=1)
        labels = np.take_along_axis(group.labels, order, axis=1)
        group = group.replace(points=points, labels=labels)
        for start in range(0, len(group), size):
            yield group.take(np.arange(start, min(start + size, len(group))))


def _node_id() -> str:
    """The Ray node this process runs on, or this machine's name outside Ray."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return platform.node() or "local"
