"""The typed units of work of a run: tile tasks going to the model host, tile results
coming back.

A task is a descriptor (scene metadata, stretch, tile, the mode's prompts): no pixels.
A result carries polygons as WKB in the scene CRS, counts and stage seconds, never mask
arrays. Each mode (:mod:`sam_geo.modes`) subclasses :class:`TileTask` and
:class:`TileResult` and implements :class:`sam_geo.run.pipeline.Mode`; the run skeleton
and the runtime (:mod:`sam_geo.run.runtime`) know only these types.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from sam_geo.geo.tiles import Tile
from sam_geo.io.scenes import SceneInfo, Stretch


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
    """What a model host sends back for one tile; modes subclass it with their payload."""

    tile_key: str
    skipped_nodata: bool = False
    """The tile's window holds no valid pixel: nothing was encoded."""
    encoded: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    """Why the tile failed after all retries (None: it did not fail)."""
    attempts: int = 0


@dataclass(frozen=True)
class TileTask(ABC):
    """One tile of one scene to segment: descriptors only (picklable, no pixels)."""

    scene: SceneInfo
    stretch: Stretch
    tile: Tile

    @property
    def key(self) -> str:
        """Stable id of the tile (see :func:`task_key`): the work-dir file name."""
        return task_key(self.scene, self.tile)

    @abstractmethod
    def execute(self, host: Any) -> TileResult:
        """Segment the tile on ``host``'s model (a :class:`sam_geo.run.host.ModelHost`,
        in a model actor or in-process)."""

