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
3. finish: upsample each instance's mask logits over its box to tile pixels (bilinear,
   pixel centres), AND with the valid mask, vectorize on the tile's affine, keep its
   largest part, and note which read-window sides facing another tile it reaches
   (:func:`~sam_geo.geo.stitch.piece_from_geometry`).

Instances are then stitched across seams exactly as automatic mode's masks are, one
:class:`~sam_geo.geo.stitch.SeamBuffer` per scene and phrase: an object seen by several
tiles comes out as one polygon, whatever its size relative to the tile. Output columns:
``phrase``, ``score`` (the instance score, ``sigmoid(logit) * sigmoid(presence)``, of
the chosen piece or area-weighted over a mosaic), ``area_m2``, ``n_tiles``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import geopandas as gpd
import numpy as np
import shapely
import torch
import torch.nn.functional as F
from affine import Affine

from sam_geo.errors import ConfigError
from sam_geo.geo.stitch import Piece, SeamBuffer, piece_from_geometry
from sam_geo.geo.tiles import TileGrid
from sam_geo.geo.vectorize import mask_to_geometry
from sam_geo.io.scenes import SceneInfo, SceneReader, compute_stretch
from sam_geo.model.detector import require_transformers
from sam_geo.model.sam3_backend import ConceptInstances
from sam_geo.modes.automatic import MIN_OVERLAP_PX, merge_scene_frames, stitched_frame
from sam_geo.modes.text import read_tile_input
from sam_geo.run.host import ModelHost, cpu_timed, timed
from sam_geo.run.pipeline import COMMON_TILE_SETTINGS
from sam_geo.run.summary import RunSummary
from sam_geo.run.tasks import PostConfig, TileInput, TileResult, TileTask
from sam_geo.settings import Settings

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
            result.pieces = instance_pieces(output, tile_input.window.valid, self, post)
        return result


@dataclass
class ConceptTileResult(TileResult):
    """A tile's instances as ``(phrase index, piece)`` pairs (no pixels)."""

    pieces: list[tuple[int, Piece]] = field(default_factory=list)


def instance_pieces(
    found: ConceptInstances, valid: np.ndarray, task: ConceptTileTask, post: PostConfig
) -> list[tuple[int, Piece]]:
    """Each instance's mask at tile resolution, vectorized, its largest part as a piece."""
    tile = task.tile
    rows, cols = valid.shape
    per_px = (found.grid_hw[0] / rows, found.grid_hw[1] / cols)  # mask cells per tile pixel
    edge_margin = max(1 / per_px[0], 1 / per_px[1]) * tile.scale + 1.0
    out: list[tuple[int, Piece]] = []
    for k in range(len(found)):
        crop = pixel_crop(found.origin[k], found.logits[k].shape, per_px, (rows, cols))
        mask = sample_logits(found.logits[k], found.origin[k], crop, per_px) & valid[crop[0]:crop[2], crop[1]:crop[3]]
        transform = tile.transform @ Affine.translation(crop[1], crop[0])
        geom = mask_to_geometry(mask, transform, min_area=post.min_area, simplify=post.simplify)
        if geom is None:
            continue
        geom = max(shapely.get_parts(geom), key=lambda p: p.area)
        piece = piece_from_geometry(geom, tile, (task.scene.height, task.scene.width), score=float(found.score[k]),
                                    edge_margin=edge_margin)
        if piece is not None:
            out.append((int(found.phrase[k]), piece))
    return out


def pixel_crop(
    origin: Sequence[int], shape: tuple[int, int], per_px: tuple[float, float], hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) of the tile pixels a crop of mask cells covers (clipped)."""
    r0 = max(0, math.floor(origin[0] / per_px[0]))
    c0 = max(0, math.floor(origin[1] / per_px[1]))
    r1 = min(hw[0], math.ceil((origin[0] + shape[0]) / per_px[0]))
    c1 = min(hw[1], math.ceil((origin[1] + shape[1]) / per_px[1]))
    return r0, c0, max(r1, r0 + 1), max(c1, c0 + 1)


def sample_logits(
    logits: np.ndarray, origin: Sequence[int], crop: tuple[int, int, int, int], per_px: tuple[float, float]
) -> np.ndarray:
    """(rows, cols) bool: crop cells' logits bilinearly sampled at the tile pixels of
    ``crop``, above 0. Tile pixel ``(r, c)`` sits at cell ``((r + 0.5) * per_px[0] - 0.5,
    (c + 0.5) * per_px[1] - 0.5)`` of the whole grid (the grid spans the tile); pixels
    beyond the crop's cells take its border value."""
    r0, c0, r1, c1 = crop
    grid = torch.from_numpy(np.array(logits, dtype=np.float32))  # a copy: arrays from Ray are read-only
    h, w = grid.shape
    ys = (torch.arange(r0, r1, dtype=torch.float32) + 0.5) * per_px[0] - 0.5 - float(origin[0])
    xs = (torch.arange(c0, c1, dtype=torch.float32) + 0.5) * per_px[1] - 0.5 - float(origin[1])
    ys = ys * (2.0 / max(h - 1, 1)) - 1.0
    xs = xs * (2.0 / max(w - 1, 1)) - 1.0
    points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
    sampled = F.grid_sample(grid[None, None], points, mode="bilinear", padding_mode="border", align_corners=True)
    return (sampled[0, 0] > 0.0).numpy()


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
        """``transformers`` installed and an overlap wide enough to stitch in."""
        require_transformers()
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

