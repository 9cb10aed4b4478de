"""Production runtime: resume, fault tolerance, failing tiles, several scenes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.windows import Window

from conftest import BANEPA, make_raster
from sam_geo import segment
from sam_geo.errors import ConfigError, RasterError, RunError
from sam_geo.run.pipeline import expand_scenes

TILING = {"tile_size_px": 256, "overlap_px": 32}
IN_PROCESS = {"workers": 0, "progress": False}


def write_crop(window: Window, dest: Path) -> Path:
    with rasterio.open(BANEPA / "banepa_utm45n.tif") as src:
        data = src.read(window=window)
        transform, crs = src.window_transform(window), src.crs.to_string()
    return Path(make_raster(dest, data, crs=crs, transform=transform, nodata=0, tiled=True))


def prompts_inside(scene: Path) -> gpd.GeoDataFrame:
    truth = gpd.read_file(BANEPA / "buildings_utm45n.geojson")
    with rasterio.open(scene) as src:
        box = shapely.box(*src.bounds)
    return truth[truth.within(box)].reset_index(drop=True)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 x 600 px of Banepa: 9 tiles of 256 px with the settings above."""
    return write_crop(Window(1500, 2000, 600, 600), tmp_path_factory.mktemp("rt") / "scene.tif")


@pytest.fixture(scope="module")
def clean_run(scene: Path) -> gpd.GeoDataFrame:
    return segment(scene, prompts_inside(scene), **IN_PROCESS, **TILING)


def assert_same_output(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame) -> None:
    """Same prompts, scores and outlines. Outlines are traced sub-pixel from the model's
    logits, so runs whose model ran on different torch thread counts (an in-process run
    against two one-thread actors) differ by float rounding: far below a pixel."""
    a, b = a.sort_values("prompt_index"), b.sort_values("prompt_index")
    assert list(a.prompt_index) == list(b.prompt_index)
    ga, gb = a.geometry.to_numpy(), b.geometry.to_numpy()
    iou = shapely.area(shapely.intersection(ga, gb)) / shapely.area(shapely.union(ga, gb))
    assert iou.min() > 0.995
    np.testing.assert_allclose(a.score.to_numpy(), b.score.to_numpy(), rtol=1e-5)


@pytest.mark.usefixtures("ray_session")
def test_killed_actor_is_replaced_and_the_output_is_unchanged(scene: Path, clean_run) -> None:
    import ray

    killed: list[str] = []

    def kill_one_actor(result) -> None:
        if killed:
            return
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("sam-geo-")]
        ray.kill(ray.get_actor(names[0]))
        killed.append(names[0])

    gdf = segment(
        scene,
        prompts_inside(scene),
        workers=2,
        progress=False,
        on_result=kill_one_actor,
        **TILING,
    )
    assert killed
    summary = gdf.attrs["summary"]
    assert summary["tiles"]["failed"] == 0
    assert summary["tiles"]["processed"] == summary["tiles"]["planned"]
    assert_same_output(gdf, clean_run)


def test_interrupted_run_resumes_only_the_remaining_tiles(scene: Path, clean_run, tmp_path: Path) -> None:
    seen: list[str] = []

    def die_after_three(result) -> None:
        seen.append(result.tile_key)
        if len(seen) == 3:
            raise KeyboardInterrupt  # the driver dies mid-run

    prompts = prompts_inside(scene)
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        segment(scene, prompts, work_dir=work, workers=0, on_result=die_after_three, **TILING)
    assert len(list((work / "tiles").glob("*.pkl"))) == 3

    summary_path = tmp_path / "summary.json"
    gdf = segment(
        scene, prompts, work_dir=work, **IN_PROCESS,
        summary_path=summary_path, **TILING,
    )
    tiles = json.loads(summary_path.read_text())["tiles"]
    assert tiles["resumed"] == 3
    assert tiles["processed"] == tiles["planned"] - 3
    assert_same_output(gdf, clean_run)

    # a finished work dir resumes everything and encodes nothing
    again = segment(scene, prompts, work_dir=work, **IN_PROCESS, **TILING)
    assert again.attrs["summary"]["tiles"]["processed"] == 0
    assert again.attrs["summary"]["workers"] == []  # nothing left to run: no model was loaded
    (host,) = clean_run.attrs["summary"]["workers"]  # workers=0: this process hosted the model
    assert host["tiles"] == clean_run.attrs["summary"]["tiles"]["planned"] and 0 < host["model_busy_share"] <= 1
    assert_same_output(again, clean_run)


