"""The one run skeleton every mode goes through (:func:`run_pipeline`).

::

    check outputs (refuse to overwrite; never onto an input)
    open scenes (metadata only) -> check tiling -> mode.check -> resolve weights
    mode.plan -> tile tasks (descriptors, no pixels)
    work dir (resume: finished tiles are loaded, the rest run)
    runtime: Ray model actors (or in-process) run the tasks, results stream back
    failure policy: more failed tiles than ``max_failed_tiles`` -> RunError, no output
    each result -> mode.accept -> polygons ready now -> regularize (optional) -> output stream
    (mode.finish: what waited for neighbours); the output published atomically at the end
    the mode's extra outputs -> run summary

The summary is written from the results; the work dir's fingerprint is built from the
settings and inputs, never read back from the summary.
"""

from __future__ import annotations

import glob
import os
import time
from contextlib import ExitStack
from tempfile import TemporaryDirectory
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from sam_geo import __version__
from sam_geo.errors import ConfigError, RasterError, RunError
from sam_geo.geo.tiles import validate_tiling
from sam_geo.geo.vectorize import geometry_area_m2, metres_to_crs_units
from sam_geo.io.atomic import check_target
from sam_geo.io.mosaic import join_mosaics, stac_scene_paths
from sam_geo.io.scenes import SceneInfo, open_scene
from sam_geo.io.stream import VectorStream, check_stream_path, is_dataset_path
from sam_geo.model.registry import ResolvedWeights, resolve_weights
from sam_geo.model.sam_backend import precision_name, resolve_device
from sam_geo.run.host import HostConfig, cpu_timed
from sam_geo.run.standin import standin_ms
from sam_geo.run.runtime import RunTimer, run_tiles
from sam_geo.run.summary import RunSummary
from sam_geo.run.tasks import TileResult, TileTask
from sam_geo.run.workdir import MOSAICS, WorkDir, fingerprint_file, published_parts
from sam_geo.settings import Settings

ScenesArg = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
OnResult = Callable[[TileResult], None]

COMMON_TILE_SETTINGS = (
    "bands", "stretch", "assume_crs", "tile_size_px", "overlap_px", "zoom", "simplify_m", "precision",
    "decoder_context_px",
)
"""Settings every mode's tile results depend on (the model and weights are fingerprinted
on their own). Settings used only on the driver after the tiles come back (area
filters, stitching, regularizing) or that do not change results (workers, device,
batch sizes) are left out, so changing them reuses a work dir."""


class Mode(Protocol):
    """What :func:`run_pipeline` needs of a mode (prompted, automatic, text).

    ``name`` names the mode in summaries and work dirs; ``tile_settings`` the
    :class:`~sam_geo.settings.Settings` fields its tile results depend on; ``inputs``
    the input files an output must never be written onto; ``order_by`` the column a
    returned frame is sorted by. :meth:`check` refuses settings or models the mode
    cannot run, before any work; :meth:`check_outputs` / :meth:`write_outputs` handle
    outputs besides the vector layer (a labels raster); :meth:`plan` makes the tile
    tasks for the opened scenes; :meth:`fingerprint` adds what tile results depend on
    besides settings, model and scenes (prompt digests, phrases);
    :meth:`summary_settings` adds resolved settings to the summary (the zoom chosen).

    Results stream through the mode: :meth:`accept` takes each tile result (failed ones
    too) as it comes and returns the polygons it can already give (in the output CRS,
    or None); :meth:`finish` gives the rest once every tile came back, filling
    ``summary``. A mode keeps only what later tiles may still change (objects on seams).
    """

    name: str
    tile_settings: tuple[str, ...]
    order_by: str | None

    @property
    def inputs(self) -> dict[str, Any]: ...

    def check(self, settings: Settings) -> None: ...

    def check_outputs(self, overwrite: bool) -> None: ...

    def plan(self, scenes: list[SceneInfo], settings: Settings) -> list[TileTask]: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def summary_settings(self) -> dict[str, Any]: ...

    def accept(self, result: TileResult) -> gpd.GeoDataFrame | None: ...

    def finish(self, summary: RunSummary) -> Iterator[gpd.GeoDataFrame]: ...

    def write_outputs(self, overwrite: bool, summary: RunSummary) -> None: ...


class RunOutput(NamedTuple):
    """What a run with ``return_frame=False`` returns: the output written (a file or a
    dataset folder; None without ``output``) and the run summary (a dict)."""

    path: Path | None
    summary: dict[str, Any]


