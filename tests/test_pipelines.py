"""pipelines/: every job script imports, parses its arguments and reads its preset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.mark.parametrize("script", sorted(p.name for p in PIPELINES.glob("*.py")))
def test_pipeline_help(script: str) -> None:
    done = subprocess.run([sys.executable, str(PIPELINES / script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_fields_pipeline_reads_the_auto_preset() -> None:
    sys.path.insert(0, str(PIPELINES))
    try:
        from fields_auto import preset_settings
    finally:
        sys.path.remove(str(PIPELINES))
    values = preset_settings()
    assert values["zoom"] == 4 and values["points_per_side"] == 32
    assert values["min_area_m2"] == 1000.0 and values["max_area_m2"] == 200000.0
    from sam_geo.settings import make_settings

    settings = make_settings(**values)  # every key is a known setting, every value valid
    assert (settings.zoom, settings.tile_size_px, settings.simplify_m) == (4, 1024, 5.0)


@pytest.mark.parametrize("preset", sorted((PIPELINES.parent / "configs").glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("command", ["segment", "auto", "text"])
def test_presets_are_valid_settings(preset: Path, command: str) -> None:
    from sam_geo.settings import load_preset, make_settings

    make_settings(**load_preset(preset, command))
