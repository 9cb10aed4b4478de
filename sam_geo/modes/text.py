"""Text prompts: a grounding detector turns phrases into boxes per tile, SAM segments them.

Every tile of the grid is read once by a model actor, which runs the detector
(:class:`~sam_geo.model.detector.TextDetector`, OWLv2 or Grounding DINO through ``transformers``)
on it, keeps the detections whose box centre lies in the tile's **core** window, encodes
the tile once and decodes those boxes with SAM. Core windows partition the scene, so an
object seen by two overlapping tiles is kept by exactly one of them (the one owning its
centre), where it has at least ``overlap`` pixels of halo around it: duplicates from
overlaps of one detection cannot arise. Different detections of one object (two boxes
on one roof, perhaps in two tiles) give near-identical masks: masks of one phrase
overlapping by IoU > 0.8 are one object (mask NMS over the whole output, the higher
detector score kept). Each output row carries the phrase, the detector's score
(``detector_score``), SAM's predicted IoU (``score``) and ``area_m2``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import geopandas as gpd
import numpy as np
import shapely

from sam_geo.errors import ConfigError
from sam_geo.geo.tiles import Tile, TileGrid
from sam_geo.geo.vectorize import geometry_area_m2
from sam_geo.io.prompts import PromptBatch
from sam_geo.io.scenes import SceneInfo, SceneReader, compute_stretch
from sam_geo.model.detector import require_transformers
from sam_geo.run.host import ModelHost, cpu_timed, timed
from sam_geo.run.pipeline import COMMON_TILE_SETTINGS, reproject_geometries
from sam_geo.run.summary import RunSummary
from sam_geo.run.post import PromptMasks, prompt_polygons
from sam_geo.run.tasks import PostConfig, TileInput, TileResult, TileTask
from sam_geo.settings import Settings


@dataclass(frozen=True)
class TextTileTask(TileTask):
    """One tile to search for ``phrases`` (a descriptor: no pixels)."""

    phrases: tuple[str, ...]
    box_threshold: float | None = None
    text_threshold: float | None = None

    def load(self, reader: SceneReader) -> TileInput:
        """Read the window."""
        return read_tile_input(self, reader)

    def infer(self, host: ModelHost, tile_input: TileInput) -> TextMasks | None:
        """Detect, keep detections centred in the core, encode once, decode."""
        return detect_and_decode(host, self, tile_input)

    def finish(self, tile_input: TileInput, output: TextMasks | None, post: PostConfig) -> TextTileResult:
        """The detected objects' polygons, in the scene CRS."""
        result = self.new_result(TextTileResult, tile_input)
        if output is None:
            return result
        with cpu_timed(result.seconds, "vectorize"):
            records = prompt_polygons(output.masks, tile_input.window, self.tile, post)
        for record in records:
            k = record.prompt_index
            phrase = self.phrases[int(output.labels[k])]
            result.objects.append(TextObject(record.wkb, record.score, float(output.detector_scores[k]), phrase))
        result.encoded = True
        return result


def read_tile_input(task: TileTask, reader: SceneReader) -> TileInput:
    """The load stage of a tile searched as a whole (text and concept prompts): its
    window, read and stretched; a window without valid pixels becomes ``window=None``
    (the tile is reported as all nodata) and needs no model."""
    tile_input = TileInput(window=None)
    with cpu_timed(tile_input.seconds, "read"):
        window = task.read(reader)
    tile_input.window = window if window.valid.any() else None
    tile_input.needs_model = tile_input.window is not None
    return tile_input


@dataclass
class TextMasks:
    """The model stage's output for a text tile: decoded detections and their labels."""

    masks: PromptMasks
    detector_scores: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class TextObject:
    """A detected and segmented object: polygon (WKB, scene CRS) and its scores."""

    wkb: bytes | None
    score: float
    detector_score: float
    phrase: str


@dataclass
class TextTileResult(TileResult):
    """A tile's detected and segmented objects."""

    objects: list[TextObject] = field(default_factory=list)


def detect_and_decode(host: ModelHost, task: TextTileTask, tile_input: TileInput) -> TextMasks | None:
    """Detect the phrases, keep detections centred in the tile's core, decode their
    boxes; None when nothing is kept."""
    window = tile_input.window
    detector = host.detector()
    with host.hold_model(), timed(tile_input.seconds, "detect"):
        found = detector.detect(
            window.rgb, list(task.phrases), box_threshold=task.box_threshold, text_threshold=task.text_threshold
        )
    keep = _owned(found.boxes, task.tile, window.valid)
    if not keep.any():
        return None
    boxes, scores, labels = found.boxes[keep], found.scores[keep], found.labels[keep]
    n = len(boxes)
    prompts = PromptBatch(np.arange(n), boxes, np.zeros((n, 0, 2)), np.zeros((n, 0), np.int32))
    masks = host.decode_prompts(window.rgb, prompts, tile_input.seconds)
    return TextMasks(masks, np.asarray(scores, dtype=np.float64), np.asarray(labels))


DUPLICATE_IOU = 0.8
"""Two masks of one phrase overlapping by more than this IoU are one object."""


