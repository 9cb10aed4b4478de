"""A stand-in model for measuring the runtime: it sleeps instead of computing.

``benchmarks/feed.py`` runs the real pipeline (reading, stages, scheduling, writing)
with this in place of SAM, to show on any machine how busy the CPU stages keep a model
as fast as an accelerator: like a GPU, it takes a fixed time per encoder batch and uses
no CPU meanwhile. Chosen with the environment variable :data:`ENV_STANDIN_MS`
(milliseconds per encoder call) in the process that plans the run; the model actors get
it through :class:`~sam_geo.run.host.HostConfig`. Prompted mode only: its masks are each
prompt's box (so the finish stage traces real outlines).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from sam_geo.errors import ConfigError

ENV_STANDIN_MS = "SAM_GEO_STANDIN_MS"
"""Environment variable: milliseconds per encoder call of the stand-in model."""

GRID = 256
"""Cells a side of the stand-in's low-resolution logits (as SAM's)."""


def standin_ms() -> float | None:
    """The stand-in's milliseconds per encoder call from :data:`ENV_STANDIN_MS`, or None."""
    value = os.environ.get(ENV_STANDIN_MS)
    if not value:
        return None
    try:
        ms = float(value)
    except ValueError as exc:
        raise ConfigError(f"{ENV_STANDIN_MS}={value!r} is not a number of milliseconds; unset it for real runs") from exc
    if not ms >= 0:
        raise ConfigError(f"{ENV_STANDIN_MS} must be >= 0 ms, got {value!r}")
    return ms


class StandinBackend:
    """Looks like a SAM backend to :class:`~sam_geo.run.host.ModelHost`; sleeps
    ``sleep_ms`` per encoder call and answers each prompt with its box as the mask."""

    image_size = 1024

    def __init__(self, sleep_ms: float) -> None:
        self.sleep_s = sleep_ms / 1000.0
        self.model = torch.nn.Identity()

    def encode_many(self, rgbs: list[np.ndarray]) -> list[tuple[Any, tuple[int, int]]]:
        time.sleep(self.sleep_s)
        return [(None, self._input_hw(rgb)) for rgb in rgbs]

    def encode(self, rgb: np.ndarray) -> tuple[Any, tuple[int, int]]:
        return self.encode_many([rgb])[0]

    def _input_hw(self, rgb: np.ndarray) -> tuple[int, int]:
        h, w = rgb.shape[:2]
        scale = self.image_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def logits_frame(self, tile_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[float, float]:
        ratio = input_hw[0] / tile_hw[0] / self.image_size
        return ratio, ratio

    def decode(self, embedding: Any, input_hw: tuple[int, int], tile_hw: tuple[int, int], prompts: Any) -> tuple[torch.Tensor, np.ndarray]:
        """(n, 256, 256) logits, +1 inside each prompt's box (a whole-tile square for
        point-only prompts), -1 outside; score 1."""
        fy, _ = self.logits_frame(tile_hw, input_hw)
        cells = fy * GRID
        logits = torch.full((len(prompts), GRID, GRID), -1.0)
        for k in range(len(prompts)):
            if prompts.has_box[k]:
                x0, y0, x1, y1 = (float(v) * cells for v in prompts.boxes[k])
                logits[k, int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = 1.0
            else:
                logits[k, 4:-4, 4:-4] = 1.0
        return logits, np.ones(len(prompts))
