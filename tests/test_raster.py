"""sam_geo.io.scenes: opening scenes, the scene-wide stretch and window reads.

Every fixture is a tiny GeoTIFF written into ``tmp_path`` by ``conftest.make_raster``.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import make_raster
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioIOError
from rasterio.io import DatasetReader
from rasterio.windows import Window
from shapely.geometry import Polygon

from sam_geo.errors import ConfigError, CRSError, InputError, RasterError, RasterReadError
from sam_geo.io.scenes import (
    SceneInfo,
    Stretch,
    WindowRead,
    compute_stretch,
    open_scene,
    read_window,
)

CI = ColorInterp


def _rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def _read(path: str, window: Window | None = None, **kwargs) -> WindowRead:
    """Open, compute the stretch and read ``window`` (default: the whole scene)."""
    scene = open_scene(path, **{k: kwargs.pop(k) for k in ("bands", "assume_crs") if k in kwargs})
    stretch = kwargs.pop("stretch", None) or compute_stretch(scene)
    window = window or Window(0, 0, scene.width, scene.height)
    with rasterio.open(scene.path) as src:
        return read_window(src, scene, stretch, window, **kwargs)


@pytest.fixture
def read_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records the (rows, cols) of every data read done through DatasetReader.read."""
    calls: list[tuple[int, int]] = []
    original = DatasetReader.read

    def recording_read(self, indexes=None, *args, **kwargs):
        window = kwargs.get("window")
        if window is None:
            calls.append((self.height, self.width))
        else:
            calls.append((int(window.height), int(window.width)))
        return original(self, indexes, *args, **kwargs)

    monkeypatch.setattr(DatasetReader, "read", recording_read)
    return calls


# --- open_scene: metadata -----------------------------------------------------------


def test_open_scene_metadata(tmp_path: Path) -> None:
    path = make_raster(tmp_path / "a.tif", np.zeros((1, 20, 30), np.uint16), nodata=0)
    scene = open_scene(path)
    assert (scene.width, scene.height, scene.count, scene.dtype) == (30, 20, 1, "uint16")
    assert scene.crs.to_epsg() == 32645
    assert scene.transform == Affine(10, 0, 500_000, 0, -10, 3_000_000)
    assert scene.nodata == 0.0
    assert scene.has_mask
    assert scene.bounds == (500_000, 2_999_800, 500_300, 3_000_000)
    assert scene.res == (10.0, 10.0)
    assert not scene.is_geographic
    corners = [(500_000, 3e6), (500_300, 3e6), (500_300, 2_999_800), (500_000, 2_999_800)]
    assert scene.footprint.equals(Polygon(corners))


def test_local_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_raster(tmp_path / "a.tif", np.zeros((5, 5), np.uint8))
    monkeypatch.chdir(tmp_path)
    assert open_scene("a.tif").path == str(tmp_path / "a.tif")


def test_scene_info_is_picklable(tmp_path: Path) -> None:
    scene = open_scene(make_raster(tmp_path / "a.tif", np.zeros((3, 5, 5), np.uint8), nodata=0))
    clone = pickle.loads(pickle.dumps(scene))
    assert clone == scene
    assert clone.crs == scene.crs and clone.footprint.equals(scene.footprint)


def test_scene_info_validates_its_fields(tmp_path: Path) -> None:
    scene = open_scene(make_raster(tmp_path / "a.tif", np.zeros((3, 5, 5), np.uint8)))
    fields = {name: getattr(scene, name) for name in SceneInfo.__dataclass_fields__}
    assert SceneInfo(**{**fields, "bands": [2]}).bands == (2, 2, 2)
    with pytest.raises(CRSError):
        SceneInfo(**{**fields, "crs": None})
    with pytest.raises(ConfigError, match=r"1\.\.3"):
        SceneInfo(**{**fields, "bands": (1, 2, 4)})


def test_geographic_scene(tmp_path: Path) -> None:
    t = Affine(0.001, 0, 85.0, 0, -0.001, 28.0)
    path = make_raster(tmp_path / "g.tif", np.zeros((5, 5), np.uint8), crs="EPSG:4326", transform=t)
    scene = open_scene(path)
    assert scene.is_geographic
    assert scene.res == pytest.approx((0.001, 0.001))


