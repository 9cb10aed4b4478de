"""Look at results: a PNG quicklook of a scene with polygon outlines, and an HTML map.

* :func:`quicklook` renders a scene (or a window of it) with the pipeline's own
  scene-wide stretch (:func:`sam_geo.io.scenes.compute_stretch`), read decimated with
  ``out_shape`` so a huge scene never comes into memory at full resolution, and draws
  the outlines of a vector layer (reprojected to the scene's CRS) on top.
* :func:`html_map` writes a self-contained Leaflet map (folium): the same rendering,
  warped to Web Mercator, embedded as a base64 PNG data URI image overlay (no tile
  server needed), and the polygons as GeoJSON in EPSG:4326 with popups listing their
  attributes. Leaflet itself (1.9.4, BSD-2-Clause, vendored in ``sam_geo/_vendor``) is
  inlined too, and folium's other CDN assets (jQuery, Bootstrap, marker icons) are left
  out, so the page opens offline: it references no URL at all unless a ``basemap`` is
  asked for.

Both write atomically (temporary file next to the target, then rename) and refuse to
replace an existing file unless ``overwrite=True``.

Windows (``window=``) are either a **pixel box** ``(col_off, row_off, width, height)``
(a tuple or :class:`rasterio.windows.Window`, full-resolution scene pixels) or **bounds**
``(left, bottom, right, top)`` in the scene's CRS given as a
:class:`rasterio.coords.BoundingBox`. Both are clipped to the scene.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyproj
import rasterio
import shapely
from affine import Affine
from PIL import Image, ImageColor, ImageDraw
from rasterio.coords import BoundingBox
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rasterio.windows import Window

from sam_geo.errors import ConfigError, CRSError, OutputError, SamGeoError
from sam_geo.evaluate import read_layer
from sam_geo.io.atomic import atomic_path, check_target, write_error
from sam_geo.io.scenes import SceneInfo, compute_stretch, open_scene, read_window

__all__ = ["html_map", "quicklook", "render_scene"]

#: Default outline colour (yellow: stands out on vegetation, soil, roofs and water).
DEFAULT_COLOUR = "#ffff00"

_IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_HTML_SUFFIXES = (".html", ".htm")
_GEOJSON_DECIMALS = 7  # 1e-7 degree is about 1 cm on the ground

SceneSource = str | os.PathLike[str] | SceneInfo
LayerSource = str | os.PathLike[str] | gpd.GeoDataFrame
WindowSpec = Window | BoundingBox | Sequence[float] | None


# --- public API --------------------------------------------------------------------------


def quicklook(
    scene: SceneSource,
    layer: LayerSource | None = None,
    output: str | os.PathLike[str] = "quicklook.png",
    *,
    window: WindowSpec = None,
    size: int = 1200,
    bands: Sequence[int] | None = None,
    stretch: str = "auto",
    overwrite: bool = False,
    colour: str = DEFAULT_COLOUR,
    line_width: int = 2,
) -> Path:
    """Render ``scene`` (or a window of it) with ``layer``'s outlines to a PNG/JPEG.

    Args:
        scene: Raster path (anything :func:`sam_geo.io.scenes.open_scene` opens) or a
            :class:`~sam_geo.io.scenes.SceneInfo`.
        layer: Optional vector layer (path or GeoDataFrame, any CRS): polygon outlines
            and lines are drawn ``line_width`` px wide in ``colour``, points as small
            circles. Features outside the window are skipped.
        output: ``.png``, ``.jpg`` or ``.jpeg`` path; its directory must exist.
        window: Part of the scene to render (see the module docstring); ``None``: all.
        size: Length in pixels of the image's longer side (the window is resampled to
            it, down or up); the other side keeps the window's aspect ratio.
        bands: 1-based bands shown as R, G, B (default: as the pipeline chooses).
        stretch: ``"auto"``, ``"none"`` or ``"percentile"``, as in the pipeline.
        overwrite: Replace ``output`` if it exists.
        colour: Outline colour, any PIL colour (``"#ff00ff"``, ``"red"``).
        line_width: Outline width in image pixels (>= 1).

    Nodata pixels are black.

    Returns:
        The path written.

    Raises:
        OutputError, OutputExistsError: bad suffix or directory, or the file exists.
        ConfigError: bad ``size``, ``window``, ``colour`` or ``line_width``.
        RasterError, CRSError, PromptError: unusable scene or layer.
        WriteError: the image could not be written (the previous file is untouched).
    """
    target = _check_output(output, _IMAGE_FORMATS, overwrite)
    rgb_colour = _check_colour(colour)
    if not isinstance(line_width, int) or line_width < 1:
        raise ConfigError(f"line_width must be an integer >= 1 (pixels), got {line_width!r}")
    rgb, _valid, info, transform = render_scene(
        scene, window=window, size=size, bands=bands, stretch=stretch
    )
    image = Image.fromarray(rgb)
    if layer is not None:
        frame = _layer_frame(layer, info, transform, rgb.shape[:2])
        _draw(image, np.asarray(frame.geometry.values, dtype=object), ~transform, rgb_colour, line_width)
    fmt = _IMAGE_FORMATS[target.suffix.lower()]
    return _write_atomic(target, lambda tmp: image.save(tmp, format=fmt), overwrite)


def html_map(
    scene: SceneSource,
    layer: LayerSource | None,
    output: str | os.PathLike[str] = "map.html",
    *,
    window: WindowSpec = None,
    size: int = 1200,
    bands: Sequence[int] | None = None,
    stretch: str = "auto",
    overwrite: bool = False,
    colour: str = DEFAULT_COLOUR,
    basemap: str | None = None,
    opacity: float = 1.0,
) -> Path:
    """Write an interactive HTML map of ``layer`` over ``scene``.

    The scene (or window) is rendered as in :func:`quicklook` (``size`` px on the
    longer side, without outlines), warped to Web Mercator so it lines up with the map,
    and embedded as a ``data:image/png;base64`` overlay; nodata and the area outside the
    scene are transparent. The layer's features intersecting the rendered area are
    embedded as GeoJSON in EPSG:4326 (coordinates rounded to 1e-7 degree), outlined in
    ``colour``, with a popup listing each feature's attributes.

    Args:
        scene, window, size, bands, stretch, overwrite, colour: as for :func:`quicklook`.
        layer: Vector layer (path or GeoDataFrame, any CRS), or ``None`` for the scene
            alone.
        output: ``.html`` or ``.htm`` path.
        basemap: Optional folium tile layer name (e.g. ``"OpenStreetMap"``) shown under
            the scene; needs the internet when the map is viewed. ``None``: no basemap.
        opacity: Opacity of the scene overlay, in ``[0, 1]``.

    Returns:
        The path written.

    Raises:
        As :func:`quicklook`; ConfigError for a bad ``opacity``.
    """
    import folium  # imported here: only this function needs it

    target = _check_output(output, dict.fromkeys(_HTML_SUFFIXES, "HTML"), overwrite)
    _check_colour(colour)
    if not 0.0 <= float(opacity) <= 1.0:
        raise ConfigError(f"opacity must be in [0, 1], got {opacity!r}")
    rgb, valid, info, transform = render_scene(scene, window=window, size=size, bands=bands, stretch=stretch)
    rgba, (south, west, north, east) = _to_web_mercator(rgb, valid, info.crs, transform, size)

    fmap = folium.Map(tiles=basemap, control_scale=True)
    folium.raster_layers.ImageOverlay(
        image=_png_data_uri(rgba), bounds=[[south, west], [north, east]], opacity=float(opacity),
        name="scene", pixelated=False,
    ).add_to(fmap)
    if layer is not None:
        _geojson_layer(layer, info, transform, rgb.shape[:2], colour).add_to(fmap)
        folium.LayerControl().add_to(fmap)
    fmap.fit_bounds([[south, west], [north, east]])
    return _write_atomic(target, lambda tmp: Path(tmp).write_text(_offline_html(fmap), encoding="utf-8"), overwrite)


_VENDOR = Path(__file__).resolve().parent / "_vendor" / "leaflet"
_LEAFLET_JS_URL = "sam-geo-vendored:leaflet.js"
_LEAFLET_CSS_URL = "sam-geo-vendored:leaflet.css"


def _offline_html(fmap: Any) -> str:
    """The map's HTML with Leaflet inlined and no other script or stylesheet URL."""
    fmap.default_js = [("leaflet", _LEAFLET_JS_URL)]
    fmap.default_css = [("leaflet_css", _LEAFLET_CSS_URL)]
    html = fmap.get_root().render()
    js = (_VENDOR / "leaflet.js").read_text(encoding="utf-8")
    css = (_VENDOR / "leaflet.css").read_text(encoding="utf-8")
    html = re.sub(r'<script src="' + re.escape(_LEAFLET_JS_URL) + r'"></script>',
                  lambda _: f"<script>{js}</script>", html)
    html = re.sub(r'<link rel="stylesheet" href="' + re.escape(_LEAFLET_CSS_URL) + r'"\s*/?>',
                  lambda _: f"<style>{css}</style>", html)
    if _LEAFLET_JS_URL in html or _LEAFLET_CSS_URL in html:  # folium changed its template
        raise RuntimeError("could not inline Leaflet into the HTML map; please report this with your folium version")
    return html