def run_pipeline(
    mode: Mode,
    scenes: ScenesArg,
    settings: Settings,
    *,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    partitioned: bool = False,
    summary_path: str | os.PathLike[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    restart: bool = False,
    on_result: OnResult | None = None,
    return_frame: bool = True,
) -> gpd.GeoDataFrame | RunOutput:
    """Run ``mode`` over ``scenes`` (see the module docs).

    Returns the output layer with the run summary in ``gdf.attrs["summary"]``, or, with
    ``return_frame=False``, a :class:`RunOutput` (the driver then keeps no polygons:
    they go to ``output`` as tiles finish). Outputs are checked before any work and
    published atomically; nothing is written when the run fails.
    """
    started = time.perf_counter()
    paths = expand_scenes(scenes)
    partitioned = output is not None and is_dataset_path(output, partitioned)  # "out/" loses its / in a Path
    resumable = published_parts(work_dir) if work_dir is not None and not restart and mode.order_by else []
    output_path = _check_outputs(mode, paths, output, overwrite, partitioned, summary_path, resumable)
    with ExitStack() as stack:  # a temporary folder for mosaics, removed once every tile is back
        infos = [open_scene(p, bands=settings.bands, assume_crs=settings.assume_crs) for p in paths]
        infos = join_mosaics(infos, _mosaic_dir(work_dir, stack), bands=settings.bands, assume_crs=settings.assume_crs)
        validate_tiling(settings.tile_size_px, settings.overlap_px)
        mode.check(settings)
        weights = resolve_weights(settings.model, settings.weights)
        tasks = mode.plan(infos, settings)
        summary = _new_summary(mode, infos, settings, weights, len(tasks))
        store = _open_work_dir(work_dir, restart, mode, infos, settings, weights) if work_dir is not None else None
        config = host_config(settings, weights, infos[0], mode.name)
        kept = [p for p in resumable if partitioned and p.exists() and p.parent == output_path.resolve()]
        sink = OutputSink(output_path, overwrite, partitioned, settings.regularize_m, summary, keep=return_frame,
                          published=PublishedParts(kept, mode.order_by), on_part=store.add_published if store else None)
        with sink:
            for result in run_with_work_dir(tasks, config, settings, store, summary, on_result):
                sink.write(mode.accept(result))
            _raise_if_failed(summary, settings.max_failed_tiles, summary_path, started)
            for chunk in mode.finish(summary):
                sink.write(chunk)
        summary.output = None if output_path is None else str(sink.path)
        _write_extra_outputs(mode, overwrite, summary)
        summary.features = sink.rows
        summary.rates["cpu_ms_per_tile"] = cpu_ms_per_tile(summary)
        summary.seconds["total"] = time.perf_counter() - started
        if summary_path is not None:
            summary.write(summary_path)
        if not return_frame:
            return RunOutput(None if output_path is None else sink.path, summary.to_dict())
        gdf = sink.frame(mode.order_by)
        gdf.attrs["summary"] = summary.to_dict()
        return gdf


class OutputSink:
    """Where a run's polygons go as they come: regularized (when asked), written to the
    output stream (when there is an output) and kept for the returned frame (``keep``).

    Write seconds are CPU seconds of this thread; regularize counts are summed.
    """

    def __init__(
        self, path: Path | None, overwrite: bool, partitioned: bool, regularize_m: float | None,
        summary: RunSummary, *, keep: bool, published: PublishedParts | None = None,
        on_part: Callable[[Path], None] | None = None,
    ) -> None:
        self.published = published if published is not None and published.parts else None
        self.stream = None if path is None else VectorStream(
            path, overwrite=overwrite, partitioned=partitioned, on_part=on_part,
            keep=self.published.parts if self.published else (),
        )
        self.regularize_m = regularize_m
        self.summary = summary
        self.kept: list[gpd.GeoDataFrame] | None = [] if keep else None
        self.rows = 0
        self.crs: Any = None

    @property
    def path(self) -> Path | None:
        return None if self.stream is None else self.stream.path

    def __enter__(self) -> OutputSink:
        if self.stream is not None:
            self.stream.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.stream is not None:
            seconds: dict[str, float] = {}
            with cpu_timed(seconds, "write"):
                self.stream.__exit__(*exc)
            self.summary.add_seconds(seconds)

    def write(self, chunk: gpd.GeoDataFrame | None) -> None:
        if chunk is None:
            return
        if self.regularize_m is not None and len(chunk):
            chunk = regularize(chunk, self.regularize_m, self.summary)
        self.crs = chunk.crs
        self.rows += len(chunk)
        if self.kept is not None:
            self.kept.append(chunk)
        if self.stream is not None:
            seconds: dict[str, float] = {}
            with cpu_timed(seconds, "write"):
                self.stream.write(chunk if self.published is None else self.published.new_rows(chunk))
            self.summary.add_seconds(seconds)

    def frame(self, order_by: str | None) -> gpd.GeoDataFrame:
        """The kept chunks as one frame, sorted by ``order_by`` when given."""
        chunks = [c for c in self.kept or [] if len(c)] or (self.kept or [])[:1]
        if not chunks:
            return gpd.GeoDataFrame(geometry=gpd.GeoSeries([], crs=self.crs))
        gdf = pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0].reset_index(drop=True)
        gdf = gpd.GeoDataFrame(gdf, geometry=chunks[0].geometry.name, crs=chunks[0].crs)
        if order_by is not None and order_by in gdf.columns:
            gdf = gdf.sort_values(order_by, kind="stable").reset_index(drop=True)
        return gdf


