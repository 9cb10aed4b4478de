"""The work done inside a model actor: read a tile, encode it once, decode its prompts.

:class:`TileSegmenter` holds one SAM-family model and the open datasets; it is what a
Ray actor wraps (:mod:`sam_geo.run.runtime`) and can also be used in-process. Input is a
:class:`TileTask` (a tile descriptor plus its prompts: no pixels); output a
:class:`TileResult` carrying polygons as WKB in the scene CRS, never mask arrays.

Decoding uses SAM's own prompt encoder and mask decoder in batches of ``batch_size``
prompts against the tile's single image embedding. Masks are upsampled from SAM's
256 x 256 low-resolution logits only over each prompt's crop (bilinear, the same
sampling as SAM's ``postprocess_masks``), so memory per batch does not grow with the
tile size.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from concurrent.futures import Future
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.env
import rasterio.features
import shapely
import shapely.affinity
import torch
import torch.nn.functional as F
from affine import Affine

from sam_geo.errors import ConfigError
from sam_geo.model.registry import build_sam, get_spec
from sam_geo.io.prompts import PromptBatch
from sam_geo.io.scenes import SceneInfo, Stretch, WindowRead, read_window
from sam_geo.geo.tiles import Tile
from sam_geo.geo.vectorize import mask_to_geometry

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

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

GDAL_CACHE_MB = 256
"""GDAL block cache of a model actor, MiB (``SAM_GEO_GDAL_CACHE_MB`` overrides). GDAL's
default is 5 % of the machine's memory, which an actor reading a large scene fills
tile after tile; a fixed cap keeps an actor's memory independent of the scene size.
Tiles are read once each, so a larger cache buys nothing."""


@dataclass(frozen=True)
class EngineConfig:
    """What a model actor needs to build its model (picklable)."""

    model: str
    weights: str
    device: str = "cpu"
    batch_size: int | None = None
    """Prompts per decoder call; None: :data:`GPU_BATCH_SIZE` on CUDA, else :data:`CPU_BATCH_SIZE`."""
    threads: int | None = None
    multimask: bool = False
    """Ask SAM for three masks for every prompt (not only single points); see choose_masks."""
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


@dataclass(frozen=True)
class TileTask:
    """A tile descriptor and its prompts: everything a worker needs, no pixels."""

    scene: SceneInfo
    stretch: Stretch
    tile: Tile
    prompts: PromptBatch

    @property
    def key(self) -> str:
        return task_key(self.scene, self.tile)

    def execute(self, segmenter: TileSegmenter) -> TileResult:
        return segmenter.run_prompted(self)


def task_key(scene: SceneInfo, tile: Tile) -> str:
    """Stable id of a tile of a scene: ``<8 hex of the scene path's sha1>-<tile key>``."""
    digest = hashlib.sha1(scene.path.encode("utf-8")).hexdigest()[:8]
    return f"{digest}-{tile.key}"


@dataclass(frozen=True)
class PromptResult:
    """One decoded prompt: its layer index, predicted IoU and polygon (WKB, scene CRS)."""

    prompt_index: int
    score: float
    wkb: bytes | None


@dataclass
class TileResult:
    """What a worker sends back for one tile."""

    tile_key: str
    results: list[PromptResult] = field(default_factory=list)
    on_nodata: list[int] = field(default_factory=list)
    skipped_nodata: bool = False
    encoded: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    """Why the tile failed after all retries (None: it did not fail)."""
    attempts: int = 0


