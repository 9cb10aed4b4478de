"""Prompt layers read only near the scenes (sam_geo.io.layers): a layer of 200,000
features, nearly all far from a small scene, in every format; the features read are
exactly those a full read would keep, with their ids in the layer."""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from sam_geo.errors import CRSError, PromptError
from sam_geo.io.layers import Area, area_in_crs, layer_info, read_layer_near
from sam_geo.io.prompts import read_prompts_near

UTM = "EPSG:32645"
N_FEATURES = 200_000
SCENE = shapely.box(500_000, 3_000_000, 500_300, 3_000_300)  # 300 m, like a 600 px scene at 0.5 m


@pytest.fixture(scope="module")
def national(tmp_path_factory: pytest.TempPathFactory) -> gpd.GeoDataFrame:
    """200,000 10 m squares over 100 km x 100 km, sorted by x so row groups are compact
    in x (as a Hilbert-sorted national layer would be), 40 of them inside SCENE."""
    rng = np.random.default_rng(7)
    x = np.sort(rng.uniform(450_000, 550_000, N_FEATURES - 40))
    y = rng.uniform(2_950_000, 3_050_000, N_FEATURES - 40)
    near_x, near_y = rng.uniform(500_000, 500_290, 40), rng.uniform(3_000_000, 3_000_290, 40)
    order = np.argsort(np.concatenate([x, near_x]), kind="stable")
    xs, ys = np.concatenate([x, near_x])[order], np.concatenate([y, near_y])[order]
    return gpd.GeoDataFrame({"osm_id": np.arange(N_FEATURES) * 10, "kind": np.where(np.arange(N_FEATURES) % 2, "a", "b")},
                            geometry=shapely.box(xs, ys, xs + 10, ys + 10), crs=UTM)


@pytest.fixture(scope="module")
def files(national: gpd.GeoDataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("national")
    paths = {name: folder / name for name in ("covering.parquet", "plain.parquet", "layer.gpkg", "layer.shp", "parts")}
    national.to_parquet(paths["covering.parquet"], write_covering_bbox=True, row_group_size=20_000)
    national.to_parquet(paths["plain.parquet"], row_group_size=20_000)  # GeoParquet 1.0: no covering column
    national.to_file(paths["layer.gpkg"], engine="pyogrio")
    national.to_file(paths["layer.shp"], engine="pyogrio")
    paths["parts"].mkdir()
    for k, part in enumerate(np.array_split(np.arange(N_FEATURES), 4)):  # a folder of files, read in name order
        national.iloc[part].to_parquet(paths["parts"] / f"part-{k}.parquet", write_covering_bbox=True)
    return paths


def expected_rows(national: gpd.GeoDataFrame, area: shapely.Geometry) -> np.ndarray:
    return np.flatnonzero(shapely.intersects(national.geometry.to_numpy(), area))


@pytest.mark.parametrize("name", ["covering.parquet", "plain.parquet", "layer.gpkg", "layer.shp", "parts"])
def test_reads_exactly_the_features_near_the_scene(national, files, name) -> None:
    area = [Area(SCENE, UTM, "scene.tif")]
    frame, info = read_layer_near(files[name], area)
    rows = expected_rows(national, area_in_crs(area, UTM))
    assert 40 <= len(rows) < 100 and info.features == N_FEATURES
    first_id = 1 if name == "layer.gpkg" else 0  # GeoPackage fids start at 1; other ids are 0-based rows
    assert frame.index.name == "prompt_index"
    assert sorted(frame.index - first_id) == rows.tolist()
    by_id = frame.sort_index()
    assert (by_id.osm_id.to_numpy() == national.osm_id.to_numpy()[rows]).all()
    assert (by_id.kind.to_numpy() == national.kind.to_numpy()[rows]).all()
    assert by_id.geometry.geom_equals(national.geometry.iloc[rows].set_axis(by_id.index)).all()
    assert frame.crs == UTM and list(frame.columns) == ["osm_id", "kind", "geometry"]


def test_footprint_is_reprojected_with_curved_edges(national, files) -> None:
    """The scene in lon/lat: its footprint goes into the layer's UTM CRS densified, and
    the same features come back as with the scene given in UTM."""
    lonlat = gpd.GeoSeries([SCENE], crs=UTM).to_crs(4326).envelope.iloc[0]
    frame, _ = read_layer_near(files["covering.parquet"], [Area(lonlat, "EPSG:4326")])
    footprint = area_in_crs([Area(lonlat, "EPSG:4326")], UTM)
    assert sorted(frame.index) == expected_rows(national, footprint).tolist()
    assert len(shapely.get_coordinates(footprint)) > 4 * 32  # densified edges


def test_logs_say_an_index_would_be_faster(files, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="sam_geo.io.layers"):
        read_layer_near(files["plain.parquet"], [Area(SCENE, UTM)])
        read_layer_near(files["layer.shp"], [Area(SCENE, UTM)])
        read_layer_near(files["covering.parquet"], [Area(SCENE, UTM)])
        read_layer_near(files["layer.gpkg"], [Area(SCENE, UTM)])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "covering" in messages[0] and "plain.parquet" in messages[0]
    assert "spatial index" in messages[1] and "layer.shp" in messages[1]


def test_layer_info_is_metadata_only(files) -> None:
    covering, plain, gpkg = (layer_info(files[n]) for n in ("covering.parquet", "plain.parquet", "layer.gpkg"))
    assert covering.indexed and not plain.indexed and gpkg.indexed
    assert covering.features == plain.features == gpkg.features == N_FEATURES
    assert gpkg.bounds is not None and gpkg.bounds[0] == pytest.approx(450_000, abs=50)


def test_nothing_near_the_scene_is_a_crs_hint(files) -> None:
    elsewhere = Area(shapely.box(10, 10, 20, 20), "EPSG:4326", "far.tif")
    with pytest.raises(PromptError, match=r"none of the 200,000 prompts .* intersect the scene.*far.tif covers.*CRS"):
        read_prompts_near(files["layer.gpkg"], [elsewhere])
    frame, total = read_prompts_near(files["layer.gpkg"], [elsewhere], allow_empty=True)
    assert len(frame) == 0 and total == N_FEATURES and list(frame.columns) == ["osm_id", "kind", "geometry"]
    frame, _ = read_prompts_near(files["covering.parquet"], [elsewhere], allow_empty=True)
    assert len(frame) == 0 and list(frame.columns) == ["osm_id", "kind", "geometry"]


def test_a_layer_without_crs_needs_one(tmp_path: Path) -> None:
    layer = tmp_path / "nocrs.parquet"
    gpd.GeoDataFrame({"a": [1]}, geometry=[shapely.box(500_010, 3_000_010, 500_020, 3_000_020)]).to_parquet(layer)
    with pytest.raises(CRSError, match="--prompts-crs"):
        read_layer_near(layer, [Area(SCENE, UTM)])
    frame, info = read_layer_near(layer, [Area(SCENE, UTM)], assume_crs=UTM)
    assert len(frame) == 1 and info.crs == UTM


def test_a_geodataframe_is_taken_whole(national) -> None:
    frame, total = read_prompts_near(national.iloc[:10], [Area(SCENE, UTM)])
    assert total == 10 and frame.index.equals(pd.RangeIndex(10, name="prompt_index"))


def test_missing_and_unreadable_layers(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="does not exist"):
        read_layer_near(tmp_path / "nope.gpkg", [Area(SCENE, UTM)])
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(PromptError, match="cannot read prompt layer"):
        read_layer_near(bad, [Area(SCENE, UTM)])
