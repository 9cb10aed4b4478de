"""``sam-geo models``: the model registry."""

from __future__ import annotations

import json

import click


@click.command("models")
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
