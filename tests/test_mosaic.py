"""Mosaics (sam_geo.io.mosaic): adjacent files of one grid are one surface; objects
crossing file borders come out whole, as from the single file."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.windows import Window

from conftest import make_raster
from sam_geo import segment, segment_auto
from sam_geo.errors import RasterError
from sam_geo.io.mosaic import join_mosaics, mosaic_groups
from sam_geo.run.pipeline import expand_scenes
from sam_geo.io.scenes import open_scene
from test_auto import E2E_PARAMS, E2E_SHAPES, NORTH_UP, paint_scene, to_crs

CUT_COL, CUT_ROW = 200, 240  # file borders, in the single file's pixels: shapes cross both


def split(scene: Path, folder: Path) -> list[Path]:
    """The scene cut into 4 files at CUT_COL / CUT_ROW, same grid."""
    paths = []
    with rasterio.open(scene) as src:
        for r0, r1 in ((0, CUT_ROW), (CUT_ROW, src.height)):
            for c0, c1 in ((0, CUT_COL), (CUT_COL, src.width)):
                window = Window(c0, r0, c1 - c0, r1 - r0)
                path = folder / f"part_{r0}_{c0}.tif"
                profile = {**src.profile, "width": c1 - c0, "height": r1 - r0,
                           "transform": src.window_transform(window), "tiled": False}
                profile.pop("blockxsize", None), profile.pop("blockysize", None)
                with rasterio.open(path, "w", **profile) as dst:
                    dst.write(src.read(window=window))
                paths.append(path)
    return paths


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("mosaic")
    single = paint_scene(folder / "single.tif", E2E_SHAPES, (512, 512))
    return single, split(single, folder)


def test_files_of_one_grid_are_one_group_others_stay_alone(scenes, tmp_path: Path) -> None:
    single, parts = scenes
    image = np.zeros((3, 10, 10), dtype=np.uint8)
    shifted = make_raster(tmp_path / "shifted.tif", image, transform=NORTH_UP * Affine.translation(512.5, 0))
    far = make_raster(tmp_path / "far.tif", image, transform=NORTH_UP * Affine.translation(2000, 0))
    other_crs = make_raster(tmp_path / "other.tif", image, transform=NORTH_UP * Affine.translation(512, 0),
                            crs="EPSG:32633")
    infos = [open_scene(p) for p in (*parts, shifted, far, other_crs)]
    groups = mosaic_groups(infos)
    assert [len(g) for g in groups] == [4, 1, 1, 1]  # half a pixel off, away, or another CRS: alone
    assert [g[0].path for g in groups[1:]] == [str(shifted), str(far), str(other_crs)]


def test_the_mosaic_reads_as_the_single_file(scenes, tmp_path: Path) -> None:
    single, parts = scenes
    (mosaic,) = join_mosaics([open_scene(p) for p in parts], tmp_path)
    assert mosaic.sources == tuple(str(p) for p in parts) and mosaic.path.endswith(".vrt")
    with rasterio.open(mosaic.path) as vrt, rasterio.open(single) as src:
        assert (vrt.width, vrt.height, vrt.transform, vrt.crs) == (src.width, src.height, src.transform, src.crs)
        assert (vrt.read() == src.read()).all() and (vrt.dataset_mask() == 255).all()
    again = join_mosaics([open_scene(p) for p in parts], tmp_path)[0]
    assert again.path == mosaic.path and len(list(tmp_path.glob("*.vrt"))) == 1  # same content, same file


def test_a_gap_in_the_mosaic_is_nodata(scenes, tmp_path: Path) -> None:
    _, parts = scenes
    (mosaic,) = join_mosaics([open_scene(p) for p in parts[:3]], tmp_path)  # bottom right file missing
    with rasterio.open(mosaic.path) as vrt:
        mask = vrt.dataset_mask()
    assert not mask[CUT_ROW:, CUT_COL:].any() and mask[:CUT_ROW].all() and mask[CUT_ROW:, :CUT_COL].all()


def test_automatic_objects_across_file_borders_are_whole(scenes) -> None:
    single, parts = scenes
    params = {"tile_size_px": 256, "overlap_px": 48, "points_per_side": 4, "workers": 0, "progress": False}
    alone = segment_auto(single, **params, **E2E_PARAMS)
    mosaic = segment_auto(parts, **params, **E2E_PARAMS)
    assert "scene" not in mosaic.columns and len(mosaic) == len(alone) >= len(E2E_SHAPES)
    assert mosaic.object_id.tolist() == alone.object_id.tolist()
    assert list(mosaic.attrs["summary"]["mosaics"].values()) == [[str(p) for p in parts]]
    assert all(a.equals(b) for a, b in zip(mosaic.geometry, alone.geometry))
    crossing = [to_crs(s, NORTH_UP) for s in E2E_SHAPES[:4]]  # each crosses a file border
    for shape in crossing:
        assert sum(g.intersection(shape).area > 0.5 * g.area for g in mosaic.geometry) == 1


def test_prompted_objects_across_file_borders_are_whole(scenes) -> None:
    single, parts = scenes
    boxes = gpd.GeoDataFrame({"name": list("abcd")}, geometry=[to_crs(shapely.box(*s.bounds), NORTH_UP)
                                                                  for s in E2E_SHAPES[:4]], crs="EPSG:32631")
    with rasterio.open(single) as src:
        boxes = boxes.set_crs(src.crs, allow_override=True)
    alone = segment(single, boxes, workers=0, progress=False)
    mosaic = segment(parts, boxes, workers=0, progress=False)
    assert mosaic.name.tolist() == alone.name.tolist() == list("abcd") and "scene" not in mosaic.columns
    assert all(a.equals(b) for a, b in zip(mosaic.geometry, alone.geometry))


def stac_collection(parts: list[Path], target: Path) -> Path:
    """An ItemCollection (pystac) of the parts, hrefs relative to the JSON file."""
    import pystac
    from datetime import datetime, timezone

    items = []
    for part in parts:
        with rasterio.open(part) as src:
            footprint = gpd.GeoSeries([shapely.box(*src.bounds)], crs=src.crs).to_crs(4326).iloc[0]
        item = pystac.Item(part.stem, shapely.geometry.mapping(footprint), list(footprint.bounds),
                           datetime(2026, 1, 1, tzinfo=timezone.utc), {})
        item.add_asset("thumbnail", pystac.Asset("thumb.png", media_type="image/png", roles=["thumbnail"]))
        item.add_asset("image", pystac.Asset(part.name, media_type=pystac.MediaType.COG, roles=["data"]))
        items.append(item)
    target.write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
    return target


def test_a_stac_item_collection_is_a_mosaic(scenes) -> None:
    single, parts = scenes
    collection = stac_collection(parts, parts[0].parent / "items.json")
    assert expand_scenes(str(collection)) == [str(p) for p in parts]  # the data assets, not the thumbnails
    boxes = gpd.GeoDataFrame({"name": list("abcd")}, geometry=[to_crs(shapely.box(*s.bounds), NORTH_UP)
                                                                  for s in E2E_SHAPES[:4]])
    with rasterio.open(single) as src:
        boxes = boxes.set_crs(src.crs)
    alone = segment(single, boxes, workers=0, progress=False)
    mosaic = segment(str(collection), boxes, workers=0, progress=False)
    assert all(a.equals(b) for a, b in zip(mosaic.geometry, alone.geometry))


def test_json_that_is_not_stac_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
                     '"geometry": {"type": "Point", "coordinates": [1, 2]}}]}')  # GeoJSON, not STAC
    with pytest.raises(RasterError, match="STAC"):
        expand_scenes(str(plain))
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(RasterError, match="not a STAC"):
        expand_scenes(str(other))
