"""SAM-family models (SAM ViT-B/L/H, MobileSAM) as a backend: encode a tile once,
decode batches of prompts against it; device and precision choices.

Every backend (this one, :class:`sam_geo.model.sam2_backend.Sam2Backend`) offers the
same members: ``image_size``; ``encode(rgb) -> (embedding, input_hw)``;
``decode(embedding, input_hw, tile_hw, prompts) -> (low-res logits (n, h, w), scores
(n,))``; and ``logits_frame(tile_hw, input_hw) -> (fy, fx)``. :func:`build_backend`
picks the backend of a registry name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sam_geo.errors import ConfigError
from sam_geo.io.prompt_batch import PromptBatch
from sam_geo.model.masks import choose_masks, image_tensor, logits_windows, mask_prompt_logits, wants_three_masks
from sam_geo.model.registry import build_sam, get_spec

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

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

    Any backend offers the same four members (see :mod:`sam_geo.model.sam2_backend` for SAM 2.1):
    ``image_size``; ``encode(rgb) -> (embedding, input_hw)``; ``decode(embedding,
    input_hw, tile_hw, prompts) -> (low-res logits (n, h, w), scores (n,))``; and
    ``logits_frame(tile_hw, input_hw) -> (fy, fx)``: the fraction of the logits grid
    one tile pixel spans along rows and columns.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, *, multimask: bool | None = None) -> None:
        self.model = model
        self.device = device
        self.image_size: int = model.image_encoder.img_size
        self.multimask = multimask
        self._cpu_decoder: torch.nn.Module | None = None
        self._image_pe: torch.Tensor | None = None

    def use_cpu_decoder(self, dtype: torch.dtype, context_px: int | None = None) -> None:
        """Run the mask decoder as :func:`cpu_mask_decoder` builds it: weights in
        ``dtype``, outside autocast, channels-last. See that function for why.
        ``context_px``: see :attr:`sam_geo.settings.Settings.decoder_context_px` (model pixels,
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
        image = image_tensor(rgb, self.device)
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

        Point-only prompts, and box prompts as :func:`wants_three_masks` decides, ask
        for SAM's three candidate masks; :func:`choose_masks` keeps one. Other box
        prompts ask for one. Mask prompts (``prompts.masks``, tile pixels) enter as SAM's
        low-res mask input (:func:`mask_prompt_logits`).
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
        multimask = wants_three_masks(prompts, self.multimask)
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

def build_backend(
    name: str, weights: Path | None, device: torch.device, *, multimask: bool | None = None
) -> SamBackend:
    """The model backend for a registry name (``models.MODELS``), weights loaded
    (``weights``: a checkpoint file, or for SAM 3 a ``transformers`` model folder)."""
    spec = get_spec(name)
    if spec.family in ("sam2_hf", "edgetam"):
        from sam_geo.model.hf_backend import HFPromptBackend

        return HFPromptBackend.from_folder(weights, spec.arch, device, multimask=multimask)
    if spec.family == "sam3":
        from sam_geo.model.sam3_backend import Sam3Backend

        return Sam3Backend.from_folder(weights, device)
    if spec.family == "sam2":
        from sam_geo.model.sam2_backend import Sam2Backend

        backend = Sam2Backend(name, weights, device)
        backend.multimask = multimask
        return backend
    return SamBackend(build_sam(name, weights, device=str(device)), device, multimask=multimask)
