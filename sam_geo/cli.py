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

from .errors import SamGeoError

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
    from .config import load_config, section_values

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
        click.option("--batch-size", type=int, default=None, help="Prompts per mask-decoder call (default: 64 on GPU, 4 on CPU)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
        click.option("--workers", type=int, default=None, help="Model actors (default: one per GPU, else 1; 0: no Ray)."),
        click.option("--address", default=None, help="Ray cluster to join ('auto' or host:port); default: a local Ray."),
        click.option("--assume-crs", default=None, help="CRS for a scene that has none, e.g. EPSG:32645."),
        click.option("--summary", "summary_path", type=click.Path(dir_okay=False), help="Write the run summary as JSON here."),
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
@click.argument("scene", type=str)
@click.option("--prompts", required=True, help="Vector layer of prompts (Shapefile, GeoJSON, GPKG, GeoParquet).")
@click.option("--prompts-layer", default=None, help="Layer name inside a multi-layer prompt file.")
@click.option("--prompts-crs", default=None, help="CRS for a prompt layer that has none.")
@click.option("--prompt-as", type=click.Choice(["auto", "point", "box", "box+point"]), default="auto", show_default=True,
              help="How features become prompts (auto: points as points, polygons as boxes).")
@click.option("--id-column", default=None, help="Prompt attribute used to name prompts in the summary.")
@common_segment_options
@click.pass_context
def segment(ctx: click.Context, **kwargs: Any) -> None:
    """Segment the object under each prompt of a vector layer, over a whole SCENE."""
    _apply_config(ctx, "segment")
    params = dict(ctx.params)
    from .api import SegmentSettings, segment as run_segment
    from .runtime import RuntimeOptions

    output = params["output"]
    if output is None:
        raise click.UsageError("give an output file with -o/--output (.geojson, .gpkg or .parquet)")
    settings = SegmentSettings(
        model=params["model"],
        weights=params["weights"],
        bands=params["bands"],
        stretch=params["stretch"],
        tile_size=params["tile_size"],
        overlap=params["overlap"],
        zoom=None if params["zoom"] in (None, "auto") else int(params["zoom"]),
        min_area_m2=params["min_area"],
        simplify_m=params["simplify"],
        batch_size=params["batch_size"],
        device=params["device"],
        assume_crs=params["assume_crs"],
    )
    runtime = RuntimeOptions(workers=params["workers"], address=params["address"], progress=params["progress"])
    gdf = run_segment(
        params["scene"],
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
    )
    _report(gdf.attrs["summary"])


def _report(summary: dict[str, Any]) -> None:
    """One short paragraph on stderr: what was written and what was not used."""
    p, t, s = summary["prompts"], summary["tiles"], summary["seconds"]
    lines = [
        f"wrote {summary['features']} polygons to {summary['output']} "
        f"({t['processed']} tiles encoded, {s['total']:.1f} s)",
    ]
    for key, label in (("outside", "outside the scene"), ("on_nodata", "on nodata"),
                       ("invalid", "with unusable geometry"), ("empty", "with an empty mask")):
        if p.get(key):
            ids = ", ".join(map(str, p[f"{key}_ids"][:10])) + (" ..." if p[key] > 10 else "")
            lines.append(f"  {p[key]} prompts {label}: {ids}")
    click.echo("\n".join(lines), err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def models(as_json: bool) -> None:
    """List the models sam-geo knows, with sizes, licences and weight sources."""
    from dataclasses import asdict

    from .models import MODELS

    if as_json:
        click.echo(json.dumps({name: asdict(spec) for name, spec in MODELS.items()}, indent=2))
        return
    for name, spec in MODELS.items():
        size = f"{spec.size_bytes / 1e6:,.0f} MB" if spec.size_bytes else "?"
        click.echo(f"{name:<12} {size:>9}  {spec.licence:<12} {spec.url}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sam-geo`` script; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="sam-geo", standalone_mode=False)
    except click.exceptions.Abort:
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

