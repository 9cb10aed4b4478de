"""Reading the signs of a checkpoint: which model a state dict fits, and why it does not.

Shared by :mod:`sam_geo.model.registry` (SAM and MobileSAM) and
:mod:`sam_geo.model.sam2_backend` (SAM 2.1) so that a wrong weights file gives one kind
of message whichever model was asked for: what does not fit (missing and unexpected
keys, shape mismatches, a few of each) and, where the keys tell, the ``--model`` the
file was made for. Nothing here loads a file or imports a model package; the functions
look at plain mappings of parameter names to tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sam_geo.errors import WeightsError, WeightsNotFoundError

__all__ = [
    "load_checkpoint",
    "SAM21_ONLY_KEYS",
    "guess_sam2_model",
    "guess_sam_model",
    "is_sam2_state",
    "one_line_reason",
    "sample_keys",
    "state_dict_problems",
]

SAM21_ONLY_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight")
"""Parameters SAM 2.1 has and SAM 2.0 checkpoints lack."""

_BLOCKS_TO_SAM2_MODEL = {
    12: "sam2.1_hiera_tiny",
    16: "sam2.1_hiera_small",
    24: "sam2.1_hiera_base_plus",
    48: "sam2.1_hiera_large",
}
"""Hiera trunk blocks (sum of ``stages`` in the configs) -> registry name."""

_VIT_WIDTH_TO_MODEL = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
"""Channels of SAM's ViT patch embedding -> registry name."""


def one_line_reason(exc: BaseException) -> str:
    """The message of ``exc`` on one line (whitespace runs collapsed), else its type name."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def sample_keys(keys: Iterable[str], count: int = 3) -> str:
    """The first ``count`` keys, comma-separated, with ``", ..."`` if there are more.

    An empty iterable gives ``""``.
    """
    keys = list(keys)
    shown = ", ".join(keys[:count])
    return shown + (", ..." if len(keys) > count else "")


def state_dict_problems(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor]
) -> dict[str, list[str]]:
    """What keeps ``state`` from loading strictly into ``model``; ``{}`` when it fits.

    Keys of the result, present only when non-empty: ``"missing keys"`` (parameters of
    the model absent from ``state``), ``"unexpected keys"`` (entries of ``state`` the
    model lacks) and ``"shape mismatches (file vs model)"`` (``"name (file shape) vs
    (model shape)"`` strings). Lists keep the model's / the file's key order.
    """
    expected = model.state_dict()
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = {
        "missing keys": [k for k in expected if k not in state],
        "unexpected keys": [k for k in state if k not in expected],
        "shape mismatches (file vs model)": shapes,
    }
    return {kind: keys for kind, keys in problems.items() if keys}


def guess_sam_model(state: Mapping[str, Any]) -> str | None:
    """The SAM / MobileSAM registry name a state dict fits, or None if it cannot tell.

    MobileSAM is told by its TinyViT stages (``image_encoder.layers.*``), SAM's ViT-B/L/H
    by the width of ``image_encoder.patch_embed.proj.weight`` (768, 1024, 1280).
    """
    if any(k.startswith("image_encoder.layers.") for k in state):
        return "mobile_sam"  # TinyViT stages; ViT encoders have image_encoder.blocks.*
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is None or getattr(patch, "ndim", 0) == 0:
        return None
    return _VIT_WIDTH_TO_MODEL.get(int(patch.shape[0]))


def is_sam2_state(state: Mapping[str, Any]) -> bool:
    """True if ``state`` has SAM 2's Hiera image-encoder trunk (any SAM 2 version)."""
    return any(k.startswith("image_encoder.trunk.") for k in state)


def guess_sam2_model(state: Mapping[str, Any]) -> str | None:
    """The SAM 2.1 registry name a state dict (or a checkpoint's ``"model"``) fits, or None.

    Told apart by the number of Hiera trunk blocks (12, 16, 24, 48); SAM 2.0 checkpoints
    (which lack SAM 2.1's ``no_obj_embed_spatial``) and non-SAM 2 dicts give None.
    """
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not is_sam2_state(state) or not all(k in state for k in SAM21_ONLY_KEYS):
        return None
    blocks = {
        int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))
    }
    return _BLOCKS_TO_SAM2_MODEL.get(max(blocks) + 1) if blocks else None


def load_checkpoint(path: Path) -> object:
    """``torch.load`` of a weights file, tensors only (``weights_only=True``), on the CPU.

    Raises :class:`WeightsNotFoundError` for a missing file and :class:`WeightsError`
    for a file torch cannot read; what the object holds is for the caller to check.
    """
    if not path.is_file():
        raise WeightsNotFoundError(f"Weights file {path} does not exist. Check the --weights path.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, ...)
        raise WeightsError(f"{path} is not a PyTorch checkpoint: {one_line_reason(exc)}") from exc
