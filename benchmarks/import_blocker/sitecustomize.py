"""Make chosen top-level packages unimportable, to prove code runs without them.

Put this folder first on ``PYTHONPATH``: Python imports ``sitecustomize`` at start-up,
and this one wraps the meta path finders so that they find none of the packages
named in ``SAM_GEO_BLOCK_IMPORTS`` (comma-separated top-level names; unset: the
geospatial and cluster stack below), whether installed or not. Used by
``tests/test_model_light_import.py`` and to try ``benchmarks/gpu_check.py`` on a
machine that has everything installed, as it must run on a GPU machine that has only
numpy and torch:

    PYTHONPATH=benchmarks/import_blocker .venv/bin/python benchmarks/gpu_check.py --allow-cpu --quick

Importing one of them then fails as if it were not installed (``ModuleNotFoundError``).
``SAM_GEO_BLOCK_IMPORTS=`` (empty) blocks nothing. Each lookup of a blocked package is
counted in ``sys.blocked_import_attempts`` (name -> count).
"""

from __future__ import annotations

import os
import sys

DEFAULT_BLOCKED = "ray,rasterio,geopandas,shapely,pyproj,pyogrio,fiona,affine"


class HidePackages:
    """Wraps a meta path finder so it finds nothing for the top-level packages ``names``:
    to the importer they are simply not installed (``ModuleNotFoundError``, and
    ``importlib.util.find_spec`` gives None, as code probing for optional packages expects)."""

    def __init__(self, finder: object, names: frozenset[str]) -> None:
        self.finder = finder
        self.names = names

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        top = fullname.partition(".")[0]
        if top in self.names:
            attempts = sys.__dict__.setdefault("blocked_import_attempts", {})
            attempts[top] = attempts.get(top, 0) + 1
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(fullname, path, target) if find is not None else None

    def __getattr__(self, attr: str) -> object:
        return getattr(self.finder, attr)


_names = frozenset(n.strip() for n in os.environ.get("SAM_GEO_BLOCK_IMPORTS", DEFAULT_BLOCKED).split(",") if n.strip())
if _names:
    for _name in list(sys.modules):  # nothing should be loaded this early, but be sure
        if _name.partition(".")[0] in _names:
            del sys.modules[_name]
    sys.meta_path[:] = [HidePackages(finder, _names) for finder in sys.meta_path]
    sys.blocked_imports = _names  # type: ignore[attr-defined]
