"""Open scenes, compute one scene-wide stretch, and read windows ready for SAM.

The three steps of getting pixels out of a (possibly huge) GeoTIFF and into a model:

1. :func:`open_scene` opens the file once, checks it, chooses the three bands fed to the
   model as R, G, B and returns a :class:`SceneInfo`: picklable metadata only, no open
   handle, so it can be shipped to Ray actors.
2. :func:`compute_stretch` computes **one** linear stretch to ``0..255`` for the whole
   scene from a bounded sample of its valid pixels (an overview, or a fixed grid of small
   windows), so that every tile is stretched the same way.
3. :func:`read_window` reads one window of an open dataset and returns ``(rows, cols, 3)``
   ``uint8`` pixels plus a ``(rows, cols)`` validity mask.

Conventions used throughout:

* Sizes, offsets and shapes are in **pixels**; shapes are ``(rows, cols)``; windows are
  :class:`rasterio.windows.Window` (``col_off, row_off, width, height``).
* Band indexes are **1-based**, as in GDAL and rasterio.
* The affine transform is used as-is: rotated and sheared transforms are supported.
* A pixel is *valid* where GDAL's dataset mask says so (nodata value, internal mask or
  alpha band, see :meth:`rasterio.io.DatasetReader.dataset_mask`) **and** all three
  selected bands are finite (NaN and ±inf are nodata even when no nodata is declared).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import rasterio.env
from affine import Affine
from rasterio.coords import BoundingBox
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import CRSError as RioCRSError
from rasterio.errors import RasterioIOError
from rasterio.windows import Window
from shapely.geometry import Polygon
from shapely.geometry.polygon import orient

from sam_geo.errors import ConfigError, CRSError, RasterError, RasterReadError

__all__ = [
    "SceneInfo",
    "Stretch",
    "WindowRead",
    "compute_stretch",
    "open_scene",
    "read_window",
]

log = logging.getLogger(__name__)

#: Stretch methods accepted by :func:`compute_stretch`.
STRETCH_METHODS = ("auto", "none", "percentile")

#: An overview is used for the stretch sample if it has at least this many pixels.
OVERVIEW_TARGET_PIXELS = 256 * 1024

#: Side (pixels) of the windows sampled when a scene has no usable overview.
SAMPLE_WINDOW_SIZE = 128

#: At most this many windows are sampled when a scene has no usable overview.
MAX_SAMPLE_WINDOWS = 64

#: Side (pixels) of the chunks in which a small level is read whole.
_CHUNK_SIZE = 512

try:  # GDAL errors that escape rasterio's own wrapping during a read.
    from rasterio._err import CPLE_BaseError as _CPLE_BaseError

    _READ_ERRORS: tuple[type[BaseException], ...] = (RasterioIOError, _CPLE_BaseError)
except ImportError:  # pragma: no cover - private module moved
    _READ_ERRORS = (RasterioIOError,)


# --- scene metadata ------------------------------------------------------------------


@dataclass(frozen=True)
class SceneInfo:
    """Picklable metadata of a scene; holds no open dataset.

    Attributes:
        path: Anything :func:`rasterio.open` accepts (local path made absolute, URL,
            ``/vsi...`` path).
        width: Number of columns, in pixels.
        height: Number of rows, in pixels.
        count: Number of bands in the file.
        dtype: Data type of the first band (GeoTIFF bands share one type).
        crs: CRS of the scene; never ``None`` (see ``assume_crs`` of :func:`open_scene`).
        transform: Pixel ``(col, row)`` to CRS ``(x, y)`` affine transform, of the pixel
            corners; may be rotated or sheared.
        nodata: Nodata value of the first band, or ``None``.
        bands: The three 1-based band indexes fed to the model as R, G, B.
        has_mask: True if GDAL reports a nodata value, internal mask or alpha band.
            NaN in float data is treated as nodata whatever this says.
        sources: For a mosaic (a VRT sam-geo made of adjacent files, see
            :mod:`sam_geo.io.mosaic`), the files it joins; empty otherwise.
    """

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: CRS
    transform: Affine
    nodata: float | None
    bands: tuple[int, ...]
    has_mask: bool
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.crs is None:
            raise CRSError(f"SceneInfo for {self.path} needs a CRS, got None.")
        object.__setattr__(self, "bands", _check_bands(self.bands, self.count, self.path))

    @property
    def corners(self) -> tuple[tuple[float, float], ...]:
        """CRS coordinates of the outer pixel corners: (0, 0), (w, 0), (w, h), (0, h)."""
        a, b, c, d, e, f = self.transform[:6]
        w, h = self.width, self.height
        pixels = ((0, 0), (w, 0), (w, h), (0, h))
        return tuple((a * col + b * row + c, d * col + e * row + f) for col, row in pixels)

    @property
    def bounds(self) -> BoundingBox:
        """Envelope of the scene in its CRS (of the footprint when rotated)."""
        xs, ys = zip(*self.corners)
        return BoundingBox(left=min(xs), bottom=min(ys), right=max(xs), top=max(ys))

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size ``(x, y)`` in CRS units: lengths of the pixel's column and row edges."""
        a, b, _, d, e, _ = self.transform[:6]
        return (math.hypot(a, d), math.hypot(b, e))

    @property
    def is_geographic(self) -> bool:
        """True if the CRS is geographic (coordinates in degrees)."""
        return bool(self.crs.is_geographic)

    @property
    def footprint(self) -> Polygon:
        """Outline of the scene in its CRS, counter-clockwise; exact for rotated transforms."""
        return orient(Polygon(self.corners), sign=1.0)


