"""Many scenes, one prompt layer, one merged output, on a Ray cluster; resumable.

    python pipelines/cluster_many_scenes.py "scenes/*.tif" --prompts footprints.parquet \
        -o buildings.parquet --work-dir run1 [--address auto]

Kill it at any time and run the same command again: finished tiles are not redone.
"""

from __future__ import annotations

import argparse

import sam_geo
from sam_geo.run.summary import RunSummary
from sam_geo.settings import make_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenes", nargs="+", help="paths, globs or @list.txt")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--address", default=None, help="'auto' inside a Ray cluster; default: local Ray")
    parser.add_argument("--workers", type=int, default=None, help="model actors; default one per GPU")
    parser.add_argument("--max-failed-tiles", type=int, default=0)
    args = parser.parse_args()

    gdf = sam_geo.segment(
        args.scenes,
        args.prompts,
        output=args.output,
        work_dir=args.work_dir,
        settings=make_settings(workers=args.workers, address=args.address, max_failed_tiles=args.max_failed_tiles),
    )
    tiles = RunSummary.from_dict(gdf.attrs["summary"]).tiles
    print(f"{len(gdf)} polygons from {len(set(gdf.get('scene', ['one scene'])))} scene(s); tiles: {tiles}")


if __name__ == "__main__":
    main()
