"""YAML presets (``--config``), validated with pydantic on load.

A preset sets defaults for a command's options; flags given on the command line win.
Keys use the option names with ``_`` for ``-`` (``tile_size`` for ``--tile-size``). An
unknown key is an error naming it, so a misspelt key never passes silently::

    # configs/buildings.yaml
    model:
      name: mobile_sam
    segment:
      tile_size: 1024
      overlap: 128
      min_area: 2.0
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sam_geo.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _CommandSection(_Section):
    """Options every segmentation command has (units: pixels, square metres, metres)."""

    model: str | None = None
    weights: str | None = None
    bands: list[int] | None = None
    stretch: str | None = None
    tile_size: int | None = Field(default=None, ge=64, le=8192)
    overlap: int | None = Field(default=None, ge=0)
    zoom: Literal["auto", "1", "2", "4", 1, 2, 4] | None = None
    min_area: float | None = Field(default=None, ge=0)
    simplify: float | None = Field(default=None, ge=0)
    regularize: float | None = Field(default=None, gt=0, le=50)
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    device: str | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = None
    encode_batch: int | None = Field(default=None, ge=1, le=64)
    decoder_context: int | None = Field(default=None, ge=0, le=4096)
    workers: int | None = Field(default=None, ge=0)
    address: str | None = None


class SegmentSection(_CommandSection):
    """Options of ``sam-geo segment`` (prompted by a vector layer)."""

    prompt_as: str | None = None
    multimask: bool | None = None
    box_grow: float | None = Field(default=None, ge=0, le=2)
    negative_points: str | None = None
    group_column: str | None = None
    label_column: str | None = None
    id_column: str | None = None


class AutoSection(_CommandSection):
    """Options of ``sam-geo auto`` (see :class:`sam_geo.auto.AutoParams`; areas in m^2)."""

    points_per_side: int | None = Field(default=None, ge=1, le=256)
    pred_iou_thresh: float | None = Field(default=None, ge=0, lt=1)
    stability_thresh: float | None = Field(default=None, ge=0, lt=1)
    max_area: float | None = Field(default=None, gt=0)
    box_nms_thresh: float | None = Field(default=None, gt=0, le=1)
    match_iou: float | None = Field(default=None, gt=0, le=1)
    max_tile_fraction: float | None = Field(default=None, gt=0, le=1)
    nested_thresh: float | None = Field(default=None, gt=0, le=1)
    skip_covered: bool | None = None


class TextSection(_CommandSection):
    """Options of ``sam-geo text`` (grounding detector thresholds in [0, 1])."""

    detector: str | None = None
    box_threshold: float | None = Field(default=None, ge=0, le=1)
    text_threshold: float | None = Field(default=None, ge=0, le=1)


class ModelSection(_Section):
    """Which model runs and how; applies to every command (a command's own keys win)."""

    name: str | None = None
    weights: str | None = None
    device: str | None = None
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = None
    encode_batch: int | None = Field(default=None, ge=1, le=64)
    decoder_context: int | None = Field(default=None, ge=0, le=4096)


class ConfigFile(_Section):
    """A whole preset file: a ``model`` section and one section per command."""

    description: str | None = None
    model: ModelSection = ModelSection()
    segment: SegmentSection = SegmentSection()
    auto: AutoSection = AutoSection()
    text: TextSection = TextSection()


def load_config(path: str | os.PathLike[str]) -> ConfigFile:
    """Read and validate a YAML preset; errors name the file and the offending key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    try:
        return ConfigFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config file {path}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        else:
            problems.append(f"'{key}': {error['msg']}")
    return "; ".join(problems)


def section_values(config: ConfigFile, command: str) -> dict[str, Any]:
    """The keys a preset sets for ``command`` (unset keys left out).

    The ``model`` section's keys come first (``name`` becomes ``model``); the
    command's own section overrides them.
    """
    values = config.model.model_dump(exclude_none=True)
    if "name" in values:
        values["model"] = values.pop("name")
    section = getattr(config, command, None)
    if section is not None:
        values.update(section.model_dump(exclude_none=True))
    return values