def open_scene(
    path: str | os.PathLike[str],
    *,
    bands: Sequence[int] | None = None,
    assume_crs: str | None = None,
) -> SceneInfo:
    """Open a scene, validate it and return its :class:`SceneInfo`.

    Args:
        path: Local path, URL or ``/vsi...`` path of a GDAL-readable raster. Local paths
            are made absolute so the result works in workers with another cwd.
        bands: 1-based band indexes fed to the model as R, G, B: three indexes, or one
            that is replicated (grey). ``None`` chooses them, see below.
        assume_crs: CRS (``"EPSG:32645"``, WKT, PROJ string) to use when the file has
            none. Ignored when the file has a CRS.

    Default bands, alpha bands never being used:

    * one usable band, or two (e.g. grey + something, dual-pol SAR): band 1 as grey
      ``(1, 1, 1)``; the second band is not fed to the model whether or not it is alpha;
    * three or more: the bands whose colour interpretation is red, green and blue if all
      three exist (so BGR or NIR-R-G-B files come out right), else the first three
      non-alpha bands (``(1, 2, 3)`` for plain 3-band, RGB+NIR and multispectral files).

    Raises:
        RasterError: The file does not exist, is not a readable raster, has complex data,
            a degenerate transform or only ground control points.
        CRSError: The file has no CRS and ``assume_crs`` was not given.
        ConfigError: ``bands`` or ``assume_crs`` is invalid.
    """
    path = _normalize_path(path)
    with _open(path) as src:
        crs = _scene_crs(src, path, assume_crs)
        _check_pixels(src, path)
        chosen = _default_bands(src) if bands is None else bands
        return SceneInfo(
            path=path,
            width=src.width,
            height=src.height,
            count=src.count,
            dtype=src.dtypes[0],
            crs=crs,
            transform=src.transform,
            nodata=None if src.nodata is None else float(src.nodata),
            bands=_check_bands(chosen, src.count, path),
            has_mask=_has_mask(src),
        )


def _normalize_path(path: str | os.PathLike[str]) -> str:
    """Return ``path`` as a string, absolute if it is a local file path."""
    text = os.fspath(path)
    if _is_local(text):
        return os.path.abspath(text)
    return text


def _is_local(path: str) -> bool:
    """True for plain file paths, False for URLs (``scheme://``) and GDAL ``/vsi`` paths."""
    return "://" not in path and not path.startswith("/vsi")


def _open(path: str, **options: Any) -> rasterio.DatasetReader:
    """Open ``path`` for reading, turning GDAL's failures into :class:`RasterError`."""
    if _is_local(path) and not os.path.exists(path):
        raise RasterError(f"Raster {path} does not exist. Check the path and try again.")
    try:
        return rasterio.open(path, **options)
    except RasterioIOError as exc:
        raise RasterError(
            f"Cannot open {path} as a raster: {exc} "
            "Check that it is a GeoTIFF (or another GDAL-readable raster) and not damaged."
        ) from exc


