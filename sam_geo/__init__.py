"""sam-geo: segment whole satellite and aerial scenes with Segment Anything models.

The entry points are the three modes, which return GeoDataFrames in the (first)
scene's CRS and can write GeoJSON, GeoPackage or GeoParquet (``output=``):

* :func:`segment`: one polygon per feature of a prompt layer (points, boxes, rough masks);
* :func:`segment_auto`: every object, from a point grid per tile, stitched across tiles;
* :func:`segment_text`: every object matching text phrases, through a grounding detector
  (needs the ``text`` extra: ``pip install "sam-geo[text]"``).

Each takes a :class:`Settings` (``settings=``) and/or any of its fields as keywords;
:func:`load_preset` reads a YAML preset, :func:`make_settings` applies changes to one.
:func:`evaluate` scores a result against reference polygons; :class:`RunSummary` reads
``gdf.attrs["summary"]``. Heavy dependencies (torch, ray, transformers) are imported on
first use, so ``import sam_geo`` and ``sam-geo --help`` stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from sam_geo import errors
from sam_geo.errors import SamGeoError

__version__ = "0.1.0"

_LAZY = {
    "segment": "sam_geo.api",
    "segment_auto": "sam_geo.api",
    "segment_text": "sam_geo.api",
    "Settings": "sam_geo.settings",
    "make_settings": "sam_geo.settings",
    "load_preset": "sam_geo.settings",
    "evaluate": "sam_geo.evaluate",
    "RunSummary": "sam_geo.run.summary",
    "RunOutput": "sam_geo.run.pipeline",
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
