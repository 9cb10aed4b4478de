"""The sam-geo command line: exit codes, messages without tracebacks, nothing half written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from conftest import BANEPA, make_raster
from sam_geo.cli import EXIT_BAD_INPUT, EXIT_OK, main


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 400 x 400 px Banepa crop and a GeoPackage of the OSM outlines inside it."""
    folder = tmp_path_factory.mktemp("cli")
    window = Window(1500, 2000, 400, 400)
    with rasterio.open(BANEPA / "banepa_utm45n.tif") as src:
        data = src.read(window=window)
        transform = src.window_transform(window)
        crs = src.crs
    scene = Path(make_raster(folder / "scene.tif", data, crs=crs.to_string(), transform=transform, nodata=0))
    truth = gpd.read_file(BANEPA / "buildings_utm45n.geojson")
    with rasterio.open(scene) as src:
        footprint = gpd.GeoSeries.from_wkt([f"POLYGON(({src.bounds.left} {src.bounds.bottom}, {src.bounds.right} "
                                            f"{src.bounds.bottom}, {src.bounds.right} {src.bounds.top}, "
                                            f"{src.bounds.left} {src.bounds.top}, {src.bounds.left} {src.bounds.bottom}))"],
                                           crs=crs)[0]
    inside = truth[truth.within(footprint)].copy()
    inside["名前"] = [f"建物 {i}" for i in range(len(inside))]
    prompts = folder / "prompts.gpkg"
    inside.to_crs(4326).to_file(prompts)
    return scene, prompts


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_help_and_models_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == EXIT_OK
    assert "segment" in capsys.readouterr().out
    assert main(["models"]) == EXIT_OK
    out = capsys.readouterr().out
    for name in ("mobile_sam", "vit_b", "vit_l", "vit_h"):
        assert name in out


