"""The command line's options are derived from ``Settings``: one option per field a
command reads, its default, help, choices and range from the field; presets and flags
apply over the defaults in that order. The API is replaced by fakes here: these tests
check the command line itself, not segmentation."""

from __future__ import annotations

import subprocess
import sys
import typing
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import pytest

import sam_geo
from sam_geo.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, cli, main
from sam_geo.cli.options import GROUPS, SettingOption, settings_from_cli
from sam_geo.errors import ConfigError, RunError
from sam_geo.run.summary import RunSummary
from sam_geo.settings import Settings, setting_modes

SEGMENTING = ("segment", "auto", "text")
NOT_SETTINGS = {  # options and arguments of each command that are not Settings fields
    "segment": {"scenes", "prompts", "prompts_layer", "prompts_crs", "group_column", "label_column",
                "negative_points", "id_column"},
    "auto": {"scenes", "labels_raster"},
    "text": {"scene", "phrases"},
}
SHARED = {"output", "partitioned", "overwrite", "summary_path", "work_dir", "restart", "config"}
UNIT_SUFFIXES = ("_px", "_m2", "_m")


def fields_of(command: str) -> set[str]:
    return {name for name in Settings.model_fields if command in setting_modes(name)}


def flag_of(field: str) -> str:
    """The expected flag, written out independently of sam_geo.cli.options."""
    for suffix in UNIT_SUFFIXES:
        if field.endswith(suffix):
            field = field[: -len(suffix)]
            break
    return "--" + field.replace("_", "-")


def help_text(command: str, option: click.Parameter) -> str:
    ctx = click.Context(cli.commands[command], info_name=command)
    record = option.get_help_record(ctx)
    assert record is not None
    return " ".join(record)


def parsed(command: str, args: list[str]) -> dict[str, Any]:
    """The parameters click parses from ``args`` (scene arguments added)."""
    positional = {"segment": ["s.tif", "--prompts", "p.gpkg"], "auto": ["s.tif"], "text": ["s.tif", "pool"]}
    ctx = cli.commands[command].make_context(command, [*positional[command], "-o", "o.gpkg", *args])
    return dict(ctx.params)


# --- derivation ------------------------------------------------------------------------


@pytest.mark.parametrize("command", SEGMENTING)
def test_one_option_per_setting_the_command_reads(command: str) -> None:
    params = cli.commands[command].params
    settings = Counter(p.setting for p in params if isinstance(p, SettingOption))
    assert set(settings) == fields_of(command)
    assert set(settings.values()) == {1}
    others = {p.name for p in params if not isinstance(p, SettingOption)}
    assert others == NOT_SETTINGS[command] | SHARED  # nothing setting-like outside Settings
    assert not others & set(Settings.model_fields)


@pytest.mark.parametrize("command", SEGMENTING)
def test_options_take_name_default_help_choices_and_range_from_the_field(command: str) -> None:
    for param in cli.commands[command].params:
        if not isinstance(param, SettingOption):
            continue
        field = Settings.model_fields[param.setting]
        assert param.name == param.setting and param.opts[0] == flag_of(param.setting)
        assert param.default is None  # not given: the preset or Settings default applies
        text = help_text(command, param)
        assert (field.description or "")[:40] in text
        default = field.default
        if isinstance(default, bool):
            assert f"[default: {'' if default else 'no-'}{flag_of(param.setting)[2:]}]" in text
        elif default is not None:
            assert f"[default: {default}]" in text or f"[default: {default};" in text
        elif param.setting in ("zoom", "multimask"):
            assert "[default: auto]" in text
        else:
            assert "[default:" not in text  # None: the description says what happens
        for item in field.metadata:
            for attr, bound in (("ge", "min"), ("gt", "min"), ("le", "max"), ("lt", "max")):
                if getattr(item, attr, None) is not None:
                    assert getattr(param.type, bound) == getattr(item, attr), (param.setting, attr)
        if typing.get_origin(field.annotation) is typing.Literal:
            assert list(param.type.choices) == [str(v) for v in typing.get_args(field.annotation)]