def _scene_crs(src: rasterio.DatasetReader, path: str, assume_crs: str | None) -> CRS:
    """The file's CRS, else ``assume_crs``; raise :class:`CRSError` if neither exists."""
    if src.crs:
        return src.crs
    if src.gcps[0] and src.transform.is_identity:
        raise RasterError(
            f"{path} is georeferenced by ground control points only. Warp it to a regular "
            "grid first, e.g. `gdalwarp -r bilinear IN.tif OUT.tif`."
        )
    if assume_crs is None:
        raise CRSError(
            f"{path} has no CRS (coordinate reference system). Pass --assume-crs "
            "EPSG:XXXX with the EPSG code the scene's coordinates are in, or set it in the "
            "file with `gdal_edit.py -a_srs EPSG:XXXX`."
        )
    try:
        return CRS.from_user_input(assume_crs)
    except (RioCRSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"--assume-crs {assume_crs!r} (for {path}) is not a valid CRS: {exc}. "
            "Use a code such as EPSG:32645."
        ) from exc


def _check_pixels(src: rasterio.DatasetReader, path: str) -> None:
    """Reject data and georeferencing that cannot be turned into RGB tiles."""
    if np.issubdtype(np.dtype(src.dtypes[0]), np.complexfloating):
        raise RasterError(
            f"{path} holds complex values ({src.dtypes[0]}). Convert it to amplitude or "
            "intensity first (e.g. `gdal_translate` with a VRT pixel function)."
        )
    if src.transform.determinant == 0:
        raise RasterError(
            f"{path} has a degenerate geotransform {tuple(src.transform)[:6]} (zero pixel "
            "area). Fix its georeferencing, e.g. with `gdal_edit.py -a_ullr`."
        )


def _has_mask(src: rasterio.DatasetReader) -> bool:
    """True if any band has a nodata value, internal mask or alpha band per GDAL."""
    return any(MaskFlags.all_valid not in flags for flags in src.mask_flag_enums)


def _default_bands(src: rasterio.DatasetReader) -> tuple[int, ...]:
    """Choose R, G, B band indexes (1-based) as documented in :func:`open_scene`."""
    interp = list(src.colorinterp)
    usable = [i + 1 for i, ci in enumerate(interp) if ci != ColorInterp.alpha] or [1]
    if len(usable) < 3:
        return (usable[0],) * 3
    wanted = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
    rgb = [interp.index(ci) + 1 for ci in wanted if ci in interp]
    if len(rgb) == 3:
        return tuple(rgb)
    return tuple(usable[:3])


def _check_bands(bands: Sequence[int], count: int, path: str) -> tuple[int, ...]:
    """Validate a band selection; a single band is replicated to three."""
    valid = f"1..{count}" if count > 1 else "1"
    try:
        chosen = tuple(bands)
    except TypeError as exc:
        raise ConfigError(
            f"Bands for {path} must be a sequence of band indexes ({valid}), got {bands!r}."
        ) from exc
    if len(chosen) == 1:
        chosen = chosen * 3
    if len(chosen) != 3:
        raise ConfigError(
            f"Give 3 band indexes (R,G,B) or 1 (grey) for {path}, got {len(chosen)}: "
            f"{list(chosen)}. Valid indexes are {valid}."
        )
    for band in chosen:
        if not _is_int(band) or not 1 <= band <= count:
            raise ConfigError(
                f"Band {band!r} is out of range for {path}, which has {count} band(s). "
                f"Valid indexes are {valid} (1-based)."
            )
    return tuple(int(b) for b in chosen)


# --- stretch --------------------------------------------------------------------------


