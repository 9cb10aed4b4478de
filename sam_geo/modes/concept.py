"""Concept prompts: every instance of each phrase, from a model that reads text (SAM 3).

>>> import sam_geo
>>> gdf = sam_geo.segment_text("scene.tif", ["solar panel", "greenhouse"], model="sam3")

What ``sam-geo text --model sam3`` runs instead of the detector + SAM path of
:mod:`sam_geo.modes.text`. Per tile of a :class:`~sam_geo.geo.tiles.TileGrid` (with
halo), in three stages:

1. load: read the window (a window without valid pixels is skipped);
2. model: encode the tile once and find every instance of every phrase
   (:meth:`~sam_geo.model.sam3_backend.Sam3Backend.concepts`: one image-encoder pass,
   then the light text/detection/mask heads once per phrase);
3. finish: trace each instance's outline from its mask logits as prompted masks are
   (:func:`~sam_geo.run.post.prompt_polygons`: sub-pixel, nodata taken out), keep its
   largest part, and note which read-window sides facing another tile it reaches
   (:func:`~sam_geo.geo.stitch.piece_from_geometry`).

Instances are then stitched across seams exactly as automatic mode's masks are, one
:class:`~sam_geo.geo.stitch.SeamBuffer` per scene and phrase: an object seen by several
tiles comes out as one polygon, whatever its size relative to the tile. Output columns:
``phrase``, ``score`` (the instance score, ``sigmoid(logit) * sigmoid(presence)``, of
the chosen piece or area-weighted over a mosaic), ``area_m2``, ``n_tiles``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import geopandas as gpd
import numpy as np
import shapely

from sam_geo.errors import ConfigError
from sam_geo.geo.stitch import Piece, SeamBuffer, piece_from_geometry
from sam_geo.geo.tiles import TileGrid
from sam_geo.io.scenes import SceneInfo, SceneReader, WindowRead, compute_stretch
from sam_geo.model.detector import require_transformers
from sam_geo.model.sam3_backend import ConceptInstances
from sam_geo.modes.automatic import MIN_OVERLAP_PX, merge_scene_frames, stitched_frame
from sam_geo.modes.text import read_tile_input
from sam_geo.run.host import ModelHost, cpu_timed, timed
from sam_geo.run.pipeline import COMMON_TILE_SETTINGS
from sam_geo.run.post import PromptMasks, prompt_polygons
from sam_geo.run.summary import RunSummary
from sam_geo.run.tasks import PostConfig, TileInput, TileResult, TileTask
from sam_geo.settings import DEFAULT_DETECTOR, Settings

CONCEPT_COLUMNS = ("phrase", "score", "area_m2", "n_tiles")
"""Columns of a concept output, besides the geometry (and ``scene`` for several scenes)."""

STITCH_EVERY = 8
"""Tiles between two looks for closed clusters to stitch."""


@dataclass(frozen=True)
class ConceptTileTask(TileTask):
    """One tile to search for ``phrases`` (a descriptor: no pixels)."""

    phrases: tuple[str, ...]
    threshold: float | None = None

    def load(self, reader: SceneReader) -> TileInput:
        """Read the window (:func:`~sam_geo.modes.text.read_tile_input`)."""
        return read_tile_input(self, reader)

    def infer(self, host: ModelHost, tile_input: TileInput) -> ConceptInstances:
        """Encode once, find every instance of every phrase."""
        concepts = getattr(host.backend, "concepts", None)
        if concepts is None:
            raise ConfigError(f"model {host.config.model!r} does not read phrases; use --model sam3")
        rgb = tile_input.window.rgb
        vision, _ = host.encode(rgb, tile_input.seconds)
        with host.model_call(), timed(tile_input.seconds, "decode"):
            return concepts(vision, self.phrases, rgb.shape[:2], self.threshold)

    def finish(self, tile_input: TileInput, output: ConceptInstances | None, post: PostConfig) -> ConceptTileResult:
        """Instances -> pieces (polygons in the scene CRS) with their phrase index."""
        result = self.new_result(ConceptTileResult, tile_input)
        if output is None:
            return result
        result.encoded = True
        with cpu_timed(result.seconds, "vectorize"):
            result.pieces = instance_pieces(output, tile_input.window, self, post)
        return result


@dataclass
class ConceptTileResult(TileResult):
    """A tile's instances as ``(phrase index, piece)`` pairs (no pixels)."""

    pieces: list[tuple[int, Piece]] = field(default_factory=list)