def test_rotated_transform_footprint(tmp_path: Path) -> None:
    # 2 m pixels rotated by 30 degrees: x = sqrt3*col + row + 1000, y = col - sqrt3*row + 2000.
    s3 = math.sqrt(3.0)
    t = Affine(s3, 1.0, 1000.0, 1.0, -s3, 2000.0)
    scene = open_scene(make_raster(tmp_path / "rot.tif", np.zeros((20, 10), np.uint8), transform=t))
    assert scene.transform.almost_equals(t)
    by_hand = [
        (1000.0, 2000.0),  # (col 0, row 0)
        (1000.0 + 10 * s3, 2010.0),  # (col 10, row 0)
        (1020.0 + 10 * s3, 2010.0 - 20 * s3),  # (col 10, row 20)
        (1020.0, 2000.0 - 20 * s3),  # (col 0, row 20)
    ]
    assert scene.footprint.normalize().equals_exact(Polygon(by_hand).normalize(), 1e-6)
    assert scene.footprint.area == pytest.approx(10 * 20 * 4.0)
    assert scene.footprint.exterior.is_ccw
    xs, ys = zip(*by_hand)
    assert scene.bounds == pytest.approx((min(xs), min(ys), max(xs), max(ys)))
    assert scene.res == pytest.approx((2.0, 2.0))


# --- open_scene: errors -------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.tif"
    with pytest.raises(RasterError, match="does not exist") as info:
        open_scene(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError)


def test_not_a_raster(tmp_path: Path) -> None:
    path = tmp_path / "notes.tif"
    path.write_text("this is not a GeoTIFF\n")
    with pytest.raises(RasterError, match="not recognized") as info:
        open_scene(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, RasterioIOError)


def test_no_crs(tmp_path: Path) -> None:
    path = make_raster(tmp_path / "nocrs.tif", np.zeros((5, 5), np.uint8), crs=None)
    with pytest.raises(CRSError, match="--assume-crs EPSG:XXXX") as info:
        open_scene(path)
    assert path in str(info.value)


def test_no_crs_with_assume_crs(tmp_path: Path) -> None:
    path = make_raster(tmp_path / "nocrs.tif", np.zeros((5, 5), np.uint8), crs=None)
    scene = open_scene(path, assume_crs="EPSG:32644")
    assert scene.crs.to_epsg() == 32644


def test_assume_crs_does_not_override_file_crs(tmp_path: Path) -> None:
    path = make_raster(tmp_path / "a.tif", np.zeros((5, 5), np.uint8))
    assert open_scene(path, assume_crs="EPSG:4326").crs.to_epsg() == 32645


def test_invalid_assume_crs(tmp_path: Path) -> None:
    path = make_raster(tmp_path / "nocrs.tif", np.zeros((5, 5), np.uint8), crs=None)
    with pytest.raises(ConfigError, match="not a valid CRS"):
        open_scene(path, assume_crs="EPSG:not-a-code")


# --- open_scene: band selection -----------------------------------------------------


@pytest.mark.parametrize(
    ("count", "colorinterp", "alpha", "expected"),
    [
        (1, None, False, (1, 1, 1)),
        (2, None, False, (1, 1, 1)),
        (2, None, True, (1, 1, 1)),
        (2, [CI.alpha, CI.gray], False, (2, 2, 2)),
        (3, None, False, (1, 2, 3)),
        (3, [CI.blue, CI.green, CI.red], False, (3, 2, 1)),
        (3, [CI.gray, CI.undefined, CI.alpha], False, (1, 1, 1)),
        (4, [CI.red, CI.green, CI.blue, CI.alpha], False, (1, 2, 3)),  # RGBA
        (4, [CI.red, CI.green, CI.blue, CI.undefined], False, (1, 2, 3)),  # RGB + NIR
        (4, [CI.undefined, CI.red, CI.green, CI.blue], False, (2, 3, 4)),  # NIR + RGB
        (4, None, False, (1, 2, 3)),  # no colour interpretation
        (4, [CI.alpha, CI.gray, CI.undefined, CI.undefined], False, (2, 3, 4)),
        (13, None, False, (1, 2, 3)),  # Sentinel-2-like stack
    ],
)
def test_default_bands(
    tmp_path: Path, count: int, colorinterp, alpha: bool, expected: tuple[int, ...]
) -> None:
    data = np.zeros((count, 4, 4), np.uint8)
    path = make_raster(tmp_path / "b.tif", data, colorinterp=colorinterp, alpha=alpha)
    assert open_scene(path).bands == expected


def test_rgba_alpha_band_is_a_mask(tmp_path: Path) -> None:
    data = np.zeros((4, 4, 4), np.uint8)
    interp = [CI.red, CI.green, CI.blue, CI.gray]
    path = make_raster(tmp_path / "rgba.tif", data, colorinterp=interp, alpha=True)
    scene = open_scene(path)
    assert scene.bands == (1, 2, 3)
    assert scene.has_mask


