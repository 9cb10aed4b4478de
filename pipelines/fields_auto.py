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

from sam_geo.auto import segment_auto
from sam_geo.config import load_config, section_values
from sam_geo.evaluate import evaluate

PRESET = Path(__file__).resolve().parents[1] / "configs" / "fields.yaml"
RENAMED = {"min_area": "min_area_m2", "simplify": "simplify_m", "stability_thresh": "stability_score_thresh",
           "max_area": "max_area_m2", "regularize": "regularize_m"}
DROPPED = {"workers", "address"}


def preset_settings(path: Path = PRESET) -> dict[str, object]:
    """The preset's ``auto`` keys as keyword arguments of :func:`segment_auto`."""
    values = section_values(load_config(path), "auto")
    values = {RENAMED.get(k, k): v for k, v in values.items() if k not in DROPPED}
    if values.get("zoom") == "auto":
        values.pop("zoom")
    elif "zoom" in values:
        values["zoom"] = int(values["zoom"])
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scene")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--reference", help="known field outlines to score against")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    fields = segment_auto(args.scene, output=args.output, overwrite=args.overwrite, **preset_settings())
    summary = fields.attrs["summary"]
    print(f"{len(fields)} fields -> {args.output} ({summary['tiles']['processed']} tiles, "
          f"{summary['seconds']['total']:.0f} s)")
    if args.reference:
        print(evaluate(fields, args.reference).to_dict())


if __name__ == "__main__":
    main()
