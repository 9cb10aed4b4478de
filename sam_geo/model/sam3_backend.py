"""SAM 3 through ``transformers`` (``Sam3Model``): every instance of a noun phrase in a tile.

One tile, several phrases: the image encoder (the costly part) runs once per tile
(:meth:`Sam3Backend.encode`), then the text encoder, DETR encoder/decoder and mask
decoder once per phrase (:meth:`Sam3Backend.concepts`) against the cached vision
features. Each phrase's queries are scored as ``transformers``' post-processing does,
``sigmoid(query logit) * sigmoid(presence logit)``, and those above the threshold are
kept with their mask logits.

Geometry: the tile array (rows, cols) is resized to the model's square input (1008 x
1008 px for SAM 3, aspect not kept, as ``Sam3ImageProcessor`` does), normalised to
[-1, 1] and encoded; masks come out on a square grid (288 x 288 cells for SAM 3) that
spans the whole tile, so one cell is ``rows / 288`` tile pixels tall and ``cols / 288``
wide. Instance boxes are given in tile pixels.

Box and point prompts from layers are not SAM 3 image prompts (its boxes are exemplars
of a concept, not objects to outline): :meth:`Sam3Backend.decode` refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sam_geo.errors import ConfigError, WeightsError
from sam_geo.model.checkpoints import one_line_reason, sample_keys

DEFAULT_CONCEPT_THRESHOLD = 0.5
"""Instance score kept by default (``sigmoid(logit) * sigmoid(presence)``): Meta's
SAM 3 demos keep 0.5; ``transformers``' post-processing defaults to 0.3."""

TEXT_TOKENS = 32
"""Tokens per phrase (SAM 3's text context length; ``Sam3Processor`` pads to it)."""

CROP_MARGIN = 2
"""Mask cells kept around each instance's box until it is vectorized."""


@dataclass
class ConceptInstances:
    """Instances found in one tile, all phrases together (numpy, picklable).

    ``phrase``: (n,) index into the phrases asked for; ``score``: (n,) in [0, 1];
    ``box``: (n, 4) x0, y0, x1, y1 in tile pixels; ``logits``: n crops (float16) of
    each instance's mask logits, ``origin``: (n, 2) row, col of each crop's first cell
    on the mask grid of ``grid_hw`` (rows, cols) cells spanning the whole tile.
    """

    phrase: np.ndarray
    score: np.ndarray
    box: np.ndarray
    logits: list[np.ndarray]
    origin: np.ndarray
    grid_hw: tuple[int, int]

    def __len__(self) -> int:
        return len(self.phrase)


class Sam3Backend:
    """``Sam3Model`` and its tokenizer from a model folder, on ``device``."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        backbone = model.config.vision_config.backbone_config
        self.image_size: int = int(backbone.image_size)
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_folder(cls, folder: Path, device: torch.device) -> Sam3Backend:
        """Load the model and tokenizer of a ``transformers`` SAM 3 folder.

        Raises:
            WeightsError: the folder cannot be loaded as SAM 3 (the message names it).
        """
        try:
            from transformers import AutoTokenizer, Sam3Model
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # one bar per actor would garble the run's own
            model, info = Sam3Model.from_pretrained(str(folder), output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise WeightsError(
                f"Cannot load SAM 3 from {folder}: {one_line_reason(exc)}. Pass the folder of facebook/sam3 "
                "as downloaded from Hugging Face (config.json, model.safetensors, tokenizer files)."
            ) from exc
        missing = sorted(info.get("missing_keys", []))
        if missing:
            raise WeightsError(
                f"{folder} does not hold every weight of SAM 3 ({len(missing)} missing, e.g. {sample_keys(missing)}); "
                "pass the folder of facebook/sam3 as downloaded from Hugging Face."
            )
        return cls(model, tokenizer, device)

    @torch.inference_mode()
    def encode(self, rgb: np.ndarray) -> tuple[Any, tuple[int, int]]:
        """Vision features of an (rows, cols, 3) uint8 tile, and the model's input (h, w)."""
        image = torch.as_tensor(np.ascontiguousarray(rgb), device=self.device).permute(2, 0, 1)[None].float()
        size = (self.image_size, self.image_size)
        image = F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)
        pixels = (image / 255.0 - 0.5) / 0.5
        return self.model.get_vision_features(pixel_values=pixels), size

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        """SAM 3 takes phrases, not box or point prompts from layers."""
        raise ConfigError(
            "SAM 3 (--model sam3) outlines every instance of a phrase: use `sam-geo text SCENE \"phrase\" --model "
            "sam3`. Box and point prompts from a layer need a SAM or SAM 2.1 model (e.g. --model mobile_sam)."
        )

    def _tokens_of(self, phrase: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (1, :data:`TEXT_TOKENS`) of a phrase, cached."""
        if phrase not in self._tokens:
            enc = self.tokenizer([phrase], padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                                 return_tensors="pt")
            self._tokens[phrase] = (enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        return self._tokens[phrase]

    @torch.inference_mode()
    def concepts(
        self, vision: Any, phrases: tuple[str, ...], tile_hw: tuple[int, int], threshold: float | None = None
    ) -> ConceptInstances:
        """Every instance of each phrase scoring above ``threshold`` (default
        :data:`DEFAULT_CONCEPT_THRESHOLD`), against the features of :meth:`encode`."""
        threshold = DEFAULT_CONCEPT_THRESHOLD if threshold is None else threshold
        parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        grid_hw = (0, 0)
        for k, phrase in enumerate(phrases):
            ids, mask = self._tokens_of(phrase)
            out = self.model(vision_embeds=vision, input_ids=ids, attention_mask=mask)
            scores = out.pred_logits[0].float().sigmoid()
            if out.presence_logits is not None:
                scores = scores * out.presence_logits[0].float().sigmoid()
            keep = scores > threshold
            grid_hw = tuple(int(v) for v in out.pred_masks.shape[-2:])
            parts.append((k, scores[keep], out.pred_boxes[0][keep].float(), out.pred_masks[0][keep].float()))
        return crop_instances(parts, grid_hw, tile_hw)


def crop_instances(
    parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]], grid_hw: tuple[int, int],
    tile_hw: tuple[int, int],
) -> ConceptInstances:
    """Kept queries of each phrase -> :class:`ConceptInstances`: boxes from the model's
    normalised xyxy to tile pixels, mask logits cropped to the cells above 0 plus
    :data:`CROP_MARGIN` (an instance whose mask is empty is dropped)."""
    rows, cols = tile_hw
    phrase, score, box, logits, origin = [], [], [], [], []
    for k, scores, boxes, masks in parts:
        for s, b, m in zip(scores.tolist(), boxes.cpu().numpy(), masks.cpu()):
            inside = torch.nonzero(m > 0)
            if len(inside) == 0:
                continue
            r0, c0 = (inside.min(dim=0).values - CROP_MARGIN).clamp(min=0).tolist()
            r1, c1 = (inside.max(dim=0).values + 1 + CROP_MARGIN).tolist()
            logits.append(m[r0 : min(r1, grid_hw[0]), c0 : min(c1, grid_hw[1])].to(torch.float16).numpy())
            origin.append((r0, c0))
            phrase.append(k)
            score.append(s)
            box.append(np.clip(b, 0.0, 1.0) * np.array([cols, rows, cols, rows]))
    return ConceptInstances(
        np.asarray(phrase, np.int64), np.asarray(score, np.float64), np.asarray(box, np.float64).reshape(-1, 4),
        logits, np.asarray(origin, np.int64).reshape(-1, 2), grid_hw,
    )
