"""sam-geo: segment whole satellite and aerial scenes with Segment Anything models.

The main entry points are :func:`segment` (prompts from a vector layer). They return
GeoDataFrames in the scene's CRS and can write GeoJSON, GeoPackage or GeoParquet.
Heavy dependencies (torch, ray) are imported on first use, so ``import sam_geo`` and
``sam-geo --help`` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from sam_geo import errors
from sam_geo.errors import SamGeoError

__version__ = "0.1.0"

_LAZY = {
    "segment": "sam_geo.api",
    "segment_auto": "sam_geo.auto",
    "AutoParams": "sam_geo.auto",
    "SegmentSettings": "sam_geo.api",
    "RuntimeOptions": "sam_geo.run.runtime",
    "TileGrid": "sam_geo.geo.tiles",
    "Tile": "sam_geo.geo.tiles",
    "open_scene": "sam_geo.io.scenes",
    "known_models": "sam_geo.model.registry",
}

__all__ = ["SamGeoError", "errors", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sam_geo' has no attribute {name!r}")