@dataclass(frozen=True)
class Stretch:
    """Per-band linear stretch mapping ``low`` to 0 and ``high`` to 255, clipped.

    Attributes:
        low: Value mapped to 0, for R, G, B.
        high: Value mapped to 255, for R, G, B; strictly greater than ``low``.
    """

    low: tuple[float, float, float]
    high: tuple[float, float, float]

    def __post_init__(self) -> None:
        low = tuple(float(v) for v in self.low)
        high = tuple(float(v) for v in self.high)
        if len(low) != 3 or len(high) != 3:
            raise ConfigError(f"A stretch needs 3 low and 3 high values, got {low=}, {high=}.")
        if not all(map(math.isfinite, low + high)) or any(h <= lo for lo, h in zip(low, high)):
            raise ConfigError(
                f"A stretch needs finite values with high > low in each band, got {low=}, {high=}."
            )
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @classmethod
    def identity(cls) -> Stretch:
        """The stretch that leaves ``0..255`` values unchanged (for ``uint8`` scenes)."""
        return cls(low=(0.0, 0.0, 0.0), high=(255.0, 255.0, 255.0))

    @property
    def is_identity(self) -> bool:
        """True if this stretch maps ``0..255`` onto itself."""
        return self == Stretch.identity()

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Stretch ``(3, rows, cols)`` data of any real dtype to ``uint8``.

        Values are mapped linearly, rounded to the nearest integer and clipped to
        ``0..255``; NaN becomes 0, +inf 255 and -inf 0. Returns a new array.
        """
        if data.ndim != 3 or data.shape[0] != 3:
            raise ValueError(f"Stretch.apply expects (3, rows, cols) data, got shape {data.shape}.")
        if data.dtype == np.uint8 and self.is_identity:
            return data.copy()
        work = np.float32 if data.dtype.itemsize <= 2 or data.dtype == np.float32 else np.float64
        low = np.asarray(self.low, dtype=work)[:, None, None]
        scale = (255.0 / (np.asarray(self.high) - np.asarray(self.low))).astype(work)[:, None, None]
        out = (data.astype(work) - low) * scale
        np.nan_to_num(out, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.clip(out, 0.0, 255.0, out=out)
        return np.rint(out, out=out).astype(np.uint8)


def compute_stretch(
    scene: SceneInfo,
    *,
    method: str | None = "auto",
    percentiles: tuple[float, float] = (1.0, 99.0),
    max_samples: int = 1_000_000,
) -> Stretch:
    """Compute one stretch for the whole scene, so that all its tiles agree.

    Args:
        scene: The scene, as returned by :func:`open_scene`.
        method: ``"none"``: identity; ``"percentile"``: per band, the ``percentiles``
            of the valid pixels map to 0 and 255; ``"auto"`` (or ``None``): identity for
            ``uint8`` scenes, ``"percentile"`` otherwise.
        percentiles: ``(low, high)`` percentiles, ``0 <= low < high <= 100``.
        max_samples: Upper bound on the pixels read and used, whatever the scene size.

    I/O is bounded: if the scene has overviews, the coarsest level with at least
    ``min(OVERVIEW_TARGET_PIXELS, max_samples)`` pixels is read; a level (or a scene
    without overviews) with at most ``max_samples`` pixels is read whole, a larger one is
    sampled with up to ``MAX_SAMPLE_WINDOWS`` windows of ``SAMPLE_WINDOW_SIZE`` pixels
    on a regular grid. Invalid pixels (nodata, mask, alpha, NaN/inf, a band's own nodata
    value) are excluded. Parts that fail to read are skipped with a logged warning.

    Degenerate cases: a band without any valid pixel falls back to its dtype's range
    (integers) or ``(0, 1)`` (floats); ``high == low`` is widened to ``low + 1``.

    Raises:
        ConfigError: ``method``, ``percentiles`` or ``max_samples`` is invalid.
        RasterError: The scene cannot be opened any more.
        RasterReadError: No part of the sample could be read.
    """
    method = "auto" if method is None else method
    _check_stretch_args(method, percentiles, max_samples)
    if method == "none" or (method == "auto" and np.dtype(scene.dtype) == np.uint8):
        return Stretch.identity()
    samples = _sample_valid_pixels(scene, max_samples)
    low, high = zip(*(_band_limits(s, scene.dtype, percentiles) for s in samples))
    return Stretch(low=low, high=high)


def _check_stretch_args(method: str, percentiles: tuple[float, float], max_samples: int) -> None:
    """Raise :class:`ConfigError` for invalid :func:`compute_stretch` arguments."""
    if method not in STRETCH_METHODS:
        choices = ", ".join(STRETCH_METHODS)
        raise ConfigError(f"Unknown stretch method {method!r}; use one of {choices}.")
    try:
        lo, hi = (float(p) for p in percentiles)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"Stretch percentiles must be two numbers (low, high), got {percentiles!r}."
        ) from exc
    if not 0.0 <= lo < hi <= 100.0:
        raise ConfigError(
            f"Stretch percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}."
        )
    if not _is_int(max_samples) or max_samples < 1:
        raise ConfigError(f"max_samples must be a positive integer, got {max_samples!r}.")


def _band_limits(
    values: np.ndarray, dtype: str, percentiles: tuple[float, float]
) -> tuple[float, float]:
    """``(low, high)`` of one band's valid sample; fallbacks for empty or flat samples."""
    if values.size == 0:
        if np.issubdtype(np.dtype(dtype), np.integer):
            info = np.iinfo(np.dtype(dtype))
            return float(info.min), float(info.max)
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, percentiles))
    return (low, high) if high > low else (low, low + 1.0)


