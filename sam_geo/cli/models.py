"""``sam-geo models``: the model registry."""

from __future__ import annotations

import json
from typing import Any

import click

from sam_geo.cli.options import HELP_SETTINGS


@click.command("models", context_settings=HELP_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def models(as_json: bool) -> None:
    """List the models sam-geo knows, with sizes, licences and weight sources.

    SAM 3 (``sam3``) is gated under Meta's SAM License, not Apache-2.0: accept it on
    the model's Hugging Face page before downloading."""
    from dataclasses import asdict

    from sam_geo.model.registry import MODELS

    if as_json:
        click.echo(json.dumps({name: asdict(spec) for name, spec in MODELS.items()}, indent=2))
        return
    width = max(map(len, MODELS))
    licence_width = max(len(spec.licence) for spec in MODELS.values())
    for name, spec in MODELS.items():
        size = f"{spec.size_bytes / 1e6:,.0f} MB" if spec.size_bytes else "folder"
        click.echo(f"{name:<{width}} {size:>9}  {spec.licence:<{licence_width}}  {weights_source(spec)}")


def weights_source(spec: Any) -> str:
    """Where a model's weights come from, in words."""
    if spec.hf_repo is not None:
        gated = f"; accept the licence at {spec.url} first" if "gated" in spec.licence else ""
        return f"Hugging Face {spec.hf_repo} (transformers folder, or --weights FOLDER){gated}"
    return spec.url
