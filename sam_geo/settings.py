"""Every setting of a run, declared once: :class:`Settings`.

The Python API takes a :class:`Settings` (or its field names as keyword arguments), the
YAML presets of ``--config`` hold its field names, and the command-line options are
built from its fields (:mod:`sam_geo.cli.options`): a name, default or range written
here is the one used everywhere. Units are in the field names: ``_px`` model pixels
(pixels of the tile the model sees; scene pixels times ``zoom``), ``_m`` metres,
``_m2`` square metres; thresholds without a unit are fractions in [0, 1].

A preset (``configs/buildings.yaml``) is YAML with a ``common`` section, applying to
every command, and one section per command (``segment``, ``auto``, ``text``)::

    common:
      model: mobile_sam
    auto:
      tile_size_px: 1024
      min_area_m2: 20.0

An unknown key is an error naming the closest known one, so a misspelt or renamed key
never passes silently.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sam_geo.errors import ConfigError

DEFAULT_MODEL = "mobile_sam"
DEFAULT_TILE_SIZE = 1024
"""Tile (model input) side, model pixels: SAM's native input size."""
DEFAULT_OVERLAP = 128
"""Halo around each tile, model pixels per side."""
DEFAULT_MATCH_IOU = 0.6
"""IoU inside the zone two tiles share at which their pieces are one object: above 0.5
so that a part of an object (half a roof) does not match the whole object, whose IoU
with it is about its share of the area."""
DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
"""Grounding detector of ``sam-geo text``: OWLv2 (Apache-2.0), in ``transformers``."""
FLIP_VIEW_COUNTS = (1, 2, 4)
"""Allowed ``flip_views``: the tile alone; plus its up-down mirror; plus its left-right
mirror and both mirrors (the four images a flip group gives)."""

SPECK_AREA_M2 = 0.5
"""Automatic mode drops mask parts and holes below ``min(min_area_m2, SPECK_AREA_M2)``."""

PromptAs = Literal["auto", "point", "box", "box+point", "mask"]
PROMPT_AS: tuple[str, ...] = ("auto", "point", "box", "box+point", "mask")

COMMANDS = ("segment", "auto", "text")
"""Commands that segment; each has a section in a preset."""