def test_derived_option_names() -> None:
    flags = {name: p.opts + p.secondary_opts for command in SEGMENTING for p in cli.commands[command].params
             if isinstance(p, SettingOption) for name in [p.setting]}
    assert flags["tile_size_px"] == ["--tile-size"]
    assert flags["overlap_px"] == ["--overlap"]
    assert flags["min_area_m2"] == ["--min-area"]
    assert flags["max_area_m2"] == ["--max-area"]
    assert flags["simplify_m"] == ["--simplify"]
    assert flags["regularize_m"] == ["--regularize"]
    assert flags["decoder_context_px"] == ["--decoder-context"]
    assert flags["stability_score_thresh"] == ["--stability-score-thresh", "--stability-thresh"]
    assert flags["progress"] == ["--progress", "--no-progress"]
    assert flags["skip_covered"] == ["--skip-covered", "--no-skip-covered"]
    units = {"tile_size_px": "model pixels", "min_area_m2": "m^2", "simplify_m": ", m."}
    for field, unit in units.items():
        option = next(p for p in cli.commands["auto"].params if getattr(p, "setting", None) == field)
        assert unit in help_text("auto", option)


def test_every_setting_is_in_one_group() -> None:
    grouped = Counter(name for names in GROUPS.values() for name in names)
    assert set(grouped) == set(Settings.model_fields) and set(grouped.values()) == {1}


def test_dash_h_still_works_after_a_command_ran_on_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    """Click caches a command's help option when the command first runs; a command run
    on its own (as CliRunner does) must not lose ``-h`` for later runs through the group."""
    from click.testing import CliRunner

    for name, command in cli.commands.items():
        assert CliRunner().invoke(command, ["-h"]).exit_code == 0, name
        assert main([name, "-h"]) == EXIT_OK, name
    assert "Usage: sam-geo models" in capsys.readouterr().out


