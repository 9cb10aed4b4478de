"""The Python API: whole-scene segmentation that returns GeoDataFrames.

>>> import sam_geo
>>> gdf = sam_geo.segment("scene.tif", prompts="buildings.shp", output="buildings.gpkg")

The CLI (:mod:`sam_geo.cli`) is a thin layer over these functions.
"""

from __future__ import annotations

import glob
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from sam_geo import __version__
from sam_geo.engine import EngineConfig, TileResult, TileTask, precision_name, resolve_device
from sam_geo.errors import ConfigError, OutputError, OutputExistsError, RasterError, RunError
from sam_geo.model.registry import resolve_weights
from sam_geo.io.prompts import (
    PROMPT_MODES,
    PromptBatch,
    PromptMode,
    PromptSet,
    TilePlan,
    GroupPoints,
    add_group_points,
    add_negative_points,
    group_prompt_rows,
    build_prompts,
    negative_points_in_pixels,
    no_usable_prompts,
    plan_prompt_tiles,
    read_prompt_layer,
)
from sam_geo.io.scenes import SceneInfo, Stretch, compute_stretch, open_scene
from sam_geo.run.runtime import RunTimer, RuntimeOptions, run_tiles
from sam_geo.run.summary import RunSummary
from sam_geo.geo.tiles import DEFAULT_OVERLAP, DEFAULT_TILE_SIZE, ZOOMS, TileGrid, validate_tiling
from sam_geo.geo.vectorize import geometry_area_m2, metres_to_crs_units
from sam_geo.run.workdir import WorkDir, digest, fingerprint_file
from sam_geo.io.writers import check_output_path, write_vector

DEFAULT_MIN_AREA_M2 = 0.5
"""Polygon parts (and holes) smaller than this many square metres are dropped."""

OUTPUT_COLUMNS = ("prompt_index", "score", "area_m2")
"""Columns sam-geo adds to every prompted output (after the prompt's own attributes)."""


@dataclass(frozen=True)
class SegmentSettings:
    """Settings shared by the segmentation commands (units in the field names)."""

    model: str = "mobile_sam"
    weights: str | None = None
    bands: tuple[int, ...] | None = None
    stretch: str = "auto"
    tile_size: int = DEFAULT_TILE_SIZE
    overlap: int = DEFAULT_OVERLAP
    zoom: int | None = None
    """Model pixels per scene pixel (1, 2 or 4); None: chosen from the prompt sizes."""
    min_area_m2: float = DEFAULT_MIN_AREA_M2
    simplify_m: float | None = None
    batch_size: int | None = None
    regularize_m: float | None = None
    """Regularize building outlines (right angles, straight edges) with this simplify
    tolerance in metres (:func:`sam_geo.geo.regularize.regularize_buildings`); None: off."""
    box_grow: float | None = None
    """Grow box prompts by this fraction of their longer side (None: 0.25 for ``mask``
    prompts, else 0): for outdated outlines that are shifted or too small."""
    multimask: bool = False
    """Three candidate masks per prompt, the one closest in area to the prompt polygon
    kept (highest predicted IoU for points); off: one mask per box prompt."""
    device: str = "auto"
    assume_crs: str | None = None
    precision: str = "auto"
    """Model arithmetic: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``."""
    encode_batch: int | None = None
    """Tiles per image-encoder call (None: 4 on CUDA, 1 on CPU)."""
    decoder_context_px: int | None = None
    """CPU only, box prompts: the mask decoder attends to a square of this many model
    pixels a side around each box instead of the whole tile (rounded up to 16 px cells;
    at least the box grown by half its size). Faster, slightly different masks: on
    Banepa 256 px cut decoding 3x at a median IoU of 0.854 against 0.857 (see README).
    None or 0: the whole tile, SAM's own decoder outputs."""

    def validate(self) -> None:
        if self.min_area_m2 < 0 or not math.isfinite(self.min_area_m2):
            raise ConfigError(f"min area must be a finite number of square metres >= 0, got {self.min_area_m2}")
        if self.box_grow is not None and not (0 <= self.box_grow <= 2):
            raise ConfigError(f"box grow must be a fraction between 0 and 2 of the box side, got {self.box_grow}")
        if self.regularize_m is not None and not (0 < self.regularize_m <= 50):
            raise ConfigError(f"regularize tolerance must be between 0 and 50 m, got {self.regularize_m}")
        if self.simplify_m is not None and not (0 <= self.simplify_m < 1000):
            raise ConfigError(f"simplify tolerance must be between 0 and 1000 m, got {self.simplify_m}")
        if self.batch_size is not None and not (1 <= self.batch_size <= 4096):
            raise ConfigError(f"batch size must be between 1 and 4096 prompts, got {self.batch_size}")
        if self.zoom is not None and self.zoom not in ZOOMS:
            raise ConfigError(f"zoom must be one of {', '.join(map(str, ZOOMS))} (or auto), got {self.zoom}")
        if self.device not in {"auto", "cpu"} and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be one of auto, fp32, bf16, fp16, got {self.precision!r}")
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("fp16 needs a CUDA GPU; use --precision bf16 or fp32 with --device cpu")
        if self.encode_batch is not None and not (1 <= self.encode_batch <= 64):
            raise ConfigError(f"encode batch must be between 1 and 64 tiles, got {self.encode_batch}")
        context = self.decoder_context_px
        if context is not None and context != 0 and not (64 <= context <= 4096):
            raise ConfigError(f"decoder context must be 0 (the whole tile) or 64 to 4096 model pixels, got {context}")