def render_scene(
    scene: SceneSource,
    *,
    window: WindowSpec = None,
    size: int = 1200,
    bands: Sequence[int] | None = None,
    stretch: str = "auto",
) -> tuple[np.ndarray, np.ndarray, SceneInfo, Affine]:
    """Read ``window`` of ``scene`` stretched to 8 bits, resampled to ``size`` px.

    Returns:
        ``(rgb, valid, info, transform)``: ``(rows, cols, 3)`` uint8 pixels (nodata 0),
        the ``(rows, cols)`` validity mask, the scene's metadata and the affine
        transform from image pixel corners to scene CRS coordinates.
    """
    info = _scene_info(scene, bands)
    box = _resolve_window(window, info)
    shape = _out_shape(box, size)
    method = compute_stretch(info, method=stretch)
    with rasterio.open(info.path) as src:
        read = read_window(src, info, method, box, out_shape=shape)
    rows, cols = shape
    transform = (
        info.transform
        * Affine.translation(box.col_off, box.row_off)
        * Affine.scale(box.width / cols, box.height / rows)
    )
    return read.rgb, read.valid, info, transform


# --- argument checks -------------------------------------------------------------------


def _check_output(
    path: str | os.PathLike[str], formats: dict[str, str], overwrite: bool
) -> Path:
    """The output path, after checking its suffix, its directory and existence."""
    target = Path(path).expanduser()
    if target.suffix.lower() not in formats:
        allowed = ", ".join(formats)
        raise OutputError(f"cannot write {str(target)!r}: use one of the suffixes {allowed}")
    return check_target(target, overwrite=overwrite)


