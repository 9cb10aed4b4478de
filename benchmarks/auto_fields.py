"""Automatic segmentation of the Sentinel-2 fields scene with ``configs/fields.yaml``.

Runs :func:`sam_geo.segment_auto` on ``../shared/data/fields/befl_s2_nir_r_g.tif``
(1500 x 806 px, 10 m, NIR/red/green) with the ``auto`` section of the preset (zoom,
prompt grid, area range) and scores the result against ``fields_polygons.gpkg`` inside
``label_locations.gpkg`` only (the labels are sparse; one-to-one matching at IoU >=
0.5, a polygon counts when its representative point lies in a label box;
:func:`sam_geo.evaluate.evaluate`). Prints precision, recall, F1, the matched IoU and
the run's stage seconds. Only the label boxes wholly inside the scene count (the labels
cover a wider area than this crop).

    python benchmarks/auto_fields.py [--config configs/fields.yaml] [--points-per-side N] [--zoom Z] [--no-skip-covered] [--work-dir DIR] [--output OUT.gpkg]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import geopandas as gpd

from _common import FIELDS, WEIGHTS
from sam_geo import segment_auto
from sam_geo.evaluate import evaluate
from sam_geo.io.scenes import open_scene

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipelines"))
from fields_auto import preset_settings  # noqa: E402  (the pipeline's own preset reader)


SCENE = FIELDS / "befl_s2_nir_r_g.tif"


def labelled_boxes_in_scene(scene: Path) -> gpd.GeoDataFrame:
    """The label locations lying wholly inside the scene: several of the 16 boxes are
    outside this 15 x 8 km crop, and their fields cannot be found in it."""
    boxes = gpd.read_file(FIELDS / "label_locations.gpkg", layer="locations")
    footprint = open_scene(scene).footprint
    boxes = boxes.to_crs(open_scene(scene).crs)
    return boxes[boxes.within(footprint)].reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "fields.yaml")
    parser.add_argument("--points-per-side", type=int, default=None)
    parser.add_argument("--zoom", type=int, default=None, choices=[1, 2, 4])
    parser.add_argument("--no-skip-covered", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep tiles here; a rerun only re-stitches")
    parser.add_argument("--output", type=Path, default=None, help="also write the objects here")
    args = parser.parse_args()
    settings = preset_settings(args.config)
    if args.points_per_side:
        settings["points_per_side"] = args.points_per_side
    if args.zoom:
        settings["zoom"] = args.zoom
    if args.no_skip_covered:
        settings["skip_covered"] = False
    start = time.perf_counter()
    fields = segment_auto(SCENE, weights=str(WEIGHTS), work_dir=args.work_dir,
                          output=args.output, overwrite=True,
                          **{**settings, "workers": args.workers, "progress": False})
    wall = time.perf_counter() - start
    aoi = labelled_boxes_in_scene(SCENE)
    result = evaluate(fields, FIELDS / "fields_polygons.gpkg", iou=0.5, aoi=aoi)
    summary = fields.attrs["summary"]
    s, t, p = summary["seconds"], summary["tiles"], summary["prompts"]
    print(f"settings {settings}")
    print(f"{len(fields)} objects; inside the label locations: P {result.precision:.3f} R {result.recall:.3f} "
          f"F1 {result.f1:.3f} (TP {result.tp}, {result.n_pred} predictions, {result.n_gt} fields, matched IoU "
          f"{result.mean_matched_iou:.3f}; {len(aoi)} of 16 label boxes lie inside the scene)")
    print(f"{t['processed']} tiles, {p['used']} points decoded ({p.get('skipped_covered', 0)} skipped as covered); "
          f"wall {wall:.0f} s: startup {s['startup']:.1f}, encode {s['encode']:.1f}, decode {s['decode']:.1f}, "
          f"vectorize {s['vectorize']:.1f}, stitch {s.get('stitch', 0):.1f} s; precision {summary['model']['precision']}")


if __name__ == "__main__":
    main()
