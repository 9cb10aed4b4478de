"""Shared pytest fixtures and helpers of the sam-geo test suite."""

from __future__ import annotations

# --- environment and shared data ---------------------------------------------------
# Tests never touch the network; real data and weights come from ../shared beside the
# repository (CI clones the project next to it). A missing file fails, never skips.

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
BANEPA = SHARED / "data" / "banepa"
INRIA = SHARED / "data" / "inria"
FIELDS = SHARED / "data" / "fields"
WEIGHTS = SHARED / "weights" / "mobile_sam.pt"

os.environ["SAM_GEO_OFFLINE"] = "1"
# Relative paths (CI passes ``../shared/weights``) are made absolute, so subprocesses and
# notebook kernels started from another working directory find the same weights.
os.environ["SAM_GEO_WEIGHTS_DIR"] = str(Path(os.environ.get("SAM_GEO_WEIGHTS_DIR", SHARED / "weights")).resolve())



@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One embedded local Ray for the whole test session (start-up costs seconds)."""
    import ray

    from sam_geo.run.runtime import ensure_ray

    ensure_ray(None)
    yield
    ray.shutdown()


# --- raster fixtures ------------------------------------------------------------------
# Tiny GeoTIFFs written in code (no data files in the repo). Used by tests/test_raster.py.

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, Resampling

#: Default test georeferencing: 10 m UTM 45N pixels, north-up.
RASTER_TEST_TRANSFORM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 3_000_000.0)


def make_raster(
    path: str | Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:32645",
    transform: Affine = RASTER_TEST_TRANSFORM,
    nodata: float | None = None,
    mask: np.ndarray | None = None,
    alpha: bool = False,
    tiled: bool = False,
    overviews: bool | Sequence[int] = False,
    colorinterp: Sequence[ColorInterp] | None = None,
    **profile: Any,
) -> str:
    """Write ``data`` (``(bands, rows, cols)`` or ``(rows, cols)``) as a GeoTIFF; return its path.

    ``mask``: ``(rows, cols)`` bool/uint8 written as an internal GDAL mask (True/255 valid).
    ``alpha``: the last band of ``data`` is flagged as alpha. ``tiled``: 256 px deflate
    tiles. ``overviews``: True for levels 2, 4, 8 (average), or the list of factors.
    Extra keyword arguments go to the rasterio profile (``sparse_ok``, ``blockxsize``...).
    """
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    prof: dict[str, Any] = {
        "driver": "GTiff",
        "width": arr.shape[2],
        "height": arr.shape[1],
        "count": arr.shape[0],
        "dtype": arr.dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
    }
    if tiled:
        prof.update(tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    prof.update(profile)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(path, "w", **prof) as dst:
            if colorinterp is not None or alpha:  # before writing, or GTiff may drop alpha
                interp = list(colorinterp) if colorinterp is not None else list(dst.colorinterp)
                if alpha:
                    interp[-1] = ColorInterp.alpha
                dst.colorinterp = interp
            dst.write(arr)
            if mask is not None:
                dst.write_mask(np.where(np.asarray(mask), 255, 0).astype(np.uint8))
        if overviews:
            factors = [2, 4, 8] if overviews is True else list(overviews)
            with rasterio.open(path, "r+") as dst:
                dst.build_overviews(factors, Resampling.average)
    return str(path)


# --- end of raster fixtures -----------------------------------------------------------
