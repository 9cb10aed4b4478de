"""Bad input and hostile data (issue 6): clear errors, nothing lost, nothing written half.

Every case runs the real command line (``sam_geo.cli.main``, in-process: ``--workers 0
--no-progress``) on a tiny synthetic scene made here (300 x 300 px, four flat-coloured
rectangles on a noisy background, box prompts around them) and ends in one of two ways:

* exit 0 with a correct result: every geometry valid, non-empty, polygonal and inside
  the scene footprint, in the expected CRS, with the prompts' attributes
  (:func:`assert_good_output`), and the polygons on the rectangles they were asked for;
* a non-zero exit (2: bad input, 1: the run failed) with one paragraph on stderr that
  names the input and the problem, no traceback, and nothing left in the output folder:
  no output, no temporary file (:func:`assert_clean_failure`).

Speed: the model is built once for the module and each distinct tile image is encoded
once (:func:`_fast_model` memoizes both; reading, prompting, decoding, vectorizing and
writing run for real), so the many runs over the same pixels cost one encoder pass.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import sqlite3
import warnings
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from conftest import WEIGHTS, make_raster
from sam_geo.run import host as model_host
from sam_geo.io import scenes as raster
from sam_geo.io import stream
from sam_geo.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main

SIZE = 300
"""Side of the synthetic scene, pixels."""

UTM = "EPSG:32645"
TRANSFORM = Affine(1.0, 0.0, 500_000.0, 0.0, -1.0, 3_000_000.0)
"""1 m pixels, north-up, UTM 45N."""

RECTS: dict[str, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    # name: ((row0, col0, row1, col1) in pixels, RGB colour)
    "a": ((40, 40, 110, 120), (220, 40, 40)),
    "b": ((60, 170, 130, 250), (40, 200, 60)),
    "c": ((170, 50, 250, 130), (40, 60, 220)),
    "d": ((180, 180, 250, 250), (240, 240, 60)),
}

NODATA_COLS = 80
"""Columns 0..79 are nodata in the nodata cases: rectangles a and c are partly on them."""

MARGIN = 3
"""Prompt boxes are the rectangles grown by this many pixels."""


# --- the model, fast -------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _fast_model() -> Iterator[None]:
    """Build the model once and encode each distinct tile image once, for this module."""
    real = model_host.build_backend  # ModelHost builds its model through this name
    built: dict[tuple[Any, ...], Any] = {}

    def cached_backend(name: str, weights: Any, device: Any, *, multimask: bool = False) -> Any:
        key = (name, str(weights), str(device), multimask)
        if key not in built:
            backend = real(name, weights, device, multimask=multimask)
            backend.encode = _memoized(backend.encode)
            built[key] = backend
        return built[key]

    patch = pytest.MonkeyPatch()
    patch.setattr(model_host, "build_backend", cached_backend)
    yield
    patch.undo()


def _memoized(encode: Any) -> Any:
    cache: dict[tuple[Any, ...], Any] = {}

    def encode_once(rgb: np.ndarray) -> Any:
        key = (rgb.shape, hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest())
        if key not in cache:
            cache[key] = encode(rgb)
        return cache[key]

    return encode_once


# --- the synthetic scene and its prompts ----------------------------------------------


def scene_pixels(size: int = SIZE, rects: dict = RECTS, seed: int = 0) -> np.ndarray:
    """(3, size, size) uint8: noisy grey-brown background with flat-coloured rectangles."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(90, 150, size=(3, size, size)).astype(np.uint8)
    for (r0, c0, r1, c1), colour in rects.values():
        rgb[:, r0:r1, c0:c1] = np.asarray(colour, dtype=np.uint8)[:, None, None]
    return rgb