def instance_pieces(
    found: ConceptInstances, window: WindowRead, task: ConceptTileTask, post: PostConfig
) -> list[tuple[int, Piece]]:
    """Each instance's outline traced from its logits (:func:`~sam_geo.run.post.prompt_polygons`,
    as for prompts: sub-pixel, nodata taken out), its largest part as a piece."""
    tile = task.tile
    masks = instance_masks(found, window.valid.shape)
    edge_margin = max(1 / (masks.frame[0] * masks.grid_hw[0]), 1 / (masks.frame[1] * masks.grid_hw[1]))
    edge_margin = edge_margin * tile.scale + 1.0  # one mask cell, in scene pixels, plus one
    out: list[tuple[int, Piece]] = []
    for record in prompt_polygons(masks, window, tile, post):
        if record.wkb is None:
            continue
        geom = max(shapely.get_parts(shapely.from_wkb(record.wkb)), key=lambda p: p.area)
        piece = piece_from_geometry(geom, tile, (task.scene.height, task.scene.width), score=record.score,
                                    edge_margin=edge_margin)
        if piece is not None:
            out.append((int(found.phrase[record.prompt_index]), piece))
    return out


def instance_masks(found: ConceptInstances, tile_hw: tuple[int, int]) -> PromptMasks:
    """The instances as :class:`~sam_geo.run.post.PromptMasks` (index = instance number):
    the mask grid spans the tile, so a tile pixel is ``1 / rows`` and ``1 / cols`` of it,
    and each crop of cells keeps its mask within the tile pixels those cells cover."""
    rows, cols = tile_hw
    gh, gw = found.grid_hw
    shapes = np.asarray([crop.shape for crop in found.logits], dtype=np.int64).reshape(-1, 2)
    cells = np.concatenate([found.origin, found.origin + shapes], axis=1)
    scale = np.array([rows / gh, cols / gw, rows / gh, cols / gw])
    crops = np.column_stack([np.floor(cells[:, :2] * scale[:2]), np.ceil(cells[:, 2:] * scale[2:])]).astype(np.int64)
    crops[:, 2:] = np.minimum(crops[:, 2:], [rows, cols])
    logits = [np.asarray(crop, dtype=np.float32) for crop in found.logits]
    return PromptMasks(np.arange(len(found)), found.score, crops, cells, logits, (1 / rows, 1 / cols), (gh, gw))


