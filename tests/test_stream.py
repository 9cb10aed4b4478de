"""Output layers written chunk by chunk (sam_geo.io.stream): every format, publication
only on success, nothing left behind on failure, partitioned GeoParquet datasets."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely

from sam_geo.errors import OutputError, OutputExistsError
from sam_geo.io.stream import VectorStream, check_stream_path, is_dataset_path

CRS = "EPSG:32633"


def chunk(start: int, n: int, multi_at: int | None = None) -> gpd.GeoDataFrame:
    """``n`` 10 m squares in UTM 33N with ids from ``start``; one MultiPolygon if asked."""
    geoms = [shapely.box(500_000 + 20 * k, 5_000_000, 500_010 + 20 * k, 5_000_010) for k in range(start, start + n)]
    if multi_at is not None:
        geoms[multi_at] = shapely.MultiPolygon([geoms[multi_at], shapely.affinity.translate(geoms[multi_at], 0, 30)])
    return gpd.GeoDataFrame({"fid_in": np.arange(start, start + n), "label": [f"r{k}" for k in range(start, start + n)]},
                            geometry=geoms, crs=CRS)


def written(path: Path) -> gpd.GeoDataFrame:
    out = gpd.read_parquet(path) if path.suffix == ".parquet" or path.is_dir() else gpd.read_file(path)
    return out.sort_values("fid_in").reset_index(drop=True)


@pytest.mark.parametrize("name", ["out.gpkg", "out.geojson", "out.parquet", "out/"])
def test_chunks_are_published_once_whole(tmp_path: Path, name: str) -> None:
    path = str(tmp_path / name) + ("/" if name.endswith("/") else "")
    with VectorStream(path) as stream:
        stream.write(chunk(0, 3))
        stream.write(chunk(3, 0))  # an empty chunk changes nothing
        stream.write(chunk(3, 4, multi_at=1))
        if not stream.dataset:
            assert not stream.path.exists()  # nothing at the target before the end
    out = written(stream.path)
    assert out.fid_in.tolist() == list(range(7)) and out.label.tolist() == [f"r{k}" for k in range(7)]
    expected = chunk(0, 3).geometry.tolist() + chunk(3, 4, multi_at=1).geometry.tolist()
    for got, want in zip(out.to_crs(CRS).geometry, expected):
        assert got.symmetric_difference(want).area < 0.5  # m2: GeoJSON rounds to 1e-7 degree (~1 cm)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_geojson_stream_is_rfc7946(tmp_path: Path) -> None:
    with VectorStream(tmp_path / "a.geojson") as stream:
        stream.write(chunk(0, 2))
        stream.write(chunk(2, 2))
    doc = json.loads((tmp_path / "a.geojson").read_text())
    assert "crs" not in doc and len(doc["features"]) == 4
    lon, lat = doc["features"][3]["geometry"]["coordinates"][0][0]
    assert 14 < lon < 16 and 45 < lat < 46  # longitude first, degrees
    ring = shapely.LinearRing(doc["features"][0]["geometry"]["coordinates"][0])
    assert ring.is_ccw


def test_gpkg_stream_is_one_multipolygon_layer_with_rtree(tmp_path: Path) -> None:
    import sqlite3

    with VectorStream(tmp_path / "a.gpkg") as stream:
        stream.write(chunk(0, 2))
        stream.write(chunk(2, 2, multi_at=0))
    with sqlite3.connect(tmp_path / "a.gpkg") as db:
        kind = db.execute("select geometry_type_name from gpkg_geometry_columns").fetchone()[0]
        rtree = db.execute("select count(*) from sqlite_master where name like 'rtree_a_%'").fetchone()[0]
    assert kind == "MULTIPOLYGON" and rtree > 0


def test_parquet_file_is_geoparquet_1_1_with_covering(tmp_path: Path) -> None:
    with VectorStream(tmp_path / "a.parquet") as stream:
        stream.write(chunk(0, 3))
        stream.write(chunk(3, 3, multi_at=2))
    meta = json.loads(pq.read_schema(tmp_path / "a.parquet").metadata[b"geo"])
    column = meta["columns"][meta["primary_column"]]
    assert meta["version"] == "1.1.0" and "bbox" in column["covering"]
    assert column["geometry_types"] == ["MultiPolygon", "Polygon"] and "bbox" not in column
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.num_rows == 6
    assert gpd.read_parquet(tmp_path / "a.parquet").crs == CRS


def test_a_failed_run_leaves_nothing_and_the_old_file_intact(tmp_path: Path) -> None:
    for name in ("a.gpkg", "a.parquet"):
        target = tmp_path / name
        target.write_bytes(b"old")
        with pytest.raises(RuntimeError), VectorStream(target, overwrite=True) as stream:
            stream.write(chunk(0, 2))
            raise RuntimeError("the run failed")
        assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gpkg", "a.parquet"]


def test_dataset_parts_appear_as_written_and_a_failure_removes_them(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    with pytest.raises(RuntimeError), VectorStream(folder, partitioned=True, part_rows=2) as stream:
        stream.write(chunk(0, 2))
        stream.write(chunk(2, 2))
        assert len(list(folder.glob("part-*.parquet"))) == 2  # published as they come
        assert len(gpd.read_parquet(folder)) == 4
        raise RuntimeError("the run failed")
    assert not folder.exists()


def test_small_batches_are_gathered_into_parts(tmp_path: Path) -> None:
    with VectorStream(tmp_path / "d", partitioned=True, part_rows=10) as stream:
        for k in range(7):
            stream.write(chunk(3 * k, 3))  # 21 rows: parts of 12, 9 (written when >= 10 rows wait)
    parts = sorted((tmp_path / "d").glob("part-*.parquet"))
    assert [len(gpd.read_parquet(p)) for p in parts] == [12, 9]
    assert written(tmp_path / "d").fid_in.tolist() == list(range(21))


def test_dataset_rows_are_in_hilbert_order_within_a_part(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gdf = chunk(0, 50)
    gdf = gdf.iloc[rng.permutation(50)].reset_index(drop=True)
    with VectorStream(str(tmp_path / "d") + "/") as stream:
        stream.write(gdf)
    part = gpd.read_parquet(next((tmp_path / "d").glob("part-*.parquet")))
    distance = part.geometry.hilbert_distance(total_bounds=part.total_bounds)
    assert np.all(np.diff(distance.to_numpy()) >= 0) and "bbox" in pq.read_schema(
        next((tmp_path / "d").glob("part-*.parquet"))).names


def test_overwriting_a_dataset_drops_its_old_parts_only_after_success(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    with VectorStream(folder, partitioned=True) as stream:
        stream.write(chunk(0, 5))
    check_stream_path(folder, overwrite=True)
    with VectorStream(folder, overwrite=True, partitioned=True, part_rows=1) as stream:
        stream.write(chunk(100, 2))
        assert len(gpd.read_parquet(folder)) == 7  # old parts still there while the run goes on
    assert written(folder).fid_in.tolist() == [100, 101]


def test_empty_outputs_are_valid_empty_layers(tmp_path: Path) -> None:
    for name in ("e.gpkg", "e.geojson", "e.parquet", "e/"):
        with VectorStream(str(tmp_path / name) + ("/" if name.endswith("/") else "")) as stream:
            stream.write(chunk(0, 0))
        out = gpd.read_parquet(stream.path) if name.endswith(("/", "parquet")) else gpd.read_file(stream.path)
        assert len(out) == 0


def test_dataset_paths_are_checked_before_any_work(tmp_path: Path) -> None:
    assert is_dataset_path(str(tmp_path / "new") + "/") and is_dataset_path(tmp_path / "x.parquet", True)
    assert not is_dataset_path(tmp_path / "x.parquet") and not is_dataset_path(tmp_path / "no_suffix")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_stream_path(busy, overwrite=False)
    with pytest.raises(OutputError, match="did not write"):
        check_stream_path(busy, overwrite=True)
    with pytest.raises(OutputError, match="does not exist"):
        check_stream_path(str(tmp_path / "no" / "such") + "/", overwrite=False)
    assert check_stream_path(str(tmp_path / "fresh") + "/", overwrite=False) == tmp_path / "fresh"
    layer = busy / "prompts.parquet"
    with pytest.raises(OutputError, match="holds the prompt layer"):
        check_stream_path(busy, overwrite=True, others={"the prompt layer": layer})