def _sample_valid_pixels(scene: SceneInfo, max_samples: int) -> list[np.ndarray]:
    """Valid values of each of the scene's R, G, B bands, at most ``max_samples`` each."""
    with _open(scene.path) as src:
        level = _overview_level(src, min(OVERVIEW_TARGET_PIXELS, max_samples))
        if level is None:
            return _sample_dataset(src, scene, max_samples)
    with _open(scene.path, overview_level=level) as overview:
        return _sample_dataset(overview, scene, max_samples)


def _sample_dataset(
    ds: rasterio.DatasetReader, scene: SceneInfo, max_samples: int
) -> list[np.ndarray]:
    """Valid R, G, B values from the sample windows of ``ds`` (a scene or overview level)."""
    windows = list(_sample_windows(ds.height, ds.width, max_samples))
    readable = [v for v in (_read_valid(ds, scene, w) for w in windows) if v is not None]
    if not readable:
        raise RasterReadError(
            f"Could not read any of the {len(windows)} sample window(s) of {scene.path} used "
            "to compute the stretch; the file is probably corrupt or truncated. Check it "
            "with `gdalinfo -checksum` and re-create or re-download it."
        )
    bands = [np.concatenate([v[i] for v in readable]) for i in range(3)]
    return [_thin(b, max_samples) for b in bands]


def _overview_level(src: rasterio.DatasetReader, target: int) -> int | None:
    """0-based overview level to sample, or ``None`` for full resolution.

    The coarsest overview with at least ``target`` pixels; ``None`` if there are no
    overviews or even the finest one is smaller than ``target``.
    """
    factors = src.overviews(1)
    level = None
    for i, factor in enumerate(factors):
        pixels = math.ceil(src.height / factor) * math.ceil(src.width / factor)
        if pixels >= target:
            level = i
    return level


