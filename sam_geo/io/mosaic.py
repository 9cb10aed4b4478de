"""Mosaics: adjacent files of one pixel grid segmented as one surface (:func:`join_mosaics`).

National imagery comes as thousands of adjacent tiles (COGs). Segmented file by file,
a building on the border between two files would come out as two halves. So the scenes
of a run that share a pixel grid and touch each other are joined into one GDAL VRT, and
the VRT is the scene: tiles, read windows and stitching cross the file borders as
they cross tile seams. Files need the same CRS, pixel size (no rotation), band count
and data type, and origins on the same grid (within 1 % of a pixel). Scenes that do not
share a grid are each segmented on their own (and then merged into the first scene's
CRS, as always with several scenes).

The VRT carries each band's nodata value and a mask band built from the sources'
masks, so places no file covers are nodata. It is written (atomically, named by a
digest of its content, so a rerun finds the same file) into ``folder``: the work dir
when there is one, so a resumed run sees the same scene. On a cluster that folder, like
the scenes, must be on storage every node reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from xml.sax.saxutils import escape

import shapely
from affine import Affine

from sam_geo.errors import RasterError
from sam_geo.io.atomic import write_bytes_atomic
from sam_geo.io.scenes import SceneInfo, open_scene

__all__ = ["GRID_TOLERANCE", "join_mosaics", "mosaic_groups", "stac_scene_paths", "vrt_document"]

GRID_TOLERANCE = 0.01
"""Largest misalignment, in pixels, of two files' origins on one grid."""

_GDAL_TYPES = {
    "uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
    "uint64": "UInt64", "int64": "Int64", "float32": "Float32", "float64": "Float64",
}


def join_mosaics(
    infos: list[SceneInfo], folder: Path, *, bands: tuple[int, ...] | None = None, assume_crs: str | None = None
) -> list[SceneInfo]:
    """``infos`` with each group of touching same-grid scenes replaced by one VRT scene
    (its ``sources`` listing the files, in the order given), at the place of the group's
    first scene. Scenes alone on their grid are returned as they are."""
    out: list[SceneInfo] = []
    for group in mosaic_groups(infos):
        if len(group) == 1:
            out.append(group[0])
            continue
        document = vrt_document(group)
        name = hashlib.sha256(document.encode()).hexdigest()[:16]
        path = folder / f"mosaic-{name}.vrt"
        if not path.exists() or path.read_text(encoding="utf-8") != document:
            folder.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, document.encode())
        mosaic = open_scene(path, bands=bands, assume_crs=assume_crs)
        out.append(replace(mosaic, sources=tuple(info.path for info in group)))
    return out