@contextmanager
def timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; others unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: AVX-512 BF16 dot products (AMD Zen 4
    and newer, Intel Cooper Lake), with or without Intel AMX tiles (Sapphire Rapids and
    newer). There bf16 autocast halves MobileSAM's image-encoder time (2 AMD EPYC cores,
    no AMX: 0.71 s against 1.42 s per 1024 px tile; on an AMX machine the decoder's time
    halves too); CPUs without it emulate bf16 and get slower. Uses torch's CPU feature
    probes, which are private, so any failure reads as "no". ``SAM_GEO_CPU_BF16=0`` (or
    ``1``) overrides the probe, e.g. to reproduce fp32 results."""
    forced = os.environ.get("SAM_GEO_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``) on ``device``.

    ``auto`` is bf16 on a CUDA GPU that supports it, fp16 on an older one; on CPU it is
    bf16 where :func:`cpu_has_fast_bf16` (same masks, measured on Banepa: median IoU
    0.857 either way) and fp32 elsewhere. fp16 on CPU is refused.
    """
    if precision == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of auto, {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 needs a CUDA GPU; use --precision bf16 or fp32 on CPU")
    return PRECISIONS[precision]


def precision_name(precision: str, device: str) -> str:
    """The precision (``fp32``, ``bf16``, ``fp16``) that ``precision`` resolves to on
    ``device`` (``auto``, ``cpu``, ``cuda``...) of this machine, for run summaries. A
    CUDA device this machine does not have (a driver without a GPU for a GPU cluster)
    gives ``precision`` unresolved; invalid values raise :class:`ConfigError` here, on
    the driver, before any work."""
    target = torch.device(resolve_device(device))
    if target.type == "cuda" and not torch.cuda.is_available():
        if precision != "auto" and precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; use one of auto, {', '.join(PRECISIONS)}")
        return precision
    dtype = resolve_precision(precision, target)
    return next(name for name, value in PRECISIONS.items() if value == dtype)


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


def cpu_mask_decoder(
    decoder: torch.nn.Module, dtype: torch.dtype = torch.float32, context: int | None = None
) -> torch.nn.Module:
    """A copy of SAM's official ``MaskDecoder`` that runs fast on CPU, same outputs:
    :class:`sam_geo.model.decoder.FactorizedMaskDecoder` with weights in ``dtype`` (bf16 runs
    outside autocast, which would re-cast weights and activations around every layer).

    On CPU SAM's decoder costs more than MobileSAM's image encoder: per prompt it
    projects all 4,096 image tokens several times. The copy computes the same function
    with the prompt-independent projections done once per tile and the per-prompt
    attentions carried through the few prompt tokens instead (see that module).
    Timings: ``benchmarks/decoder_batch.py`` (figures in DESIGN.md).

    ``context`` (image-embedding cells a side, None: the whole grid) restricts each box
    prompt's transformer to a square around its box: faster, no longer the same outputs
    (see :class:`~sam_geo.model.decoder.FactorizedMaskDecoder`).
    """
    from sam_geo.model.decoder import FactorizedMaskDecoder

    return FactorizedMaskDecoder(decoder, dtype, context)


class SamBackend:
    """Model steps of SAM-family models built on ``segment_anything.modeling.Sam``
    (SAM ViT-B/L/H and MobileSAM): encode a tile once, decode prompt batches.

    Any backend offers the same four members (see ``sam_geo/sam2_backend.py`` for SAM 2.1):
    ``image_size``; ``encode(rgb) -> (embedding, input_hw)``; ``decode(embedding,
    input_hw, tile_hw, prompts) -> (low-res logits (n, h, w), scores (n,))``; and
    ``logits_frame(tile_hw, input_hw) -> (fy, fx)``: the fraction of the logits grid
    one tile pixel spans along rows and columns.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, *, multimask: bool = False) -> None:
        self.model = model
        self.device = device
        self.image_size: int = model.image_encoder.img_size
        self.multimask = multimask
        self._cpu_decoder: torch.nn.Module | None = None
        self._image_pe: torch.Tensor | None = None

    def use_cpu_decoder(self, dtype: torch.dtype, context_px: int | None = None) -> None:
        """Run the mask decoder as :func:`cpu_mask_decoder` builds it: weights in
        ``dtype``, outside autocast, channels-last. See that function for why.
        ``context_px``: see :attr:`EngineConfig.decoder_context_px` (model pixels,
        rounded up to whole image-embedding cells)."""
        grid = self.model.prompt_encoder.image_embedding_size[0]
        context = None if not context_px else -(-context_px * grid // self.image_size)
        self._cpu_decoder = cpu_mask_decoder(self.model.mask_decoder, dtype, context)

    def _dense_pe(self) -> torch.Tensor:
        """The prompt encoder's positional encoding of the embedding grid (1, c, h, w): a
        function of the model's weights only, computed once (SAM recomputes it per call)."""
        if self._image_pe is None:
            self._image_pe = self.model.prompt_encoder.get_dense_pe()
        return self._image_pe

    def run_mask_decoder(
        self,
        embedding: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask: bool,
        windows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's mask decoder on prompt embeddings: low-res logits (n, k, 256, 256) and
        predicted IoU (n, k), float32; ``k`` is 3 with ``multimask``, else 1.

        ``windows`` (n, 4), optional, for the CPU decoder: the cells of the logits grid
        each prompt's mask is kept in (:func:`logits_windows`); logits outside are not
        computed (see :class:`sam_geo.model.decoder.FactorizedMaskDecoder`)."""
        inputs = {"image_embeddings": embedding, "image_pe": self._dense_pe(), "sparse_prompt_embeddings": sparse,
                  "dense_prompt_embeddings": dense, "multimask_output": multimask}
        if self._cpu_decoder is None:
            low_res, iou = self.model.mask_decoder(**inputs)
        else:
            with torch.autocast(device_type=self.device.type, enabled=False):  # it casts to its own dtype
                low_res, iou = self._cpu_decoder(**inputs, logits_windows=windows)
        return low_res.float(), iou.float()

    def logits_frame(self, tile_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[float, float]:
        """SAM resizes the longer side to ``image_size`` and pads: one scale for both axes."""
        ratio = input_hw[0] / tile_hw[0] / self.image_size
        return ratio, ratio

    @torch.inference_mode()
    def encode(self, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image embedding (1, 256, 64, 64) of an (rows, cols, 3) uint8 array, and its resized (h, w).

        The array is resized so its longer side is the model's input size (1024),
        normalised and zero-padded as SAM's ``preprocess`` does.
        """
        return self.encode_many([rgb])[0]

    @torch.inference_mode()
    def encode_many(self, rgbs: list[np.ndarray]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """:meth:`encode` for several tiles in one image-encoder call (any tile shapes:
        each is resized and padded to the model's square input first)."""
        images, sizes = zip(*(self._model_input(rgb) for rgb in rgbs))
        embeddings = self.model.image_encoder(torch.cat(images))
        return [(embeddings[i : i + 1], size) for i, size in enumerate(sizes)]

    def _model_input(self, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = rgb.shape[:2]
        scale = self.image_size / max(h, w)
        new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
        image = torch.as_tensor(rgb, device=self.device).permute(2, 0, 1)[None].float()
        if (new_h, new_w) != (h, w):
            image = F.interpolate(image, (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        return self.model.preprocess(image), (new_h, new_w)

    @torch.inference_mode()
    def decode(
        self,
        embedding: torch.Tensor,
        input_hw: tuple[int, int],
        tile_hw: tuple[int, int],
        prompts: PromptBatch,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Low-res mask logits (n, 256, 256) and predicted IoU (n,) for tile-pixel prompts.

        Point-only prompts (and all prompts when ``multimask``) ask for SAM's three
        candidate masks; :func:`choose_masks` keeps one. Box prompts otherwise ask for
        one. Mask prompts (``prompts.masks``, tile pixels) enter as SAM's low-res mask
        input (:func:`mask_prompt_logits`).
        """
        ratio = input_hw[0] / tile_hw[0]
        device = self.device
        points = labels = boxes = masks = None
        if (prompts.labels >= 0).any():
            points = torch.as_tensor(prompts.points * ratio, dtype=torch.float32, device=device)
            labels = torch.as_tensor(prompts.labels, dtype=torch.int64, device=device)
        has_box = prompts.has_box
        if has_box.any():
            if not has_box.all():
                raise ValueError("a decode batch must not mix box and point-only prompts")
            boxes = torch.as_tensor(prompts.boxes * ratio, dtype=torch.float32, device=device)
        if prompts.has_mask.any():
            masks = torch.as_tensor(
                mask_prompt_logits(prompts.masks, self.logits_frame(tile_hw, input_hw)), device=device
            )
        multimask = self.multimask or not has_box.any()
        sparse, dense = self.model.prompt_encoder(
            points=(points, labels) if points is not None else None, boxes=boxes, masks=masks
        )
        frame = self.logits_frame(tile_hw, input_hw)
        windows = None
        if has_box.all() and self._cpu_decoder is not None:
            windows = torch.as_tensor(logits_windows(prompts, tile_hw, frame))
        low_res, iou = self.run_mask_decoder(embedding, sparse, dense, multimask, windows)
        best = choose_masks(low_res, iou, prompts.areas, frame)
        rows = torch.arange(len(best), device=device)
        return low_res[rows, best], iou[rows, best].float().cpu().numpy()


def build_backend(name: str, weights: Path | None, device: torch.device, *, multimask: bool = False) -> SamBackend:
    """The model backend for a registry name (``models.MODELS``), weights loaded."""
    spec = get_spec(name)
    if spec.family == "sam2":
        from sam_geo.model.sam2_backend import Sam2Backend

        backend = Sam2Backend(name, weights, device)
        backend.multimask = multimask
        return backend
    return SamBackend(build_sam(name, weights, device=str(device)), device, multimask=multimask)


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


class TileSegmenter:
    """Holds one model; segments the prompts of tiles handed to :meth:`run`."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(resolve_device(config.device))
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()
        if config.threads:
            torch.set_num_threads(config.threads)
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", int(os.environ.get("SAM_GEO_GDAL_CACHE_MB", GDAL_CACHE_MB)))
        self.backend = build_backend(config.model, Path(config.weights), self.device, multimask=config.multimask)
        self._local = threading.local()  # dataset handles are per thread
        self._all_datasets: list[rasterio.DatasetReader] = []
        self._model_lock = threading.Lock()  # one model call at a time per actor
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
        """Hold the model (see :attr:`model_lock`) under the configured autocast precision."""
        with self._model_lock, self._autocast():
            yield

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

    # -- datasets ------------------------------------------------------------------

    def _dataset(self, path: str) -> rasterio.DatasetReader:
        """This thread's open handle on ``path`` (GDAL handles are not thread-safe)."""
        datasets: dict[str, rasterio.DatasetReader] = self._local.__dict__.setdefault("datasets", {})
        src = datasets.get(path)
        if src is None or src.closed:
            src = rasterio.open(path)
            datasets[path] = src
            self._all_datasets.append(src)
        return src

    def close(self) -> None:
        for src in self._all_datasets:
            src.close()
        self._all_datasets.clear()

    # -- one tile ------------------------------------------------------------------

    def run(self, task: TileTask) -> TileResult:
        """Run any task type: each task knows which segmenter method serves it."""
        return task.execute(self)

    def read(self, scene: SceneInfo, stretch: Stretch, tile: Tile) -> WindowRead:
        """The tile's pixels as model-ready RGB plus its validity mask."""
        out_shape = tile.shape if tile.scale != 1 else None
        return read_window(self._dataset(scene.path), scene, stretch, tile.read_window, out_shape)

    def run_prompted(self, task: TileTask) -> TileResult:
        """Read, encode and decode one tile; polygons come back in the scene CRS."""
        result = TileResult(tile_key=task.key)
        seconds = result.seconds
        tile = task.tile
        with timed(seconds, "read"):
            window = self.read(task.scene, task.stretch, tile)
        if not window.valid.any():
            result.skipped_nodata = True
            result.on_nodata = [int(i) for i in task.prompts.index]
            return result
        prompts = _to_tile_pixels(task.prompts, tile)
        usable = _prompts_on_data(prompts, window.valid)
        result.on_nodata = [int(i) for i in prompts.index[~usable]]
        prompts = prompts.take(np.flatnonzero(usable))
        if len(prompts) == 0:
            return result
        # The model lock is held per model call, so another task of this actor can read
        # or vectorize meanwhile, and only one batch of logits is alive at a time.
        embedding, input_hw = self.encode(window.rgb, seconds)
        result.encoded = True
        for part in _decode_batches(prompts, self.batch_size):
            logits, scores = self.decode(embedding, input_hw, window.rgb.shape[:2], part, seconds)
            with timed(seconds, "vectorize"):
                result.results.extend(
                    self._vectorize(part, logits, scores, window.valid, tile, input_hw, window.rgb.shape[:2])
                )
        return result

    def _vectorize(
        self,
        prompts: PromptBatch,
        logits: torch.Tensor,
        scores: np.ndarray,
        valid: np.ndarray,
        tile: Tile,
        input_hw: tuple[int, int],
        tile_hw: tuple[int, int],
    ) -> list[PromptResult]:
        out: list[PromptResult] = []
        for k in range(len(prompts)):
            r0, c0, r1, c1 = _crop_for_prompt(prompts, k, tile_hw)
            mask = upsample_crop(logits[k], (r0, c0, r1, c1), self.backend.logits_frame(tile_hw, input_hw))
            mask &= valid[r0:r1, c0:c1]
            geom = mask_to_geometry(
                mask,
                tile.transform @ Affine.translation(c0, r0),
                min_area=self.config.min_area,
                simplify=self.config.simplify,
            )
            wkb = None if geom is None else shapely.to_wkb(geom)
            out.append(PromptResult(int(prompts.index[k]), float(scores[k]), wkb))
        return out


MASK_PROMPT_LOGIT = 1.0
"""Logit magnitude of a rasterized mask prompt (inside +, outside -). A weak hint: on
outdated Banepa outlines (48 buildings, grown box + point + mask) median IoU was 0.734
at 1, 0.715 at 2, 0.687 at 8 and 0.663 at 20; a strong mask pins SAM to the old shape."""


def mask_prompt_logits(masks: np.ndarray, frame: tuple[float, float], size: int = 256) -> np.ndarray:
    """Rasterize tile-pixel polygons (WKB) into SAM's (n, 1, size, size) mask input.

    SAM's mask input covers the model's input frame at a quarter of its resolution;
    ``frame`` (fy, fx) is the fraction of that frame one tile pixel spans.
    """
    fy, fx = frame
    to_low = Affine.scale(fx * size, fy * size)
    out = np.full((len(masks), 1, size, size), -MASK_PROMPT_LOGIT, dtype=np.float32)
    for k, wkb in enumerate(masks):
        if wkb is None:
            continue
        geom = shapely.affinity.affine_transform(shapely.from_wkb(wkb), to_low.to_shapely())
        burned = rasterio.features.rasterize([(geom, 1)], out_shape=(size, size), all_touched=False, dtype="uint8")
        out[k, 0][burned > 0] = MASK_PROMPT_LOGIT
    return out


def choose_masks(
    low_res: torch.Tensor, iou: torch.Tensor, areas: np.ndarray, frame: tuple[float, float]
) -> torch.Tensor:
    """Index of the mask kept per prompt among SAM's candidates.

    The rule: the candidate closest in area to the prompt polygon when the prompt has
    one (``areas``, tile pixels; areas of candidates are measured on the low-res logits,
    which for box prompts on the CPU decoder cover only the window the mask is kept in),
    else the highest predicted IoU.
    """
    best = iou.argmax(dim=1)
    if low_res.shape[1] == 1 or np.isnan(areas).all():
        return best
    fy, fx = frame
    low_px_area = 1.0 / (fy * low_res.shape[-2] * fx * low_res.shape[-1])  # tile px per low-res px
    candidate_areas = (low_res > 0).sum(dim=(-1, -2)).float().cpu().numpy() * low_px_area
    closest = np.abs(candidate_areas - areas[:, None]).argmin(axis=1)
    use_area = torch.as_tensor(~np.isnan(areas), device=best.device)
    return torch.where(use_area, torch.as_tensor(closest, device=best.device), best)


def _decode_batches(batch: PromptBatch, size: int) -> Iterator[PromptBatch]:
    """Batches of at most ``size`` prompts that share one shape (box or not, point count).

    SAM's prompt encoder takes one tensor per batch, and padding a box-only prompt with
    a "not a point" token (or giving it an empty mask) would change its embedding, so
    kinds (box or not, mask or not, point count) are never mixed. Point
    arrays are trimmed to the group's point count.
    """
    n_points = (batch.labels >= 0).sum(axis=1)
    kinds = np.stack([batch.has_box, batch.has_mask, n_points], axis=1)
    for kind in np.unique(kinds, axis=0):
        rows = np.flatnonzero((kinds == kind).all(axis=1))
        group = batch.take(rows)
        k = int(kind[2])
        order = np.argsort(group.labels < 0, axis=1, kind="stable")[:, :k]
        points = np.take_along_axis(group.points, order[..., None], axis=1)
        labels = np.take_along_axis(group.labels, order, axis=1)
        group = group.replace(points=points, labels=labels)
        for start in range(0, len(group), size):
            yield group.take(np.arange(start, min(start + size, len(group))))


def _to_tile_pixels(batch: PromptBatch, tile: Tile) -> PromptBatch:
    """Scene-pixel prompts -> prompts in the tile array's pixels (x = col, y = row)."""
    offset = np.array([tile.read.col_start, tile.read.row_start], dtype=np.float64)
    s = tile.scale
    boxes = (batch.boxes - np.tile(offset, 2)) / s
    points = (batch.points - offset) / s
    to_tile = Affine.scale(1 / s) @ Affine.translation(-offset[0], -offset[1])
    masks = np.array(
        [None if m is None else shapely.to_wkb(shapely.affinity.affine_transform(shapely.from_wkb(m), to_tile.to_shapely()))
         for m in batch.masks],
        dtype=object,
    )
    return batch.replace(boxes=boxes, points=points, masks=masks, areas=batch.areas / (s * s))


def _prompts_on_data(batch: PromptBatch, valid: np.ndarray) -> np.ndarray:
    """(n,) bool: False for prompts whose positive points or whole box fall on nodata."""
    rows, cols = valid.shape
    ok = np.ones(len(batch), dtype=bool)
    for k in range(len(batch)):
        if batch.has_box[k]:
            x0, y0, x1, y1 = batch.boxes[k]
            r0, r1 = int(np.clip(np.floor(y0), 0, rows - 1)), int(np.clip(np.ceil(y1), 1, rows))
            c0, c1 = int(np.clip(np.floor(x0), 0, cols - 1)), int(np.clip(np.ceil(x1), 1, cols))
            ok[k] = bool(valid[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)].any())
        else:
            positive = batch.points[k][batch.labels[k] == 1]
            rr = np.clip(positive[:, 1].astype(int), 0, rows - 1)
            cc = np.clip(positive[:, 0].astype(int), 0, cols - 1)
            ok[k] = bool(valid[rr, cc].any())
    return ok


def _crop_for_prompt(batch: PromptBatch, k: int, tile_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) of the tile region a prompt's mask is kept in.

    A box keeps its mask within the box grown by half its size (SAM masks rarely leave
    their box by more); a point-only prompt keeps the whole tile.
    """
    rows, cols = tile_hw
    if not batch.has_box[k]:
        return 0, 0, rows, cols
    x0, y0, x1, y1 = batch.boxes[k]
    grow = 0.5 * max(x1 - x0, y1 - y0) + 8
    r0 = int(max(0, np.floor(y0 - grow)))
    c0 = int(max(0, np.floor(x0 - grow)))
    r1 = int(min(rows, np.ceil(y1 + grow)))
    c1 = int(min(cols, np.ceil(x1 + grow)))
    return r0, c0, max(r1, r0 + 1), max(c1, c0 + 1)


def logits_windows(batch: PromptBatch, tile_hw: tuple[int, int], frame: tuple[float, float],
                   size: int = 256) -> np.ndarray:
    """(n, 4) int: per box prompt, the ``(row0, col0, row1, col1)`` cells of the
    ``size`` x ``size`` low-res logits grid (end-exclusive) that :func:`upsample_crop`
    reads for the prompt's :func:`_crop_for_prompt` crop: the cells under the crop's
    first and last pixel centres plus the next cell, which bilinear sampling also reads.
    ``frame`` (fy, fx) is the fraction of the logits grid one tile pixel spans."""
    fy, fx = frame
    out = np.zeros((len(batch), 4), dtype=np.int64)
    for k in range(len(batch)):
        r0, c0, r1, c1 = _crop_for_prompt(batch, k, tile_hw)
        first = np.floor([(r0 + 0.5) * fy * size - 0.5, (c0 + 0.5) * fx * size - 0.5])
        last = np.floor([(r1 - 0.5) * fy * size - 0.5, (c1 - 0.5) * fx * size - 0.5]) + 2
        out[k] = np.clip(np.concatenate([first, last]), 0, size)
    return out


def upsample_crop(
    logits: torch.Tensor, crop: tuple[int, int, int, int], frame: tuple[float, float]
) -> np.ndarray:
    """Threshold low-res mask logits, bilinearly sampled at the crop's pixel centres.

    ``logits`` (h, w) cover the model's input frame; tile pixel (row, col) sits at
    fraction ``((row + 0.5) * fy, (col + 0.5) * fx)`` of it (``frame = (fy, fx)``, from
    the backend's ``logits_frame``). Same sampling as SAM's ``postprocess_masks``
    (bilinear, ``align_corners=False``) but only over the crop ``(row0, col0, row1,
    col1)``. Returns a (rows, cols) bool array.
    """
    r0, c0, r1, c1 = crop
    fy, fx = frame
    ys = (torch.arange(r0, r1, device=logits.device, dtype=torch.float32) + 0.5) * (2.0 * fy) - 1.0
    xs = (torch.arange(c0, c1, device=logits.device, dtype=torch.float32) + 0.5) * (2.0 * fx) - 1.0
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
    h, w = logits.shape[-2:]
    sampled = F.grid_sample(logits.float().reshape(1, 1, h, w), grid, mode="bilinear", align_corners=False)
    return (sampled[0, 0] > 0.0).cpu().numpy()