def test_a_resumed_run_keeps_the_dataset_parts_already_published(
    scene: Path, clean_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sam_geo.io import stream

    monkeypatch.setattr(stream, "PART_ROWS", 5)  # a part every 5 rows
    seen: list[str] = []

    def die_after_five(result) -> None:
        seen.append(result.tile_key)
        if len(seen) == 5:
            raise KeyboardInterrupt

    prompts, work, out = prompts_inside(scene), tmp_path / "work", tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        segment(scene, prompts, work_dir=work, output=f"{out}/", workers=0, on_result=die_after_five, **TILING)
    published = sorted(out.glob("part-*.parquet"))
    assert published and (work / "published.txt").read_text().count("\n") == len(published)
    first_rows = gpd.read_parquet(out)
    gdf = segment(scene, prompts, work_dir=work, output=f"{out}/", **IN_PROCESS, **TILING)  # no --overwrite needed
    assert set(published) <= set(out.glob("part-*.parquet"))  # kept, not rewritten
    written = gpd.read_parquet(out).sort_values("prompt_index")
    assert written.prompt_index.is_unique and len(written) == len(clean_run) == len(gdf) > len(first_rows)
    assert written.prompt_index.tolist() == sorted(clean_run.prompt_index)


def test_work_dir_of_another_run_is_refused_unless_restart(scene: Path, tmp_path: Path) -> None:
    prompts = prompts_inside(scene).iloc[:3]
    work = tmp_path / "work"
    options = IN_PROCESS
    segment(scene, prompts, work_dir=work, **options, **TILING)
    with pytest.raises(ConfigError, match="settings.*--restart"):
        segment(scene, prompts, work_dir=work, **options, tile_size_px=512, overlap_px=32)
    gdf = segment(scene, prompts, work_dir=work, **options, restart=True, tile_size_px=512, overlap_px=32)
    assert gdf.attrs["summary"]["tiles"]["resumed"] == 0
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        segment(scene, prompts, work_dir=tmp_path / "busy", **options, **TILING)


def corrupt_block(path: Path, row: int, col: int) -> None:
    """Overwrite the bytes of the GeoTIFF block holding pixel (row, col) with garbage."""
    with rasterio.open(path) as src:
        block_row, block_col = row // src.block_shapes[0][0], col // src.block_shapes[0][1]
        offset = int(src.get_tag_item(f"BLOCK_OFFSET_{block_col}_{block_row}", "TIFF", bidx=1))
        size = int(src.get_tag_item(f"BLOCK_SIZE_{block_col}_{block_row}", "TIFF", bidx=1))
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * size)


def test_a_tile_that_keeps_failing_is_recorded_and_the_rest_finishes(scene: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.tif"
    shutil.copy(scene, broken)
    corrupt_block(broken, 50, 50)  # top-left block only
    prompts = prompts_inside(scene)
    options = {**IN_PROCESS, "retries": 1}
    output = tmp_path / "out.gpkg"
    with pytest.raises(RunError, match="no output was written"):
        segment(broken, prompts, output=output, **options, **TILING)
    assert not output.exists()

    gdf = segment(broken, prompts, output=output, **options, max_failed_tiles=20, **TILING)
    summary = gdf.attrs["summary"]
    assert 1 <= summary["tiles"]["failed"] < summary["tiles"]["planned"]
    assert all("corrupt" in f["error"] and f["attempts"] == 2 for f in summary["failures"])
    assert summary["tiles"]["processed"] == summary["tiles"]["planned"] - summary["tiles"]["failed"]
    assert len(gpd.read_file(output)) == len(gdf) > 0


def test_several_scenes_merge_into_one_output_with_a_scene_column(scene: Path, tmp_path: Path) -> None:
    other = write_crop(Window(2150, 2000, 400, 300), tmp_path / "other.tif")  # apart: touching would be a mosaic
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"# two scenes\n{scene}\n{other}\n")
    assert expand_scenes([f"@{listing}"]) == [str(scene), str(other)]
    assert expand_scenes(str(tmp_path / "*.tif")) == [str(other)]
    with pytest.raises(RasterError, match="no scene matches"):
        expand_scenes(str(tmp_path / "nothing*.tif"))

    prompts = gpd.GeoDataFrame(
        gpd.pd.concat([prompts_inside(scene), prompts_inside(other)]).drop_duplicates("osm_id"), crs=scene_crs(scene)
    )
    gdf = segment([f"@{listing}"], prompts, **IN_PROCESS, **TILING)
    assert set(gdf.scene) == {str(scene), str(other)}
    assert gdf.osm_id.is_unique and len(gdf) == len(prompts)
    assert gdf.attrs["summary"]["prompts"]["outside"] == 0


