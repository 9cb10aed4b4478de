"""The short paragraphs the segmentation commands print on stderr after a run.

They read the run summary (``gdf.attrs["summary"]``) as a
:class:`sam_geo.run.summary.RunSummary`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from sam_geo.run.summary import RunSummary

MAX_LISTED = 10
"""At most this many failed tiles and prompt ids are listed."""

PROMPT_PROBLEMS = (("outside", "outside the scene"), ("on_nodata", "on nodata"),
                   ("invalid", "with unusable geometry"), ("empty", "with an empty mask"))


def summary_of(result: Any) -> RunSummary:
    """The run summary of a run's result: a :class:`~sam_geo.run.pipeline.RunOutput` or a
    GeoDataFrame (``gdf.attrs["summary"]``)."""
    from sam_geo.run.summary import RunSummary

    data = result.summary if hasattr(result, "summary") else result.attrs["summary"]
    return RunSummary.from_dict(data)


def _failures(summary: RunSummary) -> list[str]:
    """One line per failed tile (the first MAX_LISTED)."""
    return [f"  tile {failure['tile']} failed: {failure['error']}" for failure in summary.failures[:MAX_LISTED]]


def _throughput(summary: RunSummary) -> list[str]:
    """One line on how busy the model hosts were (none when no tile ran)."""
    if not summary.workers:
        return []
    busy = [round(100 * w["model_busy_share"]) for w in summary.workers]
    share = f"{busy[0]} %" if len(busy) == 1 else f"{min(busy)}-{max(busy)} %"
    return [
        f"  {len(busy)} model worker{'s' if len(busy) > 1 else ''}: {summary.rates.get('tiles_per_s', 0.0):.2f} "
        f"tiles/s, model busy {share} of the time, {summary.rates.get('cpu_ms_per_tile', 0.0):.0f} ms of CPU "
        "per tile outside the model"
    ]


def report_prompted(summary: RunSummary) -> None:
    """``segment`` and ``text``: what was written and which prompts were not used."""
    p, t = summary.prompts, summary.tiles
    lines = [
        f"wrote {summary.features} polygons to {summary.output} "
        f"({t.processed} tiles encoded, {t.resumed} resumed, {t.failed} failed, "
        f"{summary.seconds.get('total', 0.0):.1f} s)",
        *_throughput(summary),
        *_failures(summary),
    ]
    for key, label in PROMPT_PROBLEMS:
        count = getattr(p, key)
        if count:
            ids = ", ".join(map(str, getattr(p, f"{key}_ids")[:MAX_LISTED])) + (" ..." if count > MAX_LISTED else "")
            lines.append(f"  {count} prompts {label}: {ids}")
    if summary.features == 0:
        lines.append(f"  warning: no polygons were produced from the {p.total} prompts; the output is an "
                     "empty layer (see the reasons above)")
    click.echo("\n".join(lines), err=True)


def report_auto(summary: RunSummary) -> None:
    """``auto``: what was written and how tile masks were joined into objects."""
    t, o = summary.tiles, summary.objects
    dropped = o.get("disowned", 0) + o.get("duplicates_suppressed", 0) + o.get("crossing_wholes", 0)
    lines = [
        f"wrote {summary.features} objects to {summary.output} "
        f"({t.processed} tiles encoded, {t.skipped_nodata} all nodata, {t.resumed} resumed, "
        f"{t.failed} failed, {summary.seconds.get('total', 0.0):.1f} s)",
        f"  stitched {o.get('pieces', 0)} tile masks: {o.get('joins', 0)} joined across tiles, "
        f"{o.get('mosaics', 0)} objects assembled from pieces, {dropped} "
        f"dropped as fragments or duplicates, {o.get('outside_area_range', 0)} outside the area range",
    ]
    if o.get("labels_raster"):
        lines.append(f"  labels raster: {o['labels_raster']}")
    lines += _throughput(summary) + _failures(summary)
    click.echo("\n".join(lines), err=True)
