"""Options shared by the commands, derived from :class:`sam_geo.settings.Settings`.

Every setting of a run is a field of ``Settings``; its option is built here from the
field, so names, defaults, help texts, choices and ranges cannot drift from the Python
API or the presets:

* name: the field name without its unit suffix (``_px``, ``_m2``, ``_m``), ``_`` -> ``-``
  (``tile_size_px`` -> ``--tile-size``); older spellings stay as aliases (:data:`ALIASES`);
* booleans are ``--x/--no-x``; ``Literal`` fields are choices; ``ge``/``gt``/``le``/``lt``
  become a range (an out-of-range value names the setting, its bound and unit);
* help: the field's description plus its unit; the default shown is the field's default.

The click default of every setting option is ``None`` ("not given"), so
:func:`settings_from_cli` applies, in order: ``Settings`` defaults, the ``--config``
preset (:func:`sam_geo.settings.load_preset`), then the flags actually given.

Options come in groups, one decorator each (``model_options``, ``scene_options``,
``tile_options``, ``outline_options``, ``prompt_options``, ``auto_options``,
``text_options``, ``run_options``); a group decorator takes the command's name and adds
only the fields whose :func:`sam_geo.settings.setting_modes` include that command.
``output_options``, ``work_dir_options`` and ``config_option`` are the options of the
segmentation commands that are not settings.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import click
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from sam_geo.errors import ConfigError
from sam_geo.settings import Settings, load_preset, setting_modes

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[F], F]

UNITS: tuple[tuple[str, str, str], ...] = (("_px", "model pixels", "PX"), ("_m2", "m^2", "M2"), ("_m", "m", "M"))
"""(suffix of a field name, unit shown in help, metavar); longest suffixes are tried first."""

ALIASES: dict[str, tuple[str, ...]] = {"stability_score_thresh": ("--stability-thresh",)}
"""Older flag names that keep working, by field."""

GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("model", "weights", "device", "precision", "batch_size", "encode_batch", "decoder_context_px",
              "flip_views"),
    "scene": ("bands", "stretch", "assume_crs"),
    "tile": ("tile_size_px", "overlap_px", "zoom"),
    "outline": ("min_area_m2", "simplify_m", "regularize_m"),
    "prompt": ("prompt_as", "box_grow", "multimask"),
    "auto": ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "stability_score_offset",
             "box_nms_thresh", "max_area_m2", "match_iou", "max_tile_fraction", "nested_thresh", "skip_covered",
             "cover_max_fraction"),
    "text": ("detector", "box_threshold", "text_threshold"),
    "run": ("workers", "address", "retries", "max_failed_tiles", "progress"),
}
"""The settings of each option group, in the order of ``--help``; every field is in one."""

ZOOM_CHOICES = ("auto", "1", "2", "4")
FLAG_VALUES: dict[str, float] = {"regularize_m": 0.5}
"""Options that may be given without a value, and the value they then take."""
PATH_FIELDS = frozenset({"weights"})
METAVARS = {"bands": "R,G,B"}
HELP_SETTINGS = {"help_option_names": ["-h", "--help"]}
"""Every command's context settings: ``-h`` as well as ``--help``, also when a command
object is invoked on its own (click caches a command's help option the first time)."""
OUTPUT_HELP = "give an output file with -o/--output (.geojson, .gpkg or .parquet)"


# --- names ---------------------------------------------------------------------------


def _unit(name: str) -> tuple[str, str, str] | None:
    """(suffix, unit, metavar) of field ``name``, or None for a unitless field."""
    for suffix, unit, metavar in UNITS:
        if name.endswith(suffix):
            return suffix, unit, metavar
    return None


def bare_name(name: str) -> str:
    """Field name without its unit suffix: ``min_area_m2`` -> ``min_area``."""
    unit = _unit(name)
    return name[: -len(unit[0])] if unit else name


def option_name(name: str) -> str:
    """The flag of Settings field ``name``: ``tile_size_px`` -> ``--tile-size``."""
    return "--" + bare_name(name).replace("_", "-")


def human_name(name: str) -> str:
    """The setting's name in messages: ``tile_size_px`` -> ``tile size``."""
    return bare_name(name).replace("_", " ")


def command_settings(command: str) -> tuple[str, ...]:
    """Settings fields that ``command`` reads (and has an option for), in field order."""
    return tuple(name for name in Settings.model_fields if command in setting_modes(name))


# --- types -----------------------------------------------------------------------------


class _BoundedMixin:
    """A number option whose out-of-range message names the setting, bound and unit."""

    base: click.ParamType
    label: str
    unit: str
    min: float | None
    max: float | None
    min_open: bool
    max_open: bool

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The number, or a usage error naming the setting and the bound it breaks."""
        number = self.base.convert(value, param, ctx)
        problem = self.problem(number)
        if problem:
            self.fail(f"{self.label} must be {problem}, got {value}", param, ctx)  # type: ignore[attr-defined]
        return number

    def problem(self, number: float) -> str | None:
        """What is wrong with ``number`` (None: nothing)."""
        unit = f" {self.unit}" if self.unit else ""
        if isinstance(number, float) and math.isnan(number):
            return "a number"
        if self.min is not None and (number <= self.min if self.min_open else number < self.min):
            return f"{'greater than' if self.min_open else 'at least'} {self.min:g}{unit}"
        if self.max is not None and (number >= self.max if self.max_open else number > self.max):
            return f"{'less than' if self.max_open else 'at most'} {self.max:g}{unit}"
        return None


class SettingIntRange(_BoundedMixin, click.IntRange):
    """``click.IntRange`` of a setting (see :class:`_BoundedMixin`)."""

    base = click.INT

    def __init__(self, label: str, unit: str, **bounds: Any) -> None:
        super().__init__(**bounds)
        self.label, self.unit = label, unit


class SettingFloatRange(_BoundedMixin, click.FloatRange):
    """``click.FloatRange`` of a setting (see :class:`_BoundedMixin`); NaN is refused."""

    base = click.FLOAT

    def __init__(self, label: str, unit: str, **bounds: Any) -> None:
        super().__init__(**bounds)
        self.label, self.unit = label, unit


def _value_type(field: FieldInfo) -> Any:
    """The field's annotation without ``| None``."""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _bounds(field: FieldInfo) -> dict[str, Any]:
    """``click.IntRange``/``FloatRange`` keywords from the field's ge/gt/le/lt metadata."""
    bounds: dict[str, Any] = {}
    for item in field.metadata:
        for attr, key, is_open in (("ge", "min", False), ("gt", "min", True), ("le", "max", False),
                                   ("lt", "max", True)):
            if getattr(item, attr, None) is not None:
                bounds[key], bounds[f"{key}_open"] = getattr(item, attr), is_open
    return bounds


def param_type(name: str) -> click.ParamType | None:
    """The click type of Settings field ``name`` (None for a boolean flag)."""
    field = Settings.model_fields[name]
    kind = _value_type(field)
    unit = (_unit(name) or ("", "", ""))[1]
    if name == "zoom":
        return click.Choice(ZOOM_CHOICES)
    if kind is bool:
        return None
    if typing.get_origin(kind) is Literal:
        return click.Choice([str(v) for v in typing.get_args(kind)])
    if kind is int:
        return SettingIntRange(human_name(name), unit, **_bounds(field))
    if kind is float:
        return SettingFloatRange(human_name(name), unit, **_bounds(field))
    if name in PATH_FIELDS:
        return click.Path()  # a file, or a transformers model folder (SAM 3); checked when resolved
    return click.STRING


NUMBER_METAVARS = {SettingIntRange: "INTEGER", SettingFloatRange: "FLOAT"}
"""Metavars of unitless numbers (click's own say "INTEGER RANGE")."""


# --- setting options -----------------------------------------------------------------


class SettingOption(click.Option):
    """The option of one Settings field: click default None, help shows the field's default.

    ``setting`` is the field's name (also the parameter's name in ``ctx.params``).
    """

    def __init__(self, *args: Any, setting: str, shown_default: str | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setting = setting
        self.shown_default = shown_default

    def get_help_extra(self, ctx: click.Context) -> Any:
        """click's help extras, with the Settings default in place of click's (None)."""
        extra = super().get_help_extra(ctx)
        if self.shown_default is not None:
            extra["default"] = self.shown_default
        return extra


def shown_default(name: str) -> str | None:
    """The default of Settings field ``name`` as ``--help`` shows it (None: not shown)."""
    default = Settings.model_fields[name].default
    if name in ("zoom", "multimask") and default is None:
        return "auto"
    if isinstance(default, bool):
        flag = option_name(name)[2:]
        return flag if default else f"no-{flag}"
    if default is None:
        return None
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def option_help(name: str) -> str:
    """The field's description, plus its unit (unless the description names it) and
    the value it takes when given without one."""
    text = Settings.model_fields[name].description or ""
    unit = _unit(name)
    if unit and not re.search(rf"(?<![\w^]){re.escape(unit[1])}(?![\w^])", text):
        text += f" Unit: {unit[1]}."
    if name in FLAG_VALUES:
        text += f" Given without a value: {FLAG_VALUES[name]:g}."
    return text


def setting_option(name: str) -> Decorator:
    """A click option for Settings field ``name`` (see the module docstring)."""
    flag = option_name(name)
    kind = param_type(name)
    kwargs: dict[str, Any] = {"cls": SettingOption, "setting": name, "shown_default": shown_default(name),
                              "default": None, "help": option_help(name)}
    if kind is None:
        return click.option(f"{flag}/--no-{flag[2:]}", name, **kwargs)
    kwargs["type"] = kind
    unit = _unit(name)
    metavar = METAVARS.get(name) or (unit[2] if unit else None) or NUMBER_METAVARS.get(type(kind))
    if metavar:
        kwargs["metavar"] = metavar
    if name == "bands":
        kwargs["callback"] = parse_bands
    if name in FLAG_VALUES:
        kwargs.update(is_flag=False, flag_value=FLAG_VALUES[name])
    return click.option(flag, *ALIASES.get(name, ()), name, **kwargs)


def _group(group: str, command: str) -> Decorator:
    """The options of ``group`` that ``command`` reads, in the group's order."""
    names = [name for name in GROUPS[group] if command in setting_modes(name)]

    def decorate(func: F) -> F:
        for name in reversed(names):
            func = setting_option(name)(func)
        return func

    return decorate


def model_options(command: str) -> Decorator:
    """Which model runs and how: --model, --weights, --device, --precision, batch sizes."""
    return _group("model", command)


def scene_options(command: str) -> Decorator:
    """How a scene is read: --bands, --stretch, --assume-crs."""
    return _group("scene", command)


def tile_options(command: str) -> Decorator:
    """The tiles the model sees: --tile-size, --overlap, --zoom."""
    return _group("tile", command)


def outline_options(command: str) -> Decorator:
    """What becomes of the masks' outlines: --min-area, --simplify, --regularize."""
    return _group("outline", command)


def prompt_options(command: str) -> Decorator:
    """Prompted mode (segment): --prompt-as, --box-grow, --multimask."""
    return _group("prompt", command)


def auto_options(command: str) -> Decorator:
    """Automatic mode: the prompt grid, SAM's mask filters, stitching and area range."""
    return _group("auto", command)


def text_options(command: str) -> Decorator:
    """Text mode: --detector and its thresholds."""
    return _group("text", command)


def run_options(command: str) -> Decorator:
    """How the run is carried out: --workers, --address, --retries, --max-failed-tiles, --progress."""
    return _group("run", command)


# --- options that are not settings -------------------------------------------------------


def parse_bands(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """``--bands 4,3,2`` -> ``(4, 3, 2)``: one or three 1-based band numbers."""
    if value is None:
        return None
    try:
        bands = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated band numbers like 4,3,2, got {value!r}") from exc
    if len(bands) not in (1, 3):
        raise click.BadParameter(f"give 1 or 3 band numbers (1-based), got {len(bands)}")
    return bands


def _require_output(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """-o/--output is required; say so plainly (click's own message names no formats)."""
    if value is None and not ctx.resilient_parsing:
        raise click.UsageError(OUTPUT_HELP, ctx)
    return value


def output_options(func: F) -> F:
    """-o/--output (required), --partitioned, --overwrite and --summary."""
    options = [
        click.option("-o", "--output", type=click.Path(), callback=_require_output,
                     help="Output file: .geojson, .gpkg or .parquet, or a folder (out/) for a partitioned "
                          "GeoParquet dataset (required)."),
        click.option("--partitioned", is_flag=True,
                     help="Write a GeoParquet dataset (a folder of parts written as tiles finish) at --output."),
        click.option("--overwrite", is_flag=True, help="Replace the output (and summary) if it exists."),
        click.option("--summary", "summary_path", type=click.Path(dir_okay=False), metavar="PATH",
                     help="Write the run summary as JSON here."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def work_dir_options(func: F) -> F:
    """--work-dir and --restart: resumable runs."""
    func = click.option("--restart", is_flag=True, help="Discard what --work-dir holds and start over.")(func)
    return click.option("--work-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
                        help="Keep finished tiles here; rerunning the same command resumes.")(func)


def config_option(func: F) -> F:
    """--config PRESET: a YAML preset of settings (flags given on the command line win)."""
    return click.option("--config", type=click.Path(dir_okay=False), metavar="PRESET",
                        help="YAML preset of settings (sections common, segment, auto, text; keys are the "
                             "settings' names, e.g. tile_size_px); flags given here win.")(func)


def segmentation_options(command: str) -> Decorator:
    """Every option a segmentation command shares: output, model, scene, tiles,
    outlines, running, work dir and preset (the mode's own options come on top)."""
    decorators = (
        output_options, model_options(command), scene_options(command), tile_options(command),
        outline_options(command), run_options(command), work_dir_options, config_option,
    )

    def apply(func: F) -> F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


def run_arguments(params: dict[str, Any]) -> dict[str, Any]:
    """The API keywords of the options that are not settings: output, partitioned,
    overwrite, summary_path, work_dir, restart; the CLI keeps no frame in memory."""
    names = ("output", "partitioned", "overwrite", "summary_path", "work_dir", "restart")
    return {**{name: params[name] for name in names}, "return_frame": False}


# --- settings ---------------------------------------------------------------------------


def settings_from_cli(params: dict[str, Any], command: str) -> Settings:
    """The :class:`Settings` of a run of ``command``: defaults, then the ``--config``
    preset, then the flags given (options left at None).

    Raises :class:`ConfigError` (exit 2) for a bad preset, value or combination, naming
    the flag or the preset key at fault.
    """
    config = params.get("config")
    preset = load_preset(config, command) if config else {}
    given = {name: params[name] for name in command_settings(command) if params.get(name) is not None}
    values = {key: value for key, value in {**preset, **given}.items() if value is not None}
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, given, config)) from exc


def _describe(exc: ValidationError, given: dict[str, Any], config: str | None) -> str:
    """One line naming each bad value by its flag (or preset key) and what is wrong."""
    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        field = str(error["loc"][0]) if error["loc"] else None
        if field is None:
            problems.append(message)
        elif field in given or not config:
            problems.append(f"{option_name(field)}: {message}")
        else:
            problems.append(f"'{field}' in config file {config}: {message}")
    return "; ".join(problems)