def pixel_polygon(transform: Affine, r0: float, c0: float, r1: float, c1: float) -> shapely.Polygon:
    """The pixel box (rows r0..r1, cols c0..c1) as a polygon in the CRS (exact for rotations)."""
    def to_crs(xy: np.ndarray) -> np.ndarray:
        x, y = transform * (xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(shapely.box(c0, r0, c1, r1), to_crs)


def rect_truth(name: str, transform: Affine = TRANSFORM, row_off: int = 0, col_off: int = 0) -> shapely.Polygon:
    (r0, c0, r1, c1), _ = RECTS[name]
    return pixel_polygon(transform, r0 + row_off, c0 + col_off, r1 + row_off, c1 + col_off)


def prompt_frame(
    transform: Affine = TRANSFORM, crs: Any = UTM, names: tuple[str, ...] = tuple(RECTS), row_off: int = 0,
    col_off: int = 0,
) -> gpd.GeoDataFrame:
    """Box prompts (rectangles grown by MARGIN px) with a name and a number, in ``crs``."""
    geoms = []
    for name in names:
        (r0, c0, r1, c1), _ = RECTS[name]
        geoms.append(pixel_polygon(transform, r0 + row_off - MARGIN, c0 + col_off - MARGIN,
                                   r1 + row_off + MARGIN, c1 + col_off + MARGIN))
    return gpd.GeoDataFrame({"name": list(names), "height_m": [3.5 + i for i in range(len(names))]},
                            geometry=geoms, crs=crs)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The shared scene (uint8 RGB, UTM) and its prompts (GeoPackage, same CRS)."""
    folder = tmp_path_factory.mktemp("hostile")
    scene = Path(make_raster(folder / "scene.tif", scene_pixels(), crs=UTM, transform=TRANSFORM))
    prompts = folder / "prompts.gpkg"
    prompt_frame().to_file(prompts)
    return SimpleNamespace(folder=folder, scene=scene, prompts=prompts)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An empty folder for outputs: whatever a failed run leaves in it is a bug."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# --- running and checking --------------------------------------------------------------


def run_segment(capsys: pytest.CaptureFixture[str], *args: Any, workers: int = 0) -> tuple[int, str]:
    """``sam-geo segment ARGS --workers N --no-progress``; returns (exit code, stderr)."""
    code = main(["segment", *map(str, args), "--workers", str(workers), "--no-progress"])
    return code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, expected_code: int, needles: tuple[str, ...], out_dir: Path,
                         keep: tuple[str, ...] = ()) -> None:
    """Exit ``expected_code``; one paragraph naming the problem; nothing new in ``out_dir``."""
    assert code == expected_code, err
    assert "Traceback" not in err and "unexpected error" not in err, err
    message = err.strip()
    if message.startswith("Usage:"):  # click's own usage errors: usage, hint, then "Error: ..."
        message = message.splitlines()[-1]
        assert message.startswith("Error:"), err
    else:
        assert message.startswith("sam-geo: error: "), err
        assert "\n" not in message, f"not one paragraph: {err!r}"
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(keep)


def assert_ok(code: int, err: str) -> None:
    assert code == EXIT_OK, err
    assert "Traceback" not in err and "wrote " in err, err


def read_output(path: Path) -> gpd.GeoDataFrame:
    if path.suffix == ".parquet":
        return gpd.read_parquet(path)
    return gpd.read_file(path)


def scene_footprint(scene: Path, assume_crs: str | None = None) -> tuple[shapely.Polygon, CRS, float]:
    """The scene's outline in its CRS, the CRS and the pixel size (read with rasterio)."""
    with rasterio.open(scene) as src:
        crs = src.crs or CRS.from_user_input(assume_crs)
        footprint = pixel_polygon(src.transform, 0, 0, src.height, src.width)
        pixel = float(np.hypot(src.transform.a, src.transform.d))
    return footprint, crs, pixel


def assert_good_output(path: Path, scene: Path, *, count: int | None = None,
                       assume_crs: str | None = None) -> gpd.GeoDataFrame:
    """Read an output back; check its CRS and that every geometry is valid, non-empty,
    polygonal and inside the scene footprint. Returns it in the scene's CRS."""
    assert path.exists(), path
    gdf = read_output(path)
    footprint, crs, pixel = scene_footprint(scene, assume_crs)
    if count is None:
        assert len(gdf) > 0
    else:
        assert len(gdf) == count
    expected_crs = CRS.from_epsg(4326) if path.suffix == ".geojson" else crs
    assert CRS.from_user_input(gdf.crs) == expected_crs
    geoms = gdf.geometry
    assert geoms.notna().all() and not geoms.is_empty.any()
    assert geoms.is_valid.all()
    assert set(geoms.geom_type) <= {"Polygon", "MultiPolygon"}
    assert not geoms.has_z.any()
    in_scene = gdf.to_crs(crs)
    tolerance = 0.02 * pixel  # GeoJSON keeps 7 decimals of a degree (about 1 cm)
    assert in_scene.geometry.within(footprint.buffer(tolerance)).all()
    assert {"prompt_index", "score", "area_m2"} <= set(gdf.columns)
    assert (in_scene["area_m2"] > 0).all() and (in_scene["score"] > 0).all()
    assert not [p.name for p in path.parent.iterdir() if ".tmp" in p.name]  # no temp file left
    return in_scene


def iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return float(a.intersection(b).area / a.union(b).area)


def assert_on_rects(gdf: gpd.GeoDataFrame, truths: dict[str, shapely.Geometry], min_iou: float = 0.8,
                    column: str = "name") -> None:
    """Each named polygon overlaps its rectangle (given in gdf's CRS) with IoU >= min_iou."""
    assert sorted(gdf[column]) == sorted(truths)
    for name, geom in zip(gdf[column], gdf.geometry):
        assert iou(geom, truths[name]) >= min_iou, (name, iou(geom, truths[name]))


def read_summary(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


# === 1. rasters =========================================================================


def test_scene_missing(base, out_dir, capsys) -> None:
    missing = base.folder / "no_such_scene.tif"
    code, err = run_segment(capsys, missing, "--prompts", base.prompts, "-o", out_dir / "o.gpkg")
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (str(missing), "does not exist"), out_dir)


def test_scene_not_a_raster(base, out_dir, tmp_path, capsys) -> None:
    fake = tmp_path / "scene.tif"
    fake.write_text("this is a text file, not a GeoTIFF\n")
    code, err = run_segment(capsys, fake, "--prompts", base.prompts, "-o", out_dir / "o.gpkg")
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (str(fake), "as a raster"), out_dir)