@pytest.mark.parametrize(
    ("bands", "expected"), [((4, 3, 2), (4, 3, 2)), ([8], (8, 8, 8)), ((13, 1, 13), (13, 1, 13))]
)
def test_explicit_bands(tmp_path: Path, bands, expected) -> None:
    path = make_raster(tmp_path / "s2.tif", np.zeros((13, 4, 4), np.uint16))
    assert open_scene(path, bands=bands).bands == expected


@pytest.mark.parametrize(
    "bands", [(0, 1, 2), (14, 1, 1), (1, 2), (1, 2, 3, 4), (), (1.5, 2, 3), (True, 1, 1)]
)
def test_invalid_bands(tmp_path: Path, bands) -> None:
    path = make_raster(tmp_path / "s2.tif", np.zeros((13, 4, 4), np.uint16))
    with pytest.raises(ConfigError, match=r"1\.\.13") as info:
        open_scene(path, bands=bands)
    assert path in str(info.value)


def test_has_mask_false_without_nodata(tmp_path: Path) -> None:
    assert not open_scene(make_raster(tmp_path / "a.tif", np.zeros((3, 4, 4), np.uint8))).has_mask


def test_has_mask_internal_mask(tmp_path: Path) -> None:
    path = make_raster(tmp_path / "m.tif", np.zeros((4, 4), np.uint8), mask=np.ones((4, 4), bool))
    assert open_scene(path).has_mask


# --- Stretch ------------------------------------------------------------------------


def test_identity_stretch_is_exact_for_uint8() -> None:
    data = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(3, axis=0)
    out = Stretch.identity().apply(data)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, data)
    assert out is not data


def test_stretch_apply_maps_clips_and_zeroes_nan() -> None:
    stretch = Stretch(low=(0, 100, -1), high=(10, 200, 1))
    data = np.array(
        [
            [[-5.0, 0.0, 5.0, 10.0, 50.0, np.nan]],
            [[100.0, 150.0, 200.0, 0.0, 1e9, np.inf]],
            [[-1.0, 0.0, 1.0, -np.inf, 0.5, np.nan]],
        ],
        dtype=np.float32,
    )
    out = stretch.apply(data)
    np.testing.assert_array_equal(out[0, 0], [0, 0, 128, 255, 255, 0])
    np.testing.assert_array_equal(out[1, 0], [0, 128, 255, 0, 255, 255])
    np.testing.assert_array_equal(out[2, 0], [0, 128, 255, 0, 191, 0])


def test_stretch_rejects_bad_shapes_and_values() -> None:
    with pytest.raises(ValueError, match=r"\(3, rows, cols\)"):
        Stretch.identity().apply(np.zeros((4, 4), np.uint8))
    with pytest.raises(ConfigError):
        Stretch(low=(0, 0, 0), high=(1, 0, 1))
    with pytest.raises(ConfigError):
        Stretch(low=(0, 0), high=(1, 1))
    with pytest.raises(ConfigError):
        Stretch(low=(0, 0, math.nan), high=(1, 1, 1))


_FLOAT32_OR_NAN = st.floats(-1e6, 1e6, width=32) | st.just(np.nan)


@settings(max_examples=50, deadline=None)
@given(
    data=hnp.arrays(np.float32, (3, 4, 5), elements=_FLOAT32_OR_NAN),
    low=st.floats(-1e5, 1e5),
    span=st.floats(1e-2, 1e5),
)
def test_stretch_apply_is_bounded_and_monotone(data: np.ndarray, low: float, span: float) -> None:
    stretch = Stretch(low=(low,) * 3, high=(low + span,) * 3)
    out = stretch.apply(data)
    assert out.dtype == np.uint8 and out.shape == data.shape
    flat, res = data.ravel(), out.ravel()
    finite = np.isfinite(flat)
    assert (res[~finite & np.isnan(flat)] == 0).all()
    order = np.argsort(flat[finite], kind="stable")
    assert (np.diff(res[finite][order].astype(int)) >= 0).all()


def test_stretch_is_picklable() -> None:
    stretch = Stretch(low=(1, 2, 3), high=(4, 5, 6))
    assert pickle.loads(pickle.dumps(stretch)) == stretch


# --- compute_stretch ----------------------------------------------------------------


