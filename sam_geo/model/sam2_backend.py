"""SAM 2.1 image models as a model backend of the engine.

:class:`Sam2Backend` offers the same four members as :class:`sam_geo.model.sam_backend.SamBackend`
(``image_size``, ``encode``, ``decode``, ``logits_frame``) on top of the official ``sam2``
package (Meta, Apache-2.0; ``pip install "sam-geo[sam2]"``). It reproduces what
``sam2.sam2_image_predictor.SAM2ImagePredictor`` does for one image, batched over prompts:

* **encode**: the tile is stretched to the model's square input (1024 x 1024, bilinear,
  antialiased: SAM 2 does *not* keep the aspect ratio, unlike SAM), scaled to [0, 1] and
  normalised with the ImageNet mean / std (``SAM2Transforms``); then
  ``model.forward_image`` and ``model._prepare_backbone_features``, with ``no_mem_embed``
  added to the lowest-resolution map as ``SAM2ImagePredictor.set_image`` does. The
  embedding kept is that map (``image_embed``, 1 x 256 x 64 x 64) plus the two
  high-resolution feature maps the mask decoder needs (:class:`Sam2Embedding`).
* **decode**: prompts are scaled from tile pixels to the 1024 frame *per axis*; boxes enter
  the prompt encoder as two corner points with labels 2 and 3 ahead of the points, as in
  ``SAM2ImagePredictor._predict``; the mask decoder runs once per batch with the image
  embedding repeated per prompt and the high-resolution features. Point-only prompts ask
  for three masks (all prompts with ``multimask``) and keep one by the engine's
  ``choose_masks`` rule (closest in area to the prompt polygon, else highest predicted
  IoU); mask prompts enter as the low-res mask input (``mask_prompt_logits``), as in
  ``SamBackend``. Low-res logits are clamped to [-32, 32] as the predictor does.

Models are built with ``sam2.build_sam.build_sam2`` from the hydra config named by the
registry (``ModelSpec.arch``) with ``ckpt_path=None``, so the state dict is loaded here
(``weights_only=True``, strict) and a wrong file gives a :class:`~sam_geo.errors.WeightsError`
naming the file, the model and, where it can tell, the ``--model`` the file fits. Without a
checkpoint the model stays randomly initialised (tests, shape checks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from sam_geo.errors import ConfigError, WeightsError
from sam_geo.io.prompt_batch import PromptBatch
from sam_geo.model.checkpoints import (
    load_checkpoint,
    SAM21_ONLY_KEYS,
    guess_sam2_model,
    guess_sam_model,
    is_sam2_state,
    one_line_reason,
    sample_keys,
    state_dict_problems,
)
from sam_geo.model.masks import choose_masks, image_tensor, mask_prompt_logits, wants_three_masks
from sam_geo.model.registry import ModelSpec, get_spec, known_models, parse_device

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base

__all__ = [
    "SAM2_MEAN",
    "SAM2_STD",
    "Sam2Backend",
    "Sam2Embedding",
    "build_sam2_model",
    "guess_sam2_model",  # defined in sam_geo.model.checkpoints, re-exported here
    "read_sam2_state_dict",
]

SAM2_MEAN = (0.485, 0.456, 0.406)
"""ImageNet mean of SAM 2's input normalisation (on [0, 1] pixels), as ``SAM2Transforms``."""
SAM2_STD = (0.229, 0.224, 0.225)
"""ImageNet standard deviation of SAM 2's input normalisation."""

LOGIT_CLAMP = 32.0
"""Low-res logits are clamped to +-this, as ``SAM2ImagePredictor._predict`` does."""


@dataclass(frozen=True)
class Sam2Embedding:
    """What :meth:`Sam2Backend.encode` keeps of one image for decoding.

    ``image_embed``: (1, 256, 64, 64), the lowest-resolution map with ``no_mem_embed``
    added; ``high_res_feats``: the (1, 32, 256, 256) and (1, 64, 128, 128) maps, already
    projected by the mask decoder's ``conv_s0`` / ``conv_s1``.
    """

    image_embed: torch.Tensor
    high_res_feats: tuple[torch.Tensor, ...]


# --- building --------------------------------------------------------------------


