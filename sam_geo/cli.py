"""The ``sam-geo`` command line: a thin layer over :mod:`sam_geo.api`.

Exit codes: 0 success; 1 the run failed (an error while running, see the message);
2 bad input or usage (nothing was run). With ``--debug`` errors show their traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from sam_geo.errors import SamGeoError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parse_bands(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        bands = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated band numbers like 4,3,2, got {value!r}") from exc
    if len(bands) not in (1, 3):
        raise click.BadParameter(f"give 1 or 3 band numbers (1-based), got {len(bands)}")
    return bands


def _apply_config(ctx: click.Context, command: str) -> None:
    """Fill options not given on the command line from ``--config`` (flags win)."""
    path = ctx.params.get("config")
    if not path:
        return
    from sam_geo.config import load_config, section_values

    values = section_values(load_config(path), command)
    for key, value in values.items():
        source = ctx.get_parameter_source(key)
        if source in (click.core.ParameterSource.DEFAULT, None):
            ctx.params[key] = tuple(value) if key == "bands" else value


def common_segment_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by the segmentation commands."""
    options = [
        click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output file: .geojson, .gpkg or .parquet."),
        click.option("--overwrite", is_flag=True, help="Replace the output (and summary) if it exists."),
        click.option("--model", default="mobile_sam", show_default=True, help="Model name (see `sam-geo models`)."),
        click.option("--weights", type=click.Path(dir_okay=False), help="Weights file; default: cache, then download."),
        click.option("--bands", callback=_parse_bands, help="1-based bands fed as R,G,B, e.g. 4,3,2 (default: by band count)."),
        click.option("--stretch", type=click.Choice(["auto", "none", "percentile"]), default="auto", show_default=True,
                     help="Scene-wide contrast stretch to 8 bits; auto: none for uint8, 1-99 percentiles otherwise."),
        click.option("--tile-size", type=int, default=1024, show_default=True, help="Tile (model input) size in pixels."),
        click.option("--overlap", type=int, default=128, show_default=True, help="Halo around each tile, pixels per side."),
        click.option("--zoom", type=click.Choice(["auto", "1", "2", "4"]), default="auto", show_default=True,
                     help="Model pixels per scene pixel; auto upsamples when prompted objects are small."),
        click.option("--min-area", type=float, default=0.5, show_default=True, help="Drop polygon parts and holes below this, m^2."),
        click.option("--simplify", type=float, default=None, help="Simplify outlines with this tolerance in metres."),
        click.option("--regularize", "regularize", type=float, default=None, is_flag=False, flag_value=0.5,
                     help="Regularize building outlines (right angles, straight edges); optional tolerance in "
                          "metres, 0.5 when given without a value."),
        click.option("--batch-size", type=int, default=None, help="Prompts per mask-decoder call (default: 64 on GPU, 4 on CPU)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="Model arithmetic (torch.autocast); auto: bf16 on CUDA, fp32 on CPU."),
        click.option("--encode-batch", type=click.IntRange(1, 64), default=None,
                     help="Tiles per image-encoder call (default: 4 on CUDA, 1 on CPU)."),
        click.option("--decoder-context", type=int, default=None, metavar="PX",
                     help="CPU, box prompts: decode each box against a square of PX model pixels around it "
                          "instead of the whole tile (e.g. 256: about 3x faster decoding, slightly different "
                          "masks). Default: the whole tile, SAM's own outputs."),
        click.option("--workers", type=int, default=None, help="Model actors (default: one per GPU, else 1; 0: no Ray)."),
        click.option("--address", default=None, help="Ray cluster to join ('auto' or host:port); default: a local Ray."),
        click.option("--assume-crs", default=None, help="CRS for a scene that has none, e.g. EPSG:32645."),
        click.option("--summary", "summary_path", type=click.Path(dir_okay=False), help="Write the run summary as JSON here."),
        click.option("--work-dir", type=click.Path(file_okay=False), default=None,
                     help="Keep finished tiles here; rerunning the same command resumes."),
        click.option("--restart", is_flag=True, help="Discard what --work-dir holds and start over."),
        click.option("--retries", type=click.IntRange(0, 10), default=2, show_default=True,
                     help="Retries of a failed tile before it is recorded as failed."),
        click.option("--max-failed-tiles", type=click.IntRange(0), default=0, show_default=True,
                     help="Fail the run (exit 1, no output) if more tiles than this fail."),
        click.option("--config", type=click.Path(dir_okay=False), help="YAML preset (flags given here win)."),
        click.option("--progress/--no-progress", default=True, help="Progress bar on stderr."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sam-geo")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Segment satellite and aerial scenes with Segment Anything; get georeferenced polygons."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("scenes", nargs=-1, required=True)
@click.option("--prompts", required=True, help="Vector layer of prompts (Shapefile, GeoJSON, GPKG, GeoParquet).")
@click.option("--prompts-layer", default=None, help="Layer name inside a multi-layer prompt file.")
@click.option("--prompts-crs", default=None, help="CRS for a prompt layer that has none.")
@click.option("--prompt-as", type=click.Choice(["auto", "point", "box", "box+point", "mask"]), default="auto",
              show_default=True,
              help="How features become prompts (auto: points as points, polygons as boxes; mask: to refine outdated "
                   "outlines, the box grown 25%, a point and the polygon as SAM's mask input).")
@click.option("--group-column", default=None,
              help="Attribute naming the object each row belongs to: rows sharing it are one prompt "
                   "(several points, plus a box when the group has a polygon).")
@click.option("--label-column", default=None,
              help="With --group-column: attribute holding 1 (positive) or 0 (negative) for point rows.")
@click.option("--negative-points", default=None,
              help="Point layer of negative points; each joins every prompt whose box it lies near.")
@click.option("--box-grow", type=float, default=None,
              help="Grow box prompts by this fraction of their longer side (default 0; 0.25 with --prompt-as mask).")
@click.option("--multimask/--no-multimask", default=False, show_default=True,
              help="Three candidate masks per prompt; keep the one closest in area to the prompt polygon.")
@click.option("--id-column", default=None, help="Prompt attribute used to name prompts in the summary.")
@common_segment_options
@click.pass_context
def segment(ctx: click.Context, **kwargs: Any) -> None:
    """Segment the object under each prompt of a vector layer, over whole SCENES.

    SCENES: paths or URLs rasterio can open, globs ("tiles/*.tif") or @list.txt files;
    several scenes give one merged output with a `scene` column.
    """
    _apply_config(ctx, "segment")
    params = dict(ctx.params)
    from sam_geo.api import segment as run_segment
    from sam_geo.run.runtime import RuntimeOptions

    output = params["output"]
    if output is None:
        raise click.UsageError("give an output file with -o/--output (.geojson, .gpkg or .parquet)")
    settings = _settings_from(params)
    runtime = RuntimeOptions(
        workers=params["workers"], address=params["address"], progress=params["progress"], retries=params["retries"]
    )
    gdf = run_segment(
        list(params["scenes"]),
        params["prompts"],
        output=output,
        overwrite=params["overwrite"],
        prompt_as=params["prompt_as"],
        prompts_layer=params["prompts_layer"],
        prompts_crs=params["prompts_crs"],
        id_column=params["id_column"],
        settings=settings,
        runtime=runtime,
        summary_path=params["summary_path"],
        work_dir=params["work_dir"],
        restart=params["restart"],
        max_failed_tiles=params["max_failed_tiles"],
        negative_points=params["negative_points"],
        group_column=params["group_column"],
        label_column=params["label_column"],
    )
    _report(gdf.attrs["summary"])


@cli.command()
@click.argument("scenes", nargs=-1, required=True)
@click.option("--points-per-side", type=click.IntRange(1, 256), default=32, show_default=True,
              help="Prompt grid per tile: N x N points, one every tile-size / N pixels.")
@click.option("--pred-iou-thresh", type=click.FloatRange(0, 1, max_open=True), default=0.88, show_default=True,
              help="Keep masks whose predicted IoU is above this.")
@click.option("--stability-thresh", type=click.FloatRange(0, 1, max_open=True), default=0.95, show_default=True,
              help="Keep masks whose stability score is at least this.")
@click.option("--nested-thresh", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Of two masks nested in each other (this share of the smaller inside the larger), keep only "
                   "the higher-scored; e.g. 0.8 for buildings (default: off).")
@click.option("--max-area", type=click.FloatRange(0, min_open=True), default=None,
              help="Drop objects larger than this, m^2 (after stitching; --min-area drops smaller ones).")
@click.option("--skip-covered/--no-skip-covered", default=True, show_default=True,
              help="Decode grid points coarse to fine and skip those inside a mask already kept (about half "
                   "the decoder work); --no-skip-covered decodes every point, as SAM's generator does.")
@click.option("--labels-raster", type=click.Path(dir_okay=False), default=None,
              help="Also write an instance-label GeoTIFF: uint32, 0 = no object, else the object_id.")
@common_segment_options
@click.pass_context
def auto(ctx: click.Context, **kwargs: Any) -> None:
    """Segment every object in SCENES automatically (no prompts): one polygon per object.

    SCENES are paths or URLs rasterio opens, globs, or .txt files listing them; several
    scenes give one merged output with a `scene` column. Each tile is prompted with a grid of points; objects cut by tile edges are stitched
    across tiles, so the result does not depend on --tile-size and --overlap. Rows
    carry object_id, score, stability, area_m2 and n_tiles.
    """
    _apply_config(ctx, "auto")
    params = dict(ctx.params)
    from sam_geo.api import DEFAULT_MIN_AREA_M2
    from sam_geo.auto import AutoParams, segment_auto
    from sam_geo.run.runtime import RuntimeOptions

    if params["output"] is None:
        raise click.UsageError("give an output file with -o/--output (.geojson, .gpkg or .parquet)")
    extra = {k: params[k] for k in ("box_nms_thresh", "match_iou", "max_tile_fraction", "nested_thresh")
             if params.get(k) is not None}
    auto_params = AutoParams(
        points_per_side=params["points_per_side"],
        pred_iou_thresh=params["pred_iou_thresh"],
        stability_score_thresh=params["stability_thresh"],
        min_area_m2=params["min_area"],
        max_area_m2=params["max_area"],
        points_per_batch=params["batch_size"],
        skip_covered=params["skip_covered"],
        **extra,
    )
    gdf = segment_auto(
        list(params["scenes"]),
        output=params["output"],
        overwrite=params["overwrite"],
        params=auto_params,
        # --min-area filters whole objects here; specks and holes go below the default only
        settings=_settings_from({**params, "min_area": min(params["min_area"], DEFAULT_MIN_AREA_M2)}),
        runtime=RuntimeOptions(workers=params["workers"], address=params["address"], progress=params["progress"],
                               retries=params["retries"]),
        summary_path=params["summary_path"],
        labels_raster=params["labels_raster"],
        work_dir=params["work_dir"],
        restart=params["restart"],
        max_failed_tiles=params["max_failed_tiles"],
    )
    _report_auto(gdf.attrs["summary"])


def _report_auto(summary: dict[str, Any]) -> None:
    """One short paragraph on stderr for `auto`: what was written, how tiles were joined."""
    t, s, o = summary["tiles"], summary["seconds"], summary["objects"]
    lines = [
        f"wrote {summary['features']} objects to {summary['output']} "
        f"({t['processed']} tiles encoded, {t['skipped_nodata']} all nodata, {t['resumed']} resumed, "
        f"{t['failed']} failed, {s['total']:.1f} s)",
        f"  stitched {o.get('pieces', 0)} tile masks: {o.get('joins', 0)} joined across tiles, "
        f"{o.get('mosaics', 0)} objects assembled from pieces, {o.get('disowned', 0) + o.get('duplicates_suppressed', 0)} "
        f"dropped as fragments or duplicates, {o.get('outside_area_range', 0)} outside the area range",
    ]
    if o.get("labels_raster"):
        lines.append(f"  labels raster: {o['labels_raster']}")
    for failure in summary.get("failures", [])[:10]:
        lines.append(f"  tile {failure['tile']} failed: {failure['error']}")
    click.echo("\n".join(lines), err=True)


def _report(summary: dict[str, Any]) -> None:
    """One short paragraph on stderr: what was written and what was not used."""
    p, t, s = summary["prompts"], summary["tiles"], summary["seconds"]
    lines = [
        f"wrote {summary['features']} polygons to {summary['output']} "
        f"({t['processed']} tiles encoded, {t['resumed']} resumed, {t['failed']} failed, {s['total']:.1f} s)",
    ]
    for failure in summary.get("failures", [])[:10]:
        lines.append(f"  tile {failure['tile']} failed: {failure['error']}")
    for key, label in (("outside", "outside the scene"), ("on_nodata", "on nodata"),
                       ("invalid", "with unusable geometry"), ("empty", "with an empty mask")):
        if p.get(key):
            ids = ", ".join(map(str, p[f"{key}_ids"][:10])) + (" ..." if p[key] > 10 else "")
            lines.append(f"  {p[key]} prompts {label}: {ids}")
    if summary["features"] == 0:
        lines.append(f"  warning: no polygons were produced from the {p['total']} prompts; the output is an "
                     "empty layer (see the reasons above)")
    click.echo("\n".join(lines), err=True)


@cli.command()
@click.argument("scene", type=str)
@click.argument("phrases", nargs=-1, required=True)
@click.option("--detector", default="google/owlv2-base-patch16-ensemble", show_default=True,
              help="Grounding detector: Hugging Face name (OWLv2 or Grounding DINO) or a local save_pretrained folder.")
@click.option("--box-threshold", type=click.FloatRange(0, 1), default=None, help="Detector score threshold.")
@click.option("--text-threshold", type=click.FloatRange(0, 1), default=None, help="Grounding DINO text threshold.")
@common_segment_options
@click.pass_context
def text(ctx: click.Context, **kwargs: Any) -> None:
    """Outline every object matching PHRASES (e.g. "swimming pool") over a whole SCENE.

    A grounding detector finds boxes per tile; SAM segments each box. Output rows carry
    the phrase, the detector's score, SAM's score and the area.
    """
    _apply_config(ctx, "text")
    params = dict(ctx.params)
    from sam_geo.grounded import segment_text
    from sam_geo.run.runtime import RuntimeOptions

    if params["output"] is None:
        raise click.UsageError("give an output file with -o/--output (.geojson, .gpkg or .parquet)")
    gdf = segment_text(
        params["scene"],
        list(params["phrases"]),
        detector=params["detector"],
        box_threshold=params["box_threshold"],
        text_threshold=params["text_threshold"],
        output=params["output"],
        overwrite=params["overwrite"],
        settings=_settings_from(params),
        runtime=RuntimeOptions(workers=params["workers"], address=params["address"], progress=params["progress"],
                               retries=params["retries"]),
        summary_path=params["summary_path"],
        work_dir=params["work_dir"],
        restart=params["restart"],
        max_failed_tiles=params["max_failed_tiles"],
    )
    _report(gdf.attrs["summary"])


def _settings_from(params: dict[str, Any]) -> Any:
    """SegmentSettings from the common options."""
    from sam_geo.api import SegmentSettings

    return SegmentSettings(
        model=params["model"],
        weights=params["weights"],
        bands=params["bands"],
        stretch=params["stretch"],
        tile_size=params["tile_size"],
        overlap=params["overlap"],
        zoom=None if params["zoom"] in (None, "auto") else int(params["zoom"]),
        min_area_m2=params["min_area"],
        simplify_m=params["simplify"],
        regularize_m=params["regularize"],
        batch_size=params["batch_size"],
        multimask=params.get("multimask", False),
        box_grow=params.get("box_grow"),
        device=params["device"],
        assume_crs=params["assume_crs"],
        precision=params.get("precision") or "auto",
        encode_batch=params.get("encode_batch"),
        decoder_context_px=params.get("decoder_context"),
    )


@cli.command("evaluate")
@click.argument("pred", type=str)
@click.argument("gt", type=str)
@click.option("--iou", type=float, default=0.5, show_default=True, help="Minimum IoU of a match, in (0, 1].")
@click.option("--aoi", default=None, help="Polygon layer; only polygons whose representative point is inside count.")
@click.option("--key", default=None, help="Attribute shared by PRED and GT (e.g. osm_id): adds per-object IoU.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def evaluate_command(pred: str, gt: str, iou: float, aoi: str | None, key: str | None, as_json: bool) -> None:
    """Score predicted polygons PRED against ground truth GT: precision, recall, F1.

    Polygons are matched one-to-one (greedy, highest IoU first) at IoU >= --iou, after
    reprojecting both layers to GT's projected CRS (or its UTM zone).
    """
    from sam_geo.evaluate import evaluate

    result = evaluate(pred, gt, iou=iou, aoi=aoi, key=key)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(_evaluation_table(result, pred, gt))


def _evaluation_table(result: Any, pred: str, gt: str) -> str:
    """Human-readable summary of an EvaluationResult."""
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
    o = r.per_object
    if o is not None:
        lines += [
            "",
            f"per-object IoU by {o.key!r}: {o.n_objects:,} objects, {o.n_missing:,} without prediction (IoU 0), "
            f"{o.n_extra:,} prediction keys not in ground truth",
            f"  median {o.median:.3f}  mean {o.mean:.3f}  IoU>=0.5 {o.share_ge_50:.1%}  IoU>=0.75 {o.share_ge_75:.1%}",
        ]
    return "\n".join(lines)


def _parse_window(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        window = tuple(int(v) for v in value.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"expected col_off,row_off,width,height in pixels, got {value!r}") from exc
    if len(window) != 4 or window[2] <= 0 or window[3] <= 0:
        raise click.BadParameter(f"expected 4 integers col_off,row_off,width,height (width, height > 0), got {value!r}")
    return window


@cli.command("show")
@click.argument("scene", type=str)
@click.argument("layer", type=str, required=False)
@click.option("-o", "--output", default="quicklook.png", show_default=True, type=click.Path(dir_okay=False),
              help="Quicklook image: .png, .jpg or .jpeg.")
@click.option("--size", type=int, default=1200, show_default=True, help="Longer side of the image, pixels.")
@click.option("--window", callback=_parse_window, help="Part of the scene: col_off,row_off,width,height in pixels.")
@click.option("--bands", callback=_parse_bands, help="1-based bands shown as R,G,B, e.g. 4,3,2.")
@click.option("--stretch", type=click.Choice(["auto", "none", "percentile"]), default="auto", show_default=True,
              help="Contrast stretch, as in segment.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write an interactive map (scene embedded, LAYER with popups) here.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def show_command(scene: str, layer: str | None, output: str, size: int, window: tuple[int, ...] | None,
                 bands: tuple[int, ...] | None, stretch: str, html_path: str | None, overwrite: bool) -> None:
    """Render SCENE with the outlines of LAYER (optional) to a PNG quicklook, and a map."""
    from pathlib import Path

    from sam_geo.errors import OutputExistsError
    from sam_geo.show import html_map, quicklook

    for path in (output, html_path):  # fail before writing either file
        if path and Path(path).exists() and not overwrite:
            raise OutputExistsError(f"output {path!r} already exists; pass --overwrite to replace it")
    options = {"window": window, "size": size, "bands": bands, "stretch": stretch, "overwrite": overwrite}
    click.echo(f"wrote {quicklook(scene, layer, output, **options)}", err=True)
    if html_path:
        click.echo(f"wrote {html_map(scene, layer, html_path, **options)}", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def models(as_json: bool) -> None:
    """List the models sam-geo knows, with sizes, licences and weight sources."""
    from dataclasses import asdict

    from sam_geo.model.registry import MODELS

    if as_json:
        click.echo(json.dumps({name: asdict(spec) for name, spec in MODELS.items()}, indent=2))
        return
    width = max(map(len, MODELS))
    for name, spec in MODELS.items():
        size = f"{spec.size_bytes / 1e6:,.0f} MB" if spec.size_bytes else "?"
        click.echo(f"{name:<{width}} {size:>9}  {spec.licence:<12} {spec.url}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sam-geo`` script; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="sam-geo", standalone_mode=False)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            click.echo("sam-geo: interrupted; no output was written", err=True)
            return 130
        click.echo("sam-geo: aborted", err=True)
        return EXIT_FAILED
    except click.ClickException as exc:
        exc.show()
        return EXIT_BAD_INPUT
    except SamGeoError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"sam-geo: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("sam-geo: interrupted; no output was written", err=True)
        return 130
    except Exception as exc:  # the last line of defence: no traceback without --debug
        if debug:
            traceback.print_exc()
        click.echo(
            f"sam-geo: unexpected error ({type(exc).__name__}): {exc}\n"
            "Run again with --debug for the traceback and report it if it looks like a bug.",
            err=True,
        )
        return EXIT_FAILED
    return EXIT_OK