def test_auto_stretch_is_identity_for_uint8(tmp_path: Path) -> None:
    scene = open_scene(make_raster(tmp_path / "a.tif", np.full((3, 8, 8), 7, np.uint8)))
    assert compute_stretch(scene) == Stretch.identity()
    assert compute_stretch(scene, method="none") == Stretch.identity()
    flat = compute_stretch(scene, method="percentile", percentiles=(0, 100))
    assert flat == Stretch((7, 7, 7), (8, 8, 8))


def test_percentile_stretch_uint16(tmp_path: Path) -> None:
    ramp = np.arange(10_000).reshape(100, 100)
    data = np.stack([ramp + k * 1000 for k in range(3)]).astype(np.uint16)
    scene = open_scene(make_raster(tmp_path / "a.tif", data))
    full = compute_stretch(scene, percentiles=(0, 100))
    assert full.low == (0, 1000, 2000) and full.high == (9999, 10999, 11999)
    one_99 = compute_stretch(scene)
    assert one_99.low == pytest.approx([99.99 + k * 1000 for k in range(3)])
    assert one_99.high == pytest.approx([9899.01 + k * 1000 for k in range(3)])


def test_stretch_follows_selected_bands(tmp_path: Path) -> None:
    data = np.stack([np.full((10, 10), 10 * k) + np.eye(10) for k in range(1, 6)]).astype(np.uint16)
    scene = open_scene(make_raster(tmp_path / "a.tif", data), bands=(5, 1, 5))
    stretch = compute_stretch(scene, percentiles=(0, 100))
    assert stretch.low == (50, 10, 50) and stretch.high == (51, 11, 51)


def _with_extremes(kind: str, tmp_path: Path) -> str:
    """A uint16 scene with values 100..199 where valid and 60000 under nodata/mask/alpha."""
    rows = np.arange(100, 200, dtype=np.uint16).reshape(10, 10)
    data = np.stack([rows, rows, rows])
    invalid = np.zeros((10, 10), bool)
    invalid[:3] = True
    if kind == "nodata":
        data[:, invalid] = 60_000
        return make_raster(tmp_path / "n.tif", data, nodata=60_000)
    data[:, invalid] = 60_000  # would dominate the stretch if used
    if kind == "mask":
        return make_raster(tmp_path / "m.tif", data, mask=~invalid)
    alpha = np.where(invalid, 0, 65535).astype(np.uint16)
    return make_raster(tmp_path / "a.tif", np.concatenate([data, alpha[None]]), alpha=True)


@pytest.mark.parametrize("kind", ["nodata", "mask", "alpha"])
def test_stretch_uses_only_valid_pixels(tmp_path: Path, kind: str) -> None:
    scene = open_scene(_with_extremes(kind, tmp_path))
    assert scene.has_mask and scene.bands == (1, 2, 3)
    stretch = compute_stretch(scene, percentiles=(0, 100))
    assert stretch.low == (130, 130, 130)
    assert stretch.high == (199, 199, 199)


@pytest.mark.parametrize("kind", ["nodata", "mask", "alpha"])
def test_read_window_masks_invalid_pixels(tmp_path: Path, kind: str) -> None:
    read = _read(_with_extremes(kind, tmp_path))
    assert not read.valid[:3].any() and read.valid[3:].all()
    assert (read.rgb[:3] == 0).all()
    assert read.rgb[3, 0].tolist() == [0, 0, 0] and read.rgb[9, 9].tolist() == [255, 255, 255]


def test_band_specific_nodata_value_is_excluded(tmp_path: Path) -> None:
    # GDAL's dataset mask keeps a pixel valid unless *all* bands are nodata; a single
    # band at its nodata value must still not reach the stretch nor the model.
    data = np.stack([np.arange(100, 200).reshape(10, 10)] * 3).astype(np.uint16)
    data[0, 0, 0] = 65535
    scene = open_scene(make_raster(tmp_path / "n.tif", data, nodata=65535))
    stretch = compute_stretch(scene, percentiles=(0, 100))
    assert stretch.low == (101, 100, 100) and stretch.high == (199, 199, 199)
    read = _read(scene.path)
    assert read.valid[0, 0] and read.rgb[0, 0].tolist() == [0, 0, 0]


def test_int16_with_negative_values(tmp_path: Path) -> None:
    data = np.stack([np.arange(-50, 50).reshape(10, 10)] * 3).astype(np.int16)
    data[:, 0, 0] = -32768
    scene = open_scene(make_raster(tmp_path / "i.tif", data, nodata=-32768))
    stretch = compute_stretch(scene, percentiles=(0, 100))
    assert stretch.low == (-49, -49, -49) and stretch.high == (49, 49, 49)
    read = _read(scene.path, stretch=stretch)
    assert not read.valid[0, 0] and read.valid.sum() == 99
    assert read.rgb[0, 1].tolist() == [0, 0, 0] and read.rgb[9, 9].tolist() == [255, 255, 255]