@pytest.mark.parametrize("command", [None, "segment", "auto", "text", "evaluate", "show", "models"])
def test_help_of_every_command(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "-h"] if command else ["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("Usage: sam-geo")
    if command in SEGMENTING:
        assert "--config PRESET" in out and "--tile-size PX" in out and "[default: 1024; 64<=x<=8192]" in out


def test_import_is_light() -> None:
    code = "import sys, sam_geo.cli; print(sorted(m for m in ('torch', 'ray', 'geopandas') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


# --- values and precedence ---------------------------------------------------------------


def test_parsed_values() -> None:
    params = parsed("segment", ["--bands", "4,3,2", "--zoom", "2", "--regularize", "--no-progress",
                                "--prompt-as", "mask"])
    settings = settings_from_cli(params, "segment")
    assert settings.bands == (4, 3, 2) and settings.zoom == 2 and settings.regularize_m == 0.5
    assert settings.progress is False and settings.prompt_as == "mask"
    assert settings_from_cli(parsed("segment", ["--regularize", "1.5"]), "segment").regularize_m == 1.5
    assert settings_from_cli(parsed("auto", ["--stability-thresh", "0.9"]), "auto").stability_score_thresh == 0.9
    assert settings_from_cli(parsed("text", ["--box-threshold", "0.2"]), "text").box_threshold == 0.2


def test_defaults_then_preset_then_flags(tmp_path: Path) -> None:
    assert settings_from_cli(parsed("auto", []), "auto") == Settings()
    preset = tmp_path / "p.yaml"
    preset.write_text("common:\n  model: vit_b\n  tile_size_px: 512\nauto:\n  tile_size_px: 256\n  zoom: 4\n"
                      "  min_area_m2: 5.0\n  skip_covered: false\nsegment:\n  overlap_px: 8\n")
    settings = settings_from_cli(parsed("auto", ["--config", str(preset)]), "auto")
    assert (settings.model, settings.tile_size_px, settings.zoom, settings.min_area_m2) == ("vit_b", 256, 4, 5.0)
    assert settings.skip_covered is False and settings.overlap_px == Settings().overlap_px  # segment's, not auto's
    settings = settings_from_cli(parsed("auto", ["--config", str(preset), "--zoom", "auto", "--overlap", "16",
                                                 "--skip-covered", "--min-area", "0.5"]), "auto")
    assert (settings.tile_size_px, settings.zoom, settings.overlap_px) == (256, None, 16)
    assert settings.skip_covered is True and settings.min_area_m2 == 0.5  # a flag equal to the default still wins
    assert settings_from_cli(parsed("segment", ["--config", str(preset)]), "segment").overlap_px == 8


@pytest.mark.parametrize(
    ("preset", "needles"),
    [
        ("auto:\n  min_area: 5\n", ("min_area", "did you mean 'min_area_m2'")),
        ("auto:\n  stability_thresh: 0.9\n", ("stability_thresh", "did you mean 'stability_score_thresh'")),
        ("segment:\n  tile_szie: 512\n", ("tile_szie", "did you mean 'tile_size_px'")),
        ("model:\n  name: mobile_sam\n", ("unknown section", "model")),
        ("auto:\n  tile_size_px: 10\n", ("tile_size_px", "64")),
        ("common:\n  min_area_m2: 50\nauto:\n  max_area_m2: 20\n", ("max area", "min area")),
    ],
)
def test_bad_preset_exits_2_naming_the_key(preset: str, needles: tuple[str, ...], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(preset)
    assert main(["auto", "s.tif", "-o", str(tmp_path / "o.gpkg"), "--config", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("sam-geo: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err
    with pytest.raises(ConfigError):
        settings_from_cli(parsed("auto", ["--config", str(path)]), "auto")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--tile-size", "10"], ("--tile-size", "tile size must be at least 64 model pixels, got 10")),
        (["--min-area", "-1"], ("--min-area", "min area must be at least 0 m^2")),
        (["--min-area", "nan"], ("--min-area", "nan")),
        (["--regularize", "0"], ("--regularize", "greater than 0")),
        (["--pred-iou-thresh", "1"], ("--pred-iou-thresh", "less than 1")),
        (["--zoom", "3"], ("--zoom", "'3'")),
        (["--bands", "1,2"], ("--bands", "1 or 3")),
        (["--precision", "fp8"], ("--precision", "fp8")),
        (["--max-area", "0.1"], ("max area (0.1 m^2) must be larger than min area (0.5 m^2)",)),
        (["--device", "tpu"], ("--device", "'tpu'")),
        (["--device", "cpu", "--precision", "fp16"], ("fp16 needs a CUDA GPU",)),
        (["--decoder-context", "20"], ("--decoder-context", "decoder context")),
        (["--points-per-side"], ("--points-per-side", "requires an argument")),
        (["--min_area", "5"], ("--min_area",)),
    ],
)
def test_bad_flags_exit_2(args: list[str], needles: tuple[str, ...], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["auto", "s.tif", "-o", str(tmp_path / "o.gpkg"), *args]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


def test_output_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["auto", "s.tif"], ["text", "s.tif", "pool"], ["segment", "s.tif", "--prompts", "p.gpkg"]):
        assert main(args) == EXIT_BAD_INPUT
        assert "give an output file with -o/--output" in capsys.readouterr().err


# --- the commands call the API and report --------------------------------------------------


def fake_result(**summary: Any) -> SimpleNamespace:
    data = RunSummary(scene="s.tif", mode="x", output="o.gpkg", **summary).to_dict()
    return SimpleNamespace(attrs={"summary": data})


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace the three API functions by fakes recording their arguments."""
    recorded: dict[str, Any] = {}
    summaries = {
        "segment": {"features": 2, "prompts": {"total": 4, "used": 2, "outside": 2, "outside_ids": ["a", "b"]},
                    "tiles": {"processed": 3}},
        "segment_auto": {"features": 7, "tiles": {"processed": 4, "skipped_nodata": 1},
                         "objects": {"pieces": 9, "joins": 2, "labels_raster": "l.tif"},
                         "failures": [{"tile": "t1", "error": "boom", "attempts": 3}]},
        "segment_text": {"features": 0, "prompts": {"total": 0}},
    }

    def fake(name: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> SimpleNamespace:
            recorded[name] = (args, kwargs)
            return fake_result(**summaries[name])
        return run

    for name in summaries:
        monkeypatch.setattr(sam_geo, name, fake(name), raising=False)
    return recorded


def test_segment_calls_the_api(calls: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("segment:\n  prompt_as: box\n  tile_size_px: 512\n")
    args = ["segment", "a.tif", "b.tif", "--prompts", "p.gpkg", "-o", "o.gpkg", "--config", str(preset),
            "--tile-size", "256", "--id-column", "osm_id", "--group-column", "g", "--workers", "0", "--summary",
            "s.json", "--work-dir", "w", "--restart", "--overwrite"]
    assert main(args) == EXIT_OK
    (scenes, prompts), kwargs = calls["segment"]
    assert scenes == ["a.tif", "b.tif"] and prompts == "p.gpkg"
    settings = kwargs.pop("settings")
    assert (settings.prompt_as, settings.tile_size_px, settings.workers) == ("box", 256, 0)
    assert kwargs == {"output": "o.gpkg", "partitioned": False, "return_frame": False, "overwrite": True,
                      "summary_path": "s.json", "work_dir": "w",
                      "restart": True, "prompts_layer": None, "prompts_crs": None, "id_column": "osm_id",
                      "negative_points": None, "group_column": "g", "label_column": None}
    err = capsys.readouterr().err
    assert "wrote 2 polygons to o.gpkg (3 tiles encoded, 0 resumed, 0 failed" in err
    assert "2 prompts outside the scene: a, b" in err


def test_auto_calls_the_api(calls: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["auto", "a.tif", "-o", "o.gpkg", "--labels-raster", "l.tif", "--nested-thresh", "0.8",
                 "--max-area", "5000", "--no-skip-covered"]) == EXIT_OK
    (scenes,), kwargs = calls["segment_auto"]
    settings = kwargs.pop("settings")
    assert scenes == ["a.tif"] and kwargs["labels_raster"] == "l.tif" and kwargs["output"] == "o.gpkg"
    assert (settings.nested_thresh, settings.max_area_m2, settings.skip_covered) == (0.8, 5000.0, False)
    err = capsys.readouterr().err
    assert "wrote 7 objects to o.gpkg (4 tiles encoded, 1 all nodata, 0 resumed, 0 failed" in err
    assert "stitched 9 tile masks: 2 joined across tiles" in err and "labels raster: l.tif" in err
    assert "tile t1 failed: boom" in err


def test_text_calls_the_api(calls: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["text", "a.tif", "swimming pool", "tennis court", "-o", "o.gpkg", "--detector", "d",
                 "--box-threshold", "0.3"]) == EXIT_OK
    (scenes, phrases), kwargs = calls["segment_text"]
    assert scenes == ["a.tif"] and phrases == ["swimming pool", "tennis court"]
    assert (kwargs["settings"].detector, kwargs["settings"].box_threshold) == ("d", 0.3)
    assert "warning: no polygons were produced" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "code", "needle"),
    [
        (KeyboardInterrupt(), 130, "sam-geo: interrupted; no output was written"),
        (RunError("3 tiles failed"), EXIT_FAILED, "sam-geo: error: 3 tiles failed"),
        (ConfigError("bad value"), EXIT_BAD_INPUT, "sam-geo: error: bad value"),
        (RuntimeError("oops"), EXIT_FAILED, "sam-geo: unexpected error (RuntimeError): oops"),
    ],
)
def test_exit_codes(error: BaseException, code: int, needle: str, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(sam_geo, "segment_auto", fail, raising=False)
    assert main(["auto", "a.tif", "-o", "o.gpkg"]) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert main(["--debug", "auto", "a.tif", "-o", "o.gpkg"]) == code
    err = capsys.readouterr().err
    assert needle in err and ("Traceback" in err) == (code != 130)


def test_report_says_how_busy_the_model_hosts_were(capsys: pytest.CaptureFixture[str]) -> None:
    from sam_geo.cli.reports import report_prompted
    from sam_geo.run.summary import RunSummary

    summary = RunSummary(scene="s.tif", mode="prompted", output="o.gpkg", features=3)
    summary.workers = [{"model_busy_share": 0.62}, {"model_busy_share": 0.71}]
    summary.rates = {"tiles_per_s": 1.5, "cpu_ms_per_tile": 44.6}
    report_prompted(summary)
    assert "2 model workers: 1.50 tiles/s, model busy 62-71 % of the time, 45 ms of CPU per tile" in capsys.readouterr().err
    report_prompted(RunSummary(scene="s.tif", mode="prompted", output="o.gpkg", features=3))
    assert "model worker" not in capsys.readouterr().err  # nothing ran (all tiles resumed)