def build_sam2_model(name: str, checkpoint: Path | None = None, *, device: str = "cpu") -> SAM2Base:
    """Build SAM 2.1 model ``name`` (a ``sam2`` ``SAM2Base``) in eval mode on ``device``.

    Args:
        name: a registry name of the ``sam2`` family (``sam2.1_hiera_tiny`` ...).
        checkpoint: the official checkpoint (weights under ``"model"``) or a plain state
            dict, loaded strictly; ``None`` leaves the weights randomly initialised.
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Raises:
        UnknownModelError: ``name`` is not in the registry.
        ConfigError: ``name`` is not a SAM 2 model, the ``sam2`` package is missing, or
            ``device`` is not usable.
        WeightsNotFoundError: ``checkpoint`` does not exist.
        WeightsError: ``checkpoint`` is not a PyTorch state dict, or not one for ``name``.
    """
    spec = get_spec(name)
    if spec.family != "sam2":
        raise ConfigError(f"{name} is not a SAM 2 model (family {spec.family!r}); use models.build_sam")
    target = parse_device(device)
    state = None
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        state = read_sam2_state_dict(path)  # read first: a bad file fails before the build
    model = _build_architecture(spec)
    if state is not None:
        _load_weights(model, state, spec, path)
    model.eval()
    return model.to(target)


def _build_architecture(spec: ModelSpec) -> SAM2Base:
    """The randomly initialised model of ``spec``, built on the CPU from its hydra config.

    ``build_sam2``'s default ``apply_postprocessing=True`` is kept: it turns on the mask
    decoder's dynamic multimask fallback for unstable single-mask outputs, as
    ``SAM2ImagePredictor`` users get it.
    """
    try:
        from sam2.build_sam import build_sam2
    except ImportError as exc:
        raise ConfigError(
            f"model {spec.name!r} needs the `sam2` package (SAM 2.1), which is not installed: "
            f"{one_line_reason(exc)}. Install it with: SAM2_BUILD_CUDA=0 pip install --no-build-isolation "
            f'"sam2==1.1.0" (after torch), or pip install "sam-geo[sam2]".'
        ) from exc
    try:
        return build_sam2(spec.arch, ckpt_path=None, device="cpu", mode="eval")
    except Exception as exc:  # hydra raises its own types for missing or broken configs
        raise ConfigError(
            f"cannot build {spec.name!r} from the sam2 config {spec.arch!r}: {one_line_reason(exc)}. "
            f"Check that the installed sam2 package (>= 1.1.0) ships SAM 2.1 configs."
        ) from exc


def read_sam2_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """Load a SAM 2 state dict from ``path`` (``weights_only=True``).

    Accepts the official layout (``{"model": state_dict}``) and a plain state dict.
    """
    loaded = load_checkpoint(path)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping) or not loaded or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        what = (
            f"a dict with keys {sample_keys(map(str, loaded))}"
            if isinstance(loaded, Mapping)
            else f"a {type(loaded).__name__}"
        )
        raise WeightsError(
            f"{path} is a PyTorch file but not a SAM 2 checkpoint: it holds {what}; expected "
            f'parameter names -> tensors, either alone or under "model" as in the official files.'
        )
    return loaded


def _load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], spec: ModelSpec, path: Path) -> None:
    """Load ``state`` into ``model`` strictly, explaining any mismatch."""
    problems = state_dict_problems(model, state)
    if problems:
        details = "; ".join(f"{len(keys)} {kind} (e.g. {sample_keys(keys)})" for kind, keys in problems.items())
        message = f"Weights file {path} does not fit model {spec.name!r}: {details}."
        guess = guess_sam2_model(state) or guess_sam_model(state)
        if guess is not None and guess != spec.name:
            message += f" It looks like weights for {guess!r}: pass --model {guess}."
        elif is_sam2_state(state) and not all(k in state for k in SAM21_ONLY_KEYS):
            message += (
                " It looks like a SAM 2.0 checkpoint (sam2_hiera_*.pt); sam-geo runs SAM 2.1: "
                f"pass {spec.filename} from {spec.url}."
            )
        else:
            message += (
                f" Pass the checkpoint of {spec.name!r} ({spec.filename}), or the --model the file "
                f"was made for (known: {', '.join(known_models())})."
            )
        raise WeightsError(message)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # should not happen after the checks above
        raise WeightsError(f"{path} does not fit model {spec.name!r}: {one_line_reason(exc)}") from exc


# --- the backend -----------------------------------------------------------------


