"""``sam-geo segment``: the object under each prompt of a vector layer."""

from __future__ import annotations

from typing import Any

import click

from sam_geo.cli import options
from sam_geo.cli.reports import report_prompted, summary_of

COMMAND = "segment"


@click.command(COMMAND, context_settings=options.HELP_SETTINGS)
@click.argument("scenes", nargs=-1, required=True)
@click.option("--prompts", required=True, help="Vector layer of prompts (Shapefile, GeoJSON, GPKG, GeoParquet).")
@click.option("--prompts-layer", default=None, help="Layer name inside a multi-layer prompt file.")
@click.option("--prompts-crs", default=None, help="CRS for a prompt layer that has none.")
@click.option("--group-column", default=None,
              help="Attribute naming the object each row belongs to: rows sharing it are one prompt "
                   "(several points, plus a box when the group has a polygon).")
@click.option("--label-column", default=None,
              help="With --group-column: attribute holding 1 (positive) or 0 (negative) for point rows.")
@click.option("--negative-points", default=None,
              help="Point layer of negative points; each joins every prompt whose box it lies near.")
@click.option("--id-column", default=None, help="Prompt attribute used to name prompts in the summary.")
@options.prompt_options(COMMAND)
@options.segmentation_options(COMMAND)
def segment(**params: Any) -> None:
    """Segment the object under each prompt of a vector layer, over whole SCENES.

    SCENES: paths or URLs rasterio can open, globs ("tiles/*.tif") or @list.txt files;
    several scenes give one merged output with a `scene` column.
    """
    settings = options.settings_from_cli(params, COMMAND)
    from sam_geo import segment as run_segment

    result = run_segment(
        list(params["scenes"]),
        params["prompts"],
        **options.run_arguments(params),
        prompts_layer=params["prompts_layer"],
        prompts_crs=params["prompts_crs"],
        id_column=params["id_column"],
        negative_points=params["negative_points"],
        group_column=params["group_column"],
        label_column=params["label_column"],
        settings=settings,
    )
    report_prompted(summary_of(result))