def _check_colour(colour: str) -> tuple[int, int, int]:
    """``colour`` as an RGB triple, or ConfigError."""
    try:
        return ImageColor.getrgb(colour)[:3]
    except (ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(
            f"unknown colour {colour!r}; use a name like 'yellow' or a hex code like '#ff00ff'"
        ) from exc


def _scene_info(scene: SceneSource, bands: Sequence[int] | None) -> SceneInfo:
    """``scene`` as a SceneInfo, re-opened if other bands are asked for."""
    if isinstance(scene, SceneInfo):
        return scene if bands is None else open_scene(scene.path, bands=bands)
    return open_scene(scene, bands=bands)


def _resolve_window(window: WindowSpec, info: SceneInfo) -> Window:
    """Integer pixel window inside the scene for a pixel box, bounds or ``None``."""
    if window is None:
        return Window(0, 0, info.width, info.height)
    if isinstance(window, BoundingBox):
        col0, row0, col1, row1 = _bounds_to_pixels(window, info.transform)
    else:
        try:
            col_off, row_off, width, height = (float(v) for v in window)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"window must be (col_off, row_off, width, height) in pixels or a "
                f"BoundingBox in the scene's CRS, got {window!r}"
            ) from exc
        if not (width > 0 and height > 0):
            raise ConfigError(f"window width and height must be > 0 pixels, got {window!r}")
        col0, row0, col1, row1 = col_off, row_off, col_off + width, row_off + height
    col0, row0 = max(0, math.floor(col0)), max(0, math.floor(row0))
    col1, row1 = min(info.width, math.ceil(col1)), min(info.height, math.ceil(row1))
    if col1 <= col0 or row1 <= row0:
        raise ConfigError(
            f"window {window!r} does not overlap the scene {info.path} "
            f"({info.width} cols x {info.height} rows, pixels)"
        )
    return Window(col0, row0, col1 - col0, row1 - row0)