class Sam2Backend:
    """Model steps of SAM 2.1 image models: encode a tile once, decode prompt batches.

    Same members as :class:`sam_geo.model.sam_backend.SamBackend`. ``multimask``: ask for three
    masks for every prompt, not only point-only ones (the engine sets it).
    """

    def __init__(
        self, name: str, weights: Path | None, device: torch.device | str, *, multimask: bool | None = None
    ) -> None:
        self.model = build_sam2_model(name, weights, device=str(device))
        self.device = torch.device(device)
        self.name = name
        self.image_size: int = int(self.model.image_size)
        self.multimask = multimask
        self._mean = torch.tensor(SAM2_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(SAM2_STD, device=self.device).view(1, 3, 1, 1)

    def logits_frame(self, tile_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[float, float]:
        """SAM 2 stretches the tile to its square input: each axis has its own scale."""
        return 1.0 / tile_hw[0], 1.0 / tile_hw[1]

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """(1, 3, S, S) model input of an (rows, cols, 3) uint8 array, as ``SAM2Transforms``:
        [0, 1] scaling, bilinear antialiased resize to S x S, ImageNet normalisation."""
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an (rows, cols, 3) RGB array, got shape {rgb.shape}")
        image = image_tensor(rgb, self.device) / 255.0
        size = (self.image_size, self.image_size)
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)
        return (image - self._mean) / self._std

    @torch.inference_mode()
    def encode(self, rgb: np.ndarray) -> tuple[Sam2Embedding, tuple[int, int]]:
        """Image features of an (rows, cols, 3) uint8 array, and the input (h, w) = (S, S)."""
        model = self.model
        backbone_out = model.forward_image(self.preprocess(rgb))
        _, vision_feats, _, feat_sizes = model._prepare_backbone_features(backbone_out)
        if model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        # (HW, 1, C) -> (1, C, H, W), as SAM2ImagePredictor.set_image
        feats = [f.permute(1, 2, 0).reshape(1, -1, *hw) for f, hw in zip(vision_feats, feat_sizes)]
        return Sam2Embedding(feats[-1], tuple(feats[:-1])), (self.image_size, self.image_size)

    @torch.inference_mode()
    def decode(
        self,
        embedding: Sam2Embedding,
        input_hw: tuple[int, int],
        tile_hw: tuple[int, int],
        prompts: PromptBatch,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Low-res mask logits (n, 256, 256) and predicted IoU (n,) for tile-pixel prompts.

        Boxes and points are scaled to the model frame per axis (x by S / cols, y by
        S / rows). Point-only prompts (box prompts as :func:`wants_three_masks` decides)
        get three candidate masks and keep one; other box prompts get one (SAM 2's
        decoder falls back to the best of three itself when that one is unstable).
        """
        model = self.model
        device = self.device
        n = len(prompts)
        scale = np.array([input_hw[1] / tile_hw[1], input_hw[0] / tile_hw[0]])  # x, y
        has_box = prompts.has_box
        if has_box.any() and not has_box.all():
            raise ValueError("a decode batch must not mix box and point-only prompts")
        coords: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        if has_box.all():  # boxes first, as two corner points labelled 2 and 3
            coords.append(prompts.boxes.reshape(n, 2, 2) * scale)
            labels.append(np.tile(np.array([[2, 3]]), (n, 1)))
        if (prompts.labels >= 0).any():
            coords.append(prompts.points * scale)
            labels.append(prompts.labels)
        if not coords:
            raise ValueError("every prompt of a decode batch needs a box or a point")
        points = (
            torch.as_tensor(np.concatenate(coords, axis=1), dtype=torch.float32, device=device),
            torch.as_tensor(np.concatenate(labels, axis=1), dtype=torch.int32, device=device),
        )
        frame = self.logits_frame(tile_hw, input_hw)
        masks = None
        if prompts.has_mask.any():  # mask prompts: SAM's low-res mask input, as in SamBackend
            masks = torch.as_tensor(mask_prompt_logits(prompts.masks, frame), device=device)
        sparse, dense = model.sam_prompt_encoder(points=points, boxes=None, masks=masks)
        low_res, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=embedding.image_embed,
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=wants_three_masks(prompts, self.multimask),
            repeat_image=True,  # one image embedding for the whole batch of prompts
            high_res_features=list(embedding.high_res_feats),
        )
        low_res = low_res.clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        best = choose_masks(low_res, iou, prompts.areas, frame)
        rows = torch.arange(n, device=device)
        return low_res[rows, best], iou[rows, best].float().cpu().numpy()
