"""Does upsampling small objects help SAM? Sentinel-2 fields at zoom 1, 2 and 4.

Prompts are the labelled field polygons (> 5000 m^2) as boxes; prints per-field median
IoU and the share >= 0.5 for each zoom (``--zoom`` / ``TileGrid.zoom``).

    python benchmarks/zoom.py
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np

from _common import FIELDS, WEIGHTS, per_object_iou
from sam_geo import segment


def main() -> None:
    fields = gpd.read_file(FIELDS / "fields_polygons.gpkg", layer="polygons")
    fields = fields[fields.area > 5000].reset_index(drop=True)
    fields["fid_"] = np.arange(len(fields))
    for zoom in (1, 2, 4):
        gdf = segment(FIELDS / "befl_s2_nir_r_g.tif", fields, id_column="fid_", zoom=zoom, weights=str(WEIGHTS),
                      workers=0, progress=False)
        ious = per_object_iou(gdf, fields, "fid_")
        seconds = gdf.attrs["summary"]["seconds"]["total"]
        print(f"zoom {zoom}: median IoU {np.median(ious):.3f}  share>=0.5 {(ious >= 0.5).mean():.3f}  {seconds:.1f} s")


if __name__ == "__main__":
    main()