class ConceptMode:
    """Concept prompts as a :class:`~sam_geo.run.pipeline.Mode`: every tile searched for
    ``phrases`` by a model that reads text (``settings.model``'s family ``sam3``);
    instances stitched across seams per scene and phrase."""

    name = "concept"
    order_by = None
    tile_settings = (*COMMON_TILE_SETTINGS, "min_area_m2", "box_threshold")

    def __init__(self, phrases: str | Sequence[str]) -> None:
        self.phrases = (phrases,) if isinstance(phrases, str) else tuple(phrases)
        if not self.phrases or not all(isinstance(p, str) and p.strip() for p in self.phrases):
            raise ConfigError("give at least one non-empty phrase, e.g. 'swimming pool'")
        self.settings: Settings | None = None
        self.scenes: list[SceneInfo] = []
        self.scene_of_tile: dict[str, SceneInfo] = {}
        self.buffers: dict[tuple[str, int], SeamBuffer] = {}
        self.since_stitch = 0
        self.counts: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}

    @property
    def inputs(self) -> dict[str, Any]:
        """No input files besides the scenes."""
        return {}

    def check(self, settings: Settings) -> None:
        """``transformers`` installed, an overlap wide enough to stitch in, and no
        detector settings or flip views (SAM 3 reads the phrases itself and finds its
        own instances; they would be ignored)."""
        require_transformers()
        if settings.detector != DEFAULT_DETECTOR or settings.text_threshold is not None:
            raise ConfigError(
                "--detector and --text-threshold do nothing with a SAM 3 model, which reads the phrases itself; "
                "drop them, or pick a SAM model (--model mobile_sam) to use the detector"
            )
        if settings.flip_views != 1:
            raise ConfigError(
                "--flip-views mirrors prompts for SAM-family models; a SAM 3 model finds its own instances, which "
                "differ per view. Drop --flip-views, or pick a SAM model (--model mobile_sam) with a detector"
            )
        if settings.overlap_px < MIN_OVERLAP_PX:
            raise ConfigError(
                f"concept prompts stitch instances across tile edges, which needs tiles overlapping by at least "
                f"{MIN_OVERLAP_PX} px (got {settings.overlap_px}); use --overlap 64 or more"
            )

    def check_outputs(self, overwrite: bool) -> None:
        """No outputs besides the vector layer."""

    def plan(self, scenes: list[SceneInfo], settings: Settings) -> list[TileTask]:
        """Every tile of every scene, at ``settings.zoom`` (1 when unset)."""
        self.settings, self.scenes = settings, scenes
        tasks: list[ConceptTileTask] = []
        for info in scenes:
            grid = TileGrid(info.height, info.width, info.transform, settings.tile_size_px, settings.overlap_px,
                            settings.zoom or 1)
            stretch = compute_stretch(info, method=settings.stretch)
            scene_tasks = [ConceptTileTask(info, stretch, t, self.phrases, settings.box_threshold) for t in grid]
            for k in range(len(self.phrases)):
                self.buffers[(info.path, k)] = SeamBuffer({t.key: t.tile for t in scene_tasks})
            tasks += scene_tasks
        self.scene_of_tile = {t.key: t.scene for t in tasks}
        return list(tasks)

    def fingerprint(self) -> dict[str, Any]:
        """The phrases."""
        return {"phrases": list(self.phrases)}

    def summary_settings(self) -> dict[str, Any]:
        """The phrases searched for."""
        return {"phrases": list(self.phrases)}

    def accept(self, result: TileResult) -> gpd.GeoDataFrame | None:
        """The tile's pieces into its scene's buffers (one per phrase); every
        :data:`STITCH_EVERY` tiles, and when a scene is done, closed clusters are stitched."""
        scene = self.scene_of_tile[result.tile_key]
        pieces = [] if result.error else getattr(result, "pieces", [])
        for k in range(len(self.phrases)):
            self.buffers[(scene.path, k)].add(result.tile_key, [p for i, p in pieces if i == k])
        self.since_stitch += 1
        if self.since_stitch < STITCH_EVERY and not self.buffers[(scene.path, 0)].done:
            return None
        self.since_stitch = 0
        return self._stitch_closed()

    def finish(self, summary: RunSummary) -> Iterator[gpd.GeoDataFrame]:
        """The instances still held (every cluster is closed now); stitching counts."""
        yield self._stitch_closed()
        for key, value in self.counts.items():
            summary.objects[key] = summary.objects.get(key, 0) + value
        summary.add_seconds(self.seconds)

    def _stitch_closed(self) -> gpd.GeoDataFrame:
        """Objects of every closed cluster of every scene and phrase, first scene's CRS."""
        frames = []
        with cpu_timed(self.seconds, "stitch"):
            for info in self.scenes:
                for k, phrase in enumerate(self.phrases):
                    buffer = self.buffers[(info.path, k)]
                    frame = stitched_frame(info, buffer.pop_closed(), self.settings, self.counts, buffer.extent)
                    frame = frame.assign(phrase=phrase)[[*CONCEPT_COLUMNS, frame.geometry.name]]
                    frames.append(frame.assign(scene=info.path) if len(self.scenes) > 1 else frame)
        return merge_scene_frames(frames) if len(frames) > 1 else frames[0]

    def write_outputs(self, overwrite: bool, summary: RunSummary) -> None:
        """No outputs besides the vector layer."""

