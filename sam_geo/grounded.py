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

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import shapely

from sam_geo.api import (
    SegmentSettings,
    _check_summary_path,
    _merge_settings,
    _metres_in_crs_units,
    _min_area_in_crs_units,
    _regularize,
    expand_scenes,
    run_with_work_dir,
)
from sam_geo.engine import EngineConfig, TileResult, TileSegmenter, _decode_batches, precision_name, resolve_device, task_key, timed
from sam_geo.errors import ConfigError, RunError
from sam_geo.model.registry import resolve_weights
from sam_geo.io.prompts import PromptBatch
from sam_geo.io.scenes import SceneInfo, Stretch, compute_stretch, open_scene
from sam_geo.run.runtime import RuntimeOptions
from sam_geo.run.summary import RunSummary
from sam_geo.model.detector import DEFAULT_TEXT_MODEL
from sam_geo.geo.tiles import Tile, TileGrid, validate_tiling
from sam_geo.geo.vectorize import geometry_area_m2
from sam_geo.run.workdir import WorkDir, fingerprint_file
from sam_geo.io.writers import check_output_path, write_vector


@dataclass(frozen=True)
class TextTileTask:
    """One tile to search for ``phrases`` (a descriptor: no pixels)."""

    scene: SceneInfo
    stretch: Stretch
    tile: Tile
    phrases: tuple[str, ...]
    box_threshold: float | None = None
    text_threshold: float | None = None

    @property
    def key(self) -> str:
        return task_key(self.scene, self.tile)

    def execute(self, segmenter: TileSegmenter) -> TileResult:
        return run_text_tile(segmenter, self)


@dataclass(frozen=True)
class TextObject:
    """A detected and segmented object: polygon (WKB, scene CRS) and its scores."""

    wkb: bytes | None
    score: float
    detector_score: float
    phrase: str


@dataclass
class TextTileResult(TileResult):
    objects: list[TextObject] = field(default_factory=list)


def run_text_tile(segmenter: TileSegmenter, task: TextTileTask) -> TextTileResult:
    """Detect, keep detections centred in the core, encode once, decode, vectorize."""
    result = TextTileResult(tile_key=task.key)
    seconds = result.seconds
    tile = task.tile
    with timed(seconds, "read"):
        window = segmenter.read(task.scene, task.stretch, tile)
    if not window.valid.any():
        result.skipped_nodata = True
        return result
    detector = segmenter.detector()
    with segmenter.model_lock, timed(seconds, "detect"):
        found = detector.detect(
            window.rgb, list(task.phrases), box_threshold=task.box_threshold, text_threshold=task.text_threshold
        )
    keep = _owned(found.boxes, tile, window.valid)
    if not keep.any():
        return result
    boxes = found.boxes[keep]
    n = len(boxes)
    prompts = PromptBatch(np.arange(n), boxes, np.zeros((n, 0, 2)), np.zeros((n, 0), np.int32))
    embedding, input_hw = segmenter.encode(window.rgb, seconds)
    result.encoded = True
    scores, labels = found.scores[keep], found.labels[keep]
    for part in _decode_batches(prompts, segmenter.batch_size):
        logits, sam_scores = segmenter.decode(embedding, input_hw, window.rgb.shape[:2], part, seconds)
        with timed(seconds, "vectorize"):
            polygons = segmenter._vectorize(part, logits, sam_scores, window.valid, tile, input_hw, window.rgb.shape[:2])
        for record in polygons:
            k = record.prompt_index
            result.objects.append(
                TextObject(record.wkb, record.score, float(scores[k]), task.phrases[int(labels[k])])
            )
    return result


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


