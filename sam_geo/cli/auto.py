"""``sam-geo auto``: every object of the scenes, without prompts."""

from __future__ import annotations

from typing import Any

import click

from sam_geo.cli import options
from sam_geo.cli.reports import report_auto, summary_of

COMMAND = "auto"


@click.command(COMMAND, context_settings=options.HELP_SETTINGS)
@click.argument("scenes", nargs=-1, required=True)
@options.auto_options(COMMAND)
@click.option("--labels-raster", type=click.Path(dir_okay=False), default=None,
              help="Also write an instance-label GeoTIFF: uint32, 0 = no object, else the object_id.")
@options.segmentation_options(COMMAND)
def auto(**params: Any) -> None:
    """Segment every object in SCENES automatically (no prompts): one polygon per object.

    SCENES are paths or URLs rasterio opens, globs, or .txt files listing them; several
    scenes give one merged output with a `scene` column. Each tile is prompted with a
    grid of points; objects cut by tile edges are stitched across tiles, so the result
    does not depend on --tile-size and --overlap. Rows carry object_id, score,
    stability, area_m2 and n_tiles.
    """
    settings = options.settings_from_cli(params, COMMAND)
    from sam_geo import segment_auto

    result = segment_auto(
        list(params["scenes"]),
        **options.run_arguments(params),
        labels_raster=params["labels_raster"],
        settings=settings,
    )
    report_auto(summary_of(result))