def _bounds_to_pixels(bounds: BoundingBox, transform: Affine) -> tuple[float, float, float, float]:
    """Pixel envelope ``(col0, row0, col1, row1)`` of CRS bounds (any affine)."""
    inverse = ~transform
    corners = [
        inverse * (x, y)
        for x in (bounds.left, bounds.right)
        for y in (bounds.bottom, bounds.top)
    ]
    cols, rows = zip(*corners)
    return min(cols), min(rows), max(cols), max(rows)


def _out_shape(box: Window, size: int) -> tuple[int, int]:
    """``(rows, cols)`` with the longer side equal to ``size``, aspect ratio kept."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"size must be a positive integer (pixels), got {size!r}")
    scale = size / max(box.width, box.height)
    rows = size if box.height >= box.width else max(1, round(box.height * scale))
    cols = size if box.width > box.height else max(1, round(box.width * scale))
    return int(rows), int(cols)


# --- vector layer ----------------------------------------------------------------------


def _layer_frame(
    layer: LayerSource, info: SceneInfo, transform: Affine, shape: tuple[int, int]
) -> gpd.GeoDataFrame:
    """Rows of ``layer`` (reprojected to the scene CRS) intersecting the rendered area."""
    frame = read_layer(layer, role="layer")
    try:
        frame = frame.to_crs(info.crs)
    except Exception as exc:  # pyproj raises several types for impossible transforms
        raise CRSError(
            f"cannot reproject the layer from {frame.crs} to the scene's CRS "
            f"{info.crs}: {exc}; check the layer's CRS"
        ) from exc
    geoms = np.asarray(frame.geometry.values, dtype=object)
    present = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    rows, cols = shape
    corners = [transform * (c, r) for c, r in ((0, 0), (cols, 0), (cols, rows), (0, rows))]
    footprint = shapely.Polygon(corners)
    inside = present.copy()
    inside[present] = shapely.intersects(footprint, geoms[present])
    return frame.loc[inside]


def _draw(
    image: Image.Image,
    geoms: np.ndarray,
    to_pixels: Affine,
    colour: tuple[int, int, int],
    width: int,
) -> None:
    """Draw outlines (polygons), lines and points of ``geoms`` onto ``image`` in place."""
    if len(geoms) == 0:
        return
    pixels = shapely.transform(geoms, lambda xy: _apply(to_pixels, xy))
    draw = ImageDraw.Draw(image)
    parts = shapely.get_parts(pixels)
    kinds = shapely.get_type_id(parts)
    lines = np.concatenate([
        shapely.get_parts(shapely.boundary(parts[kinds == 3])),  # polygon rings
        parts[np.isin(kinds, (1, 2))],  # linestrings, linearrings
    ]) if len(parts) else np.empty(0, dtype=object)
    coords, owner = shapely.get_coordinates(lines, return_index=True)
    for run in np.split(coords, np.flatnonzero(np.diff(owner)) + 1):
        if len(run) > 1:
            draw.line([tuple(p) for p in run], fill=colour, width=width, joint="curve")
    radius = 2 * width
    for x, y in shapely.get_coordinates(parts[kinds == 0]):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour, width=width)


def _apply(affine: Affine, xy: np.ndarray) -> np.ndarray:
    """``affine`` applied to an ``(n, 2)`` array of ``x, y``."""
    a, b, c, d, e, f = affine[:6]
    return np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f])


# --- HTML map --------------------------------------------------------------------------


def _to_web_mercator(
    rgb: np.ndarray, valid: np.ndarray, crs: Any, transform: Affine, size: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """RGBA image warped to EPSG:3857 and its ``(south, west, north, east)`` in degrees.

    The destination grid covers the rendered area with square pixels, ``size`` px on
    its longer side; pixels outside the scene or on nodata are transparent.
    """
    rows, cols = valid.shape
    footprint = shapely.Polygon(
        [transform * (c, r) for c, r in ((0, 0), (cols, 0), (cols, rows), (0, rows))]
    )
    outline = shapely.segmentize(footprint, footprint.length / 64)  # curved in 3857
    to_merc = pyproj.Transformer.from_crs(crs, 3857, always_xy=True)
    xs, ys = to_merc.transform(*shapely.get_coordinates(outline).T)
    left, bottom, right, top = min(xs), min(ys), max(xs), max(ys)
    res = max(right - left, top - bottom) / size
    width, height = max(1, round((right - left) / res)), max(1, round((top - bottom) / res))
    dst_transform = Affine(res, 0, left, 0, -res, top)
    source = np.concatenate([rgb.transpose(2, 0, 1), (valid * 255).astype(np.uint8)[None]])
    warped = np.zeros((4, height, width), dtype=np.uint8)
    reproject(
        source, warped, src_transform=transform, src_crs=crs, dst_transform=dst_transform,
        dst_crs="EPSG:3857", resampling=Resampling.nearest, src_nodata=None, dst_nodata=0,
    )
    to_lonlat = pyproj.Transformer.from_crs(3857, 4326, always_xy=True)
    west, south = to_lonlat.transform(left, top - height * res)
    east, north = to_lonlat.transform(left + width * res, top)
    return warped.transpose(1, 2, 0), (south, west, north, east)


def _png_data_uri(rgba: np.ndarray) -> str:
    """``data:image/png;base64,...`` URI of an RGBA array."""
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _geojson_layer(
    layer: LayerSource, info: SceneInfo, transform: Affine, shape: tuple[int, int], colour: str
) -> Any:
    """folium GeoJson of the layer's features in the rendered area, with popups."""
    import folium

    frame = _layer_frame(layer, info, transform, shape).to_crs(4326)
    geometry = frame.geometry.name
    frame[geometry] = shapely.transform(
        np.asarray(frame.geometry.values, dtype=object), lambda xy: np.round(xy, _GEOJSON_DECIMALS)
    )
    fields = [str(c) for c in frame.columns if c != geometry]
    frame = _json_friendly(frame.rename(columns={c: str(c) for c in frame.columns}), geometry)
    style = {"color": colour, "weight": 2, "fillOpacity": 0.05, "fillColor": colour}
    return folium.GeoJson(
        frame.to_json(na="null", drop_id=True),
        name="polygons",
        style_function=lambda _feature: style,
        popup=folium.GeoJsonPopup(fields=fields) if fields else None,
    )