def _damaged_scene(folder: Path, how: str) -> Path:
    """The scene in 256 px deflate tiles with tile (1, 1) overwritten or cut off."""
    path = Path(make_raster(folder / f"{how}.tif", scene_pixels(), crs=UTM, transform=TRANSFORM, tiled=True))
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        size = int(src.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        if how == "corrupt":
            f.seek(offset)
            f.write(b"\xff" * size)
        else:
            f.truncate(offset + size // 3)
    return path


@pytest.mark.parametrize("how", ["corrupt", "truncated"])
def test_scene_with_a_damaged_block_fails_the_run_naming_file_and_tile(base, out_dir, tmp_path, capsys, how) -> None:
    """The header opens, a block read fails: the tile fails (after retries), exit 1, no output."""
    scene = _damaged_scene(tmp_path, how)
    summary = tmp_path / "summary.json"
    code, err = run_segment(capsys, scene, "--prompts", base.prompts, "-o", out_dir / "o.gpkg",
                            "--summary", summary)
    assert_clean_failure(code, err, EXIT_FAILED,
                         (str(scene), "1 of 1 tiles failed", "tile ", "r0000c0000", "no output was written"),
                         out_dir)
    report = read_summary(summary)  # the summary (asked for) explains the failure
    assert report["tiles"]["failed"] == 1 and report["failures"][0]["attempts"] == 3
    assert "corrupt or truncated" in report["failures"][0]["error"]


def test_scene_damaged_block_within_max_failed_tiles_writes_what_succeeded(base, out_dir, tmp_path, capsys) -> None:
    scene = _damaged_scene(tmp_path, "corrupt")
    output = out_dir / "o.gpkg"
    code, err = run_segment(capsys, scene, "--prompts", base.prompts, "-o", output, "--max-failed-tiles", "1",
                            "--retries", "0")
    assert_ok(code, err)
    assert "1 failed" in err and "r0000c0000 failed" in err
    assert len(read_output(output)) == 0  # the only tile failed: an empty, valid layer


def test_scene_without_crs_needs_assume_crs(out_dir, tmp_path, capsys) -> None:
    scene = Path(make_raster(tmp_path / "nocrs.tif", scene_pixels(), crs=None, transform=TRANSFORM))
    prompts = tmp_path / "prompts.gpkg"
    prompt_frame().to_file(prompts)
    output = out_dir / "o.gpkg"
    code, err = run_segment(capsys, scene, "--prompts", prompts, "-o", output)
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (str(scene), "no CRS", "--assume-crs"), out_dir)

    code, err = run_segment(capsys, scene, "--prompts", prompts, "-o", output, "--assume-crs", UTM)
    assert_ok(code, err)
    gdf = assert_good_output(output, scene, count=4, assume_crs=UTM)
    assert_on_rects(gdf, {n: rect_truth(n) for n in RECTS})


def test_rotated_scene_polygons_land_on_the_rotated_shapes(out_dir, tmp_path, capsys) -> None:
    transform = TRANSFORM * Affine.rotation(30.0) * Affine.shear(5.0, 0.0)
    scene = Path(make_raster(tmp_path / "rotated.tif", scene_pixels(), crs=UTM, transform=transform))
    prompts = tmp_path / "prompts.gpkg"
    prompt_frame(transform).to_file(prompts)
    output = out_dir / "o.gpkg"
    code, err = run_segment(capsys, scene, "--prompts", prompts, "-o", output)
    assert_ok(code, err)
    gdf = assert_good_output(output, scene, count=4)
    truths = {n: rect_truth(n, transform) for n in RECTS}
    assert_on_rects(gdf, truths)
    # the rotated rectangles are far from their own axis-aligned envelopes
    assert all(iou(t, t.envelope) < 0.6 for t in truths.values())


def test_geographic_scene_areas_are_square_metres(out_dir, tmp_path, capsys) -> None:
    transform = Affine(1e-5, 0.0, 85.5, 0.0, -1e-5, 27.65)  # about 1.0 x 1.1 m pixels
    scene = Path(make_raster(tmp_path / "wgs84.tif", scene_pixels(), crs="EPSG:4326", transform=transform))
    prompts = tmp_path / "prompts.geojson"
    prompt_frame(transform, crs="EPSG:4326").to_file(prompts)
    output = out_dir / "o.gpkg"
    code, err = run_segment(capsys, scene, "--prompts", prompts, "-o", output)
    assert_ok(code, err)
    gdf = assert_good_output(output, scene, count=4)
    assert_on_rects(gdf, {n: rect_truth(n, transform) for n in RECTS})
    equal_area = gdf.to_crs("+proj=laea +lat_0=27.65 +lon_0=85.5 +datum=WGS84 +units=m").area.to_numpy()
    np.testing.assert_allclose(gdf["area_m2"].to_numpy(), equal_area, rtol=2e-3)
    assert 4000 < gdf["area_m2"].min() and gdf["area_m2"].max() < 12000  # ~70 x 80 px of ~1.05 m^2


def _bands_scene(count: int) -> tuple[np.ndarray, list[ColorInterp] | None]:
    rgb = scene_pixels()
    rng = np.random.default_rng(1)
    if count == 1:
        return rgb[:1], None  # the red band alone: rectangles still stand out in grey
    if count == 2:  # grey + a second band (dual-pol SAR, grey + NIR ...): band 1 is used
        return np.concatenate([rgb[:1], rng.integers(0, 255, (1, SIZE, SIZE), dtype=np.uint8)]), None
    extra = rng.integers(0, 255, (count - 3, SIZE, SIZE), dtype=np.uint8)
    interp = None
    if count == 4:  # R, G, B, NIR: say so, or GDAL's default would make band 4 an alpha band
        interp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined]
    return np.concatenate([rgb, extra]), interp


@pytest.mark.parametrize("count", [1, 2, 3, 4, 13])
def test_band_counts(out_dir, tmp_path, capsys, count) -> None:
    data, interp = _bands_scene(count)
    scene = Path(make_raster(tmp_path / f"bands{count}.tif", data, crs=UTM, transform=TRANSFORM,
                             colorinterp=interp))
    output = out_dir / "o.parquet"
    summary = tmp_path / "s.json"
    base_prompts = tmp_path / "p.gpkg"
    prompt_frame().to_file(base_prompts)
    code, err = run_segment(capsys, scene, "--prompts", base_prompts, "-o", output, "--summary", summary)
    assert_ok(code, err)
    gdf = assert_good_output(output, scene, count=4)
    assert_on_rects(gdf, {n: rect_truth(n) for n in RECTS}, min_iou=0.75)
    assert read_summary(summary)["tiles"]["processed"] == 1


def _nodata_strip(kind: str, tmp_path: Path) -> Path:
    """The scene with columns 0..NODATA_COLS-1 nodata, declared as ``kind``.

    Under an internal mask or alpha band the pixels keep their values (the rectangles go
    on into the strip), so only honouring the mask keeps polygons out of it.
    """
    rgb = scene_pixels()
    valid = np.ones((SIZE, SIZE), dtype=bool)
    valid[:, :NODATA_COLS] = False
    path = tmp_path / f"{kind}.tif"
    if kind == "value":
        rgb[:, ~valid] = 0
        return Path(make_raster(path, rgb, crs=UTM, transform=TRANSFORM, nodata=0))
    if kind == "mask":
        return Path(make_raster(path, rgb, crs=UTM, transform=TRANSFORM, mask=valid))
    if kind == "alpha":
        alpha = np.where(valid, 255, 0).astype(np.uint8)[None]
        return Path(make_raster(path, np.concatenate([rgb, alpha]), crs=UTM, transform=TRANSFORM, alpha=True))
    if kind == "nan":  # float32 reflectance with NaN where there is no data
        data = rgb.astype(np.float32) / 255.0
        data[:, ~valid] = np.nan
        return Path(make_raster(path, data, crs=UTM, transform=TRANSFORM))
    raise AssertionError(kind)


