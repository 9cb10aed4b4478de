"""Every field of a Sentinel-2 scene, automatically (no prompts), as a GeoPackage.

    python pipelines/fields_auto.py SCENE -o fields.gpkg [--reference fields.gpkg] [--overwrite]

Uses the ``auto`` section of ``configs/fields.yaml`` (zoom, prompt-grid density, area
range in m^2); the scene's bands are fed as R, G, B in file order (a NIR, red, green
false-colour composite separates fields best). With ``--reference`` the result is
scored against known field outlines (one-to-one matching at IoU >= 0.5).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import sam_geo
from sam_geo.evaluate import evaluate
from sam_geo.run.summary import RunSummary
from sam_geo.settings import load_preset, make_settings

PRESET = Path(__file__).resolve().parents[1] / "configs" / "fields.yaml"


def preset_settings(path: Path = PRESET) -> dict[str, Any]:
    """The preset's ``common`` and ``auto`` keys: :class:`sam_geo.settings.Settings` field names."""
    return load_preset(path, "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scene")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--reference", help="known field outlines to score against")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    fields = sam_geo.segment_auto(
        [args.scene], output=args.output, overwrite=args.overwrite, settings=make_settings(**preset_settings())
    )
    summary = RunSummary.from_dict(fields.attrs["summary"])
    print(f"{len(fields)} fields -> {args.output} ({summary.tiles.processed} tiles, "
          f"{summary.seconds.get('total', 0.0):.0f} s)")
    if args.reference:
        print(evaluate(fields, args.reference).to_dict())


if __name__ == "__main__":
    main()
