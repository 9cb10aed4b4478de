"""Promptable models of ``transformers`` (SAM 2.1 as ``Sam2Model``, EdgeTAM as
``EdgeTamModel``) as a model backend: one code path for all of them.

Both share one API: ``get_image_embeddings(pixel_values)`` returns the image features
(a list of maps, finest first), and ``forward(image_embeddings=..., input_points=...,
input_labels=..., input_boxes=..., multimask_output=...)`` returns low-resolution mask
logits ``pred_masks`` (1, n, k, 4 g, 4 g) on a grid four times the embedding's ``g`` and
predicted IoU ``iou_scores`` (1, n, k). :class:`HFPromptBackend` offers the members of
:class:`sam_geo.model.sam_backend.SamBackend` (``image_size``, ``encode``, ``decode``,
``logits_frame``) on top of them, so prompted mode runs them like any other model:

* **encode**: the tile is stretched to the model's square input (``S`` x ``S`` px,
  1024 for SAM 2.1 and EdgeTAM; aspect not kept, as their image processors do),
  scaled to [0, 1] and normalised with the ImageNet mean and std;
* **decode**: boxes and points are scaled from tile pixels to the ``S`` frame per
  axis; padding points keep label -1 (SAM's "not a point"); point-only prompts (box
  prompts as :func:`~sam_geo.model.masks.wants_three_masks` decides) get three masks
  and keep one (:func:`~sam_geo.model.masks.choose_masks`). Mask prompts are refused
  (use the ``sam2`` package's models or SAM for ``--prompt-as mask``).

Weights are a ``transformers`` model folder (:mod:`sam_geo.model.hf_weights`); every
parameter of the model must come from it: a folder that leaves some randomly
initialised (another model's checkpoint) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sam_geo.errors import ConfigError, WeightsError
from sam_geo.io.prompt_batch import PromptBatch
from sam_geo.model.checkpoints import one_line_reason, sample_keys
from sam_geo.model.masks import choose_masks, image_tensor, wants_three_masks

MODEL_CLASSES = {"sam2": "Sam2Model", "edgetam": "EdgeTamModel"}
"""``transformers`` class of each ``model_type`` this backend runs."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_prompt_model(folder: Path, model_type: str) -> torch.nn.Module:
    """The ``transformers`` model of ``model_type`` from ``folder``, every weight loaded.

    Raises:
        WeightsError: the folder cannot be loaded, or leaves parameters uninitialised.
    """
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_class = getattr(transformers, MODEL_CLASSES[model_type])
    try:
        model, info = model_class.from_pretrained(str(folder), output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise WeightsError(f"Cannot load {model_type} from {folder}: {one_line_reason(exc)}.") from exc
    missing = list(info.get("missing_keys", []))
    if missing:
        raise WeightsError(
            f"{folder} does not hold every weight of a {model_type} model ({len(missing)} missing, e.g. "
            f"{sample_keys(sorted(missing))}); pass the model's own folder from Hugging Face."
        )
    return model.eval()


class HFPromptBackend:
    """A ``transformers`` promptable model (see the module docs) on ``device``."""

    def __init__(self, model: torch.nn.Module, device: torch.device, *, multimask: bool | None = None) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.multimask = multimask
        self.image_size: int = int(model.config.prompt_encoder_config.image_size)
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def from_folder(
        cls, folder: Path, model_type: str, device: torch.device, *, multimask: bool | None = None
    ) -> HFPromptBackend:
        """Load the model of a ``transformers`` folder (:func:`load_prompt_model`)."""
        return cls(load_prompt_model(folder, model_type), device, multimask=multimask)

    def logits_frame(self, tile_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[float, float]:
        """The tile is stretched to the square input: each axis has its own scale."""
        return 1.0 / tile_hw[0], 1.0 / tile_hw[1]

    @torch.inference_mode()
    def encode(self, rgb: np.ndarray) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Image features of an (rows, cols, 3) uint8 array, and the input (h, w) = (S, S)."""
        image = image_tensor(rgb, self.device) / 255.0
        size = (self.image_size, self.image_size)
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)
        embeddings = self.model.get_image_embeddings(pixel_values=(image - self._mean) / self._std)
        return list(embeddings), size

    @torch.inference_mode()
    def decode(
        self, embedding: list[torch.Tensor], input_hw: tuple[int, int], tile_hw: tuple[int, int], prompts: PromptBatch
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Low-res mask logits (n, 4 g, 4 g) and predicted IoU (n,) for tile-pixel prompts."""
        if prompts.has_mask.any():
            raise ConfigError(
                "mask prompts (--prompt-as mask) need a SAM, MobileSAM or sam2-package SAM 2.1 model; "
                "use --prompt-as box with this model"
            )
        frame = self.logits_frame(tile_hw, input_hw)
        out = self.model(image_embeddings=embedding, multimask_output=wants_three_masks(prompts, self.multimask),
                         **self._prompt_inputs(prompts, input_hw, tile_hw))
        low_res, iou = out.pred_masks[0].float(), out.iou_scores[0].float()
        best = choose_masks(low_res, iou, prompts.areas, frame)
        rows = torch.arange(len(prompts), device=low_res.device)
        return low_res[rows, best], iou[rows, best].cpu().numpy()

    def _prompt_inputs(
        self, prompts: PromptBatch, input_hw: tuple[int, int], tile_hw: tuple[int, int]
    ) -> dict[str, Any]:
        """``input_boxes`` (1, n, 4) and ``input_points`` (1, n, k, 2) / ``input_labels``
        (1, n, k) in the model's input frame (x scaled by S / cols, y by S / rows)."""
        scale = np.array([input_hw[1] / tile_hw[1], input_hw[0] / tile_hw[0]])
        has_box = prompts.has_box
        if has_box.any() and not has_box.all():
            raise ValueError("a decode batch must not mix box and point-only prompts")
        inputs: dict[str, Any] = {}
        if has_box.all():
            boxes = prompts.boxes.reshape(-1, 2, 2) * scale
            inputs["input_boxes"] = torch.as_tensor(boxes.reshape(1, -1, 4), dtype=torch.float32, device=self.device)
        if (prompts.labels >= 0).any():
            points = torch.as_tensor(prompts.points * scale, dtype=torch.float32, device=self.device)
            inputs["input_points"] = points[None]
            inputs["input_labels"] = torch.as_tensor(prompts.labels, dtype=torch.int64, device=self.device)[None]
        if not inputs:
            raise ValueError("every prompt of a decode batch needs a box or a point")
        return inputs