def segment_text(
    scenes: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    phrases: str | Sequence[str],
    *,
    detector: str = DEFAULT_TEXT_MODEL,
    box_threshold: float | None = None,
    text_threshold: float | None = None,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    settings: SegmentSettings | None = None,
    runtime: RuntimeOptions | None = None,
    summary_path: str | os.PathLike[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    restart: bool = False,
    max_failed_tiles: int = 0,
    **setting_overrides: Any,
) -> gpd.GeoDataFrame:
    """Find and outline every object matching ``phrases`` over whole scenes.

    ``detector`` is a Hugging Face model name (downloaded once into the Hugging Face
    cache when online) or a local folder written by ``save_pretrained``; it is passed to
    ``transformers`` unchanged. Thresholds default to the detector's own
    (:data:`sam_geo.model.detector.DEFAULT_THRESHOLDS`). Returns one row per object with
    ``phrase``, ``detector_score``, ``score`` (SAM's predicted IoU) and ``area_m2``, in
    the (first) scene's CRS; several scenes add a ``scene`` column. Other arguments as
    :func:`sam_geo.segment`.
    """
    t_total = time.perf_counter()
    phrase_list = (phrases,) if isinstance(phrases, str) else tuple(phrases)
    if not phrase_list or not all(p.strip() for p in phrase_list):
        raise ConfigError("give at least one non-empty phrase, e.g. 'swimming pool'")
    settings = _merge_settings(settings, setting_overrides)
    runtime = runtime or RuntimeOptions()
    output_path = check_output_path(output, overwrite=overwrite) if output is not None else None
    if summary_path is not None:
        _check_summary_path(Path(summary_path), overwrite)
    infos = [open_scene(p, bands=settings.bands, assume_crs=settings.assume_crs) for p in expand_scenes(scenes)]
    validate_tiling(settings.tile_size, settings.overlap)
    weights = resolve_weights(settings.model, settings.weights)
    config = EngineConfig(
        model=settings.model,
        weights=str(weights.path),
        device=settings.device,
        batch_size=settings.batch_size,
        precision=settings.precision,
        encode_batch=settings.encode_batch,
        decoder_context_px=settings.decoder_context_px,
        min_area=_min_area_in_crs_units(infos[0], settings.min_area_m2),
        simplify=_metres_in_crs_units(infos[0], settings.simplify_m),
        detector=detector,
    )
    tasks: list[TextTileTask] = []
    for info in infos:
        grid = TileGrid(info.height, info.width, info.transform, settings.tile_size, settings.overlap, settings.zoom or 1)
        stretch = compute_stretch(info, method=settings.stretch)
        tasks += [TextTileTask(info, stretch, tile, phrase_list, box_threshold, text_threshold) for tile in grid]

    summary = RunSummary(scene=", ".join(i.path for i in infos), mode="text")
    summary.model = {"name": settings.model, "weights_sha256": weights.sha256, "weights_source": weights.source,
                     "device": resolve_device(settings.device), "detector": detector,
                     "precision": precision_name(settings.precision, settings.device)}
    summary.settings = {**settings.__dict__, "phrases": list(phrase_list), "box_threshold": box_threshold,
                        "text_threshold": text_threshold, "workers": runtime.workers}
    summary.tiles.planned = len(tasks)
    store = None
    if work_dir is not None:
        fingerprint = {"mode": "text", "model": settings.model, "weights_sha256": weights.sha256,
                       "detector": detector, "settings": {k: v for k, v in summary.settings.items() if k != "workers"},
                       "scenes": [fingerprint_file(i.path) for i in infos]}
        store = WorkDir(work_dir, fingerprint, restart=restart)
    results = run_with_work_dir(tasks, config, runtime, store, summary)
    failed = [r for r in results if r.error]
    if len(failed) > max_failed_tiles:
        raise RunError(
            f"{len(failed)} of {len(tasks)} tiles failed (allowed: {max_failed_tiles}), so no output was written; "
            f"first: tile {failed[0].tile_key}: {failed[0].error}"
        )
    gdf = _assemble_text(infos, tasks, results)
    if settings.regularize_m is not None and len(gdf):
        gdf = _regularize(gdf, settings.regularize_m, summary)
    summary.features = len(gdf)
    if output_path is not None:
        start = time.perf_counter()
        write_vector(gdf, output_path, overwrite=overwrite)
        summary.seconds["write"] += time.perf_counter() - start
        summary.output = str(output_path)
    summary.seconds["total"] = time.perf_counter() - t_total
    gdf.attrs["summary"] = summary.to_dict()
    if summary_path is not None:
        summary.write(summary_path)
    return gdf


def _assemble_text(infos: list[SceneInfo], tasks: list[TextTileTask], results: list[TileResult]) -> gpd.GeoDataFrame:
    scene_of = {t.key: t.scene for t in tasks}
    out_crs = infos[0].crs
    rows: list[dict[str, Any]] = []
    geoms = []
    for res in sorted(results, key=lambda r: r.tile_key):
        scene = scene_of[res.tile_key]
        for obj in getattr(res, "objects", []):
            if obj.wkb is None:
                continue
            geom = shapely.from_wkb(obj.wkb)
            if scene.crs != out_crs:
                geom = gpd.GeoSeries([geom], crs=scene.crs).to_crs(out_crs).iloc[0]
            geoms.append(geom)
            row = {"phrase": obj.phrase, "detector_score": obj.detector_score, "score": obj.score}
            if len(infos) > 1:
                row["scene"] = scene.path
            rows.append(row)
    columns = ["phrase", "detector_score", "score"] + (["scene"] if len(infos) > 1 else [])
    gdf = gpd.GeoDataFrame(rows or None, columns=columns, geometry=gpd.GeoSeries(geoms, crs=out_crs), crs=out_crs)
    if len(gdf):
        drop = duplicate_rows(gdf.geometry.to_numpy(), gdf.phrase.to_numpy(), gdf.detector_score.to_numpy())
        gdf = gdf[~drop].reset_index(drop=True)
    gdf["area_m2"] = geometry_area_m2(gdf.geometry, out_crs) if len(gdf) else np.zeros(0)
    return gdf