def _sample_windows(height: int, width: int, max_samples: int) -> Iterator[Window]:
    """Windows to sample from a ``height`` x ``width`` pixel level.

    A level of at most ``max_samples`` pixels is covered whole (in chunks, so a damaged
    block loses only its chunk). Otherwise up to ``MAX_SAMPLE_WINDOWS`` windows of
    ``SAMPLE_WINDOW_SIZE`` pixels (fewer for small ``max_samples``), laid on a regular
    grid following the level's aspect ratio and clamped inside it.
    """
    if height * width <= max_samples:
        yield from _chunks(height, width, _CHUNK_SIZE)
        return
    size = SAMPLE_WINDOW_SIZE
    n = max(1, min(MAX_SAMPLE_WINDOWS, max_samples // (size * size)))
    win_h, win_w = min(size, height), min(size, width)
    ny = min(n, math.ceil(height / win_h), max(1, round(math.sqrt(n * height / width))))
    nx = min(math.ceil(width / win_w), max(1, n // ny))
    for i in range(ny):
        row = min(max(0, round((i + 0.5) * height / ny - win_h / 2)), height - win_h)
        for j in range(nx):
            col = min(max(0, round((j + 0.5) * width / nx - win_w / 2)), width - win_w)
            yield Window(col, row, win_w, win_h)


def _chunks(height: int, width: int, size: int) -> Iterator[Window]:
    """Non-overlapping windows of at most ``size`` x ``size`` pixels covering a level."""
    for row in range(0, height, size):
        for col in range(0, width, size):
            yield Window(col, row, min(size, width - col), min(size, height - row))


def _read_valid(
    ds: rasterio.DatasetReader, scene: SceneInfo, window: Window
) -> list[np.ndarray] | None:
    """Valid values of the R, G, B bands in ``window``; ``None`` (logged) if unreadable."""
    try:
        data = _read_bands(ds, scene.bands, window, None)
        valid = ds.dataset_mask(window=window) > 0
    except _READ_ERRORS as exc:
        reason = _gdal_reason(exc)
        log.warning(
            "Stretch: skipping unreadable %s of %s: %s", _describe(window), scene.path, reason
        )
        return None
    valid &= _all_finite(data)
    nodatavals = [ds.nodatavals[b - 1] for b in scene.bands]
    return [_valid_values(band, valid, nd) for band, nd in zip(data, nodatavals)]


def _valid_values(band: np.ndarray, valid: np.ndarray, nodata: float | None) -> np.ndarray:
    """1-D values of ``band`` under ``valid`` that are not the band's own nodata value."""
    values = band[valid]
    if nodata is not None and not math.isnan(nodata):
        values = values[values != nodata]
    return values


def _thin(values: np.ndarray, max_samples: int) -> np.ndarray:
    """At most ``max_samples`` of ``values``, taken with a regular stride (deterministic)."""
    step = math.ceil(values.size / max_samples)
    return values[::step] if step > 1 else values


# --- window reads --------------------------------------------------------------------


@dataclass(frozen=True)
class WindowRead:
    """Pixels of one window, ready for SAM.

    Attributes:
        bands: ``(3, rows, cols)`` ``uint8``, C-contiguous, stretched; invalid pixels are
            0, and so is a channel whose value equals that band's own nodata value. Kept
            band-first, as GDAL reads it and the model takes it: no copy to interleave.
        valid: ``(rows, cols)`` ``bool``, True where the pixel is valid (see module doc).
    """

    bands: np.ndarray
    valid: np.ndarray

    @property
    def rgb(self) -> np.ndarray:
        """``(rows, cols, 3)`` view of :attr:`bands` (not C-contiguous; no copy)."""
        return self.bands.transpose(1, 2, 0)


def read_window(
    src: rasterio.DatasetReader,
    scene: SceneInfo,
    stretch: Stretch,
    window: Window,
    out_shape: tuple[int, int] | None = None,
) -> WindowRead:
    """Read ``window`` of ``src`` (opened from ``scene.path``) as stretched RGB + mask.

    Args:
        src: Dataset opened on ``scene.path``; reused across calls by the caller.
        scene: The scene's metadata (bands to read).
        stretch: The scene-wide stretch from :func:`compute_stretch`.
        window: Integer pixel window lying entirely inside the scene (no boundless read).
        out_shape: ``(rows, cols)`` of a resampled read, or ``None`` for full resolution.

    Upsampled reads (``out_shape`` larger than the window, see ``TileGrid.zoom``) use
    bilinear resampling for data and nearest for the mask. Downsampled reads use average
    resampling; GDAL averages only valid source pixels
    (nodata, masked and alpha-transparent pixels are left out) and may serve the read
    from an overview. An output pixel is valid where GDAL's average-resampled dataset
    mask is > 0, i.e. where at least one of its source pixels is valid (its value being
    the mean of those), and its three bands are finite.

    Raises:
        ConfigError: ``window`` is not inside the scene, ``out_shape`` is invalid or
            ``src`` does not match ``scene``.
        RasterReadError: GDAL failed to read a block (corrupt or truncated file).
    """
    _check_read_args(src, scene, window, out_shape)
    shape = (int(window.height), int(window.width)) if out_shape is None else out_shape
    upsampled = out_shape is not None and out_shape[0] > window.height
    if out_shape is None:
        resampling = mask_resampling = Resampling.nearest
    elif upsampled:
        resampling, mask_resampling = Resampling.bilinear, Resampling.nearest
    else:
        resampling = mask_resampling = Resampling.average
    try:
        data = _read_bands(src, scene.bands, window, shape, resampling)
        valid = _valid_from_nodata(src, scene.bands, data) if out_shape is None else None
        if valid is None:
            valid = src.dataset_mask(window=window, out_shape=shape, resampling=mask_resampling) > 0
    except _READ_ERRORS as exc:
        raise RasterReadError(
            f"Failed to read {_describe(window)} of {scene.path}: {_gdal_reason(exc)}. The "
            "file is probably corrupt or truncated; check it with `gdalinfo -checksum` and "
            "re-create or re-download it."
        ) from exc
    valid &= _all_finite(data)
    rgb = stretch.apply(data)
    if not valid.all():
        rgb *= valid
    _zero_band_nodata(rgb, data, [src.nodatavals[b - 1] for b in scene.bands])
    return WindowRead(bands=rgb, valid=valid)


def _check_read_args(
    src: rasterio.DatasetReader, scene: SceneInfo, window: Window, out_shape: tuple[int, int] | None
) -> None:
    """Cheap checks that the read stays inside the scene and has a sane output shape."""
    if (src.height, src.width) != (scene.height, scene.width):
        raise ConfigError(
            f"Dataset {src.name} ({src.height} x {src.width} px) does not match scene "
            f"{scene.path} ({scene.height} x {scene.width} px); open scene.path for reading."
        )
    offsets = (window.row_off, window.col_off, window.height, window.width)
    inside = (
        all(float(v).is_integer() for v in offsets)
        and window.row_off >= 0
        and window.col_off >= 0
        and window.height >= 1
        and window.width >= 1
        and window.row_off + window.height <= scene.height
        and window.col_off + window.width <= scene.width
    )
    if not inside:
        raise ConfigError(
            f"{_describe(window)} is not an integer window inside {scene.path}, which has "
            f"{scene.height} rows x {scene.width} cols (pixels)."
        )
    if out_shape is not None and (
        len(out_shape) != 2 or not all(_is_int(n) and n >= 1 for n in out_shape)
    ):
        raise ConfigError(
            f"out_shape must be (rows, cols) of positive integers (pixels), got {out_shape!r}."
        )


def _read_bands(
    ds: rasterio.DatasetReader,
    bands: tuple[int, ...],
    window: Window,
    shape: tuple[int, int] | None,
    resampling: Resampling = Resampling.nearest,
) -> np.ndarray:
    """``(3, rows, cols)`` data of ``bands``, reading each distinct band once."""
    unique = sorted(set(bands))
    out_shape = None if shape is None else (len(unique), *shape)
    data = ds.read(unique, window=window, out_shape=out_shape, resampling=resampling)
    if list(bands) == unique:
        return data
    return data[[unique.index(b) for b in bands]]


def _valid_from_nodata(src: rasterio.DatasetReader, bands: tuple[int, ...], data: np.ndarray) -> np.ndarray | None:
    """GDAL's dataset mask computed from full-resolution ``data`` without reading the
    bands again, or None when it cannot be (the mask comes from elsewhere).

    Works when every band of the dataset reads its mask from one nodata value, or has
    none (``all_valid``), and ``bands`` are all of the dataset's bands: GDAL then marks
    a pixel invalid only where every band holds its nodata value (NaN nodata matches
    NaN). Reading the mask through GDAL would decode the blocks a second time.
    """
    flags = src.mask_flag_enums
    if sorted(set(bands)) != list(range(1, src.count + 1)):
        return None
    if all(f == [MaskFlags.all_valid] for f in flags):
        return np.ones(data.shape[1:], dtype=bool)
    if not all(f == [MaskFlags.nodata] for f in flags):
        return None
    invalid = np.ones(data.shape[1:], dtype=bool)
    for band, b in zip(data, bands):
        nodata = src.nodatavals[b - 1]
        invalid &= np.isnan(band) if nodata is not None and math.isnan(nodata) else band == nodata
    return ~invalid


def _all_finite(data: np.ndarray) -> np.ndarray:
    """``(rows, cols)`` True where all bands of ``(bands, rows, cols)`` data are finite."""
    if not np.issubdtype(data.dtype, np.floating):
        return np.ones(data.shape[1:], dtype=bool)
    return np.isfinite(data).all(axis=0)


def _zero_band_nodata(
    rgb: np.ndarray, data: np.ndarray, nodatavals: Sequence[float | None]
) -> None:
    """Set to 0, in place, each channel of ``rgb`` whose value is that band's nodata."""
    for channel, (band, nodata) in enumerate(zip(data, nodatavals)):
        if nodata is not None and not math.isnan(nodata):
            rgb[channel][band == nodata] = 0


def _is_int(value: object) -> bool:
    """True for Python and NumPy integers, False for bools and everything else."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _describe(window: Window) -> str:
    """Human-readable window, in pixels: ``window (row_off, col_off, height, width)``."""
    parts = ("row_off", "col_off", "height", "width")
    values = (window.row_off, window.col_off, window.height, window.width)
    text = ", ".join(f"{name}={_number(v)}" for name, v in zip(parts, values))
    return f"window ({text} px)"


def _number(value: float) -> int | float:
    """``value`` as an int when it is integral (for messages)."""
    return int(value) if float(value).is_integer() else value


def _gdal_reason(exc: BaseException) -> str:
    """GDAL's own message for a failed read (rasterio chains it as the cause)."""
    cause = exc.__cause__ or exc.__context__
    return (str(cause) if cause is not None else str(exc)).rstrip(". ")  # callers add the period


GDAL_CACHE_MB = 256
"""GDAL block cache of a process that reads tiles, MiB (``SAM_GEO_GDAL_CACHE_MB``
overrides). GDAL's default is 5 % of the machine's memory, which a reader of a large
scene fills tile after tile; a fixed cap keeps a reader's memory independent of the
scene size. Tiles are read once each, so a larger cache buys nothing."""


class SceneReader:
    """Reads tile windows, keeping datasets open between calls.

    One per process (:func:`scene_reader`): a Ray worker process reads many tiles of the
    same scenes, and opening a GeoTIFF (or a remote COG's header) for every tile would
    cost more than reading the tile. At most ``max_open`` datasets stay open (least
    recently used closed first); a local file rewritten since it was opened (another
    size or modification time) is opened again. Not shared between threads (GDAL handles are not
    thread-safe); Ray task workers run one task at a time.
    """

    def __init__(self, max_open: int = 16) -> None:
        self.max_open = max_open
        self._open: dict[tuple[Any, ...], rasterio.DatasetReader] = {}
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", int(os.environ.get("SAM_GEO_GDAL_CACHE_MB", GDAL_CACHE_MB)))

    def read(self, scene: SceneInfo, stretch: Stretch, window: Window, out_shape: tuple[int, int] | None) -> WindowRead:
        """:func:`read_window` on this process's open handle of ``scene.path``."""
        return read_window(self._dataset(scene.path), scene, stretch, window, out_shape)

    def _dataset(self, path: str) -> rasterio.DatasetReader:
        key = _file_version(path)
        src = self._open.pop(key, None)
        if src is None or src.closed:
            src = rasterio.open(path)
        self._open[key] = src  # most recently used last
        while len(self._open) > self.max_open:
            oldest = next(iter(self._open))
            self._open.pop(oldest).close()
        return src

    def close(self) -> None:
        """Close every open dataset."""
        for src in self._open.values():
            src.close()
        self._open.clear()


def _file_version(path: str) -> tuple[Any, ...]:
    """``(path, size, mtime_ns)`` of a local file, ``(path,)`` for a URL or GDAL path."""
    try:
        info = os.stat(path)
    except OSError:
        return (path,)
    return (path, info.st_size, info.st_mtime_ns)


_READER: SceneReader | None = None


def scene_reader() -> SceneReader:
    """This process's :class:`SceneReader`, made on first use."""
    global _READER
    if _READER is None:
        _READER = SceneReader()
    return _READER