def test_float32_nan_is_nodata(tmp_path: Path) -> None:
    data = np.linspace(0.0, 1.0, 100, dtype=np.float32).reshape(1, 10, 10)
    data[0, :2] = np.nan
    data[0, 2, 0] = np.inf
    path = make_raster(tmp_path / "f.tif", data)  # NaN/inf with no declared nodata
    scene = open_scene(path)
    assert scene.bands == (1, 1, 1) and not scene.has_mask
    stretch = compute_stretch(scene, percentiles=(0, 100))
    assert stretch.low == pytest.approx((data[0, 2, 1],) * 3)
    assert stretch.high == pytest.approx((1.0,) * 3)
    read = _read(path, stretch=stretch)
    assert not read.valid[:2].any() and not read.valid[2, 0] and read.valid[2, 1:].all()
    assert (read.rgb[:2] == 0).all() and (read.rgb[2, 0] == 0).all()
    assert read.rgb[9, 9].tolist() == [255, 255, 255]


def test_float_nodata_value_declared_as_nan(tmp_path: Path) -> None:
    data = np.full((1, 6, 6), 2.0, np.float32)
    data[0, 0] = np.nan
    data[0, 1] = 4.0
    scene = open_scene(make_raster(tmp_path / "f.tif", data, nodata=math.nan))
    assert scene.has_mask and math.isnan(scene.nodata)
    assert compute_stretch(scene, percentiles=(0, 100)) == Stretch((2, 2, 2), (4, 4, 4))


@pytest.mark.parametrize(
    ("dtype", "nodata", "low", "high"),
    [("uint16", 0, 0, 65535), ("int16", -1, -32768, 32767), ("float32", -9999, 0, 1)],
)
def test_entirely_nodata_scene(
    tmp_path: Path, dtype: str, nodata: float, low: float, high: float
) -> None:
    path = make_raster(tmp_path / "empty.tif", np.full((3, 16, 16), nodata, dtype), nodata=nodata)
    scene = open_scene(path)
    stretch = compute_stretch(scene)
    assert stretch == Stretch((low,) * 3, (high,) * 3)
    read = _read(path, stretch=stretch)
    assert not read.valid.any()
    assert not read.rgb.any()


def test_entirely_masked_uint8_scene(tmp_path: Path) -> None:
    data = np.full((3, 8, 8), 9, np.uint8)
    path = make_raster(tmp_path / "m.tif", data, mask=np.zeros((8, 8), bool))
    scene = open_scene(path)
    assert compute_stretch(scene, method="percentile") == Stretch((0, 0, 0), (255, 255, 255))
    read = _read(path)
    assert not read.valid.any() and not read.rgb.any()


def test_constant_scene_widens_flat_stretch(tmp_path: Path) -> None:
    scene = open_scene(make_raster(tmp_path / "c.tif", np.full((1, 8, 8), 500, np.uint16)))
    assert compute_stretch(scene) == Stretch((500, 500, 500), (501, 501, 501))


def test_stretch_arguments_are_validated(tmp_path: Path) -> None:
    scene = open_scene(make_raster(tmp_path / "a.tif", np.zeros((1, 4, 4), np.uint16)))
    with pytest.raises(ConfigError, match="auto, none, percentile"):
        compute_stretch(scene, method="minmax")
    for bad in [(99, 1), (-1, 50), (0, 101), (5,)]:
        with pytest.raises(ConfigError, match="percentiles"):
            compute_stretch(scene, percentiles=bad)
    with pytest.raises(ConfigError, match="max_samples"):
        compute_stretch(scene, max_samples=0)


def test_stretch_reads_overview(tmp_path: Path) -> None:
    # Overviews built from values 100..199; afterwards full resolution is overwritten with
    # 5000..5099. Only a stretch computed from an overview can see 100..199.
    size = 2048
    ramp = (100 + np.arange(size * size) % 100).reshape(1, size, size).astype(np.uint16)
    path = make_raster(tmp_path / "ovr.tif", ramp, tiled=True, overviews=[2, 4, 8])
    with rasterio.open(path, "r+") as dst:
        dst.write(ramp + 4900)
    scene = open_scene(path)
    stretch = compute_stretch(scene, percentiles=(0, 100))
    assert 100 <= stretch.low[0] < stretch.high[0] <= 199


