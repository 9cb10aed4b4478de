"""Tests of sam_geo.show: PNG quicklooks and HTML maps of a small synthetic scene."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.coords import BoundingBox
from shapely.geometry import box

import sam_geo.show as show
from sam_geo.cli import main
from sam_geo.errors import ConfigError, OutputError, OutputExistsError
from sam_geo.show import html_map, quicklook

UTM = "EPSG:32645"
#: 0.5 m pixels, north-up, near Banepa (Nepal).
TRANSFORM = Affine(0.5, 0.0, 350_000.0, 0.0, -0.5, 3_050_000.0)
ROWS, COLS = 200, 300
SCENE_RGB = (30, 90, 40)
YELLOW = (255, 255, 0)


def pixel_box(col0: float, row0: float, col1: float, row1: float):
    """Polygon of a scene pixel box, in the scene's CRS."""
    (x0, y0), (x1, y1) = TRANSFORM * (col0, row0), TRANSFORM * (col1, row1)
    return box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


@pytest.fixture()
def scene(tmp_path: Path) -> Path:
    """A uniform dark-green 3-band uint8 GeoTIFF, 300 cols x 200 rows."""
    path = tmp_path / "scene.tif"
    data = np.empty((3, ROWS, COLS), dtype=np.uint8)
    for band, value in enumerate(SCENE_RGB):
        data[band] = value
    profile = {"driver": "GTiff", "width": COLS, "height": ROWS, "count": 3, "dtype": "uint8",
               "crs": UTM, "transform": TRANSFORM}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture()
def layer() -> gpd.GeoDataFrame:
    """Two buildings given in EPSG:4326 (so they must be reprojected to the scene)."""
    geoms = [pixel_box(50, 50, 150, 100), pixel_box(200, 120, 260, 180)]
    return gpd.GeoDataFrame({"label": ["house-1", "house-2"], "height_m": [6.5, 9.0]},
                            geometry=geoms, crs=UTM).to_crs(4326)


def near(image: np.ndarray, col: int, row: int, colour: tuple[int, int, int], radius: int = 1) -> bool:
    """True if a pixel within ``radius`` of (col, row) has exactly ``colour``."""
    patch = image[row - radius:row + radius + 1, col - radius:col + radius + 1]
    return bool((patch == colour).all(axis=-1).any())


def test_quicklook_draws_outlines_on_the_scene(scene: Path, layer: gpd.GeoDataFrame, tmp_path: Path) -> None:
    out = quicklook(scene, layer, tmp_path / "ql.png", size=600)
    assert out == tmp_path / "ql.png"
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (400, 600, 3)  # scale 2: 300 x 200 px -> 600 x 400 px
    # on the outlines of building 1 (scene px 50..150 x 50..100 -> image px 100..300 x 100..200)
    for col, row in ((200, 100), (200, 200), (100, 150), (300, 150)):
        assert near(image, col, row, YELLOW), (col, row)
    assert near(image, 460, 240, YELLOW)  # building 2's top edge (cols 400..520, row 240)
    # far from both: the scene's own colour; inside a building: not filled
    for col, row in ((20, 20), (580, 20), (20, 380), (200, 150), (460, 300)):
        assert tuple(image[row, col]) == SCENE_RGB, (col, row)
    assert list(tmp_path.glob(".*tmp*")) == []


def test_window_as_pixels_or_bounds_and_longer_side(scene: Path, layer: gpd.GeoDataFrame, tmp_path: Path) -> None:
    by_pixels = quicklook(scene, layer, tmp_path / "a.png", window=(0, 0, 150, 100), size=300)
    bounds = BoundingBox(*pixel_box(0, 0, 150, 100).bounds)
    by_bounds = quicklook(scene, layer, tmp_path / "b.png", window=bounds, size=300)
    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in (by_pixels, by_bounds))
    assert a.shape == (200, 300, 3)
    np.testing.assert_array_equal(a, b)
    assert near(a, 200, 100, YELLOW)  # top edge of building 1 at scene row 50
    tall = quicklook(scene, None, tmp_path / "tall.png", window=(0, 0, 50, 200), size=100)
    assert Image.open(tall).size == (25, 100)  # (width, height): longer side = size


def test_large_scenes_are_read_decimated(scene: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = show.read_window

    def spy(src, info, stretch, window, out_shape=None):
        calls.append((window, out_shape))
        return real(src, info, stretch, window, out_shape)

    monkeypatch.setattr(show, "read_window", spy)
    quicklook(scene, None, tmp_path / "small.png", size=60)
    assert calls == [(rasterio.windows.Window(0, 0, COLS, ROWS), (40, 60))]


def test_refuses_to_overwrite_unless_asked(scene: Path, tmp_path: Path) -> None:
    target = tmp_path / "ql.png"
    target.write_bytes(b"previous")
    with pytest.raises(OutputExistsError, match="overwrite"):
        quicklook(scene, None, target, size=50)
    assert target.read_bytes() == b"previous"
    quicklook(scene, None, target, size=50, overwrite=True)
    assert Image.open(target).size == (50, 33)


def test_bad_arguments(scene: Path, tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="suffix"):
        quicklook(scene, None, tmp_path / "ql.tif")
    with pytest.raises(OutputError, match="does not exist"):
        quicklook(scene, None, tmp_path / "missing" / "ql.png")
    with pytest.raises(ConfigError, match="does not overlap"):
        quicklook(scene, None, tmp_path / "ql.png", window=(1000, 1000, 10, 10))
    with pytest.raises(ConfigError, match="size"):
        quicklook(scene, None, tmp_path / "ql.png", size=0)
    with pytest.raises(ConfigError, match="colour"):
        quicklook(scene, None, tmp_path / "ql.png", colour="not-a-colour")


def test_html_map_embeds_the_scene_and_the_polygons(scene: Path, layer: gpd.GeoDataFrame, tmp_path: Path) -> None:
    out = html_map(scene, layer, tmp_path / "map.html", size=300)
    html = out.read_text()
    match = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert match, "the scene is embedded as a data URI"
    overlay = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
    assert overlay.mode == "RGBA" and max(overlay.size) == 300
    rgba = np.asarray(overlay)
    assert tuple(rgba[overlay.size[1] // 2, overlay.size[0] // 2]) == (*SCENE_RGB, 255)
    numbers = np.array([float(n) for n in re.findall(r"-?\d+\.\d{5,}", html)])
    for lon, lat in layer.geometry.iloc[0].exterior.coords:
        assert np.abs(numbers - lon).min() < 2e-7 and np.abs(numbers - lat).min() < 2e-7
    assert "house-1" in html and "height_m" in html  # attributes for the popups
    assert "tile.openstreetmap" not in html  # no basemap unless asked
    # opens offline: Leaflet inlined, no script or stylesheet fetched from anywhere
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", html)
    assert "Leaflet 1.9.4" in html and "L.map(" in html and ".leaflet-container" in html


def test_cli_show_writes_png_and_html(scene: Path, layer: gpd.GeoDataFrame, tmp_path: Path) -> None:
    layer_path = tmp_path / "layer.geojson"
    layer.to_file(layer_path)
    png, html = tmp_path / "ql.png", tmp_path / "map.html"
    args = ["show", str(scene), str(layer_path), "-o", str(png), "--size", "150",
            "--window", "0,0,150,100", "--html", str(html)]
    assert main(args) == 0
    assert Image.open(png).size == (150, 100)
    assert "data:image/png;base64," in html.read_text()
    assert main(args) == 2  # exists: refused
    assert main([*args, "--overwrite"]) == 0
    assert main(["show", str(scene), "--window", "1,2,3"]) == 2