def duplicate_rows(geoms: np.ndarray, phrases: np.ndarray, detector_scores: np.ndarray) -> np.ndarray:
    """(n,) True for rows to drop: a mask of the same phrase with IoU > :data:`DUPLICATE_IOU`
    and a higher detector score exists (mask NMS over the whole output, STRtree
    candidates, so linear in objects for realistic densities)."""
    n = len(geoms)
    drop = np.zeros(n, dtype=bool)
    if n < 2:
        return drop
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pairs = (left < right) & (phrases[left] == phrases[right])
    left, right = left[pairs], right[pairs]
    inter = shapely.area(shapely.intersection(geoms[left], geoms[right]))
    iou = inter / shapely.area(shapely.union(geoms[left], geoms[right]))
    order = np.argsort(-detector_scores, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    dup = iou > DUPLICATE_IOU
    for a, b in sorted(zip(left[dup], right[dup]), key=lambda ab: min(rank[ab[0]], rank[ab[1]])):
        keep, lose = (a, b) if rank[a] < rank[b] else (b, a)
        if not drop[keep]:
            drop[lose] = True
    return drop


def _owned(boxes: np.ndarray, tile: Tile, valid: np.ndarray) -> np.ndarray:
    """(n,) True for tile-pixel boxes whose centre is in the tile's core and on data."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=bool)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    s = tile.scale
    col, row = tile.read.col_start + cx * s, tile.read.row_start + cy * s
    core = tile.core
    in_core = (col >= core.col_start) & (col < core.col_stop) & (row >= core.row_start) & (row < core.row_stop)
    rr = np.clip(cy.astype(int), 0, valid.shape[0] - 1)
    cc = np.clip(cx.astype(int), 0, valid.shape[1] - 1)
    return in_core & valid[rr, cc]


class TextMode:
    """Text prompts as a :class:`~sam_geo.run.pipeline.Mode`: every tile searched for
    ``phrases`` by the grounding detector of ``settings.detector``."""

    name = "text"
    order_by = None
    tile_settings = (*COMMON_TILE_SETTINGS, "min_area_m2", "detector", "box_threshold", "text_threshold",
                     "flip_views")

    def __init__(self, phrases: str | Sequence[str]) -> None:
        self.phrases = (phrases,) if isinstance(phrases, str) else tuple(phrases)
        if not self.phrases or not all(isinstance(p, str) and p.strip() for p in self.phrases):
            raise ConfigError("give at least one non-empty phrase, e.g. 'swimming pool'")
        self.scenes: list[SceneInfo] = []
        self.tasks: list[TextTileTask] = []
        self.results: list[TileResult] = []

    @property
    def inputs(self) -> dict[str, Any]:
        """No input files besides the scenes."""
        return {}

    def check(self, settings: Settings) -> None:
        """``transformers`` must be installed (the detector itself loads in the actors)."""
        require_transformers()

    def check_outputs(self, overwrite: bool) -> None:
        """No outputs besides the vector layer."""

    def plan(self, scenes: list[SceneInfo], settings: Settings) -> list[TileTask]:
        """Every tile of every scene, at ``settings.zoom`` (1 when unset)."""
        self.scenes, self.tasks = scenes, []
        for info in scenes:
            grid = TileGrid(info.height, info.width, info.transform, settings.tile_size_px, settings.overlap_px,
                            settings.zoom or 1)
            stretch = compute_stretch(info, method=settings.stretch)
            self.tasks += [
                TextTileTask(info, stretch, tile, self.phrases, settings.box_threshold, settings.text_threshold)
                for tile in grid
            ]
        return list(self.tasks)

    def fingerprint(self) -> dict[str, Any]:
        """The phrases."""
        return {"phrases": list(self.phrases)}

    def summary_settings(self) -> dict[str, Any]:
        """The phrases searched for."""
        return {"phrases": list(self.phrases)}

    def accept(self, result: TileResult) -> gpd.GeoDataFrame | None:
        """Kept until the end: duplicates across tile overlaps (and scenes) are removed over
        all detections at once (a few per tile, so this stays small)."""
        if getattr(result, "objects", None):
            self.results.append(result)
        return None

    def finish(self, summary: RunSummary) -> Iterator[gpd.GeoDataFrame]:
        """One row per object: duplicates across overlaps removed (:func:`duplicate_rows`)."""
        yield assemble_text(self.scenes, self.tasks, self.results)

    def write_outputs(self, overwrite: bool, summary: RunSummary) -> None:
        """No outputs besides the vector layer."""


def assemble_text(infos: list[SceneInfo], tasks: list[TextTileTask], results: list[TileResult]) -> gpd.GeoDataFrame:
    """The tiles' objects as one layer in the first scene's CRS, duplicates removed."""
    scene_of = {t.key: t.scene for t in tasks}
    out_crs = infos[0].crs
    rows: list[dict[str, Any]] = []
    geoms: list[shapely.Geometry] = []
    crss: list[Any] = []
    for res in sorted(results, key=lambda r: r.tile_key):
        scene = scene_of[res.tile_key]
        for obj in getattr(res, "objects", []):
            if obj.wkb is None:
                continue
            geoms.append(shapely.from_wkb(obj.wkb))
            crss.append(scene.crs)
            row = {"phrase": obj.phrase, "detector_score": obj.detector_score, "score": obj.score}
            if len(infos) > 1:
                row["scene"] = scene.path
            rows.append(row)
    geoms = list(reproject_geometries(np.array(geoms, dtype=object), crss, out_crs))
    columns = ["phrase", "detector_score", "score"] + (["scene"] if len(infos) > 1 else [])
    gdf = gpd.GeoDataFrame(rows or None, columns=columns, geometry=gpd.GeoSeries(geoms, crs=out_crs), crs=out_crs)
    if len(gdf):
        drop = duplicate_rows(gdf.geometry.to_numpy(), gdf.phrase.to_numpy(), gdf.detector_score.to_numpy())
        gdf = gdf[~drop].reset_index(drop=True)
    gdf["area_m2"] = geometry_area_m2(gdf.geometry, out_crs) if len(gdf) else np.zeros(0)
    return gdf