def test_stretch_does_not_read_too_small_overviews(tmp_path: Path, read_log: list) -> None:
    # 512 x 512 = 262144 px <= max_samples: overviews (all < 256k px) are not used and
    # full resolution is read whole (in chunks).
    data = np.arange(512 * 512).reshape(1, 512, 512).astype(np.uint32) % 1000
    path = make_raster(tmp_path / "o.tif", data.astype(np.uint16), tiled=True, overviews=True)
    stretch = compute_stretch(open_scene(path), percentiles=(0, 100))
    assert stretch == Stretch((0, 0, 0), (999, 999, 999))
    assert sum(r * c for r, c in read_log) == 512 * 512


def test_stretch_samples_windows_without_overviews(tmp_path: Path, read_log: list) -> None:
    data = np.broadcast_to(np.arange(1500, dtype=np.uint16) % 700, (1, 1200, 1500))
    path = make_raster(tmp_path / "w.tif", np.ascontiguousarray(data), tiled=True)
    stretch = compute_stretch(open_scene(path), percentiles=(0, 100), max_samples=200_000)
    assert len(read_log) == 12 and all(shape == (128, 128) for shape in read_log)
    assert stretch.low[0] < 200 and stretch.high[0] > 600  # grid windows spread over the scene


def test_stretch_is_scene_wide(tmp_path: Path) -> None:
    # Left half dark, right half bright: the stretch is the same whichever window is read
    # later, so overlapping tiles get identical pixels.
    data = np.zeros((3, 64, 64), np.uint16)
    data[:, :, :32] = np.arange(32 * 32).reshape(32, 32).repeat(2, axis=0) % 100
    data[:, :, 32:] = 5000 + np.arange(32 * 32).reshape(32, 32).repeat(2, axis=0) % 1000
    scene = open_scene(make_raster(tmp_path / "s.tif", data))
    stretch = compute_stretch(scene)
    assert compute_stretch(scene) == stretch
    with rasterio.open(scene.path) as src:
        left = read_window(src, scene, stretch, Window(0, 0, 40, 64))
        right = read_window(src, scene, stretch, Window(24, 0, 40, 64))
    np.testing.assert_array_equal(left.rgb[:, 24:], right.rgb[:, :16])
    assert left.rgb[:, :32].max() < 30  # dark half stays dark: not stretched per window


# --- read_window --------------------------------------------------------------------


def test_read_window_shapes_and_types(tmp_path: Path) -> None:
    data = _rng().integers(0, 256, (3, 40, 50), dtype=np.uint8)
    path = make_raster(tmp_path / "rgb.tif", data)
    read = _read(path, Window(10, 5, 30, 20))
    assert read.rgb.shape == (20, 30, 3) and read.rgb.dtype == np.uint8
    assert read.bands.flags.c_contiguous and read.bands.shape == (3, 20, 30)
    assert read.valid.shape == (20, 30) and read.valid.dtype == bool and read.valid.all()
    np.testing.assert_array_equal(read.rgb, data[:, 5:25, 10:40].transpose(1, 2, 0))


def test_read_window_replicates_single_band(tmp_path: Path) -> None:
    data = _rng().integers(0, 256, (1, 16, 16), dtype=np.uint8)
    read = _read(make_raster(tmp_path / "g.tif", data))
    for channel in range(3):
        np.testing.assert_array_equal(read.rgb[..., channel], data[0])


def test_read_window_band_order(tmp_path: Path) -> None:
    data = np.stack([np.full((4, 4), v, np.uint8) for v in (10, 20, 30, 40)])
    read = _read(make_raster(tmp_path / "b.tif", data), bands=(4, 2, 1))
    assert read.rgb[0, 0].tolist() == [40, 20, 10]


def test_read_window_uint16_uses_stretch(tmp_path: Path) -> None:
    data = np.stack([np.arange(0, 1000, 10).reshape(10, 10)] * 3).astype(np.uint16)
    path = make_raster(tmp_path / "u.tif", data)
    read = _read(path, stretch=Stretch((0, 0, 0), (990, 990, 990)))
    assert read.rgb[0, 0].tolist() == [0, 0, 0] and read.rgb[9, 9].tolist() == [255, 255, 255]
    assert read.rgb[5, 0, 0] == round(500 / 990 * 255)


