"""The typed units of work of a run: tile tasks, what flows between their stages, and
tile results.

A task is a descriptor (scene metadata, stretch, tile, the mode's prompts): no pixels.
It runs in three stages, so that the model process does model work only:

1. :meth:`TileTask.load` (CPU, any node): read and stretch the window, prepare the
   prompts; returns a :class:`TileInput` (pixels, through Ray's object store);
2. :meth:`TileTask.infer` (model host): encoder and decoder calls only; returns the
   mode's model output (low-resolution logits crops and scores, numpy);
3. :meth:`TileTask.finish` (CPU, any node): upsample or trace masks, vectorize; returns
   the :class:`TileResult`.

A result carries polygons as WKB in the scene CRS, counts and stage seconds, never mask
arrays. Each mode (:mod:`sam_geo.modes`) subclasses :class:`TileTask` and
:class:`TileResult` and implements :class:`sam_geo.run.pipeline.Mode`; the run skeleton
and the runtime (:mod:`sam_geo.run.runtime`) know only these types.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sam_geo.geo.tiles import Tile
from sam_geo.io.scenes import SceneInfo, SceneReader, Stretch, WindowRead


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


@dataclass
class TileInput:
    """What the load stage hands on: the window's pixels and the mode's prepared inputs."""

    window: WindowRead | None
    """The tile's pixels; None when the window holds no valid pixel."""
    seconds: dict[str, float] = field(default_factory=dict)
    payload: Any = None
    """The mode's inputs for the model (e.g. prompts in tile pixels)."""
    needs_model: bool = True
    """False when there is nothing for the model to do (nodata, no prompt on data)."""


@dataclass
class ModelOutput:
    """What the model stage hands on: the mode's output and the model's stage seconds
    (encode, decode, detect), which the finish stage adds to the tile's."""

    value: Any
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PostConfig:
    """What the finish stage needs (picklable): areas and lengths in scene CRS units."""

    min_area: float = 0.0
    """Smallest polygon part kept, in square CRS units of the scene."""
    simplify: float | None = None
    """Simplification tolerance in CRS units, or None."""



ResultT = TypeVar("ResultT", bound="TileResult")


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

    def read(self, reader: SceneReader) -> WindowRead:
        """The tile's window, read and stretched (resampled when the tile is zoomed)."""
        out_shape = self.tile.shape if self.tile.scale != 1 else None
        return reader.read(self.scene, self.stretch, self.tile.read_window, out_shape)

    @abstractmethod
    def load(self, reader: SceneReader) -> TileInput:
        """Stage 1 (CPU): read the window and prepare the model's inputs."""

    @abstractmethod
    def infer(self, host: Any, tile_input: TileInput) -> Any:
        """Stage 2 (model host, a :class:`sam_geo.run.host.ModelHost`): model calls only;
        returns numpy/bytes (sent through the object store). Called only when
        ``tile_input.needs_model``."""

    @abstractmethod
    def finish(self, tile_input: TileInput, output: Any, post: PostConfig) -> TileResult:
        """Stage 3 (CPU): masks to polygons; ``output`` is None when the model was not
        called."""

    def new_result(self, result_type: type[ResultT], tile_input: TileInput, **fields: Any) -> ResultT:
        """An empty ``result_type`` for this tile, carrying the load stage's seconds and
        whether the tile was all nodata (no window read)."""
        result = result_type(tile_key=self.key, seconds=tile_input.seconds, **fields)
        result.skipped_nodata = tile_input.window is None
        return result

    def execute(self, host: Any, reader: SceneReader, post: PostConfig) -> TileResult:
        """All three stages in this process (``workers=0`` and tests)."""
        tile_input = self.load(reader)
        output = host.infer(self, tile_input) if tile_input.needs_model else None
        return finish_tile(self, tile_input, output, post)


def finish_tile(task: TileTask, tile_input: TileInput, output: ModelOutput | None, post: PostConfig) -> TileResult:
    """Stage 3 of ``task``: the model's seconds added to the tile's, then
    :meth:`TileTask.finish` on the model's output (None when the model was not called)."""
    if output is not None:
        for stage, spent in output.seconds.items():
            tile_input.seconds[stage] = tile_input.seconds.get(stage, 0.0) + spent
    return task.finish(tile_input, None if output is None else output.value, post)