class Settings(BaseModel):
    """Settings of a segmentation run (all modes). Immutable; unknown names are refused.

    Fields are grouped by what they steer; ``mode`` in a field's ``json_schema_extra``
    names the modes that read it (absent: every mode).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    # --- the model --------------------------------------------------------------------
    model: str = Field(DEFAULT_MODEL, description="Model name (see `sam-geo models`).")
    weights: str | None = Field(None, description="Weights file (SAM 3: its transformers model folder); default: the cache, then a download.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Model arithmetic. auto: bf16 on CUDA (fp16 on GPUs without bf16) and on CPUs that multiply "
        "bf16 natively (AVX-512 BF16 or AMX; SAM_GEO_CPU_BF16=0 turns that off), fp32 elsewhere.",
    )
    batch_size: int | None = Field(
        None, ge=1, le=4096,
        description="Prompts (automatic mode: grid points) per mask-decoder call; default 64 on GPU, 4 on CPU.",
    )
    encode_batch: int | None = Field(
        None, ge=1, le=64, description="Tiles per image-encoder call; default 4 on CUDA, 1 on CPU."
    )
    decoder_context_px: int | None = Field(
        None, ge=0, le=4096,
        description="CPU, box prompts: decode each box against a square of this many model pixels around it "
        "instead of the whole tile (256: about 3x faster decoding, slightly different masks). 0 or unset: the "
        "whole tile, SAM's own outputs.",
    )
    flip_views: int = Field(
        1, ge=1, le=4,
        description="Test-time views per tile for prompts: 1 the tile alone; 2 adds its up-down mirror; 4 adds its "
        "left-right mirror and both. Each view costs one more encoder and decoder pass; the views' masks are "
        "averaged (Banepa boxes, MobileSAM: median IoU 0.869 with 1, 0.879 with 4 in 3.2x the time).",
        json_schema_extra={"mode": ["segment", "text"]},
    )

    # --- reading the scene ------------------------------------------------------------
    bands: tuple[int, ...] | None = Field(
        None, description="1-based bands fed as R,G,B, e.g. 4,3,2 (one band is replicated); default: by band count."
    )
    stretch: Literal["auto", "none", "percentile"] = Field(
        "auto", description="Scene-wide contrast stretch to 8 bits; auto: none for uint8, 1-99 percentiles otherwise."
    )
    assume_crs: str | None = Field(None, description="CRS for a scene that has none, e.g. EPSG:32645.")

    # --- tiles ------------------------------------------------------------------------
    tile_size_px: int = Field(DEFAULT_TILE_SIZE, ge=64, le=8192, description="Tile (model input) side, model pixels.")
    overlap_px: int = Field(DEFAULT_OVERLAP, ge=0, description="Halo around each tile, model pixels per side.")
    zoom: Literal[1, 2, 4] | None = Field(
        None, description="Model pixels per scene pixel (1, 2, 4); unset (auto): upsample when prompted objects "
        "are small, else 1."
    )

    # --- outlines ---------------------------------------------------------------------
    min_area_m2: float = Field(
        0.5, ge=0, allow_inf_nan=False,
        description="Drop polygon parts and holes smaller than this, m^2 (automatic mode: drop objects smaller "
        "than this; parts and holes below 0.5 m^2).",
    )
    simplify_m: float | None = Field(None, ge=0, lt=1000, description="Simplify outlines with this tolerance, m.")
    regularize_m: float | None = Field(
        None, gt=0, le=50,
        description="Regularize building outlines (right angles, straight edges) with this tolerance, m.",
    )

    # --- prompted mode ----------------------------------------------------------------
    prompt_as: PromptAs = Field(
        "auto",
        description="How features become prompts. auto: points as points, polygons as boxes; mask: for outdated "
        "outlines, the box grown 25%, a point and the polygon as SAM's mask input.",
        json_schema_extra={"mode": ["segment"]},
    )
    box_grow: float | None = Field(
        None, ge=0, le=2,
        description="Grow box prompts by this fraction of their longer side (default 0; 0.25 with prompt_as mask).",
        json_schema_extra={"mode": ["segment"]},
    )
    multimask: bool | None = Field(
        None,
        description="Three candidate masks per box prompt; keep the one closest in area to the prompt polygon. "
        "Unset (auto): on for polygons that are not rectangles (their area says which candidate is the object), "
        "off for rectangles, which may be loose boxes. Point prompts always get three.",
        json_schema_extra={"mode": ["segment"]},
    )

    # --- automatic mode ---------------------------------------------------------------
    points_per_side: int = Field(
        32, ge=1, le=256, description="Prompt grid per tile: N x N points, one every tile_size_px / N model pixels.",
        json_schema_extra={"mode": ["auto"]},
    )
    pred_iou_thresh: float = Field(
        0.88, ge=0, lt=1, description="Keep masks whose predicted IoU is above this.",
        json_schema_extra={"mode": ["auto"]},
    )
    stability_score_thresh: float = Field(
        0.95, ge=0, lt=1, description="Keep masks whose stability score is at least this.",
        json_schema_extra={"mode": ["auto"]},
    )
    stability_score_offset: float = Field(
        1.0, gt=0, le=16, description="Logit offset of SAM's stability score.", json_schema_extra={"mode": ["auto"]}
    )
    box_nms_thresh: float = Field(
        0.7, gt=0, le=1, description="Box IoU above which a tile's lower-scored mask is dropped.",
        json_schema_extra={"mode": ["auto"]},
    )
    max_area_m2: float | None = Field(
        None, gt=0, description="Drop objects larger than this, m^2 (after stitching).",
        json_schema_extra={"mode": ["auto"]},
    )
    match_iou: float = Field(
        DEFAULT_MATCH_IOU, gt=0, le=1, description="IoU inside the zone two tiles share at which their pieces are one object.",
        json_schema_extra={"mode": ["auto"]},
    )
    max_tile_fraction: float | None = Field(
        None, gt=0, le=1, description="Drop masks covering more than this share of a tile (unset: keep them).",
        json_schema_extra={"mode": ["auto"]},
    )
    nested_thresh: float | None = Field(
        None, gt=0, le=1,
        description="Of two objects nested in each other (this share of the smaller inside the larger) keep the "
        "higher-scored; e.g. 0.8 for buildings (unset: off).",
        json_schema_extra={"mode": ["auto"]},
    )
    skip_covered: bool = Field(
        True,
        description="Decode grid points coarse to fine and skip those inside a mask already kept (about half the "
        "decoder work); off: every point, as SAM's generator.",
        json_schema_extra={"mode": ["auto"]},
    )
    cover_max_fraction: float = Field(
        0.1, gt=0, le=1, description="Masks larger than this share of a tile cover no grid points.",
        json_schema_extra={"mode": ["auto"]},
    )

    # --- text mode --------------------------------------------------------------------
    detector: str = Field(
        DEFAULT_DETECTOR,
        description="Grounding detector: a Hugging Face name (OWLv2 or Grounding DINO) or a save_pretrained folder.",
        json_schema_extra={"mode": ["text"]},
    )
    box_threshold: float | None = Field(
        None, ge=0, le=1, description="Detector score threshold (default: the detector's own; SAM 3: 0.5).",
        json_schema_extra={"mode": ["text"]},
    )
    text_threshold: float | None = Field(
        None, ge=0, le=1, description="Grounding DINO text threshold (default: the detector's own).",
        json_schema_extra={"mode": ["text"]},
    )

    # --- running ----------------------------------------------------------------------
    workers: int | None = Field(
        None, ge=0, description="Model actors; default one per GPU, else 1; 0: in this process, no Ray."
    )
    address: str | None = Field(None, description="Ray cluster to join ('auto' or host:port); default: a local Ray.")
    retries: int = Field(2, ge=0, le=10, description="Retries of a failing tile before it is recorded as failed.")
    max_failed_tiles: int = Field(0, ge=0, description="Fail the run (no output) if more tiles than this fail.")
    progress: bool = Field(True, description="A progress bar over tiles on stderr.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu") or value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {value!r}")

    @field_validator("bands", mode="before")
    @classmethod
    def _band_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if value is None:
            return None
        bands = tuple(int(v) for v in value)
        if len(bands) not in (1, 3) or min(bands) < 1:
            raise ValueError(f"give 1 or 3 band numbers (1-based), got {list(bands)}")
        return bands

    @field_validator("zoom", mode="before")
    @classmethod
    def _auto_zoom(cls, value: Any) -> Any:
        if value in ("auto", None):
            return None
        return int(value) if isinstance(value, str) and value.isdigit() else value

    @field_validator("flip_views")
    @classmethod
    def _view_count(cls, value: int) -> int:
        if value not in FLIP_VIEW_COUNTS:
            raise ValueError(f"flip views must be 1, 2 or 4, got {value}")
        return value

    @field_validator("decoder_context_px")
    @classmethod
    def _context_range(cls, value: int | None) -> int | None:
        if value not in (None, 0) and value < 64:
            raise ValueError(f"decoder context must be 0 (the whole tile) or 64 to 4096 model pixels, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("fp16 needs a CUDA GPU; use precision bf16 or fp32 with device cpu")
        if self.max_area_m2 is not None and not self.max_area_m2 > self.min_area_m2:
            raise ValueError(f"max area ({self.max_area_m2} m^2) must be larger than min area ({self.min_area_m2} m^2)")
        return self

    def updated(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied and validated; ``None`` values are ignored."""
        return make_settings(self, **changes)

    def speck_area_m2(self, mode: str) -> float:
        """Mask parts and holes below this many m^2 are dropped when vectorizing."""
        return min(self.min_area_m2, SPECK_AREA_M2) if mode == "auto" else self.min_area_m2


