"""Instance-label GeoTIFFs: polygons with an ``object_id`` burnt onto a scene's grid.

Written block by block, so memory does not grow with the scene.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.features
import rasterio.windows
import shapely
from affine import Affine
from rasterio.errors import RasterioError
from rasterio.windows import Window

from sam_geo.errors import OutputError, WriteError
from sam_geo.io.atomic import atomic_path, check_target
from sam_geo.io.scenes import SceneInfo

LABELS_BLOCK = 512
"""Block size (pixels) of the labels GeoTIFF; it is written one block at a time."""

def check_labels_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Validate a labels GeoTIFF path before any work (suffix, directory, existing file)."""
    target = Path(path).expanduser()
    if target.suffix.lower() not in (".tif", ".tiff"):
        raise OutputError(f"labels raster {str(target)!r} must be a GeoTIFF ending in .tif or .tiff")
    return check_target(target, what="labels raster", overwrite=overwrite)


def write_labels_raster(
    gdf: gpd.GeoDataFrame, scene: SceneInfo, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``object_id`` of ``gdf`` as an instance-label GeoTIFF on the scene's grid.

    uint32, 0 = no object, tiled 512 x 512, deflate. Written one block at a time: each
    block rasterizes only the polygons an STRtree finds over it (pixel centres inside a
    polygon take its id; where objects overlap the smaller one wins), so memory does not
    grow with the scene. Written atomically (:func:`sam_geo.io.atomic.atomic_path`): a
    failed write leaves any previous file unchanged and no temporary file behind.
    """
    target = check_labels_path(path, overwrite=overwrite)
    geoms = gdf.geometry.to_numpy()
    ids = gdf["object_id"].to_numpy(dtype=np.uint32)
    order = np.argsort(-shapely.area(geoms), kind="stable") if len(geoms) else np.zeros(0, dtype=np.int64)
    tree = shapely.STRtree(geoms)
    profile = {
        "driver": "GTiff",
        "width": scene.width,
        "height": scene.height,
        "count": 1,
        "dtype": "uint32",
        "crs": scene.crs,
        "transform": scene.transform,
        "nodata": 0,
        "tiled": True,
        "blockxsize": LABELS_BLOCK,
        "blockysize": LABELS_BLOCK,
        "compress": "deflate",
    }
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    try:
        with atomic_path(target, suffix=".tif", overwrite=overwrite) as tmp, rasterio.open(tmp, "w", **profile) as dst:
            for window in _blocks(scene.height, scene.width, LABELS_BLOCK):
                dst.write(_label_block(window, scene.transform, tree, geoms, ids, rank), 1, window=window)
    except RasterioError as exc:  # OSErrors become WriteError in atomic_path
        raise WriteError(f"cannot write labels raster {target}: {exc}; check free space and permissions") from exc
    return target


def _label_block(
    window: Window,
    scene_transform: Affine,
    tree: shapely.STRtree,
    geoms: np.ndarray,
    ids: np.ndarray,
    rank: np.ndarray,
) -> np.ndarray:
    """uint32 labels of one block: ``ids`` of the polygons over it, smaller ones on top.

    ``rank`` orders the polygons by decreasing area; pixels whose centre no polygon
    covers are 0.
    """
    transform = rasterio.windows.transform(window, scene_transform)
    hits = tree.query(_window_polygon(window, scene_transform), predicate="intersects")
    hits = hits[np.argsort(rank[hits])]  # large first, small painted over them
    shape = (int(window.height), int(window.width))
    if not len(hits):
        return np.zeros(shape, dtype=np.uint32)
    return rasterio.features.rasterize(
        zip(geoms[hits], ids[hits].tolist()), out_shape=shape, transform=transform, fill=0, dtype="uint32"
    )


def _blocks(height: int, width: int, size: int) -> Iterator[Window]:
    for row in range(0, height, size):
        for col in range(0, width, size):
            yield Window(col, row, min(size, width - col), min(size, height - row))


def _window_polygon(window: Window, transform: Affine) -> shapely.Geometry:
    c0, r0 = window.col_off, window.row_off
    c1, r1 = c0 + window.width, r0 + window.height
    return shapely.Polygon([transform * (c, r) for c, r in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))])