def mosaic_groups(infos: list[SceneInfo]) -> list[list[SceneInfo]]:
    """Scenes grouped into mosaics: same grid (see module docs) and touching, directly or
    through other scenes of the group. Groups come in the order of their first scene."""
    keys = [_grid_key(info) for info in infos]
    parent = list(range(len(infos)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    boxes = [shapely.box(*info.bounds) for info in infos]
    tree = shapely.STRtree(boxes)
    for i, j in zip(*tree.query(boxes, predicate="intersects")):
        if i < j and keys[i] is not None and keys[i] == keys[j] and _aligned(infos[i], infos[j]):
            parent[find(int(j))] = find(int(i))
    groups: dict[int, list[SceneInfo]] = {}
    for k, info in enumerate(infos):
        groups.setdefault(find(k), []).append(info)
    return list(groups.values())


def _grid_key(info: SceneInfo) -> tuple | None:
    """What scenes of one grid share; None for rotated scenes (never joined)."""
    a, b, _, d, e, _ = info.transform[:6]
    if b != 0 or d != 0:
        return None
    return (info.crs.to_wkt(), round(a, 9), round(e, 9), info.count, info.dtype, info.nodata)


def _aligned(one: SceneInfo, other: SceneInfo) -> bool:
    a, e = one.transform.a, one.transform.e
    dx = (other.transform.c - one.transform.c) / a
    dy = (other.transform.f - one.transform.f) / e
    return abs(dx - round(dx)) <= GRID_TOLERANCE and abs(dy - round(dy)) <= GRID_TOLERANCE


def vrt_document(group: list[SceneInfo]) -> str:
    """The VRT XML of a same-grid group: the union of the scenes' extents, every band
    with its nodata value, one mask band from the sources' masks. Where scenes overlap,
    the later one wins (GDAL draws sources in order)."""
    first = group[0]
    a, e = first.transform.a, first.transform.e
    left = min(i.transform.c for i in group)
    top = max(i.transform.f for i in group) if e < 0 else min(i.transform.f for i in group)
    cols = [round((i.transform.c - left) / a) for i in group]
    rows = [round((i.transform.f - top) / e) for i in group]
    width = max(c + i.width for c, i in zip(cols, group))
    height = max(r + i.height for r, i in zip(rows, group))
    transform = Affine(a, 0, left, 0, e, top)
    gdal_type = _GDAL_TYPES.get(first.dtype, "Float64")
    bands = []
    for band in range(1, first.count + 1):
        nodata = "" if first.nodata is None or math.isnan(first.nodata) else f"<NoDataValue>{first.nodata!r}</NoDataValue>"
        sources = "".join(_source(i, str(band), c, r) for i, c, r in zip(group, cols, rows))
        bands.append(f'<VRTRasterBand dataType="{gdal_type}" band="{band}">{nodata}{sources}</VRTRasterBand>')
    mask_sources = "".join(_source(i, "mask,1", c, r) for i, c, r in zip(group, cols, rows))
    mask = f'<MaskBand><VRTRasterBand dataType="Byte">{mask_sources}</VRTRasterBand></MaskBand>'
    geotransform = ", ".join(repr(v) for v in transform.to_gdal())
    return (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">'
        f"<SRS>{escape(first.crs.to_wkt())}</SRS><GeoTransform>{geotransform}</GeoTransform>"
        + "".join(bands) + mask + "</VRTDataset>\n"
    )


def _source(info: SceneInfo, band: str, col: int, row: int) -> str:
    rect = f'xOff="0" yOff="0" xSize="{info.width}" ySize="{info.height}"'
    dst = f'xOff="{col}" yOff="{row}" xSize="{info.width}" ySize="{info.height}"'
    return (
        f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(info.path)}</SourceFilename>'
        f"<SourceBand>{band}</SourceBand><SrcRect {rect}/><DstRect {dst}/></SimpleSource>"
    )



STAC_IMAGE_TYPES = ("image/tiff", "image/vnd.stac.geotiff", "image/jp2")
"""Media types of STAC assets taken as scenes."""


def stac_scene_paths(path: Path) -> list[str]:
    """The image of each item of a STAC Item or ItemCollection file (read with pystac):
    the asset ``visual`` when there is one, else the first GeoTIFF (or JPEG 2000) asset
    with the role ``data`` or no role. Relative hrefs are taken from the file's folder.

    Raises :class:`RasterError` for JSON that is not STAC, or an item without an image.
    """
    import pystac

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        kind = data.get("type")
        items = (list(pystac.ItemCollection.from_dict(data).items) if kind == "FeatureCollection"
                 else [pystac.Item.from_dict(data)] if kind == "Feature" and "stac_version" in data else None)
    except (OSError, ValueError, KeyError, pystac.STACError, pystac.STACTypeError) as exc:
        raise RasterError(f"cannot read {path} as a STAC Item or ItemCollection: {exc}") from exc
    if items is None:
        raise RasterError(f"{path} is JSON but not a STAC Item or ItemCollection; give the scenes' paths")
    return [_item_image(item, path) for item in items]


def _item_image(item: object, path: Path) -> str:
    assets = item.assets  # type: ignore[attr-defined]
    chosen = assets.get("visual") or next(
        (a for a in assets.values()
         if (a.media_type or "").startswith(STAC_IMAGE_TYPES) and (not a.roles or "data" in a.roles)), None)
    if chosen is None:
        raise RasterError(
            f"STAC item {item.id!r} of {path} has no GeoTIFF asset (keys: {', '.join(assets)}); "  # type: ignore[attr-defined]
            "give the image paths instead"
        )
    href = chosen.href
    if "://" in href or href.startswith("/"):
        return href
    return os.path.normpath(os.path.join(path.parent, href))