def _assert_avoids_strip(gdf: gpd.GeoDataFrame) -> None:
    strip = pixel_polygon(TRANSFORM, 0, 0, SIZE, NODATA_COLS)
    data = pixel_polygon(TRANSFORM, 0, NODATA_COLS, SIZE, SIZE)
    truths = {n: rect_truth(n).intersection(data) for n in RECTS}
    assert_on_rects(gdf, truths, min_iou=0.75)
    for name in ("a", "c"):  # partly on nodata: the polygon stops at the data's edge
        geom = gdf.loc[gdf["name"] == name].geometry.iloc[0]
        assert geom.intersection(strip.buffer(-0.02)).is_empty, name  # GeoJSON rounds to ~1 cm


@pytest.mark.parametrize("kind", ["value", "mask", "alpha", "nan"])
def test_nodata_pixels_never_become_polygons(base, out_dir, tmp_path, capsys, kind) -> None:
    scene = _nodata_strip(kind, tmp_path)
    output = out_dir / "o.gpkg"
    code, err = run_segment(capsys, scene, "--prompts", base.prompts, "-o", output)
    assert_ok(code, err)
    _assert_avoids_strip(assert_good_output(output, scene, count=4))


@pytest.mark.parametrize(
    ("dtype", "convert"),
    [
        ("uint16", lambda v: v.astype(np.uint16) * 200 + 300),
        ("int16", lambda v: v.astype(np.int16) * 100 - 12_000),
        ("float32", None),  # float32 with NaN: see test_nodata_pixels_never_become_polygons[nan]
    ],
)
def test_data_types(base, out_dir, tmp_path, capsys, dtype, convert) -> None:
    """Integer types other than uint8 go through the scene-wide percentile stretch."""
    if convert is None:
        scene = _nodata_strip("nan", tmp_path)
    else:
        scene = Path(make_raster(tmp_path / f"{dtype}.tif", convert(scene_pixels()), crs=UTM, transform=TRANSFORM))
    with rasterio.open(scene) as src:
        assert src.dtypes[0] == dtype
    output = out_dir / "o.geojson"
    code, err = run_segment(capsys, scene, "--prompts", base.prompts, "-o", output)
    assert_ok(code, err)
    gdf = assert_good_output(output, scene, count=4)
    if convert is None:
        _assert_avoids_strip(gdf)
    else:
        assert_on_rects(gdf, {n: rect_truth(n) for n in RECTS}, min_iou=0.75)


def test_scene_entirely_nodata_gives_an_empty_layer_and_says_why(base, out_dir, tmp_path, capsys) -> None:
    """Decision: exit 0, an empty (valid) layer, every prompt listed as on nodata in the
    summary and on stderr, plus a warning line; no encoder pass is spent."""
    scene = Path(make_raster(tmp_path / "empty.tif", np.zeros((3, SIZE, SIZE), np.uint8), crs=UTM,
                             transform=TRANSFORM, nodata=0))
    output, summary = out_dir / "o.gpkg", tmp_path / "s.json"
    code, err = run_segment(capsys, scene, "--prompts", base.prompts, "-o", output, "--summary", summary,
                            "--id-column", "name")
    assert_ok(code, err)
    assert "4 prompts on nodata: a, b, c, d" in err
    assert "warning: no polygons" in err
    assert len(read_output(output)) == 0
    report = read_summary(summary)
    assert report["prompts"]["on_nodata_ids"] == ["a", "b", "c", "d"] and report["features"] == 0
    assert report["tiles"]["processed"] == 0 and report["tiles"]["skipped_nodata"] == 1


def test_scene_smaller_than_one_tile_with_a_prompt_over_its_edge(out_dir, tmp_path, capsys) -> None:
    """40 x 40 px, tiles of 512: one tile; the object runs off the scene's right edge and
    its prompt reaches 20 px beyond it: the polygon stops at the scene's edge."""
    rects = {"tiny": ((8, 16, 30, 40), (230, 50, 50))}
    scene = Path(make_raster(tmp_path / "tiny.tif", scene_pixels(40, rects), crs=UTM, transform=TRANSFORM))
    prompts = gpd.GeoDataFrame({"name": ["tiny"]}, geometry=[pixel_polygon(TRANSFORM, 6, 14, 32, 60)], crs=UTM)
    output, summary = out_dir / "o.gpkg", tmp_path / "s.json"
    code, err = run_segment(capsys, scene, "--prompts", _save(prompts, tmp_path / "p.gpkg"), "-o", output,
                            "--summary", summary, "--tile-size", "512", "--overlap", "64")
    assert_ok(code, err)
    gdf = assert_good_output(output, scene, count=1)  # inside the footprint
    assert iou(gdf.geometry.iloc[0], pixel_polygon(TRANSFORM, 8, 16, 30, 40)) >= 0.7
    assert read_summary(summary)["tiles"]["planned"] == 1


def _save(frame: gpd.GeoDataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_file(path)
    return path


def test_huge_sparse_scene_reads_only_around_its_prompts(out_dir, tmp_path, capsys, monkeypatch) -> None:
    """100,000 x 100,000 px (10^10 px, a few MB on disk): data in one 300 px patch only."""
    size, off = 100_000, 60_000
    path = tmp_path / "sparse.tif"
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=UTM, transform=TRANSFORM,
                   nodata=0, tiled=True, blockxsize=512, blockysize=512, compress="deflate", sparse_ok=True,
                   BIGTIFF="YES")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(scene_pixels(), window=Window(off, off, SIZE, SIZE))
    assert path.stat().st_size < 10_000_000
    prompts = prompt_frame(row_off=off, col_off=off)
    lonely = gpd.GeoDataFrame({"name": ["far"], "height_m": [1.0]},
                              geometry=[pixel_polygon(TRANSFORM, 5_000, 90_000, 5_060, 90_080)], crs=UTM)
    layer = _save(pd.concat([prompts, lonely], ignore_index=True), tmp_path / "p.gpkg")

    pixels_read: list[int] = []
    real_read = raster._read_bands

    def counting_read(ds, bands, window, shape, *args, **kwargs):  # type: ignore[no-untyped-def]
        pixels_read.append(int(window.width * window.height))
        return real_read(ds, bands, window, shape, *args, **kwargs)

    monkeypatch.setattr(raster, "_read_bands", counting_read)
    output, summary = out_dir / "o.gpkg", tmp_path / "s.json"
    code, err = run_segment(capsys, path, "--prompts", layer, "-o", output, "--summary", summary,
                            "--id-column", "name")
    assert_ok(code, err)
    gdf = assert_good_output(output, path, count=4)
    assert_on_rects(gdf, {n: rect_truth(n, row_off=off, col_off=off) for n in RECTS})
    report = read_summary(summary)
    assert report["tiles"]["planned"] == 2  # the patch's tile, and the lonely prompt's
    assert report["tiles"]["processed"] == 1 and report["tiles"]["skipped_nodata"] == 1
    assert report["prompts"]["on_nodata_ids"] == ["far"]
    assert sum(pixels_read) <= 2 * 1024 * 1024  # of 3 x 10^10: no stretch sample, one tile window