def _json_friendly(frame: gpd.GeoDataFrame, geometry: str) -> gpd.GeoDataFrame:
    """Copy whose attribute columns JSON can encode (others converted to text)."""
    out = frame.reset_index(drop=True).copy()
    for name in out.columns:
        if name == geometry:
            continue
        kind = out[name].dtype.kind
        if kind in "biuf":
            continue
        out[name] = [None if v is None or v != v else str(v) for v in out[name]]
    return out


# --- atomic write ----------------------------------------------------------------------


def _write_atomic(target: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Write via ``write(tmp)`` with :func:`sam_geo.io.atomic.atomic_path`; return ``target``.

    Without ``overwrite`` the file is published with a hard link, which fails if the
    target appeared meanwhile; a failed write leaves any previous file untouched and no
    temporary file behind. The temporary name keeps the target's suffix (PIL and the
    format checks look at it).

    Raises:
        OutputExistsError: ``target`` exists and ``overwrite`` is false.
        WriteError: writing failed (OSError, or the encoder refused the data).
    """
    try:
        with atomic_path(target, suffix=target.suffix, overwrite=overwrite) as tmp:
            write(tmp)
    except SamGeoError:
        raise
    except Exception as exc:  # encoder errors; OSErrors were wrapped by atomic_path
        raise write_error(target, exc) from exc
    return target
