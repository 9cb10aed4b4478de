"""``sam-geo text``: every object matching text phrases, found by a grounding detector."""

from __future__ import annotations

from typing import Any

import click

from sam_geo.cli import options
from sam_geo.cli.reports import report_prompted, summary_of

COMMAND = "text"


@click.command(COMMAND, context_settings=options.HELP_SETTINGS,
               short_help="Outline every object matching text phrases over a whole scene.")
@click.argument("scene", type=str)
@click.argument("phrases", nargs=-1, required=True)
@options.text_options(COMMAND)
@options.segmentation_options(COMMAND)
def text(**params: Any) -> None:
    """Outline every object matching PHRASES (e.g. "swimming pool") over a whole SCENE.

    A grounding detector finds boxes per tile; SAM segments each box. Output rows carry
    the phrase, the detector's score, SAM's score and the area.

    With --model sam3 (concept prompts; weights gated, see `sam-geo models`) SAM 3 finds
    every instance of each phrase itself, and instances cut by tile edges are stitched
    into one polygon; rows carry the phrase, SAM 3's score, the area and n_tiles.
    """
    settings = options.settings_from_cli(params, COMMAND)
    from sam_geo import segment_text

    result = segment_text(
        [params["scene"]],
        list(params["phrases"]),
        **options.run_arguments(params),
        settings=settings,
    )
    report_prompted(summary_of(result))
