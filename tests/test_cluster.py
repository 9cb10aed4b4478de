"""Ray clusters of several nodes on this machine (``ray.cluster_utils.Cluster``).

Each run happens in a subprocess with its own cluster, so the session's embedded Ray
(``ray_session``) is left alone. The nodes are Ray nodes of one machine: what is
checked is placement (model actors per node, by each node's own resources) and that
the output equals an embedded run; speed is for ``benchmarks/``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pytest
from rasterio.windows import Window

from sam_geo import segment
from sam_geo.run.runtime import ActorSlot, model_actor_count, plan_cpu_actors
from test_runtime import TILING, assert_same_output, prompts_inside, write_crop

CLUSTER_RUN = """
import json, sys
import geopandas as gpd
import ray
from ray.cluster_utils import Cluster
from sam_geo import segment

nodes, scene, prompts, out, overrides = sys.argv[1:6]
cluster = Cluster(initialize_head=True, head_node_args=json.loads(nodes)[0])
for node in json.loads(nodes)[1:]:
    cluster.add_node(**node)
cluster.wait_for_nodes()
try:
    gdf = segment(scene, gpd.read_file(prompts), address=cluster.address, progress=False,
                  output=out, **json.loads(overrides))
    summary = gdf.attrs["summary"]
    gpu_nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    print("RESULT " + json.dumps({"workers": summary["workers"], "tiles": summary["tiles"],
                                  "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
                                  "gpu_nodes": gpu_nodes}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 x 400 px of Banepa: 4 tiles of 256 px."""
    return write_crop(Window(1500, 2000, 400, 400), tmp_path_factory.mktemp("cluster") / "scene.tif")


def run_on_cluster(nodes: list[dict], scene: Path, tmp_path: Path, **overrides) -> tuple[dict, gpd.GeoDataFrame]:
    prompts, out = tmp_path / "prompts.gpkg", tmp_path / "out.gpkg"
    prompts_inside(scene).to_file(prompts)
    args = [json.dumps(nodes), str(scene), str(prompts), str(out), json.dumps({**TILING, **overrides})]
    done = subprocess.run([sys.executable, "-c", CLUSTER_RUN, *args], capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):]), gpd.read_file(out)


def embedded(scene: Path, **overrides) -> gpd.GeoDataFrame:
    return segment(scene, prompts_inside(scene), workers=0, progress=False, **TILING, **overrides)


def test_two_cpu_nodes_each_run_a_model_actor_and_the_output_equals_an_embedded_run(scene: Path, tmp_path: Path) -> None:
    nodes = [{"num_cpus": 2}, {"num_cpus": 2}]
    summary, gdf = run_on_cluster(nodes, scene, tmp_path, workers=2)
    assert summary["tiles"]["failed"] == 0
    assert sorted(w["node_id"] for w in summary["workers"]) == sorted(summary["nodes"])
    assert all(w["tiles"] > 0 for w in summary["workers"])
    assert_same_output(gdf, embedded(scene))


def test_gpu_path_on_a_node_with_a_fake_gpu_matches_the_cpu_path(scene: Path, tmp_path: Path) -> None:
    """A CPU-only head and a node advertising one (fake) GPU: the one model actor goes
    to the GPU node, where torch finds no CUDA and runs on CPU, with the GPU path's
    choices forced: encoder batches of 3 tiles, 4 tiles in its hands at once, bf16."""
    nodes = [{"num_cpus": 2}, {"num_cpus": 2, "num_gpus": 1}]
    summary, gdf = run_on_cluster(nodes, scene, tmp_path, workers=2, encode_batch=3, precision="bf16")
    assert [w["node_id"] for w in summary["workers"]] == summary["gpu_nodes"]  # 2 asked, 1 GPU
    actor = summary["workers"][0]
    assert actor["tiles"] == summary["tiles"]["processed"] > 1
    assert actor["encoder_calls"] < actor["tiles"]  # tiles went through the encoder in batches
    assert_same_output(gdf, embedded(scene, precision="bf16"))


def test_cpu_actors_spread_over_nodes_by_their_cpus_with_threads_from_their_node() -> None:
    slots = plan_cpu_actors(3, {"big": 8, "small": 4})
    assert sorted(s.node_id for s in slots) == ["big", "big", "small"]
    assert {s.node_id: s.threads for s in slots} == {"big": 4, "small": 4}
    assert plan_cpu_actors(1, {"small": 4, "big": 8}) == [ActorSlot("big", 8)]
    assert plan_cpu_actors(2, {"a": 2}, threads=3) == [ActorSlot("a", 3), ActorSlot("a", 3)]
    assert plan_cpu_actors(5, {"a": 2}) == [ActorSlot("a", 1)] * 5  # at least one thread
    assert plan_cpu_actors(2, {}) == [ActorSlot(None, None)] * 2


def test_model_actors_are_one_per_gpu_at_most_and_never_more_than_the_tiles() -> None:
    assert model_actor_count(None, 0, 10) == 1
    assert model_actor_count(None, 4, 10) == 4
    assert model_actor_count(8, 2, 10) == 2
    assert model_actor_count(3, 0, 2) == 2


def test_a_stand_in_run_is_marked_and_never_resumes_into_a_real_run(scene: Path, tmp_path: Path, monkeypatch) -> None:
    from sam_geo.errors import ConfigError
    from sam_geo.run.standin import ENV_STANDIN_MS

    work = tmp_path / "work"
    monkeypatch.setenv(ENV_STANDIN_MS, "1")
    standin = segment(scene, prompts_inside(scene), work_dir=work, workers=0, progress=False, **TILING)
    assert standin.attrs["summary"]["model"]["standin_ms"] == 1.0
    monkeypatch.delenv(ENV_STANDIN_MS)
    with pytest.raises(ConfigError, match="standin_ms"):
        segment(scene, prompts_inside(scene), work_dir=work, workers=0, progress=False, **TILING)
    monkeypatch.setenv(ENV_STANDIN_MS, "fast")
    with pytest.raises(ConfigError, match="not a number"):
        segment(scene, prompts_inside(scene), workers=0, progress=False, **TILING)
