"""The Python API: whole-scene segmentation in three modes, returning GeoDataFrames.

>>> import sam_geo
>>> buildings = sam_geo.segment("scene.tif", prompts="buildings.shp", output="buildings.gpkg")
>>> objects = sam_geo.segment_auto("scene.tif", output="objects.gpkg", min_area_m2=20)
>>> pools = sam_geo.segment_text("scene.tif", ["swimming pool"], output="pools.gpkg")

Each function takes a :class:`~sam_geo.settings.Settings` (``settings=``) and/or any of
its fields as keyword arguments (``tile_size_px=512``, ``workers=0``; keywords win), and
runs the one pipeline of :mod:`sam_geo.run.pipeline` with its mode. Common arguments:

``scenes``: a path or URL rasterio opens, a glob (``"tiles/*.tif"``), ``@list.txt`` (one
path per line), a STAC Item or ItemCollection ``.json``, or a list of those. Adjacent
files of one pixel grid are joined into one mosaic (:mod:`sam_geo.io.mosaic`), so objects
crossing file borders come out whole; other scenes give one layer in the first scene's
CRS (reprojected explicitly) with a ``scene`` column. A prompt layer file is read only
near the scenes (:mod:`sam_geo.io.layers`).

``output`` (``.geojson``, ``.gpkg``, ``.parquet``, or a folder ``"out/"`` /
``partitioned=True`` for a GeoParquet dataset): polygons are written as tiles finish
(:mod:`sam_geo.io.stream`) and the output published atomically at the end, never
overwritten unless ``overwrite``; ``summary_path``: the run summary as JSON (also in
``gdf.attrs["summary"]``). ``return_frame=False`` keeps no polygons in memory (for
outputs bigger than memory) and returns a :class:`~sam_geo.run.pipeline.RunOutput`
(the output's path and the summary) instead of the GeoDataFrame. ``work_dir``: finished tiles are kept there and a rerun of the
same job resumes (``restart`` discards them). More than ``max_failed_tiles`` tiles that
keep failing raise :class:`~sam_geo.errors.RunError` and write nothing. ``on_result``
is called on the driver with each tile result once it is stored.

The CLI (:mod:`sam_geo.cli`) is a thin layer over these functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import geopandas as gpd

from sam_geo.model.registry import get_spec
from sam_geo.modes.automatic import AutoMode
from sam_geo.modes.concept import ConceptMode
from sam_geo.modes.prompted import PromptedMode, PromptLayer
from sam_geo.modes.text import TextMode
from sam_geo.run.pipeline import OnResult, RunOutput, ScenesArg, run_pipeline
from sam_geo.settings import Settings, make_settings

PathArg = str | os.PathLike[str]


def segment(
    scenes: ScenesArg,
    prompts: PathArg | gpd.GeoDataFrame,
    *,
    output: PathArg | None = None,
    overwrite: bool = False,
    partitioned: bool = False,
    summary_path: PathArg | None = None,
    work_dir: PathArg | None = None,
    restart: bool = False,
    prompts_layer: str | None = None,
    prompts_crs: str | None = None,
    id_column: str | None = None,
    negative_points: PathArg | gpd.GeoDataFrame | None = None,
    group_column: str | None = None,
    label_column: str | None = None,
    settings: Settings | None = None,
    on_result: OnResult | None = None,
    return_frame: bool = True,
    **overrides: Any,
) -> gpd.GeoDataFrame | RunOutput:
    """Segment the object each feature of a vector layer points at, over whole scenes.

    Points become point prompts and polygons box prompts (``prompt_as``); each prompt
    is decoded in a window that holds its whole box, so no prompted object is cut by a
    tile edge. Returns one row per prompt that produced a mask: the prompt's own
    attributes, ``prompt_index`` (its row in the layer), ``score`` (SAM's predicted IoU)
    and ``area_m2`` (geodesic for a geographic CRS), in the (first) scene's CRS.
    Prompts outside every scene, on nodata, with unusable geometry or an empty mask are
    listed in the summary (by ``id_column`` when given, else by row).

    ``prompts_layer``: a layer in a multi-layer file; ``prompts_crs``: the CRS of a layer
    without one. ``negative_points``: a point layer (any CRS) whose points join every
    prompt near them as negative points. ``group_column`` (and ``label_column``, 1
    positive / 0 negative): rows sharing a group value are one prompt with several
    points, plus a box when the group has a polygon; one output row per group.
    """
    layer = PromptLayer(prompts, prompts_layer, prompts_crs, id_column, negative_points, group_column, label_column)
    return run_pipeline(
        PromptedMode(layer), scenes, make_settings(settings, **overrides), output=output, overwrite=overwrite,
        partitioned=partitioned, summary_path=summary_path, work_dir=work_dir, restart=restart,
        on_result=on_result, return_frame=return_frame,
    )


def segment_auto(
    scenes: ScenesArg,
    *,
    output: PathArg | None = None,
    overwrite: bool = False,
    partitioned: bool = False,
    summary_path: PathArg | None = None,
    work_dir: PathArg | None = None,
    restart: bool = False,
    labels_raster: PathArg | None = None,
    settings: Settings | None = None,
    on_result: OnResult | None = None,
    return_frame: bool = True,
    **overrides: Any,
) -> gpd.GeoDataFrame | RunOutput:
    """Segment every object of whole scenes automatically: one polygon per object.

    Every tile is prompted with a grid of ``points_per_side ** 2`` points; masks that
    pass SAM's filters are stitched across tile edges (:mod:`sam_geo.geo.stitch`), so an
    object seen by several tiles comes out once and one larger than a tile is assembled
    from its pieces. Returns one row per object with ``object_id`` (the number of the
    scene pixel holding the object's representative point, ``row * width + col + 1``:
    stable across reruns and tile grids; per scene; rows sorted by it, which is reading
    order), ``score`` (SAM's predicted IoU),
    ``stability``, ``area_m2`` and ``n_tiles`` (tiles that saw it); holes are kept.

    Objects outside ``[min_area_m2, max_area_m2]`` are dropped after stitching; mask
    parts and holes below ``min(min_area_m2, 0.5)`` m^2 are dropped per tile.
    ``labels_raster`` (``.tif``, one scene only) also writes an instance-label GeoTIFF on
    the scene's grid (uint32, 0 = no object, else ``object_id``), block by block.
    Filters applied after the tiles come back (areas, ``nested_thresh``, ``match_iou``)
    reuse a work dir: only the stitching reruns.
    """
    mode = AutoMode(None if labels_raster is None else str(labels_raster))
    return run_pipeline(
        mode, scenes, make_settings(settings, **overrides), output=output, overwrite=overwrite,
        partitioned=partitioned, summary_path=summary_path, work_dir=work_dir, restart=restart,
        on_result=on_result, return_frame=return_frame,
    )


def segment_text(
    scenes: ScenesArg,
    phrases: str | Sequence[str],
    *,
    output: PathArg | None = None,
    overwrite: bool = False,
    partitioned: bool = False,
    summary_path: PathArg | None = None,
    work_dir: PathArg | None = None,
    restart: bool = False,
    settings: Settings | None = None,
    on_result: OnResult | None = None,
    return_frame: bool = True,
    **overrides: Any,
) -> gpd.GeoDataFrame | RunOutput:
    """Find and outline every object matching ``phrases`` over whole scenes.

    The grounding detector of ``detector`` (a Hugging Face name, downloaded once into
    its cache when online, or a local ``save_pretrained`` folder) finds boxes per tile;
    a detection belongs to the tile whose core holds its centre, and SAM segments it.
    Thresholds default to the detector's own. Returns one row per object with
    ``phrase``, ``detector_score``, ``score`` (SAM's predicted IoU) and ``area_m2``.

    With a model that reads text itself (``model="sam3"``), no detector runs: the model
    finds every instance of each phrase per tile and the instances are stitched across
    tile seams as in automatic mode (:mod:`sam_geo.modes.concept`); rows then carry
    ``phrase``, ``score``, ``area_m2`` and ``n_tiles``.
    """
    run_settings = make_settings(settings, **overrides)
    concept = get_spec(run_settings.model).family == "sam3"
    mode = ConceptMode(phrases) if concept else TextMode(phrases)
    return run_pipeline(
        mode, scenes, run_settings, output=output, overwrite=overwrite,
        partitioned=partitioned, summary_path=summary_path, work_dir=work_dir, restart=restart,
        on_result=on_result, return_frame=return_frame,
    )