class PublishedParts:
    """Parts of a dataset output that the interrupted run being resumed published
    (``parts``), and the keys of their rows (``key``: the mode's ``order_by`` column, with
    ``scene`` when there is one), so that the resumed run writes only the other rows."""

    def __init__(self, parts: list[Path], key: str | None) -> None:
        self.parts = parts if key is not None else []
        self.key = key
        self.keys: pd.Index | None = None
        if self.parts:
            tables = [pq.read_table(p, columns=[c for c in (key, "scene") if c in pq.read_schema(p).names])
                      for p in self.parts]
            self.keys = self._index(pd.concat([t.to_pandas() for t in tables], ignore_index=True))

    def _index(self, frame: pd.DataFrame) -> pd.Index:
        if "scene" in frame.columns:
            return pd.MultiIndex.from_frame(frame[["scene", self.key]])
        return pd.Index(frame[self.key])

    def new_rows(self, chunk: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
        """The rows of ``chunk`` not in a published part."""
        if self.keys is None or len(chunk) == 0:
            return chunk
        return chunk[~self._index(pd.DataFrame(chunk)).isin(self.keys)]


def _mosaic_dir(work_dir: str | os.PathLike[str] | None, stack: ExitStack) -> Path:
    """Where mosaic VRTs go: the work dir (a resumed run finds the same file), else a
    temporary folder that lives as long as ``stack``."""
    if work_dir is not None:
        return Path(work_dir) / MOSAICS
    return Path(stack.enter_context(TemporaryDirectory(prefix="sam-geo-mosaic-")))


def _write_extra_outputs(mode: Mode, overwrite: bool, summary: RunSummary) -> None:
    seconds: dict[str, float] = {}
    with cpu_timed(seconds, "write"):
        mode.write_outputs(overwrite, summary)
    summary.add_seconds(seconds)


def expand_scenes(scenes: ScenesArg) -> list[str]:
    """Scene arguments -> paths: globs expanded (sorted), ``@file`` lists read, order kept.

    A text file of paths (one per line, ``#`` comments) is given as ``@list.txt`` or by
    a ``.txt`` suffix; a ``.json`` file is a STAC Item or ItemCollection (its images,
    :func:`~sam_geo.io.mosaic.stac_scene_paths`); URLs and ``/vsi`` paths pass unchanged. Duplicates are dropped.
    Raises :class:`RasterError` for a glob that matches nothing or an empty list.
    """
    items = [scenes] if isinstance(scenes, (str, os.PathLike)) else list(scenes)
    paths: list[str] = []
    for item in map(str, items):
        if item.startswith("@") or item.endswith(".txt"):
            paths += _read_scene_list(Path(item.lstrip("@")))
        elif item.lower().endswith(".json") and "://" not in item:
            paths += stac_scene_paths(Path(item))
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


def _read_scene_list(listing: Path) -> list[str]:
    if not listing.exists():
        raise RasterError(f"scene list {listing} does not exist")
    lines = listing.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _check_outputs(
    mode: Mode, scenes: list[str], output: Any, overwrite: bool, partitioned: bool, summary_path: Any,
    resumable: list[Path],
) -> Path | None:
    """Refuse bad or existing outputs before any work (nothing is written here)."""
    inputs = {label: path for label, path in mode.inputs.items() if path is not None}
    inputs.update({f"scene {k + 1}": s for k, s in enumerate(scenes)})
    inputs["the summary"] = summary_path
    if output is None and partitioned:
        raise ConfigError("partitioned=True needs an output folder (output='out/')")
    output_path = None
    if output is not None:
        output_path = check_stream_path(
            output, overwrite=overwrite, partitioned=partitioned, others=inputs, resumable=resumable
        )
    if summary_path is not None:
        check_target(summary_path, what="summary file", overwrite=overwrite)
    mode.check_outputs(overwrite)
    return output_path


def host_config(settings: Settings, weights: ResolvedWeights, scene: SceneInfo, mode: str) -> HostConfig:
    """What each model actor needs, derived from the settings; lengths and areas in the
    (first) scene's CRS units."""
    return HostConfig(
        model=settings.model,
        weights=str(weights.path),
        device=settings.device,
        batch_size=settings.batch_size,
        precision=settings.precision,
        encode_batch=settings.encode_batch,
        decoder_context_px=settings.decoder_context_px,
        flip_views=settings.flip_views,  # automatic and SAM 3 runs refuse anything but 1
        multimask=settings.multimask if mode == "prompted" else False,
        detector=settings.detector if mode == "text" else None,
        min_area=area_in_crs_units(scene, settings.speck_area_m2(mode)),
        simplify=metres_in_crs_units(scene, settings.simplify_m),
        standin_ms=standin_ms(),
    )


def _new_summary(
    mode: Mode, infos: list[SceneInfo], settings: Settings, weights: ResolvedWeights, planned: int
) -> RunSummary:
    summary = RunSummary(scene=", ".join(i.path for i in infos), mode=mode.name)
    summary.model = {
        "name": settings.model,
        "weights_sha256": weights.sha256,
        "weights_source": weights.source,
        "device": resolve_device(settings.device),
        "precision": precision_name(settings.precision, settings.device),
    }
    if mode.name == "text":
        summary.model["detector"] = settings.detector
    if standin_ms() is not None:
        summary.model["standin_ms"] = standin_ms()  # masks from the stand-in, not the model
    summary.settings = {**settings.model_dump(mode="json"), **mode.summary_settings()}
    summary.tiles.planned = planned
    summary.mosaics = {info.path: list(info.sources) for info in infos if info.sources}
    return summary


def _open_work_dir(
    path: str | os.PathLike[str],
    restart: bool,
    mode: Mode,
    infos: list[SceneInfo],
    settings: Settings,
    weights: ResolvedWeights,
) -> WorkDir:
    """The work dir, its fingerprint built from what the tile results depend on."""
    tile_settings = settings.model_dump(mode="json", include=set(mode.tile_settings))
    fingerprint = {
        "sam_geo": __version__,
        "mode": mode.name,
        "model": settings.model,
        "weights_sha256": weights.sha256,
        "settings": tile_settings,
        "scenes": [[fingerprint_file(path) for path in info.sources or (info.path,)] for info in infos],
        **mode.fingerprint(),
    }
    if standin_ms() is not None:  # a measuring run's stand-in masks must never resume into a real run
        fingerprint["standin_ms"] = standin_ms()
    return WorkDir(path, fingerprint, restart=restart)


def run_with_work_dir(
    tasks: list[TileTask],
    config: HostConfig,
    settings: Settings,
    store: WorkDir | None,
    summary: RunSummary,
    on_result: OnResult | None = None,
) -> Iterator[TileResult]:
    """Yield each tile's result: first those already finished in ``store`` (loaded one
    at a time), then the rest as they are run, each saved in ``store`` before it is
    yielded. Results come in no particular order; none is kept here.

    Fills ``summary.tiles`` (processed, resumed, failed, skipped_nodata), the failures,
    the stage seconds, ``workers`` and ``rates``; calls ``on_result`` with each new
    result once stored.
    """
    todo = tasks
    if store is not None:
        done = [t for t in tasks if store.done(t.key)]
        todo = [t for t in tasks if not store.done(t.key)]
        for task in done:
            result = store.load(task.key)
            summary.tiles.resumed += 1
            summary.tiles.skipped_nodata += result.skipped_nodata
            yield result
    timer = RunTimer()
    started = time.perf_counter()
    for result in run_tiles(todo, config, settings, timer):
        if result.error is None and store is not None:
            store.save(result.tile_key, result)
        _count(result, summary)
        if on_result is not None:
            on_result(result)
        yield result
    summary.add_seconds(timer.seconds)
    summary.workers = timer.workers
    summary.rates = _rates(summary, len(todo), time.perf_counter() - started - timer.seconds.get("startup", 0.0))


def _count(result: TileResult, summary: RunSummary) -> None:
    """A new tile result's seconds and counts added to ``summary``."""
    summary.add_seconds(result.seconds)
    summary.tiles.processed += int(result.encoded)
    summary.tiles.skipped_nodata += result.skipped_nodata
    if result.error:
        summary.tiles.failed += 1
        summary.failures.append({"tile": result.tile_key, "error": result.error, "attempts": result.attempts})


CPU_STAGES = ("read", "vectorize", "stitch", "regularize", "write")
"""Stages outside the model; their seconds are CPU seconds of the thread running them."""


def _rates(summary: RunSummary, tiles_run: int, wall_s: float) -> dict[str, float]:
    """Tiles per second of the runtime and CPU milliseconds per tile outside the model
    so far (:func:`cpu_ms_per_tile` again once the driver stages ran)."""
    return {
        "tiles_per_s": round(tiles_run / wall_s, 3) if wall_s > 0 else 0.0,
        "cpu_ms_per_tile": cpu_ms_per_tile(summary),
    }


def cpu_ms_per_tile(summary: RunSummary) -> float:
    """CPU milliseconds spent outside the model (:data:`CPU_STAGES`: read and finish
    stages on the workers, stitch, regularize and write on the driver) per tile encoded."""
    cpu_s = sum(summary.seconds.get(stage, 0.0) for stage in CPU_STAGES)
    return round(1000.0 * cpu_s / max(summary.tiles.processed, 1), 1)


def _raise_if_failed(
    summary: RunSummary, allowed: int, summary_path: str | os.PathLike[str] | None, started: float
) -> None:
    """The one failure policy: more failed tiles than allowed -> no output, the summary
    written (when asked for) and :class:`RunError` naming the first failure."""
    failed = summary.failures
    if len(failed) <= allowed:
        return
    summary.seconds["total"] = time.perf_counter() - started
    if summary_path is not None:
        summary.write(summary_path)
    first = failed[0]
    raise RunError(
        f"{len(failed)} of {summary.tiles.planned} tiles failed (allowed: {allowed}), so no output was written; "
        f"first: tile {first['tile']}: {first['error']}. Finished tiles are kept in the work dir if one was "
        "given; fix the input or raise --max-failed-tiles."
    )


def regularize(gdf: gpd.GeoDataFrame, tolerance_m: float, summary: RunSummary) -> gpd.GeoDataFrame:
    """Regularized building outlines, areas recomputed; counts go to ``summary.regularize``."""
    from sam_geo.geo.regularize import regularize_buildings  # buildingregulariser is slow to import

    seconds: dict[str, float] = {}
    with cpu_timed(seconds, "regularize"):
        out = regularize_buildings(gdf, tolerance_m=tolerance_m)
        out["area_m2"] = geometry_area_m2(out.geometry, out.crs)
    for key, value in out.attrs.get("regularize", {}).items():
        if not key.endswith("_index") and isinstance(value, (int, float)):
            summary.regularize[key] = summary.regularize.get(key, 0) + value
    summary.add_seconds(seconds)
    return out


def reproject_geometries(geoms: np.ndarray, crss: Sequence[Any], dst: Any) -> np.ndarray:
    """Geometries each in its own CRS (``crss[i]``) -> all in ``dst``, one vectorized
    ``to_crs`` call per source CRS (explicit: no CRS is assumed)."""
    out = np.asarray(geoms, dtype=object).copy()
    keys = np.array([str(c) for c in crss], dtype=object)
    for key in dict.fromkeys(keys.tolist()):
        rows = np.flatnonzero(keys == key)
        src = crss[int(rows[0])]
        if src != dst and len(rows):
            out[rows] = gpd.GeoSeries(out[rows], crs=src).to_crs(dst).to_numpy()
    return out


def metres_in_crs_units(scene: SceneInfo, metres: float | None) -> float | None:
    """A length in metres as CRS units of ``scene`` (degrees at the scene's mid-latitude)."""
    if metres is None:
        return None
    return metres_to_crs_units(scene.crs, metres, at_lat=_scene_latitude(scene))


def area_in_crs_units(scene: SceneInfo, area_m2: float) -> float:
    """An area in m^2 as square CRS units of ``scene``."""
    side = metres_to_crs_units(scene.crs, float(np.sqrt(area_m2)), at_lat=_scene_latitude(scene))
    return side * side


def _scene_latitude(scene: SceneInfo) -> float | None:
    if not scene.is_geographic:
        return None
    _, bottom, _, top = scene.bounds
    return (bottom + top) / 2