# === 2. prompt layers ====================================================================


@pytest.mark.parametrize("kind", ["missing", "garbage", "directory"])
def test_prompt_layer_missing_or_unreadable(base, out_dir, tmp_path, capsys, kind) -> None:
    layer = tmp_path / "prompts.geojson"
    if kind == "garbage":
        layer.write_bytes(b"\x00\x01 not json {{{")
    elif kind == "directory":
        layer = tmp_path / "folder.gpkg"
        layer.mkdir()
    code, err = run_segment(capsys, base.scene, "--prompts", layer, "-o", out_dir / "o.gpkg")
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (str(layer),), out_dir)


@pytest.mark.parametrize("suffix", [".shp", ".parquet"])  # a Shapefile without its .prj
def test_prompt_layer_without_crs_needs_prompts_crs(base, out_dir, tmp_path, capsys, suffix) -> None:
    # A CRS-less layer on purpose: pyogrio warns about it when writing a Shapefile.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
        layer = _save(prompt_frame().set_crs(None, allow_override=True), tmp_path / f"nocrs{suffix}")
    assert not layer.with_suffix(".prj").exists()
    output = out_dir / "o.gpkg"
    code, err = run_segment(capsys, base.scene, "--prompts", layer, "-o", output)
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (str(layer), "no CRS", "--prompts-crs"), out_dir)
    code, err = run_segment(capsys, base.scene, "--prompts", layer, "-o", output, "--prompts-crs", UTM)
    assert_ok(code, err)
    assert_on_rects(assert_good_output(output, base.scene, count=4), {n: rect_truth(n) for n in RECTS})


def test_prompt_layer_in_another_crs_is_reprojected(base, out_dir, tmp_path, capsys) -> None:
    layer = _save(prompt_frame().to_crs(4326), tmp_path / "p4326.geojson")
    output = out_dir / "o.gpkg"
    code, err = run_segment(capsys, base.scene, "--prompts", layer, "-o", output)
    assert_ok(code, err)
    assert_on_rects(assert_good_output(output, base.scene, count=4), {n: rect_truth(n) for n in RECTS})


def test_prompt_layer_empty(base, out_dir, tmp_path, capsys) -> None:
    layer = _save(prompt_frame().iloc[:0], tmp_path / "empty.gpkg")
    code, err = run_segment(capsys, base.scene, "--prompts", layer, "-o", out_dir / "o.gpkg")
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (str(layer), "no features"), out_dir)


@pytest.mark.parametrize("mistake", ["shifted", "wrong_crs_label"])
def test_all_prompts_outside_the_scene(base, out_dir, tmp_path, capsys, mistake) -> None:
    """Decision: exit 2, "none of the N prompts intersect the scene": almost always a CRS
    or extent mistake, so nothing is run and the message shows both extents."""
    frame = prompt_frame()
    if mistake == "shifted":
        frame = frame.set_geometry(frame.translate(xoff=50_000))
    else:  # lon/lat coordinates labelled as UTM
        frame = frame.to_crs(4326).set_crs(UTM, allow_override=True)
    layer = _save(frame, tmp_path / "outside.gpkg")
    code, err = run_segment(capsys, base.scene, "--prompts", layer, "-o", out_dir / "o.gpkg")
    assert_clean_failure(code, err, EXIT_BAD_INPUT,
                         ("none of the 4 prompts", str(layer), str(base.scene), "CRS"), out_dir)


def test_all_prompts_unusable(base, out_dir, tmp_path, capsys) -> None:
    frame = gpd.GeoDataFrame({"name": ["line", "empty"]},
                             geometry=[shapely.LineString([(500_010, 2_999_990), (500_100, 2_999_900)]),
                                       shapely.Polygon()], crs=UTM)
    layer = _save(frame, tmp_path / "lines.parquet")
    code, err = run_segment(capsys, base.scene, "--prompts", layer, "-o", out_dir / "o.gpkg")
    # the empty polygon lies nowhere, so it is not read from the file: one prompt, a line
    assert_clean_failure(code, err, EXIT_BAD_INPUT, ("none of the 1 prompts", str(layer), "usable"), out_dir)


def test_mixed_geometry_types(base, out_dir, tmp_path, capsys) -> None:
    """Polygon, point, line and MultiPolygon in one GeoJSON: the line is reported unusable."""
    (r0, c0, r1, c1), _ = RECTS["c"]
    mid = (c0 + c1) // 2
    halves = shapely.MultiPolygon([pixel_polygon(TRANSFORM, r0 - 3, c0 - 3, r1 + 3, mid - 1),
                                   pixel_polygon(TRANSFORM, r0 - 3, mid + 1, r1 + 3, c1 + 3)])
    frame = gpd.GeoDataFrame(
        {"name": ["a", "b", "line", "c"]},
        geometry=[prompt_frame().geometry[0], rect_truth("b").centroid,
                  shapely.LineString([(500_200, 2_999_850), (500_290, 2_999_750)]), halves],
        crs=UTM,
    ).to_crs(4326)
    layer = _save(frame, tmp_path / "mixed.geojson")
    output, summary = out_dir / "o.gpkg", tmp_path / "s.json"
    code, err = run_segment(capsys, base.scene, "--prompts", layer, "-o", output, "--summary", summary,
                            "--id-column", "name")
    assert_ok(code, err)
    assert "1 prompts with unusable geometry: line" in err
    gdf = assert_good_output(output, base.scene, count=3)
    assert_on_rects(gdf, {n: rect_truth(n) for n in ("a", "b", "c")}, min_iou=0.7)
    assert read_summary(summary)["prompts"]["invalid_ids"] == ["line"]