def test_segment_writes_geojson_and_summary(small_scene, tmp_path: Path, capsys) -> None:
    scene, prompts = small_scene
    out, summary = tmp_path / "out.geojson", tmp_path / "summary.json"
    code, err = run_cli(
        ["segment", str(scene), "--prompts", str(prompts), "-o", str(out), "--summary", str(summary),
         "--workers", "0", "--id-column", "osm_id", "--no-progress"],
        capsys,
    )
    assert code == EXIT_OK, err
    assert "wrote" in err
    data = json.loads(out.read_text(encoding="utf-8"))
    assert "crs" not in data
    names = {f["properties"]["名前"] for f in data["features"]}
    assert all(name.startswith("建物") for name in names) and len(names) == len(data["features"]) > 3
    for feature in data["features"]:
        lon, lat = feature["geometry"]["coordinates"][0][0][0] if feature["geometry"]["type"] == "MultiPolygon" \
            else feature["geometry"]["coordinates"][0][0]
        assert 85 < lon < 86 and 27 < lat < 28  # Banepa, lon/lat order
    report = json.loads(summary.read_text())
    assert report["tiles"]["processed"] >= 1 and report["features"] == len(data["features"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["segment", "missing.tif", "--prompts", "{prompts}", "-o", "{tmp}/o.gpkg"], "missing.tif does not exist"),
        (["segment", "{scene}", "--prompts", "{tmp}/nope.shp", "-o", "{tmp}/o.gpkg"], "nope.shp does not exist"),
        (["segment", "{scene}", "--prompts", "{prompts}", "-o", "{tmp}/o.gpkg", "--model", "sam_xxl"], "mobile_sam"),
        (["segment", "{scene}", "--prompts", "{prompts}", "-o", "{tmp}/o.shp"], ".gpkg"),
        (["segment", "{scene}", "--prompts", "{prompts}", "-o", "{tmp}/no/dir/o.gpkg"], "does not exist"),
        (["segment", "{scene}", "--prompts", "{prompts}", "-o", "{tmp}/o.gpkg", "--tile-size", "256",
          "--overlap", "128"], "twice the overlap"),
        (["segment", "{scene}", "--prompts", "{prompts}", "-o", "{tmp}/o.gpkg", "--min-area", "-3"], "min area"),
        (["segment", "{scene}", "--prompts", "{prompts}", "-o", "{tmp}/o.gpkg", "--decoder-context", "20"],
         "decoder context"),
        (["segment", "{scene}", "--prompts", "{prompts}", "-o", "{tmp}/o.gpkg", "--weights", "{tmp}/bad.pt"],
         "sha256"),
        (["segment", "{scene}", "--prompts", "{prompts}", "-o", "{tmp}/o.gpkg", "--config", "{tmp}/typo.yaml"],
         "tile_szie"),
        (["segment", "{scene}", "--prompts", "{prompts}", "-o", "{tmp}/o.gpkg", "--config", "{tmp}/old.yaml"],
         "did you mean 'tile_size_px'"),
        (["segment", "{scene}", "--prompts", "{prompts}", "-o", "{tmp}/o.gpkg", "--tile-size", "10"],
         "tile size must be at least 64"),
        (["segment", "{scene}", "--prompts", "{prompts}", "--overwrite"], "-o/--output"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_output(small_scene, tmp_path: Path, capsys, args, expected) -> None:
    scene, prompts = small_scene
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "typo.yaml").write_text("segment:\n  tile_szie: 512\n")
    (tmp_path / "old.yaml").write_text("segment:\n  tile_size: 512\n")
    args = [a.format(scene=scene, prompts=prompts, tmp=tmp_path) for a in args]
    code, err = run_cli(args + ["--workers", "0"], capsys)
    assert code == EXIT_BAD_INPUT
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.gpkg").exists()


def test_existing_output_is_kept_without_overwrite(small_scene, tmp_path: Path, capsys) -> None:
    scene, prompts = small_scene
    out = tmp_path / "o.gpkg"
    out.write_bytes(b"old")
    code, err = run_cli(["segment", str(scene), "--prompts", str(prompts), "-o", str(out), "--workers", "0"], capsys)
    assert code == EXIT_BAD_INPUT and "--overwrite" in err
    assert out.read_bytes() == b"old"


def test_config_preset_sets_defaults_and_flags_win(small_scene, tmp_path: Path, capsys) -> None:
    scene, prompts = small_scene
    preset = tmp_path / "preset.yaml"
    preset.write_text("segment:\n  tile_size_px: 256\n  overlap_px: 32\n  min_area_m2: 1.0\n")
    out, summary = tmp_path / "o.parquet", tmp_path / "s.json"
    code, err = run_cli(
        ["segment", str(scene), "--prompts", str(prompts), "-o", str(out), "--config", str(preset),
         "--overlap", "16", "--workers", "0", "--summary", str(summary), "--no-progress"],
        capsys,
    )
    assert code == EXIT_OK, err
    settings = json.loads(summary.read_text())["settings"]
    assert (settings["tile_size_px"], settings["overlap_px"], settings["min_area_m2"]) == (256, 16, 1.0)
    assert len(gpd.read_parquet(out)) > 0


def test_console_script_reports_without_traceback(tmp_path: Path) -> None:
    """The installed `sam-geo` script maps errors to exit codes (a real subprocess)."""
    not_a_raster = tmp_path / "scene.tif"
    not_a_raster.write_text("hello")
    prompts = tmp_path / "p.geojson"
    gpd.GeoDataFrame(geometry=gpd.points_from_xy([0], [0]), crs=4326).to_file(prompts)
    script = Path(sys.executable).with_name("sam-geo")
    proc = subprocess.run(
        [str(script), "segment", str(not_a_raster), "--prompts", str(prompts), "-o", str(tmp_path / "o.gpkg")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == EXIT_BAD_INPUT
    assert str(not_a_raster) in proc.stderr and "Traceback" not in proc.stderr
    np.testing.assert_equal(list(tmp_path.glob("o.gpkg*")), [])


def test_segment_grouped_points_one_row_per_object(small_scene, tmp_path: Path, capsys) -> None:
    """Two positive points inside each of the three largest buildings and one negative
    point 3 m outside it: one output row per object, on its building, off the negative.
    (Points alone often give a roof part rather than the whole roof: boxes are the
    default for polygons for that reason.)"""
    import shapely

    scene, prompts = small_scene
    buildings = gpd.read_file(prompts).to_crs(32645)
    buildings = buildings.assign(area=buildings.area).nlargest(3, "area")
    others = buildings.union_all()
    rows = []
    for k, (_, building) in enumerate(buildings.iterrows()):
        inner = building.geometry.buffer(-1.0)
        rows += [(f"obj{k}", 1, inner.representative_point()),
                 (f"obj{k}", 1, shapely.Point(shapely.get_coordinates(inner.exterior)[0]).buffer(0.5).centroid)]
        ring = building.geometry.buffer(3.0).exterior
        outside = next(shapely.Point(xy) for xy in shapely.get_coordinates(ring.segmentize(1.0))
                       if not others.buffer(1.0).contains(shapely.Point(xy)))
        rows.append((f"obj{k}", 0, outside))
    layer = gpd.GeoDataFrame({"obj": [r[0] for r in rows], "label": [r[1] for r in rows]},
                             geometry=[r[2] for r in rows], crs=32645)
    path, out = tmp_path / "grouped.gpkg", tmp_path / "grouped_out.gpkg"
    layer.to_file(path)
    code, err = run_cli(["segment", str(scene), "--prompts", str(path), "--group-column", "obj", "--label-column",
                         "label", "-o", str(out), "--workers", "0", "--no-progress"], capsys)
    assert code == EXIT_OK, err
    result = gpd.read_file(out).to_crs(32645).set_index("obj")
    assert sorted(result.index) == ["obj0", "obj1", "obj2"]
    for k, (_, building) in enumerate(buildings.iterrows()):
        geom = result.loc[f"obj{k}", "geometry"]
        positives = layer[(layer.obj == f"obj{k}") & (layer.label == 1)].geometry
        negative = layer[(layer.obj == f"obj{k}") & (layer.label == 0)].geometry.iloc[0]
        assert geom.intersection(building.geometry).area / geom.area >= 0.7  # on its building (maybe a roof part)
        assert positives.within(geom.buffer(0.3)).all() and not geom.contains(negative)
