"""Text prompts end to end: a tiny random OWLv2 (saved like a real one) + real MobileSAM."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.windows import Window

from conftest import BANEPA, make_raster
from sam_geo.cli import EXIT_OK, main
from test_text import tiny_owlv2


@pytest.fixture(scope="module")
def detector_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder written by save_pretrained, as a user would pass with --detector."""
    folder = tmp_path_factory.mktemp("owlv2")
    detector = tiny_owlv2()
    detector.model.save_pretrained(folder)
    detector.processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    window = Window(1500, 2000, 400, 400)
    with rasterio.open(BANEPA / "banepa_utm45n.tif") as src:
        data, transform, crs = src.read(window=window), src.window_transform(window), src.crs.to_string()
    return Path(make_raster(tmp_path_factory.mktemp("text") / "scene.tif", data, crs=crs, transform=transform, nodata=0))


def test_text_command_writes_georeferenced_objects_with_phrase_and_scores(
    scene: Path, detector_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, summary = tmp_path / "pools.gpkg", tmp_path / "summary.json"
    code = main(
        ["text", str(scene), "swimming pool", "roof", "--detector", str(detector_folder), "--box-threshold", "0",
         "-o", str(out), "--summary", str(summary), "--tile-size", "512", "--overlap", "32", "--workers", "0",
         "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == EXIT_OK, err
    gdf = gpd.read_file(out)
    report = json.loads(summary.read_text())
    assert report["mode"] == "text" and report["model"]["detector"] == str(detector_folder)
    assert len(gdf) == report["features"] > 0
    assert {"phrase", "detector_score", "score", "area_m2"} <= set(gdf.columns)
    assert set(gdf.phrase) <= {"swimming pool", "roof"}
    with rasterio.open(scene) as src:
        footprint = shapely.box(*src.bounds)
        assert gdf.crs == src.crs
    assert gdf.geometry.is_valid.all() and not gdf.geometry.is_empty.any()
    assert gdf.geometry.within(footprint.buffer(1e-6)).all()
    assert (gdf.detector_score >= 0).all() and np.isfinite(gdf.score).all()


def test_each_detection_is_kept_by_one_tile_only(scene: Path, detector_folder: Path) -> None:
    """Tiles overlap, but a detection is kept only by the tile whose core holds its centre."""
    from sam_geo import segment_text

    gdf = segment_text(scene, ["roof"], detector=str(detector_folder), box_threshold=0.0, tile_size_px=256,
                       overlap_px=32, workers=0, progress=False)
    centroids = shapely.get_coordinates(gdf.geometry.centroid)
    assert len(gdf) > 0
    assert gdf.attrs["summary"]["tiles"]["planned"] == 4
    # no two outputs are the same object seen twice (near-identical polygons)
    tree = shapely.STRtree(gdf.geometry.to_numpy())
    left, right = tree.query(gdf.geometry.to_numpy(), predicate="intersects")
    pairs = left < right
    a, b = gdf.geometry.to_numpy()[left[pairs]], gdf.geometry.to_numpy()[right[pairs]]
    iou = shapely.area(shapely.intersection(a, b)) / shapely.area(shapely.union(a, b)) if len(a) else np.zeros(0)
    assert (iou <= 0.8).all(), centroids
