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
    settings = preset_settings()
    assert settings["zoom"] == 4 and settings["points_per_side"] == 32
    assert settings["min_area_m2"] == 1000.0 and settings["max_area_m2"] == 200000.0
    from sam_geo.auto import _split_overrides

    _split_overrides(None, None, settings)  # every key is a known setting
