"""Tests for sam_geo.io.writers: atomic GeoJSON (RFC 7946), GeoPackage and GeoParquet output."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import geopandas
import numpy as np
import pandas as pd
import pyogrio
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box

from sam_geo.errors import CRSError, OutputError, OutputExistsError, WriteError
from sam_geo.io.atomic import atomic_path, write_bytes_atomic
from sam_geo.io.labels import write_labels_raster
from sam_geo.io.writers import SUPPORTED_SUFFIXES, check_output_path, write_vector
from sam_geo.run.summary import write_json_atomic
from sam_geo.run.workdir import WorkDir

SUFFIXES = [".geojson", ".gpkg", ".parquet"]
UTM33N = "EPSG:32633"


@pytest.fixture
def polygons() -> geopandas.GeoDataFrame:
    """Three features in UTM 33N (near 15E 45N) with non-ASCII names and mixed types.

    The first polygon's shell is clockwise and its hole counter-clockwise (the opposite
    of RFC 7946) so the GeoJSON writer has to re-orient them.
    """
    x, y = 500_000.0, 4_980_000.0
    shell_cw = [(x, y), (x, y + 100), (x + 100, y + 100), (x + 100, y)]
    hole_ccw = [(x + 10, y + 10), (x + 30, y + 10), (x + 30, y + 30), (x + 10, y + 30)]
    ring = Polygon(shell_cw, [hole_ccw])
    assert not ring.exterior.is_ccw  # test precondition, not validation
    multi = MultiPolygon([box(x + 200, y, x + 250, y + 50), box(x + 300, y, x + 310, y + 10)])
    return geopandas.GeoDataFrame(
        {
            "名前": ["Straße", "नाम", None],
            "Straße": [1, 2, 3],
            "score": [0.5, np.nan, 2.25],
            "flag": [True, False, True],
            "maybe": [True, None, False],
        },
        geometry=[ring, multi, box(x + 400, y, x + 401.5, y + 1.5)],
        crs=UTM33N,
    )


@pytest.fixture
def empty(polygons: geopandas.GeoDataFrame) -> geopandas.GeoDataFrame:
    """No features, same columns and CRS as ``polygons``."""
    return polygons.iloc[:0]


def _read(path: Path) -> geopandas.GeoDataFrame:
    """Read any supported output back."""
    if path.suffix == ".parquet":
        return geopandas.read_parquet(path)
    return pyogrio.read_dataframe(path)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _multi(geom: shapely.Geometry) -> MultiPolygon:
    return MultiPolygon([geom]) if isinstance(geom, Polygon) else geom


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_keeps_features_attributes_and_crs(
    tmp_path: Path, polygons: geopandas.GeoDataFrame, suffix: str
) -> None:
    path = tmp_path / f"straße_名前{suffix}"

    written = write_vector(polygons, path)
    back = _read(path)

    assert written == path and path.is_file()
    assert _files(tmp_path) == [path.name]
    assert len(back) == len(polygons)
    assert list(back.columns) == list(polygons.columns)
    assert back["名前"].iloc[:2].tolist() == ["Straße", "नाम"]
    assert pd.isna(back["名前"].iloc[2])
    assert back["Straße"].tolist() == [1, 2, 3]
    assert back["score"].iloc[[0, 2]].tolist() == [0.5, 2.25]
    assert pd.isna(back["score"].iloc[1])
    assert back["flag"].tolist() == [True, False, True]
    assert bool(back["maybe"].iloc[0]) is True and bool(back["maybe"].iloc[2]) is False
    assert pd.isna(back["maybe"].iloc[1])
    expected = polygons.to_crs(4326) if suffix == ".geojson" else polygons
    assert back.crs == expected.crs
    tolerance = 1e-7 if suffix == ".geojson" else 0.0
    for got, want in zip(back.geometry, expected.geometry):
        # GPKG layers have one geometry type: mixed Polygon/MultiPolygon become Multi
        assert _multi(got).normalize().equals_exact(_multi(want).normalize(), tolerance)


def test_input_frame_is_not_modified(tmp_path: Path, polygons: geopandas.GeoDataFrame) -> None:
    before = polygons.copy()

    write_vector(polygons, tmp_path / "out.geojson")
    write_vector(polygons, tmp_path / "out.gpkg")

    pd.testing.assert_frame_equal(polygons, before)


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet"])
def test_empty_frame_keeps_columns(
    tmp_path: Path, empty: geopandas.GeoDataFrame, suffix: str
) -> None:
    path = tmp_path / f"empty{suffix}"

    write_vector(empty, path)
    back = _read(path)

    assert len(back) == 0
    assert list(back.columns) == list(empty.columns)
    assert back.crs == empty.crs


def test_empty_frame_gives_empty_feature_collection(
    tmp_path: Path, empty: geopandas.GeoDataFrame
) -> None:
    path = tmp_path / "empty.geojson"

    write_vector(empty, path)
    document = json.loads(path.read_text(encoding="utf-8"))

    assert document["type"] == "FeatureCollection"
    assert document["features"] == []
    assert "crs" not in document
    assert len(_read(path)) == 0


def test_named_index_is_kept_as_column(
    tmp_path: Path, polygons: geopandas.GeoDataFrame
) -> None:
    indexed = polygons.set_index(pd.Index([10, 20, 30], name="tile_id"))

    write_vector(indexed, tmp_path / "out.gpkg")

    assert _read(tmp_path / "out.gpkg")["tile_id"].tolist() == [10, 20, 30]


# --- GeoJSON: RFC 7946 -------------------------------------------------------------------


def _signed_area(ring: list[list[float]]) -> float:
    """Shoelace signed area of a closed ring: > 0 counter-clockwise."""
    xy = np.asarray(ring, dtype=float)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def _polygons_of(geometry: dict[str, Any]) -> list[list[list[list[float]]]]:
    """Polygon coordinate arrays of a GeoJSON Polygon/MultiPolygon."""
    if geometry["type"] == "Polygon":
        return [geometry["coordinates"]]
    assert geometry["type"] == "MultiPolygon"
    return geometry["coordinates"]


def _decimals(value: Decimal) -> int:
    return max(0, -value.as_tuple().exponent)


@pytest.fixture
def geojson_doc(tmp_path: Path, polygons: geopandas.GeoDataFrame) -> dict[str, Any]:
    """``polygons`` written as GeoJSON, parsed with floats kept as exact Decimals."""
    path = write_vector(polygons, tmp_path / "out.geojson", layer="buildings")
    return json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)


def test_geojson_has_no_crs_member_and_keeps_layer_name(geojson_doc: dict[str, Any]) -> None:
    assert "crs" not in geojson_doc
    assert geojson_doc["name"] == "buildings"
    assert geojson_doc["features"][0]["properties"]["名前"] == "Straße"


def test_geojson_coordinates_are_lonlat_within_1e7_of_to_crs(
    geojson_doc: dict[str, Any], polygons: geopandas.GeoDataFrame
) -> None:
    expected = shapely.orient_polygons(
        np.asarray(polygons.to_crs(4326).geometry.values), exterior_cw=False
    )
    for feature, want in zip(geojson_doc["features"], expected):
        coords = np.asarray(
            [
                [float(value) for value in xy]
                for polygon in _polygons_of(feature["geometry"])
                for ring in polygon
                for xy in ring
            ]
        )
        assert np.all((-180 <= coords[:, 0]) & (coords[:, 0] <= 180))
        assert np.all((-90 <= coords[:, 1]) & (coords[:, 1] <= 90))
        assert 14 < coords[:, 0].min() and coords[:, 0].max() < 16  # lon first
        assert 44 < coords[:, 1].min() and coords[:, 1].max() < 46  # lat second
        np.testing.assert_allclose(coords, shapely.get_coordinates(want), rtol=0, atol=1e-7)


def test_geojson_rings_follow_right_hand_rule(geojson_doc: dict[str, Any]) -> None:
    holes = 0
    for feature in geojson_doc["features"]:
        for polygon in _polygons_of(feature["geometry"]):
            exterior, *interiors = polygon
            assert _signed_area(exterior) > 0  # counter-clockwise
            for hole in interiors:
                assert _signed_area(hole) < 0  # clockwise
                holes += 1
    assert holes == 1


def test_geojson_coordinates_have_at_most_7_decimals(geojson_doc: dict[str, Any]) -> None:
    decimals = [
        _decimals(value)
        for feature in geojson_doc["features"]
        for polygon in _polygons_of(feature["geometry"])
        for ring in polygon
        for xy in ring
        for value in xy
    ]
    assert max(decimals) <= 7
    assert max(decimals) == 7  # and the precision is actually used


# --- GeoPackage ---------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [None, "buildings"])
def test_gpkg_has_spatial_index(
    tmp_path: Path, polygons: geopandas.GeoDataFrame, layer: str | None
) -> None:
    path = tmp_path / "scene.gpkg"

    write_vector(polygons, path, layer=layer)

    name = layer or "scene"
    assert pyogrio.list_layers(path)[:, 0].tolist() == [name]
    geometry_column = pyogrio.read_info(path, layer=name)["geometry_name"]
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        indexed = db.execute(
            "SELECT count(*) FROM gpkg_extensions WHERE table_name = ? AND "
            "extension_name = 'gpkg_rtree_index'",
            (name,),
        ).fetchone()[0]
        entries = db.execute(f'SELECT count(*) FROM "rtree_{name}_{geometry_column}"')
        assert entries.fetchone()[0] == len(polygons)
    assert f"rtree_{name}_{geometry_column}" in tables
    assert f"rtree_{name}_geom" in tables
    assert indexed == 1


# --- overwrite, paths ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_existing_output_is_refused_and_left_identical(
    tmp_path: Path, polygons: geopandas.GeoDataFrame, suffix: str
) -> None:
    path = tmp_path / f"out{suffix}"
    write_vector(polygons, path)
    before = path.read_bytes()

    with pytest.raises(OutputExistsError, match="--overwrite") as info:
        write_vector(polygons.iloc[:1], path)

    assert isinstance(info.value, FileExistsError)
    assert path.read_bytes() == before
    assert _files(tmp_path) == [path.name]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_overwrite_replaces_output(
    tmp_path: Path, polygons: geopandas.GeoDataFrame, suffix: str
) -> None:
    path = tmp_path / f"out{suffix}"
    write_vector(polygons, path)

    write_vector(polygons.iloc[:1], path, overwrite=True)

    assert len(_read(path)) == 1
    assert _files(tmp_path) == [path.name]


def test_check_output_path_accepts_supported_suffixes(tmp_path: Path) -> None:
    for suffix in [*SUPPORTED_SUFFIXES, ".GPKG", ".GeoJSON"]:
        assert check_output_path(str(tmp_path / f"a{suffix}")) == tmp_path / f"a{suffix}"
    assert set(SUPPORTED_SUFFIXES.values()) == {"GeoJSON", "GPKG", "GeoParquet"}


@pytest.mark.parametrize("name", ["out.shp", "out.csv", "out"])
def test_unsupported_suffix_lists_supported_ones(tmp_path: Path, name: str) -> None:
    with pytest.raises(OutputError, match=r"\.gpkg.*\.parquet") as info:
        check_output_path(tmp_path / name)
    assert not isinstance(info.value, OutputExistsError)


def test_missing_directory_is_named_and_not_created(
    tmp_path: Path, polygons: geopandas.GeoDataFrame
) -> None:
    missing = tmp_path / "no" / "such"

    with pytest.raises(OutputError, match="does not exist; create it") as info:
        write_vector(polygons, missing / "out.gpkg")

    assert str(missing) in str(info.value)
    assert not missing.exists() and not missing.parent.exists()


def test_existing_path_refused_by_check(tmp_path: Path) -> None:
    path = tmp_path / "out.gpkg"
    path.write_bytes(b"old")

    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_output_path(path)
    assert check_output_path(path, overwrite=True) == path


def test_directory_as_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out.gpkg").mkdir()

    with pytest.raises(OutputError, match="is a directory"):
        check_output_path(tmp_path / "out.gpkg", overwrite=True)


def test_frame_without_crs_is_refused(tmp_path: Path, polygons: geopandas.GeoDataFrame) -> None:
    no_crs = polygons.set_crs(None, allow_override=True)

    with pytest.raises(CRSError, match="set_crs"):
        write_vector(no_crs, tmp_path / "out.gpkg")

    assert _files(tmp_path) == []


def test_non_geodataframe_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="GeoDataFrame"):
        write_vector(pd.DataFrame({"a": [1]}), tmp_path / "out.gpkg")  # type: ignore[arg-type]


# --- failures mid-write -------------------------------------------------------------------


def _failing_writer(target_arg: int = 1):
    """A writer that leaves a partial file where it was told to write, then hits ENOSPC."""

    def fail(*args: Any, **kwargs: Any) -> None:
        Path(args[target_arg]).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    return fail


def _patch_writer(monkeypatch: pytest.MonkeyPatch, suffix: str, replacement: Any) -> None:
    if suffix == ".parquet":
        monkeypatch.setattr(geopandas.GeoDataFrame, "to_parquet", replacement)
    else:
        monkeypatch.setattr(pyogrio, "write_dataframe", replacement)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_disk_full_leaves_old_target_and_no_temp_files(
    tmp_path: Path,
    polygons: geopandas.GeoDataFrame,
    monkeypatch: pytest.MonkeyPatch,
    suffix: str,
) -> None:
    path = tmp_path / f"out{suffix}"
    write_vector(polygons, path)
    before = path.read_bytes()
    seen: list[Path] = []

    def fail(*args: Any, **kwargs: Any) -> None:
        seen.append(Path(args[1]))
        _failing_writer()(*args, **kwargs)

    _patch_writer(monkeypatch, suffix, fail)

    with pytest.raises(WriteError, match="full") as info:
        write_vector(polygons.iloc[:1], path, overwrite=True)

    assert isinstance(info.value.__cause__, OSError)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert _files(tmp_path) == [path.name]
    # the writer was given a hidden temp file next to the target, with the right suffix
    (temp,) = seen
    assert temp.parent == tmp_path and temp.name.startswith(f".{path.name}.")
    assert temp.suffix == suffix and ".tmp" in temp.name


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_failure_without_previous_target_leaves_nothing(
    tmp_path: Path,
    polygons: geopandas.GeoDataFrame,
    monkeypatch: pytest.MonkeyPatch,
    suffix: str,
) -> None:
    _patch_writer(monkeypatch, suffix, _failing_writer())

    with pytest.raises(WriteError):
        write_vector(polygons, tmp_path / f"out{suffix}")

    assert _files(tmp_path) == []


def test_interrupt_cleans_up_and_propagates(
    tmp_path: Path, polygons: geopandas.GeoDataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.gpkg"
    write_vector(polygons, path)
    before = path.read_bytes()

    def interrupted(*args: Any, **kwargs: Any) -> None:
        Path(args[1]).write_bytes(b"partial")
        Path(f"{args[1]}-journal").write_bytes(b"journal")
        raise KeyboardInterrupt

    monkeypatch.setattr(pyogrio, "write_dataframe", interrupted)

    with pytest.raises(KeyboardInterrupt):
        write_vector(polygons, path, overwrite=True)

    assert path.read_bytes() == before
    assert _files(tmp_path) == [path.name]


def test_failed_rename_leaves_old_target(
    tmp_path: Path, polygons: geopandas.GeoDataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.parquet"
    write_vector(polygons, path)
    before = path.read_bytes()

    def no_replace(src: Any, dst: Any) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", no_replace)

    with pytest.raises(WriteError, match="permission"):
        write_vector(polygons.iloc[:1], path, overwrite=True)

    assert path.read_bytes() == before
    assert _files(tmp_path) == [path.name]


def test_target_appearing_during_write_is_not_clobbered(
    tmp_path: Path, polygons: geopandas.GeoDataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out.gpkg"
    real_write = pyogrio.write_dataframe

    def racing(*args: Any, **kwargs: Any) -> None:
        real_write(*args, **kwargs)
        path.write_bytes(b"someone else's")

    monkeypatch.setattr(pyogrio, "write_dataframe", racing)

    with pytest.raises(OutputExistsError):
        write_vector(polygons, path)

    assert path.read_bytes() == b"someone else's"
    assert _files(tmp_path) == [path.name]


# --- the atomic-write helper (sam_geo.io.atomic) and the other writers using it ----------


def test_atomic_path_publishes_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.gpkg"
    with atomic_path(target, suffix=".gpkg") as tmp:
        assert tmp.parent == tmp_path and not tmp.exists()
        assert tmp.name.startswith(".out.gpkg.") and tmp.name.endswith(".tmp.gpkg")
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_bytes() == b"new"
    assert _files(tmp_path) == ["out.gpkg"]


def test_atomic_path_failure_keeps_previous_and_removes_temp_and_sidecars(tmp_path: Path) -> None:
    target = tmp_path / "out.gpkg"
    target.write_bytes(b"old")
    with pytest.raises(WriteError, match="out.gpkg.*full.*unchanged") as info:
        with atomic_path(target, suffix=".gpkg") as tmp:
            tmp.write_bytes(b"partial")
            Path(f"{tmp}-journal").write_bytes(b"journal")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(info.value.__cause__, OSError) and info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old"
    assert _files(tmp_path) == ["out.gpkg"]


def test_atomic_path_other_errors_propagate_unchanged(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(ValueError, match="bad data"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise ValueError("bad data")
    with pytest.raises(OSError, match="HTTP Error 503") as info:
        with atomic_path(target, wrap_errors=False) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError("HTTP Error 503")
    assert not isinstance(info.value, WriteError)
    assert _files(tmp_path) == []


def test_atomic_path_without_overwrite_refuses_an_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    write_bytes_atomic(target, b"first", overwrite=False)
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_bytes_atomic(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first"
    write_bytes_atomic(target, b"third")
    assert target.read_bytes() == b"third"
    assert _files(tmp_path) == ["out.bin"]


def test_atomic_path_failed_rename_is_a_write_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def no_replace(src: Any, dst: Any) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(WriteError, match="permission"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert _files(tmp_path) == ["out.bin"]


def test_summary_json_and_work_dir_files_are_written_atomically(tmp_path: Path) -> None:
    summary = write_json_atomic({"n": np.int64(3), "name": "Straße"}, tmp_path / "summary.json")
    assert json.loads(summary.read_text(encoding="utf-8")) == {"n": 3, "name": "Straße"}
    work = WorkDir(tmp_path / "work", {"scene": "a.tif"})
    work.save("r0000c0000", {"polygons": [1, 2]})
    assert work.load("r0000c0000") == {"polygons": [1, 2]}
    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_failed_labels_raster_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from affine import Affine
    from rasterio.crs import CRS

    scene = SimpleNamespace(width=600, height=40, crs=CRS.from_string(UTM33N),
                            transform=Affine(1, 0, 500_000, 0, -1, 4_980_000))
    objects = geopandas.GeoDataFrame(
        {"object_id": [1, 2]}, geometry=[box(500_010, 4_979_970, 500_030, 4_979_990), box(500_520, 4_979_965, 500_590, 4_979_995)],
        crs=UTM33N,
    )
    target = tmp_path / "labels.tif"
    write_labels_raster(objects, scene, target)  # type: ignore[arg-type]
    before = target.read_bytes()

    def no_replace(src: Any, dst: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(WriteError, match="full"):
        write_labels_raster(objects.iloc[:1], scene, target, overwrite=True)  # type: ignore[arg-type]
    assert target.read_bytes() == before
    assert _files(tmp_path) == ["labels.tif"]