def segment(
    scenes: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    prompts: str | os.PathLike[str] | gpd.GeoDataFrame,
    *,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    prompt_as: PromptMode = "auto",
    prompts_layer: str | None = None,
    prompts_crs: str | None = None,
    id_column: str | None = None,
    settings: SegmentSettings | None = None,
    runtime: RuntimeOptions | None = None,
    summary_path: str | os.PathLike[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    restart: bool = False,
    max_failed_tiles: int = 0,
    negative_points: str | os.PathLike[str] | gpd.GeoDataFrame | None = None,
    group_column: str | None = None,
    label_column: str | None = None,
    **setting_overrides: Any,
) -> gpd.GeoDataFrame:
    """Segment the objects a vector layer points at, over one or several whole scenes.

    Each prompt (a feature of ``prompts``: points become point prompts, polygons box
    prompts; see ``prompt_as``) is decoded in a window that holds its whole box, so no
    prompted object is cut by a tile edge. Returns one row per prompt that produced a
    mask, with the prompt's attributes plus ``prompt_index`` (its row in the layer),
    ``score`` (SAM's predicted IoU) and ``area_m2``, in the CRS of the (first) scene.

    ``scenes``: a path, URL, glob (``"tiles/*.tif"``), ``@list.txt`` (one path per
    line), or a list of those. With several scenes the output is one merged layer with
    a ``scene`` column, reprojected to the first scene's CRS; a prompt belongs to the
    first scene (in the order given) that it intersects.

    The run summary is in ``gdf.attrs["summary"]``: prompts outside every scene, on
    nodata, with invalid geometry or an empty mask are listed there. ``work_dir`` keeps
    each finished tile so a rerun resumes (see :mod:`sam_geo.run.workdir`); tiles that keep
    failing are recorded and the rest finishes, but more than ``max_failed_tiles``
    failures raise :class:`~sam_geo.errors.RunError` and write no output.

    ``negative_points``: a point layer (any CRS); each point is added as a negative
    point to every prompt near it (:func:`~sam_geo.io.prompts.add_negative_points`).
    ``group_column`` (and ``label_column``, 1 positive / 0 negative): rows sharing a
    group value are one object with several points, and a box when the group has a
    polygon (:func:`~sam_geo.io.prompts.group_prompt_rows`); one output row per group.

    ``output`` (``.geojson``, ``.gpkg``, ``.parquet``) is written atomically and never
    overwritten unless ``overwrite``. Keyword arguments not listed are fields of
    :class:`SegmentSettings` (``tile_size=512``, ``model="vit_b"`` ...).
    """
    t_total = time.perf_counter()
    settings = _merge_settings(settings, setting_overrides)
    runtime = runtime or RuntimeOptions()
    if prompt_as not in PROMPT_MODES:
        raise ConfigError(f"unknown prompt mode {prompt_as!r}; use one of {', '.join(PROMPT_MODES)}")
    if max_failed_tiles < 0:
        raise ConfigError(f"max failed tiles must be >= 0, got {max_failed_tiles}")
    if runtime.workers is not None and runtime.workers < 0:
        raise ConfigError(f"--workers must be 0 (in this process, no Ray) or more model actors, got {runtime.workers}")
    if runtime.retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {runtime.retries}")
    others = {"the prompt layer": prompts, "the negative-point layer": negative_points, "the summary": summary_path}
    scene_args = [scenes] if isinstance(scenes, (str, os.PathLike)) else list(scenes)
    others.update({f"scene {k + 1}": s for k, s in enumerate(scene_args)})
    output_path = check_output_path(output, overwrite=overwrite, others=others) if output is not None else None
    if summary_path is not None:
        _check_summary_path(Path(summary_path), overwrite)

    infos = [open_scene(p, bands=settings.bands, assume_crs=settings.assume_crs) for p in expand_scenes(scenes)]
    validate_tiling(settings.tile_size, settings.overlap)
    weights = resolve_weights(settings.model, settings.weights)
    frame = read_prompt_layer(prompts, layer=prompts_layer, assume_crs=prompts_crs)
    frame.index = pd.RangeIndex(len(frame), name="prompt_index")
    if id_column is not None and id_column not in frame.columns:
        raise ConfigError(
            f"id column {id_column!r} is not in the prompt layer; its columns are: "
            + ", ".join(map(str, frame.columns.drop(frame.geometry.name)))
        )
    group_points = None
    if group_column is not None:
        frame, group_points = group_prompt_rows(frame, group_column, label_column)
        id_column = id_column or group_column
    elif label_column is not None:
        raise ConfigError("a label column needs a group column naming which object each point belongs to")
    negatives = read_prompt_layer(negative_points) if negative_points is not None else None
    jobs, outside, invalid = _plan_scenes(infos, frame, settings, prompt_as, negatives, group_points)
    if not jobs:  # nothing to segment: almost always a CRS or extent mistake
        source = "the prompt GeoDataFrame" if isinstance(prompts, gpd.GeoDataFrame) else str(prompts)
        raise no_usable_prompts(source, frame, [(i.path, i.crs, tuple(i.bounds)) for i in infos], outside, invalid)

    config = EngineConfig(
        model=settings.model,
        weights=str(weights.path),
        device=settings.device,
        batch_size=settings.batch_size,
        precision=settings.precision,
        encode_batch=settings.encode_batch,
        decoder_context_px=settings.decoder_context_px,
        multimask=settings.multimask,
        min_area=_min_area_in_crs_units(infos[0], settings.min_area_m2),
        simplify=_metres_in_crs_units(infos[0], settings.simplify_m),
    )
    summary = RunSummary(scene=", ".join(i.path for i in infos), mode="prompted")
    summary.model = {
        "name": settings.model,
        "weights_sha256": weights.sha256,
        "weights_source": weights.source,
        "device": resolve_device(settings.device),
        "precision": precision_name(settings.precision, settings.device),
    }
    summary.settings = {
        **settings.__dict__,
        "zoom": [job.grid.zoom for job in jobs],
        "prompt_as": prompt_as,
        "workers": runtime.workers,
    }
    summary.settings["negative_points"] = None if negatives is None else _geometry_digest(negatives)
    summary.settings["group_points"] = None if group_points is None else _points_digest(group_points)
    tasks = [TileTask(job.scene, job.stretch, tile, batch) for job in jobs for tile, batch in job.plan.tiles]
    summary.tiles.planned = len(tasks)
    store = _open_work_dir(work_dir, restart, summary, infos, frame, prompt_as) if work_dir else None
    results = run_with_work_dir(tasks, config, runtime, store, summary)

    gdf = _assemble(frame, jobs, results, summary, id_column, outside, invalid)
    if settings.regularize_m is not None and len(gdf):
        gdf = _regularize(gdf, settings.regularize_m, summary)
    failed = [r for r in results if r.error]
    if len(failed) > max_failed_tiles:
        summary.seconds["total"] = time.perf_counter() - t_total
        if summary_path is not None:
            summary.write(summary_path)
        first = failed[0]
        raise RunError(
            f"{len(failed)} of {len(tasks)} tiles failed (allowed: {max_failed_tiles}), so no output was "
            f"written; first: tile {first.tile_key}: {first.error}. Finished tiles are kept in the work dir "
            "if one was given; fix the input or raise --max-failed-tiles."
        )
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


@dataclass(frozen=True)
class SceneJob:
    """One scene's share of a prompted run."""

    scene: SceneInfo
    grid: TileGrid
    stretch: Stretch
    prompts: PromptSet
    plan: TilePlan


def expand_scenes(scenes: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Scene arguments -> paths: globs expanded (sorted), ``@file`` lists read, order kept.

    A text file of paths may also be given by a ``.txt`` suffix. Raises
    :class:`RasterError` for a glob that matches nothing or an empty list.
    """
    items = [scenes] if isinstance(scenes, (str, os.PathLike)) else list(scenes)
    paths: list[str] = []
    for item in map(str, items):
        if item.startswith("@") or item.endswith(".txt"):
            listing = Path(item.lstrip("@"))
            if not listing.exists():
                raise RasterError(f"scene list {listing} does not exist")
            lines = listing.read_text(encoding="utf-8").splitlines()
            paths += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        elif glob.has_magic(item) and "://" not in item:
            matched = sorted(glob.glob(item))
            if not matched:
                raise RasterError(f"no scene matches {item!r}")
            paths += matched
        else:
            paths.append(item)
    if not paths:
        raise RasterError("no scenes given")
    return list(dict.fromkeys(paths))


def _plan_scenes(
    infos: list[SceneInfo],
    frame: gpd.GeoDataFrame,
    settings: SegmentSettings,
    prompt_as: PromptMode,
    negatives: gpd.GeoDataFrame | None = None,
    group_points: GroupPoints | None = None,
) -> tuple[list[SceneJob], tuple[int, ...], tuple[int, ...]]:
    """Give each prompt to the first scene it intersects; plan each scene's tiles."""
    jobs: list[SceneJob] = []
    remaining = frame
    invalid: tuple[int, ...] = ()
    for n, info in enumerate(infos):
        prompt_set = build_prompts(
            remaining, info.crs, info.transform, (info.height, info.width), prompt_as=prompt_as,
            box_grow=settings.box_grow,
        )
        if n == 0:
            invalid = prompt_set.invalid
        remaining = remaining.loc[list(prompt_set.outside)]
        if len(prompt_set.batch) == 0:
            continue
        if group_points is not None:
            prompt_set = replace(
                prompt_set, batch=add_group_points(prompt_set.batch, group_points, info.crs, info.transform)
            )
        if negatives is not None:
            negative_xy = negative_points_in_pixels(negatives, info.crs, info.transform)
            prompt_set = replace(prompt_set, batch=add_negative_points(prompt_set.batch, negative_xy))
        zoom = settings.zoom or choose_zoom(prompt_set.batch)
        grid = TileGrid(info.height, info.width, info.transform, settings.tile_size, settings.overlap, zoom)
        stretch = compute_stretch(info, method=settings.stretch)
        jobs.append(SceneJob(info, grid, stretch, prompt_set, plan_prompt_tiles(grid, prompt_set.batch)))
    return jobs, tuple(int(i) for i in remaining.index), invalid


def _open_work_dir(
    path: str | os.PathLike[str],
    restart: bool,
    summary: RunSummary,
    infos: list[SceneInfo],
    frame: gpd.GeoDataFrame,
    prompt_as: str,
) -> WorkDir:
    prompts_digest = _geometry_digest(frame)
    fingerprint = {
        "sam_geo": __version__,
        "mode": summary.mode,
        "model": summary.model["name"],
        "weights_sha256": summary.model["weights_sha256"],
        "settings": {k: v for k, v in summary.settings.items() if k not in ("workers", "device", "batch_size", "encode_batch")},
        "scenes": [fingerprint_file(info.path) for info in infos],
        "prompts": prompts_digest,
        "prompt_as": prompt_as,
    }
    return WorkDir(path, fingerprint, restart=restart)


def _geometry_digest(frame: gpd.GeoDataFrame) -> str:
    """sha256 over a layer's geometries (WKB), CRS and column names."""
    wkb = shapely.to_wkb(frame.geometry.to_numpy(), hex=False)
    return digest(
        b"".join(g if g is not None else b"-" for g in wkb),
        str(frame.crs).encode(),
        ",".join(map(str, frame.columns)).encode(),
    )


def run_with_work_dir(
    tasks: list[Any], config: EngineConfig, runtime: RuntimeOptions, store: WorkDir | None, summary: RunSummary
) -> list[TileResult]:
    """Run the tasks not already finished in ``store``; save each success there first.

    Fills ``summary.tiles`` (processed, resumed, failed, skipped_nodata) and the stage
    seconds. Results come back in no particular order.
    """
    results: list[TileResult] = []
    todo = tasks
    if store is not None:
        done = [t for t in tasks if store.done(t.key)]
        results += [store.load(t.key) for t in done]
        summary.tiles.resumed = len(done)
        todo = [t for t in tasks if not store.done(t.key)]
    timer = RunTimer()
    for result in run_tiles(todo, config, runtime, timer):
        if result.error is None and store is not None:
            store.save(result.tile_key, result)
        results.append(result)
        summary.add_seconds(result.seconds)
        summary.tiles.processed += int(result.encoded)
        if runtime.on_result is not None:
            runtime.on_result(result)
    summary.add_seconds(timer.seconds)
    summary.tiles.skipped_nodata = sum(r.skipped_nodata for r in results)
    failed = [r for r in results if r.error]
    summary.tiles.failed = len(failed)
    summary.failures = [{"tile": r.tile_key, "error": r.error, "attempts": r.attempts} for r in failed]
    return results


ZOOM_THRESHOLDS_PX = ((48.0, 1), (24.0, 2))
"""Auto zoom: median prompt box side (scene px) >= 48 -> 1, >= 24 -> 2, smaller -> 4."""


def choose_zoom(batch: PromptBatch) -> int:
    """Zoom for a prompt set: upsample scenes whose prompted objects are small in pixels.

    SAM segments objects a few dozen pixels across poorly (it was trained on photos
    where objects span hundreds). Measured on the Sentinel-2 fields (10 m, median box
    20 px): median IoU 0.566 at zoom 1, 0.628 at 2, 0.656 at 4 (``benchmarks/zoom.py``).
    Point-only layers give no size and keep zoom 1.
    """
    boxes = batch.boxes[batch.has_box]
    if len(boxes) == 0:
        return 1
    median_side = float(np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))
    for threshold, zoom in ZOOM_THRESHOLDS_PX:
        if median_side >= threshold:
            return zoom
    return ZOOMS[-1]


def _merge_settings(settings: SegmentSettings | None, overrides: dict[str, Any]) -> SegmentSettings:
    base = settings or SegmentSettings()
    unknown = set(overrides) - set(SegmentSettings.__dataclass_fields__)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(sorted(unknown))}; known: "
            + ", ".join(SegmentSettings.__dataclass_fields__)
        )
    merged = SegmentSettings(**{**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    if merged.bands is not None:
        merged = SegmentSettings(**{**merged.__dict__, "bands": tuple(merged.bands)})
    merged.validate()
    return merged


def _check_summary_path(path: Path, overwrite: bool) -> None:
    if not path.parent.exists():
        raise OutputError(f"directory {path.parent} of the summary file does not exist; create it first")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"summary file {path} exists; pass --overwrite to replace it")


def _metres_in_crs_units(scene: SceneInfo, metres: float | None) -> float | None:
    if metres is None:
        return None
    return metres_to_crs_units(scene.crs, metres, at_lat=_scene_latitude(scene))


def _min_area_in_crs_units(scene: SceneInfo, area_m2: float) -> float:
    side = metres_to_crs_units(scene.crs, math.sqrt(area_m2), at_lat=_scene_latitude(scene))
    return side * side


def _scene_latitude(scene: SceneInfo) -> float | None:
    if not scene.is_geographic:
        return None
    left, bottom, right, top = scene.bounds
    return (bottom + top) / 2


def _ids(frame: pd.DataFrame, rows: list[int] | tuple[int, ...], id_column: str | None) -> list[Any]:
    if id_column is None:
        return [int(r) for r in rows]
    return [_plain(v) for v in frame.loc[list(rows), id_column].tolist()]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _assemble(
    frame: gpd.GeoDataFrame,
    jobs: list[SceneJob],
    results: list[TileResult],
    summary: RunSummary,
    id_column: str | None,
    outside: tuple[int, ...],
    invalid: tuple[int, ...],
) -> gpd.GeoDataFrame:
    """Join decoded polygons to their prompts' attributes; fill the summary's counts.

    Several scenes are merged into the first scene's CRS (reprojected explicitly) with
    a ``scene`` column naming each row's scene.
    """
    scene_of_tile = {TileTask(j.scene, j.stretch, t, b).key: j.scene for j in jobs for t, b in j.plan.tiles}
    records = [(scene_of_tile[res.tile_key], r) for res in results for r in res.results]
    on_nodata = sorted({i for res in results for i in res.on_nodata})
    empty = sorted(r.prompt_index for _, r in records if r.wkb is None)
    done = sorted(((s, r) for s, r in records if r.wkb is not None), key=lambda sr: sr[1].prompt_index)

    counts = summary.prompts
    counts.total = len(frame)
    counts.used = sum(len(j.prompts.batch) for j in jobs)
    counts.outside, counts.outside_ids = len(outside), _ids(frame, outside, id_column)
    counts.invalid, counts.invalid_ids = len(invalid), _ids(frame, invalid, id_column)
    counts.on_nodata, counts.on_nodata_ids = len(on_nodata), _ids(frame, on_nodata, id_column)
    counts.empty, counts.empty_ids = len(empty), _ids(frame, empty, id_column)

    out_crs = jobs[0].scene.crs if jobs else frame.crs
    index = np.array([r.prompt_index for _, r in done], dtype=np.int64)
    attrs = pd.DataFrame(frame.drop(columns=frame.geometry.name)).loc[index]
    attrs = attrs.rename(columns={c: f"prompt_{c}" for c in (*OUTPUT_COLUMNS, "scene") if c in attrs.columns})
    attrs = attrs.reset_index()
    if len(jobs) > 1:
        attrs["scene"] = [s.path for s, _ in done]
    attrs["score"] = np.array([r.score for _, r in done], dtype=np.float64)
    geoms = [_to_crs(shapely.from_wkb(r.wkb), s.crs, out_crs) for s, r in done]
    gdf = gpd.GeoDataFrame(attrs, geometry=gpd.GeoSeries(geoms, crs=out_crs), crs=out_crs)
    gdf["area_m2"] = geometry_area_m2(gdf.geometry, out_crs) if len(gdf) else np.zeros(0)
    summary.features = len(gdf)
    return gdf


def _points_digest(group: GroupPoints) -> str:
    """A digest of grouped prompts' points and labels (for the work-dir fingerprint)."""
    parts = [np.ascontiguousarray(a).tobytes() for k in sorted(group.points) for a in group.points[k]]
    return digest(*parts)


def _regularize(gdf: gpd.GeoDataFrame, tolerance_m: float, summary: RunSummary) -> gpd.GeoDataFrame:
    """Regularized outlines, areas recomputed; counts go to ``summary.regularize``."""
    from sam_geo.geo.regularize import regularize_buildings

    start = time.perf_counter()
    out = regularize_buildings(gdf, tolerance_m=tolerance_m)
    out["area_m2"] = geometry_area_m2(out.geometry, out.crs)
    summary.regularize = {k: v for k, v in out.attrs.get("regularize", {}).items() if not k.endswith("_index")}
    summary.add_seconds({"regularize": time.perf_counter() - start})
    summary.features = len(out)
    return out


def _to_crs(geom: shapely.Geometry, src: Any, dst: Any) -> shapely.Geometry:
    if src == dst:
        return geom
    return gpd.GeoSeries([geom], crs=src).to_crs(dst).iloc[0]
