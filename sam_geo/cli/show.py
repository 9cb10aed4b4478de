"""``sam-geo show``: a PNG quicklook of a scene with outlines, and an HTML map."""

from __future__ import annotations

from pathlib import Path

import click

from sam_geo.cli.options import HELP_SETTINGS, param_type, parse_bands


def parse_window(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """``--window 0,0,512,512`` -> ``(col_off, row_off, width, height)`` in pixels."""
    if value is None:
        return None
    try:
        window = tuple(int(v) for v in value.split(","))
    except ValueError as exc:
        raise click.BadParameter(f"expected col_off,row_off,width,height in pixels, got {value!r}") from exc
    if len(window) != 4 or window[2] <= 0 or window[3] <= 0:
        raise click.BadParameter(f"expected 4 integers col_off,row_off,width,height (width, height > 0), got {value!r}")
    return window


@click.command("show", context_settings=HELP_SETTINGS)
@click.argument("scene", type=str)
@click.argument("layer", type=str, required=False)
@click.option("-o", "--output", default="quicklook.png", show_default=True, type=click.Path(dir_okay=False),
              help="Quicklook image: .png, .jpg or .jpeg.")
@click.option("--size", type=int, default=1200, show_default=True, help="Longer side of the image, pixels.")
@click.option("--window", callback=parse_window, help="Part of the scene: col_off,row_off,width,height in pixels.")
@click.option("--bands", callback=parse_bands, metavar="R,G,B", help="1-based bands shown as R,G,B, e.g. 4,3,2.")
@click.option("--stretch", type=param_type("stretch"), default="auto", show_default=True,
              help="Contrast stretch, as in segment.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write an interactive map (scene embedded, LAYER with popups) here.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def show_command(scene: str, layer: str | None, output: str, size: int, window: tuple[int, ...] | None,
                 bands: tuple[int, ...] | None, stretch: str, html_path: str | None, overwrite: bool) -> None:
    """Render SCENE with the outlines of LAYER (optional) to a PNG quicklook, and a map."""
    from sam_geo.errors import OutputExistsError
    from sam_geo.show import html_map, quicklook

    for path in (output, html_path):  # fail before writing either file
        if path and Path(path).exists() and not overwrite:
            raise OutputExistsError(f"output {path!r} already exists; pass --overwrite to replace it")
    kwargs = {"window": window, "size": size, "bands": bands, "stretch": stretch, "overwrite": overwrite}
    click.echo(f"wrote {quicklook(scene, layer, output, **kwargs)}", err=True)
    if html_path:
        click.echo(f"wrote {html_map(scene, layer, html_path, **kwargs)}", err=True)