def scene_crs(path: Path) -> str:
    with rasterio.open(path) as src:
        return src.crs.to_string()


def test_cpu_actors_run_one_task_at_a_time_and_gpu_actors_fill_an_encoder_batch() -> None:
    from sam_geo.run.host import GPU_ENCODE_BATCH, HostConfig
    from sam_geo.run.runtime import TASKS_PER_ACTOR, tasks_per_actor

    config = HostConfig(model="mobile_sam", weights="w.pt")
    assert tasks_per_actor(config, on_gpu=False) == 1
    assert tasks_per_actor(HostConfig(model="mobile_sam", weights="w.pt", encode_batch=8), on_gpu=False) == 1
    assert tasks_per_actor(config, on_gpu=True) == max(TASKS_PER_ACTOR, GPU_ENCODE_BATCH + 1)
    assert tasks_per_actor(HostConfig(model="mobile_sam", weights="w.pt", encode_batch=1), on_gpu=True) == TASKS_PER_ACTOR


EMBEDDED_RUN = """
import sys
import ray
from sam_geo.run.runtime import ensure_ray

ensure_ray(None)

@ray.remote
def own():
    return "own task ran"

print(ray.get(own.remote()), flush=True)
print(ray.get_runtime_context().gcs_address, flush=True)
import os
print(os.environ["RAY_AUTH_TOKEN"], flush=True)
sys.stdin.readline()  # keep the run alive until the test is done
"""

CLIENT = """
import sys
import ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR")

    @ray.remote
    def intruder():
        return "ran inside"

    print(ray.get(intruder.remote(), timeout=60))
except Exception as exc:
    print("refused:", type(exc).__name__)
"""


def clean_environment(home: Path) -> dict[str, str]:
    """This process's environment without any Ray setting, and another home directory."""
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"HOME": str(home)}


@pytest.mark.ray
def test_embedded_ray_runs_no_task_for_a_client_without_its_token(tmp_path: Path) -> None:
    env = clean_environment(tmp_path / "user")
    run = subprocess.Popen([sys.executable, "-c", EMBEDDED_RUN], env=env, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout is not None
        assert run.stdout.readline().strip() == "own task ran"
        address, token = run.stdout.readline().strip(), run.stdout.readline().strip()
        assert len(token) == 64 and not (tmp_path / "user" / ".ray" / "auth_token").exists()

        stranger = clean_environment(tmp_path / "stranger")
        refused = subprocess.run([sys.executable, "-c", CLIENT, address], env=stranger, capture_output=True,
                                 text=True, timeout=180)
        assert refused.stdout.startswith("refused:"), refused.stdout + refused.stderr[-2000:]

        with_token = stranger | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        allowed = subprocess.run([sys.executable, "-c", CLIENT, address], env=with_token, capture_output=True,
                                 text=True, timeout=180)
        assert allowed.stdout.strip() == "ran inside", allowed.stdout + allowed.stderr[-2000:]
    finally:
        run.communicate(input="\n", timeout=120)


def test_a_cluster_that_refuses_this_client_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    from sam_geo.run.runtime import join_cluster

    def refuse(**kwargs: object) -> None:
        raise AuthenticationError("Authentication token is missing or incorrect")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConfigError, match="10.0.0.9:6379.*RAY_AUTH_TOKEN"):
        join_cluster("10.0.0.9:6379", {})