def test_invalid_geometries_are_repaired_or_reported(base, out_dir, tmp_path, capsys) -> None:
    """Bow-tie (self-intersecting), zero-area, empty and GeometryCollection prompts."""
    (r0, c0, r1, c1), _ = RECTS["a"]
    g = [TRANSFORM * (c, r) for c, r in ((c0 - 3, r0 - 3), (c1 + 3, r1 + 3), (c1 + 3, r0 - 3), (c0 - 3, r1 + 3))]
    bow_tie = shapely.Polygon(g)
    assert not bow_tie.is_valid  # test precondition
    x, y = TRANSFORM * (200, 200)
    zero_area = shapely.Polygon([(x, y), (x + 10, y), (x + 20, y), (x, y)])
    collection = shapely.GeometryCollection([prompt_frame().geometry[1], shapely.LineString([(x, y), (x + 5, y)])])
    lines_only = shapely.GeometryCollection([shapely.LineString([(x, y), (x + 5, y - 5)])])
    frame = gpd.GeoDataFrame(
        {"name": ["bow-tie", "zero-area", "empty", "collection", "lines-only"]},
        geometry=[bow_tie, zero_area, shapely.Polygon(), collection, lines_only], crs=UTM,
    )
    layer = _save(frame, tmp_path / "invalid.parquet")
    output, summary = out_dir / "o.gpkg", tmp_path / "s.json"
    code, err = run_segment(capsys, base.scene, "--prompts", layer, "-o", output, "--summary", summary,
                            "--id-column", "name")
    assert_ok(code, err)
    gdf = assert_good_output(output, base.scene, count=2)
    assert_on_rects(gdf, {"bow-tie": rect_truth("a"), "collection": rect_truth("b")})
    # an empty geometry lies nowhere, so a file layer read only near the scene never returns it
    assert read_summary(summary)["prompts"]["invalid_ids"] == ["zero-area", "lines-only"]
    assert "2 prompts with unusable geometry: zero-area, lines-only" in err


def test_multipolygons_duplicate_ids_and_3d_coordinates(base, out_dir, tmp_path, capsys) -> None:
    frame = prompt_frame()
    frame["name"] = ["dup", "dup", "c", "d"]
    geoms = list(frame.geometry)
    geoms[0] = shapely.force_3d(geoms[0], 1234.5)  # Polygon Z
    (r0, c0, r1, c1), _ = RECTS["c"]
    mid = (r0 + r1) // 2
    geoms[2] = shapely.force_3d(shapely.MultiPolygon([  # MultiPolygon Z: rectangle c in two bands
        pixel_polygon(TRANSFORM, r0 - 3, c0 - 3, mid - 1, c1 + 3), pixel_polygon(TRANSFORM, mid + 1, c0 - 3, r1 + 3,
                                                                                    c1 + 3)]), 10.0)
    frame = frame.set_geometry(geoms)
    assert frame.has_z.iloc[0] and frame.has_z.iloc[2]
    layer = _save(frame, tmp_path / "z.gpkg")
    output, summary = out_dir / "o.gpkg", tmp_path / "s.json"
    code, err = run_segment(capsys, base.scene, "--prompts", layer, "-o", output, "--summary", summary,
                            "--id-column", "name")
    assert_ok(code, err)
    gdf = assert_good_output(output, base.scene, count=4)
    assert list(gdf["name"]) == ["dup", "dup", "c", "d"]
    assert list(gdf["prompt_index"]) == [1, 2, 3, 4]  # the features' ids: GeoPackage fids start at 1
    for index, name in enumerate(RECTS):
        assert iou(gdf.geometry.iloc[index], rect_truth(name)) >= 0.8
    assert read_summary(summary)["prompts"]["used"] == 4


@pytest.mark.parametrize("suffix", [".geojson", ".gpkg", ".parquet"])
def test_non_ascii_attributes_survive_every_format(base, out_dir, tmp_path, capsys, suffix) -> None:
    frame = prompt_frame(names=("a", "b"))
    frame["名前"] = ["建物 Ä", "Straße 🏠"]
    frame["नाम"] = ["घर", "ñandú"]
    layer = _save(frame, tmp_path / "ébauche 建物.gpkg")
    scene = tmp_path / "scène aérienne 建物.tif"
    shutil.copy(base.scene, scene)
    output = out_dir / f"résultat 建物{suffix}"
    code, err = run_segment(capsys, scene, "--prompts", layer, "-o", output, "--id-column", "名前")
    assert_ok(code, err)
    assert str(output) in err
    gdf = assert_good_output(output, scene, count=2)
    assert list(gdf["名前"]) == ["建物 Ä", "Straße 🏠"] and list(gdf["नाम"]) == ["घर", "ñandú"]
    assert {"name", "height_m", "prompt_index", "score", "area_m2"} <= set(gdf.columns)


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet"])
def test_attribute_names_clashing_with_the_output_format(base, out_dir, tmp_path, capsys, suffix) -> None:
    """``Score`` beside sam-geo's ``score``, ``FID``/``fid`` and ``geom`` (GeoPackage's own
    columns, case-insensitive in SQLite) used to fail the write after the whole run."""
    frame = prompt_frame(names=("a", "b"))
    frame["Score"] = [5, 6]
    frame["FID"] = ["x-1", "x-1"]
    frame["geom"] = ["roof", "shed"]
    layer = _save(frame, tmp_path / "clash.geojson")
    output = out_dir / f"o{suffix}"
    code, err = run_segment(capsys, base.scene, "--prompts", layer, "-o", output)
    assert_ok(code, err)
    gdf = assert_good_output(output, base.scene, count=2)
    assert list(gdf["FID"]) == ["x-1", "x-1"] and list(gdf["geom"]) == ["roof", "shed"]
    assert list(gdf["Score" if suffix == ".parquet" else "Score_2"]) == [5, 6]
    assert (gdf["score"] > 0.5).all()  # sam-geo's own column keeps its name