@pytest.mark.parametrize(
    "window",
    [
        Window(-1, 0, 5, 5),
        Window(0, 0, 11, 5),
        Window(6, 6, 5, 5),
        Window(0, 0, 0, 5),
        Window(0.5, 0, 5, 5),
    ],
)
def test_read_window_outside_scene(tmp_path: Path, window: Window) -> None:
    path = make_raster(tmp_path / "a.tif", np.zeros((10, 10), np.uint8))
    with pytest.raises(ConfigError, match="10 rows x 10 cols") as info:
        _read(path, window)
    assert path in str(info.value)


def test_read_window_bad_out_shape_and_mismatched_src(tmp_path: Path) -> None:
    path = make_raster(tmp_path / "a.tif", np.zeros((10, 10), np.uint8))
    other = make_raster(tmp_path / "b.tif", np.zeros((12, 10), np.uint8))
    scene = open_scene(path)
    with rasterio.open(path) as src, pytest.raises(ConfigError, match="out_shape"):
        read_window(src, scene, Stretch.identity(), Window(0, 0, 10, 10), out_shape=(0, 5))
    with rasterio.open(other) as src, pytest.raises(ConfigError, match="does not match"):
        read_window(src, scene, Stretch.identity(), Window(0, 0, 10, 10))


def test_downsampled_read_nodata(tmp_path: Path) -> None:
    # Cols 0-2 are nodata (0), col 3 is 100, cols 4-7 are 20.
    data = np.full((1, 8, 8), 20, np.uint8)
    data[0, :, :3] = 0
    data[0, :, 3] = 100
    read = _read(make_raster(tmp_path / "n.tif", data, nodata=0), out_shape=(2, 2))
    assert read.valid.all()  # every output pixel has at least one valid source pixel
    np.testing.assert_array_equal(read.rgb[..., 0], [[100, 20], [100, 20]])  # mean of valid only


def test_downsampled_read_internal_mask(tmp_path: Path) -> None:
    data = np.full((1, 8, 8), 20, np.uint8)
    data[0, :, :3] = 250  # masked out: must not leak into averages
    mask = np.ones((8, 8), bool)
    mask[:, :3] = False
    read = _read(make_raster(tmp_path / "m.tif", data, mask=mask), out_shape=(4, 4))
    np.testing.assert_array_equal(read.valid, np.tile([False, True, True, True], (4, 1)))
    np.testing.assert_array_equal(read.rgb[..., 0], np.tile([0, 20, 20, 20], (4, 1)))


def test_downsampled_read_float_nan(tmp_path: Path) -> None:
    data = np.ones((1, 4, 4), np.float32)
    data[0, :2, :2] = np.nan
    data[0, 2:, 2:] = np.nan
    data[0, 0, 2] = np.nan
    path = make_raster(tmp_path / "f.tif", data)
    read = _read(path, out_shape=(2, 2), stretch=Stretch((0,) * 3, (1,) * 3))
    # All-NaN footprints are invalid, NaN-free ones valid; a partly-NaN footprint is either
    # invalid (GDAL propagates NaN) or valid with the mean of its finite pixels.
    assert not read.valid[0, 0] and not read.valid[1, 1] and read.valid[1, 0]
    assert (read.rgb[read.valid] == 255).all() and (read.rgb[~read.valid] == 0).all()


# --- corrupt files ------------------------------------------------------------------


def _tiled_random(path: Path, size: int = 512) -> str:
    data = _rng().integers(0, 256, (1, size, size), dtype=np.uint8)  # incompressible tiles
    return make_raster(path, data, tiled=True)


def _tile_bytes(path: str, col: int, row: int) -> tuple[int, int]:
    """Byte offset and size of tile (col, row) of band 1, as GDAL reports them."""
    with rasterio.open(path) as src:
        offset = src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1)
        size = src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1)
    return int(offset), int(size)


def _overwritten(tmp_path: Path, size: int = 512) -> str:
    """Tile (1, 1) (rows and cols 256..511) overwritten with 0xFF: not a deflate stream."""
    path = _tiled_random(tmp_path / "garbage.tif", size)
    offset, size = _tile_bytes(path, 1, 1)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)
    return path


def _truncated(tmp_path: Path) -> str:
    """File cut at 60 % of its size; GDAL writes the tile index first, so it still opens."""
    path = _tiled_random(tmp_path / "truncated.tif")
    offset, _ = _tile_bytes(path, 1, 1)
    size = os.path.getsize(path)
    assert _tile_bytes(path, 0, 0)[0] < int(0.6 * size) <= offset  # tile (0, 0) intact, (1, 1) gone
    with open(path, "r+b") as f:
        f.truncate(int(0.6 * size))
    return path