def make_settings(base: Settings | None = None, **changes: Any) -> Settings:
    """``base`` (default: all defaults) with ``changes`` applied; ``None`` values ignored.

    Raises :class:`ConfigError` naming every bad value, or an unknown name with the
    closest known one.
    """
    values = {**(base.model_dump() if base is not None else {}), **{k: v for k, v in changes.items() if v is not None}}
    return validated(values, source="settings")


def validated(values: dict[str, Any], *, source: str) -> Settings:
    """:class:`Settings` from a mapping; errors name ``source`` and the offending keys."""
    unknown = sorted(set(values) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"{source}: " + "; ".join(_unknown_key(k) for k in unknown))
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from exc


def setting_modes(name: str) -> tuple[str, ...]:
    """Commands whose runs read setting ``name`` (``segment``, ``auto``, ``text``)."""
    extra = Settings.model_fields[name].json_schema_extra
    modes = extra.get("mode") if isinstance(extra, dict) else None
    return tuple(modes) if isinstance(modes, list) else COMMANDS


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, list(Settings.model_fields), n=1, cutoff=0.6)
    return f"unknown setting '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"'{key}': {message}" if error["loc"] else message)
    return "; ".join(problems)


# --- presets ---------------------------------------------------------------------------


def load_preset(path: str | os.PathLike[str], command: str) -> dict[str, Any]:
    """The settings a YAML preset gives ``command``: its ``common`` section, then the
    command's own section on top. Every key is checked (unknown keys and bad values
    name the file, section and key); keys of other commands' sections are checked but
    not returned."""
    sections = _read_yaml(Path(path))
    values: dict[str, Any] = {}
    for name in ("common", *COMMANDS):
        section = sections.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"config file {path}: section '{name}' must be a mapping of settings")
        validated({**Settings().model_dump(), **section}, source=f"config file {path}, section '{name}'")
        if name in ("common", command):
            values.update(section)
    return values


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - {"description", "common", *COMMANDS})
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown section(s) {', '.join(unknown)}; sections are description, common, "
            + ", ".join(COMMANDS)
        )
    return data