def test_api_prompt_frame_with_mixed_type_column(base, out_dir) -> None:
    """A GeoDataFrame column holding numbers and text is written (as text) to GeoParquet."""
    import sam_geo

    frame = prompt_frame(names=("a", "b"))
    frame["code"] = [17, "B-2"]
    output = out_dir / "o.parquet"
    gdf = sam_geo.segment(base.scene, frame, output=output, workers=0, progress=False)
    assert len(gdf) == 2
    written = assert_good_output(output, base.scene, count=2)
    assert list(written["code"]) == ["17", "B-2"]


# === 3. outputs ==========================================================================


def test_existing_output_is_refused_and_left_byte_identical(base, out_dir, capsys) -> None:
    output = out_dir / "o.gpkg"
    output.write_bytes(b"previous results \x00\x01")
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", output)
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (str(output), "already exists", "--overwrite"), out_dir,
                         keep=("o.gpkg",))
    assert output.read_bytes() == b"previous results \x00\x01"


@pytest.mark.parametrize("which", ["prompts", "summary"])
def test_output_that_is_an_input_is_refused_even_with_overwrite(base, out_dir, tmp_path, capsys, which) -> None:
    """``-o prompts.gpkg --overwrite`` would replace the prompt layer with the results."""
    layer = shutil.copy(base.prompts, out_dir / "buildings.gpkg")
    before = Path(layer).read_bytes()
    output = Path(layer) if which == "prompts" else out_dir / "o.gpkg"
    summary = tmp_path / "s.json" if which == "prompts" else output
    code, err = run_segment(capsys, base.scene, "--prompts", layer, "-o", output, "--overwrite", "--summary",
                            summary)
    needle = "the prompt layer" if which == "prompts" else "the summary"
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (str(output), "same file as", needle), out_dir,
                         keep=("buildings.gpkg",))
    assert Path(layer).read_bytes() == before


def test_output_directory_missing(base, out_dir, capsys) -> None:
    output = out_dir / "not" / "there" / "o.gpkg"
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", output)
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (str(output.parent), "does not exist"), out_dir)


@pytest.mark.parametrize("name", ["o.shp", "o.csv", "o", "o.GEOJSON.txt"])
def test_unsupported_output_suffix_lists_supported_ones(base, out_dir, capsys, name) -> None:
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", out_dir / name)
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (name, ".geojson", ".gpkg", ".parquet"), out_dir)


@pytest.mark.parametrize("previous", [True, False])
@pytest.mark.parametrize("failure", ["disk full", "interrupted"])
def test_failed_write_keeps_the_previous_file_or_leaves_nothing(base, out_dir, capsys, monkeypatch, previous,
                                                                failure) -> None:
    output = out_dir / "o.gpkg"
    if previous:
        output.write_bytes(b"yesterday's polygons")
    real = stream.gpkg_chunk

    def dies_half_way(gdf, tmp, layer_name, *, append):  # type: ignore[no-untyped-def]
        real(gdf, tmp, layer_name, append=append)
        with open(tmp, "r+b") as handle:  # half the file is on disk ...
            handle.truncate(tmp.stat().st_size // 2)
        if failure == "disk full":  # ... when the disk fills up or the process is interrupted
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "gpkg_chunk", dies_half_way)
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", output, "--overwrite")
    keep = ("o.gpkg",) if previous else ()
    if failure == "disk full":
        assert_clean_failure(code, err, EXIT_FAILED, (str(output), "full", "unchanged"), out_dir, keep=keep)
    else:
        assert code == 130 and "interrupted" in err and "Traceback" not in err
        assert sorted(p.name for p in out_dir.iterdir()) == sorted(keep)
    if previous:
        assert output.read_bytes() == b"yesterday's polygons"


def test_every_output_kind_holds_the_rows_the_api_returns(base, out_dir) -> None:
    """Streamed outputs (GPKG, GeoJSON, GeoParquet file, GeoParquet dataset) hold the
    rows of the returned frame; return_frame=False returns the path and summary only."""
    from sam_geo import RunOutput, segment

    frame = segment(base.scene, base.prompts, workers=0, progress=False, output=out_dir / "a.gpkg")
    assert len(frame) == 4 and frame.prompt_index.is_monotonic_increasing
    for name in ("b.geojson", "c.parquet", "d/"):
        target = str(out_dir / name) + ("/" if name.endswith("/") else "")
        result = segment(base.scene, base.prompts, workers=0, progress=False, output=target, return_frame=False)
        assert isinstance(result, RunOutput) and result.summary["features"] == 4
        assert result.path == out_dir / name.rstrip("/") and result.summary["output"] == str(result.path)
        back = read_output(result.path) if not name.endswith("/") else gpd.read_parquet(result.path)
        back = back.to_crs(frame.crs).sort_values("prompt_index").reset_index(drop=True)
        assert back.prompt_index.tolist() == frame.prompt_index.tolist()
        assert np.allclose(back.score, frame.score) and np.allclose(back.area_m2, frame.area_m2)
        assert all(a.symmetric_difference(b).area < 1e-3 * b.area for a, b in zip(back.geometry, frame.geometry)), name
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.gpkg", "b.geojson", "c.parquet", "d"]


def test_cli_writes_a_partitioned_dataset_and_refuses_to_reuse_it(base, out_dir, capsys) -> None:
    target = out_dir / "parts.parquet"
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", target, "--partitioned")
    assert_ok(code, err)
    assert target.is_dir() and len(gpd.read_parquet(target)) == 4
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", target, "--partitioned")
    assert code == EXIT_BAD_INPUT and "--overwrite" in err
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", target, "--overwrite")
    assert_ok(code, err)
    assert len(list(target.glob("part-*.parquet"))) == 1 and len(gpd.read_parquet(target)) == 4
    import dask_geopandas

    lazy = dask_geopandas.read_parquet(target)
    assert lazy.crs == gpd.read_parquet(target).crs and len(lazy.compute()) == 4
    capsys.readouterr()
    assert main(["evaluate", str(target), str(base.prompts), "--json"]) == EXIT_OK  # a folder is a layer too
    folder_scores = json.loads(capsys.readouterr().out)
    single = out_dir.parent / "single.parquet"
    gpd.read_parquet(target).to_parquet(single)
    assert main(["evaluate", str(single), str(base.prompts), "--json"]) == EXIT_OK
    file_scores = json.loads(capsys.readouterr().out)
    assert folder_scores["f1"] == file_scores["f1"] > 0.5 and folder_scores["tp"] == 4