@pytest.mark.parametrize("damage", [_overwritten, _truncated])
def test_corrupt_block_raises_read_error(tmp_path: Path, damage) -> None:
    path = damage(tmp_path)
    scene = open_scene(path)  # header and tile index are intact
    with rasterio.open(path) as src:
        good = read_window(src, scene, Stretch.identity(), Window(0, 0, 256, 256))
        assert good.valid.all()
        with pytest.raises(RasterReadError) as info:
            read_window(src, scene, Stretch.identity(), Window(300, 260, 100, 50))
    message = str(info.value)
    assert path in message
    assert "row_off=260, col_off=300, height=50, width=100 px" in message
    assert "TIFFReadEncodedTile" in message or "Read" in message  # GDAL's reason
    assert isinstance(info.value.__cause__, RasterioIOError)
    assert isinstance(info.value, OSError)


def test_stretch_skips_unreadable_parts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _overwritten(tmp_path, size=768)  # read whole in 4 chunks; chunk (0, 0) is damaged
    scene = open_scene(path)
    with caplog.at_level(logging.WARNING, logger="sam_geo.io.scenes"):
        stretch = compute_stretch(scene, method="percentile", percentiles=(0, 100))
    assert stretch.low[0] <= 1 and stretch.high[0] >= 254
    assert "skipping unreadable window (row_off=0, col_off=0, height=512" in caplog.text


def test_stretch_fails_when_nothing_is_readable(tmp_path: Path) -> None:
    data = _rng().integers(0, 256, (1, 256, 256), np.uint8)
    path = make_raster(tmp_path / "one.tif", data, tiled=True)
    offset, size = _tile_bytes(path, 0, 0)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)
    with pytest.raises(RasterReadError, match="corrupt or truncated") as info:
        compute_stretch(open_scene(path), method="percentile")
    assert path in str(info.value)


# --- large sparse scene -------------------------------------------------------------


def test_large_sparse_scene_is_read_in_bounded_pieces(tmp_path: Path, read_log: list) -> None:
    """100,000 x 100,000 px with one 512 px block of data: nothing reads the whole scene."""
    path = tmp_path / "sparse.tif"
    size = 100_000
    profile = dict(
        driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32645",
        transform=Affine(0.5, 0, 500_000, 0, -0.5, 3_000_000), nodata=0,
        tiled=True, blockxsize=512, blockysize=512, compress="deflate", sparse_ok=True,
    )  # fmt: skip
    block = np.arange(512 * 512, dtype=np.uint32).reshape(1, 512, 512) % 200 + 50
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(block.astype(np.uint8), window=Window(51_200, 51_200, 512, 512))
    assert os.path.getsize(path) < 5_000_000

    scene = open_scene(path)
    assert (scene.height, scene.width) == (size, size) and scene.has_mask
    assert compute_stretch(scene) == Stretch.identity()
    stretch = compute_stretch(scene, method="percentile")  # grid misses the data: fallback
    assert stretch == Stretch((0, 0, 0), (255, 255, 255))
    with rasterio.open(scene.path) as src:
        read = read_window(src, scene, stretch, Window(51_000, 51_000, 1024, 1024))
        window = Window(51_200, 51_200, 1024, 1024)
        coarse = read_window(src, scene, stretch, window, out_shape=(256, 256))
    assert read.valid.sum() == 512 * 512
    assert read.valid[200:712, 200:712].all()
    np.testing.assert_array_equal(read.rgb[200:712, 200:712, 0], block[0])
    assert coarse.valid[:128, :128].all() and not coarse.valid[128:].any()
    assert max(r * c for r, c in read_log) <= 1024 * 1024
    assert sum(r * c for r, c in read_log) <= 3 * 1024 * 1024


def test_scene_reader_reopens_a_file_rewritten_since_it_was_opened(tmp_path) -> None:
    from sam_geo.io.scenes import SceneReader, compute_stretch, open_scene

    path = tmp_path / "scene.tif"
    reader = SceneReader()
    window = Window(0, 0, 8, 8)
    seen = []
    for value in (50, 200):
        data = np.full((3, 8, 8), value, dtype=np.uint8)
        data[:, 0, 0] = 0  # a spread for the stretch
        make_raster(path, data, crs="EPSG:32631", transform=Affine(1, 0, 0, 0, -1, 8))
        scene = open_scene(path)
        seen.append(int(reader.read(scene, compute_stretch(scene, method=None), window, None).bands[0, 4, 4]))
    reader.close()
    assert seen == [50, 200]
