"""``sam-geo evaluate``: precision, recall and F1 of predicted polygons against ground truth."""

from __future__ import annotations

import json
from typing import Any

import click

from sam_geo.cli.options import HELP_SETTINGS


@click.command("evaluate", context_settings=HELP_SETTINGS)
@click.argument("pred", type=str)
@click.argument("gt", type=str)
@click.option("--iou", type=float, default=0.5, show_default=True, help="Minimum IoU of a match, in (0, 1].")
@click.option("--aoi", default=None, help="Polygon layer; only polygons whose representative point is inside count.")
@click.option("--key", default=None, help="Attribute shared by PRED and GT (e.g. osm_id): adds per-object IoU.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--out-of-core/--in-memory", default=None,
              help="Read GeoParquet layers partition by partition with dask (default: when PRED is a "
                   "GeoParquet dataset folder, GT GeoParquet, and no --aoi or --key).")
def evaluate_command(
    pred: str, gt: str, iou: float, aoi: str | None, key: str | None, as_json: bool, out_of_core: bool | None
) -> None:
    """Score predicted polygons PRED against ground truth GT: precision, recall, F1.

    Polygons are matched one-to-one (greedy, highest IoU first) at IoU >= --iou, after
    reprojecting both layers to GT's projected CRS (or its UTM zone).
    """
    from sam_geo.evaluate import evaluate

    result = evaluate(pred, gt, iou=iou, aoi=aoi, key=key, out_of_core=out_of_core)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(evaluation_table(result, pred, gt))


def evaluation_table(result: Any, pred: str, gt: str) -> str:
    """Human-readable summary of an :class:`sam_geo.evaluate.EvaluationResult`."""
    r = result
    lines = [
        f"predictions   {r.n_pred:>8,}  {pred}",
        f"ground truth  {r.n_gt:>8,}  {gt}",
        f"matched at IoU >= {r.iou_threshold:g} in {r.crs}",
        "",
        f"  precision  {r.precision:6.3f}   TP {r.tp:,} / {r.n_pred:,} predictions",
        f"  recall     {r.recall:6.3f}   TP {r.tp:,} / {r.n_gt:,} ground truth",
        f"  F1         {r.f1:6.3f}   FP {r.fp:,}  FN {r.fn:,}  mean IoU of matches {r.mean_matched_iou:.3f}",
    ]
    if r.n_pred_dropped or r.n_gt_dropped:
        lines.append(f"  dropped (empty or no area): {r.n_pred_dropped:,} predictions, {r.n_gt_dropped:,} ground truth")
    if r.n_pred_outside_aoi or r.n_gt_outside_aoi:
        lines.append(f"  outside the AOI: {r.n_pred_outside_aoi:,} predictions, {r.n_gt_outside_aoi:,} ground truth")
    return "\n".join(lines + _per_object_lines(r.per_object))


def _per_object_lines(o: Any) -> list[str]:
    """The per-object IoU paragraph (``--key``), or nothing."""
    if o is None:
        return []
    return [
        "",
        f"per-object IoU by {o.key!r}: {o.n_objects:,} objects, {o.n_missing:,} without prediction (IoU 0), "
        f"{o.n_extra:,} prediction keys not in ground truth",
        f"  median {o.median:.3f}  mean {o.mean:.3f}  IoU>=0.5 {o.share_ge_50:.1%}  IoU>=0.75 {o.share_ge_75:.1%}",
    ]