def test_geojson_output_is_rfc7946(base, out_dir, capsys) -> None:
    output = out_dir / "o.geojson"
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", output)
    assert_ok(code, err)
    assert_good_output(output, base.scene, count=4)
    doc = json.loads(output.read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection" and "crs" not in doc
    for feature in doc["features"]:
        geometry = feature["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        for rings in polygons:
            for k, ring in enumerate(rings):
                assert ring[0] == ring[-1]
                xy = np.asarray(ring)
                assert ((86.9 < xy[:, 0]) & (xy[:, 0] < 87.1)).all()  # longitude first
                assert ((27.0 < xy[:, 1]) & (xy[:, 1] < 27.2)).all()  # then latitude
                assert shapely.LinearRing(ring).is_ccw == (k == 0)  # CCW shells, CW holes
    exact = json.loads(output.read_text(encoding="utf-8"), parse_float=Decimal)  # numbers as written
    numbers = [n for feature in exact["features"] for n in _leaves(feature["geometry"]["coordinates"])]
    assert numbers and max(-n.as_tuple().exponent for n in numbers) <= 7  # at most 7 decimals


def _leaves(nested: Any) -> Iterator[Any]:
    for item in nested:
        if isinstance(item, list):
            yield from _leaves(item)
        else:
            yield item


def test_gpkg_output_reads_back_with_a_spatial_index(base, out_dir, tmp_path, capsys) -> None:
    output, summary = out_dir / "o.gpkg", tmp_path / "s.json"
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", output, "--summary", summary)
    assert_ok(code, err)
    gdf = assert_good_output(output, base.scene, count=read_summary(summary)["features"])
    assert list(gdf["name"]) == list("abcd")
    with sqlite3.connect(output) as db:
        (layer,) = db.execute("SELECT table_name FROM gpkg_contents").fetchone()
        extensions = db.execute("SELECT extension_name FROM gpkg_extensions WHERE table_name = ?", (layer,))
        assert "gpkg_rtree_index" in {row[0] for row in extensions}
        (indexed,) = db.execute(f'SELECT count(*) FROM "rtree_{layer}_geom"').fetchone()
    assert indexed == 4


# === 4. configuration and arguments ======================================================


def test_unknown_model_lists_the_known_ones(base, out_dir, capsys) -> None:
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", out_dir / "o.gpkg",
                            "--model", "sam_xxl")
    assert_clean_failure(code, err, EXIT_BAD_INPUT, ("sam_xxl", "mobile_sam", "vit_b", "vit_h", "--model"), out_dir)


def test_weights_of_another_model_name_the_model(base, out_dir, capsys) -> None:
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", out_dir / "o.gpkg",
                            "--model", "vit_b", "--weights", WEIGHTS)
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (str(WEIGHTS), "'vit_b'", "sha256"), out_dir)


def test_corrupt_weights_file(base, out_dir, tmp_path, capsys) -> None:
    broken = tmp_path / "mobile_sam.pt"
    with open(WEIGHTS, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read(1_000_000))  # a download cut short
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", out_dir / "o.gpkg",
                            "--weights", broken)
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (str(broken), "sha256", "'mobile_sam'"), out_dir)


def test_corrupt_cached_weights(base, out_dir, tmp_path, capsys, monkeypatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / WEIGHTS.name).write_bytes(b"<html>404 Not Found</html>")
    monkeypatch.setenv("SAM_GEO_WEIGHTS_DIR", str(cache))
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", out_dir / "o.gpkg")
    assert_clean_failure(code, err, EXIT_BAD_INPUT, (str(cache / WEIGHTS.name), "corrupt", "Delete"), out_dir)
    assert (cache / WEIGHTS.name).exists()  # never deleted behind the user's back


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--tile-size", "256", "--overlap", "128"], ("tile size (256 px)", "twice the overlap", "--overlap")),
        (["--tile-size", "10"], ("tile size", "at least 64", "10")),
        (["--tile-size", "1000000"], ("tile size", "8192")),
        (["--overlap", "-1"], ("overlap", "-1")),
        (["--min-area", "-1"], ("min area", "-1")),
        (["--min-area", "nan"], ("min area", "nan")),
        (["--simplify", "-1"], ("simplify", "-1")),
        (["--batch-size", "0"], ("batch size", "0")),
        (["--zoom", "3"], ("--zoom", "'3'")),
        (["--workers", "-1"], ("workers", "-1")),
        (["--retries", "-1"], ("--retries", "-1")),
        (["--max-failed-tiles", "-1"], ("--max-failed-tiles", "-1")),
        (["--bands", "5,3,2"], ("Band 5", "3 band(s)")),
        (["--device", "tpu"], ("device", "'tpu'")),
    ],
)
def test_absurd_arguments(base, out_dir, capsys, args, needles) -> None:
    workers = int(args[1]) if args[0] == "--workers" else 0
    rest = args if args[0] != "--workers" else []
    code, err = run_segment(capsys, base.scene, "--prompts", base.prompts, "-o", out_dir / "o.gpkg", *rest,
                            workers=workers)
    assert_clean_failure(code, err, EXIT_BAD_INPUT, needles, out_dir)


def test_invalid_assume_crs_for_a_scene_without_one(out_dir, tmp_path, capsys) -> None:
    scene = Path(make_raster(tmp_path / "nocrs.tif", scene_pixels(), crs=None, transform=TRANSFORM))
    prompts = _save(prompt_frame(), tmp_path / "p.gpkg")
    code, err = run_segment(capsys, scene, "--prompts", prompts, "-o", out_dir / "o.gpkg", "--assume-crs", "EPSG:0")
    assert_clean_failure(code, err, EXIT_BAD_INPUT, ("--assume-crs", "EPSG:0", str(scene)), out_dir)
