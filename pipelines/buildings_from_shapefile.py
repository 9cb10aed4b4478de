"""Building outlines from a footprint layer, regularized, as a GeoPackage.

    python pipelines/buildings_from_shapefile.py SCENE FOOTPRINTS -o buildings.gpkg \
        [--reference outlines.geojson --key osm_id]
"""

from __future__ import annotations

import argparse

import sam_geo
from sam_geo.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scene")
    parser.add_argument("footprints", help="polygons or points, any vector format and CRS")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--reference", help="true outlines to score against")
    parser.add_argument("--key", default=None, help="attribute shared by footprints and reference")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    buildings = sam_geo.segment(
        args.scene,
        args.footprints,
        output=args.output,
        overwrite=args.overwrite,
        id_column=args.key,
        regularize_m=0.5,
        min_area_m2=1.0,
    )
    summary = buildings.attrs["summary"]
    print(f"{len(buildings)} buildings -> {args.output}; prompts not used: "
          f"{summary['prompts']['outside']} outside, {summary['prompts']['on_nodata']} on nodata")
    if args.reference:
        print(evaluate(buildings, args.reference, key=args.key).to_dict())


if __name__ == "__main__":
    main()
