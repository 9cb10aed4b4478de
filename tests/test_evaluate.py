"""Tests of sam_geo.evaluate: hand-made cases, a brute-force cross-check on real labels."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import Polygon, box

from sam_geo.cli import main
from sam_geo.errors import ConfigError, CRSError, PromptError
from sam_geo.evaluate import EvaluationResult, evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BANEPA_GT = DATA / "banepa" / "buildings_utm45n.geojson"
UTM = "EPSG:32645"


def frame(geoms: list, crs: str = UTM, **columns: list) -> gpd.GeoDataFrame:
    """GeoDataFrame of ``geoms`` (shapely or None) in ``crs`` with optional columns."""
    return gpd.GeoDataFrame(columns, geometry=list(geoms), crs=crs)


def at(geom: shapely.Geometry, x: float = 500_000.0, y: float = 3_000_000.0) -> shapely.Geometry:
    """``geom`` moved from the origin to a place inside UTM zone 45N."""
    return shapely.affinity.translate(geom, x, y)


# --- hand-made cases ---------------------------------------------------------------------


def test_identical_layers_match_perfectly() -> None:
    gt = frame([at(box(i * 20, 0, i * 20 + 10, 10)) for i in range(3)])
    result = evaluate(gt.copy(), gt)
    assert (result.tp, result.fp, result.fn) == (3, 0, 0)
    assert result.precision == result.recall == result.f1 == 1.0
    assert result.crs == UTM
    assert result.mean_matched_iou == pytest.approx(1.0)


def test_shifted_square_matches_only_below_its_iou() -> None:
    gt = frame([at(box(0, 0, 10, 10))])
    pred = frame([at(box(2, 0, 12, 10))])  # intersection 80, union 120: IoU 2/3
    matched = evaluate(pred, gt, iou=0.5)
    assert (matched.tp, matched.fp, matched.fn) == (1, 0, 0)
    assert matched.matches["iou"].iloc[0] == pytest.approx(2 / 3)
    unmatched = evaluate(pred, gt, iou=0.7)
    assert (unmatched.tp, unmatched.fp, unmatched.fn) == (0, 1, 1)
    assert unmatched.precision == unmatched.recall == unmatched.f1 == 0.0


def test_one_to_one_keeps_the_best_of_two_predictions() -> None:
    gt = frame([at(box(0, 0, 10, 10))])
    pred = frame([at(box(3, 0, 13, 10)), at(box(1, 0, 11, 10))])  # IoU 0.538 and 0.818
    result = evaluate(pred, gt)
    assert (result.tp, result.fp, result.fn) == (1, 1, 0)
    assert result.matches.to_dict("records") == [
        {"pred_index": 1, "gt_index": 0, "iou": pytest.approx(90 / 110)}
    ]
    assert result.precision == 0.5 and result.recall == 1.0
    assert result.f1 == pytest.approx(2 / 3)


def test_greedy_matching_is_global_by_iou_not_by_prediction_order() -> None:
    gt = frame([at(box(0, 0, 10, 10)), at(box(10, 0, 20, 10))])
    # pred 0 prefers GT 1 (IoU 0.379) over GT 0 (0.290); pred 1 fits GT 1 best (0.95).
    pred = frame([at(box(5.5, 0, 15.5, 10)), at(box(10.5, 0, 20, 10))])
    result = evaluate(pred, gt, iou=0.25)
    assert (result.tp, result.fp, result.fn) == (2, 0, 0)
    pairs = sorted(zip(result.matches.pred_index, result.matches.gt_index))
    assert pairs == [(0, 0), (1, 1)]
    assert evaluate(pred, gt, iou=0.3).tp == 1  # pred 0 - GT 0 is below 0.3


def test_invalid_geometries_are_repaired_and_empty_ones_dropped() -> None:
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])  # self-intersecting
    gt = frame([at(box(0, 0, 10, 10)), at(box(20, 0, 30, 10))])
    pred = frame([at(bowtie), None, Polygon(), at(box(20, 0, 30, 10))])
    result = evaluate(pred, gt, iou=0.45)  # the repaired bowtie covers half the square
    assert result.n_pred_dropped == 2
    assert result.n_pred == 2
    assert (result.tp, result.fp, result.fn) == (2, 0, 0)
    assert evaluate(pred, gt, iou=0.55).tp == 1


def test_empty_prediction_layer_misses_everything(tmp_path: Path) -> None:
    gt = frame([at(box(0, 0, 10, 10)), at(box(20, 0, 30, 10))])
    empty = frame([])
    result = evaluate(empty, gt)
    assert (result.tp, result.fp, result.fn, result.n_pred) == (0, 0, 2, 0)
    assert result.precision == result.recall == result.f1 == 0.0
    path = tmp_path / "empty.geojson"
    path.write_text('{"type": "FeatureCollection", "features": []}')
    assert evaluate(path, gt).fn == 2


def test_bad_inputs_raise_errors_that_say_what_to_do(tmp_path: Path) -> None:
    gt = frame([at(box(0, 0, 10, 10))])
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        evaluate(gt, gt, iou=0)
    with pytest.raises(ConfigError, match="not a column"):
        evaluate(gt, gt, key="osm_id")
    with pytest.raises(PromptError, match="does not exist"):
        evaluate(tmp_path / "missing.gpkg", gt)
    with pytest.raises(PromptError, match="no features"):
        evaluate(gt, frame([]))
    with pytest.raises(CRSError, match="no CRS"):
        evaluate(gpd.GeoDataFrame(geometry=[box(0, 0, 1, 1)]), gt)


# --- CRS and AOI --------------------------------------------------------------------------


def test_prediction_in_4326_against_gt_in_utm_gives_the_same_scores() -> None:
    gt = frame([at(box(i * 20, 0, i * 20 + 10, 10)) for i in range(4)])
    pred = frame([at(box(i * 20 + 2, 0, i * 20 + 12, 10)) for i in range(4)])
    in_utm = evaluate(pred, gt)
    in_4326 = evaluate(pred.to_crs(4326), gt)
    assert in_4326.crs == UTM
    assert (in_4326.tp, in_4326.fp, in_4326.fn) == (in_utm.tp, in_utm.fp, in_utm.fn) == (4, 0, 0)
    np.testing.assert_allclose(in_4326.matches["iou"], in_utm.matches["iou"], atol=1e-6)


def test_geographic_gt_is_compared_in_its_utm_zone() -> None:
    gt = frame([at(box(0, 0, 10, 10))]).to_crs(4326)
    pred = frame([at(box(2, 0, 12, 10))])
    result = evaluate(pred, gt)
    assert result.crs == UTM  # 85.5 E, 27 N: UTM zone 45N
    assert result.matches["iou"].iloc[0] == pytest.approx(2 / 3, abs=1e-4)


def test_aoi_counts_polygons_by_their_representative_point() -> None:
    gt = frame([at(box(i * 20, 0, i * 20 + 10, 10)) for i in range(3)])  # x 0-10, 20-30, 40-50
    pred = frame([
        at(box(1, 0, 11, 10)),  # inside, matches GT 0
        at(box(21, 0, 31, 10)),  # centre x 26: outside the AOI that ends at x 25
        at(box(41, 0, 51, 10)),  # outside
    ])
    aoi = frame([at(box(-5, -5, 25, 15))]).to_crs(4326)  # GT 1 (centre x 25) on the border
    result = evaluate(pred, gt, aoi=aoi)
    assert (result.n_gt, result.n_gt_outside_aoi) == (2, 1)
    assert (result.n_pred, result.n_pred_outside_aoi) == (1, 2)
    assert (result.tp, result.fp, result.fn) == (1, 0, 1)


# --- brute-force cross-check on real labels ------------------------------------------------


def brute_force_f1(pred: gpd.GeoDataFrame, gt: gpd.GeoDataFrame, iou: float) -> tuple[int, int, int, float]:
    """Independent reference: loops over all pairs, greedy one-to-one by IoU descending."""
    pred = pred.to_crs(gt.crs)
    p_geoms = [g for g in pred.geometry if g is not None and not g.is_empty]
    g_geoms = [g for g in gt.geometry if g is not None and not g.is_empty]
    g_bounds = np.array([g.bounds for g in g_geoms])
    pairs = []
    for i, p in enumerate(p_geoms):
        minx, miny, maxx, maxy = p.bounds
        near = (g_bounds[:, 0] <= maxx) & (g_bounds[:, 2] >= minx) & (g_bounds[:, 1] <= maxy) & (g_bounds[:, 3] >= miny)
        for j in np.flatnonzero(near):
            g = g_geoms[j]
            value = p.intersection(g).area / p.union(g).area
            if value >= iou:
                pairs.append((value, i, int(j)))
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    used_p, used_g = set(), set()
    for _value, i, j in pairs:
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
    tp = len(used_p)
    fp, fn = len(p_geoms) - tp, len(g_geoms) - tp
    precision = tp / len(p_geoms) if p_geoms else 0.0
    recall = tp / len(g_geoms) if g_geoms else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return tp, fp, fn, f1


def split_in_two(geom: shapely.Geometry) -> list[shapely.Geometry]:
    """The two halves of ``geom`` on either side of a vertical line through its centre."""
    minx, miny, maxx, maxy = geom.bounds
    mid = (minx + maxx) / 2
    halves = [geom.intersection(box(minx, miny, mid, maxy)), geom.intersection(box(mid, miny, maxx, maxy))]
    return [h for h in halves if not h.is_empty]


def perturbed(gt: gpd.GeoDataFrame, seed: int, *, drop: float = 0.10, split: float = 0.15) -> gpd.GeoDataFrame:
    """GT shifted by 1.5 m, ``drop`` of rows dropped, ``split`` of rows split in two."""
    rng = np.random.default_rng(seed)
    shifted = gt.copy()
    shifted["geometry"] = shifted.translate(1.5, 0.0)
    kept = shifted[rng.random(len(shifted)) >= drop]
    to_split = rng.random(len(kept)) < split
    rows = []
    for (_, row), cut in zip(kept.iterrows(), to_split):
        for part in split_in_two(row.geometry) if cut else [row.geometry]:
            rows.append({"osm_id": row["osm_id"], "geometry": part})
    return gpd.GeoDataFrame(rows, geometry="geometry", crs=gt.crs)


@pytest.fixture(scope="module")
def banepa_gt() -> gpd.GeoDataFrame:
    return gpd.read_file(BANEPA_GT)


@pytest.mark.parametrize(
    ("variant", "iou"),
    [("shifted", 0.5), ("dropped+split", 0.5), ("dropped+split in 4326", 0.5), ("dropped+split", 0.3)],
)
def test_agrees_with_brute_force_on_banepa(banepa_gt: gpd.GeoDataFrame, variant: str, iou: float) -> None:
    if variant == "shifted":
        pred = perturbed(banepa_gt, 0, drop=0.0, split=0.0)
    else:
        pred = perturbed(banepa_gt, 1)
    if variant.endswith("4326"):
        pred = pred.to_crs(4326)
    tp, fp, fn, f1 = brute_force_f1(pred, banepa_gt, iou)
    result = evaluate(pred, banepa_gt, iou=iou)
    assert abs(result.f1 - f1) <= 0.005
    assert abs(result.tp - tp) <= 2 and result.fp + result.tp == tp + fp and result.fn + result.tp == tp + fn
    assert 0.0 < result.f1 < 1.0  # the perturbation is strong enough to matter


def test_aoi_on_banepa_agrees_with_filtering_by_hand(banepa_gt: gpd.GeoDataFrame) -> None:
    pred = perturbed(banepa_gt, 2)
    minx, miny, maxx, maxy = banepa_gt.total_bounds
    aoi_geom = box(minx, miny, (minx + maxx) / 2, (miny + maxy) / 2)
    inside = lambda f: f[shapely.intersects(aoi_geom, f.geometry.representative_point())]  # noqa: E731
    tp, fp, fn, f1 = brute_force_f1(inside(pred), inside(banepa_gt), 0.5)
    result = evaluate(pred, banepa_gt, aoi=frame([aoi_geom]))
    assert (result.tp, result.fp, result.fn) == (tp, fp, fn)
    assert result.n_gt + result.n_gt_outside_aoi == len(banepa_gt)
    assert 0 < result.n_gt < len(banepa_gt)


def test_per_object_iou_by_osm_id(banepa_gt: gpd.GeoDataFrame) -> None:
    pred = perturbed(banepa_gt, 3)
    result = evaluate(pred, banepa_gt, key="osm_id")
    stats = result.per_object
    expected = {}
    for osm_id, g in zip(banepa_gt.osm_id, banepa_gt.geometry):
        parts = pred.geometry[pred.osm_id == osm_id]
        if len(parts) == 0:
            expected[osm_id] = 0.0
            continue
        p = shapely.union_all(list(parts))
        expected[osm_id] = p.intersection(g).area / p.union(g).area
    values = np.array(list(expected.values()))
    assert stats.key == "osm_id"
    assert stats.n_objects == banepa_gt.osm_id.nunique()
    assert stats.n_missing == len(banepa_gt) - pred.osm_id.nunique() > 100
    assert stats.n_extra == 0
    assert stats.median == pytest.approx(np.median(values), abs=1e-6)
    assert stats.mean == pytest.approx(values.mean(), abs=1e-6)
    assert stats.share_ge_50 == pytest.approx((values >= 0.5).mean())
    assert stats.share_ge_75 == pytest.approx((values >= 0.75).mean())
    # split predictions are unioned per key: the same per-object IoU as unsplit ones
    unsplit = evaluate(perturbed(banepa_gt, 3, split=0.0), banepa_gt, key="osm_id")
    np.testing.assert_allclose(result.object_ious.sort_index(), unsplit.object_ious.sort_index(), atol=1e-6)


def test_per_object_keys_compare_text_with_numbers() -> None:
    gt = frame([at(box(0, 0, 10, 10)), at(box(20, 0, 30, 10))], osm_id=[1, 2])
    pred = frame([at(box(2, 0, 12, 10)), at(box(50, 0, 60, 10))], osm_id=["1", "7"])
    stats = evaluate(pred, gt, key="osm_id").per_object
    assert (stats.n_objects, stats.n_missing, stats.n_extra) == (2, 1, 1)
    assert stats.mean == pytest.approx((2 / 3 + 0) / 2)


# --- result and CLI -----------------------------------------------------------------------


def test_to_dict_is_json_ready() -> None:
    gt = frame([at(box(0, 0, 10, 10))], osm_id=[5])
    result = evaluate(gt, gt, key="osm_id")
    assert isinstance(result, EvaluationResult)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["f1"] == 1.0 and data["per_object"]["median"] == pytest.approx(1.0)
    assert "matches" not in data


def test_cli_prints_a_table_or_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt_path, pred_path = tmp_path / "gt.gpkg", tmp_path / "pred.geojson"
    frame([at(box(0, 0, 10, 10)), at(box(20, 0, 30, 10))], osm_id=[1, 2]).to_file(gt_path)
    frame([at(box(1, 0, 11, 10))], osm_id=[1]).to_crs(4326).to_file(pred_path)
    assert main(["evaluate", str(pred_path), str(gt_path), "--key", "osm_id"]) == 0
    table = capsys.readouterr().out
    assert "precision" in table and "recall" in table and "per-object IoU" in table
    assert main(["evaluate", str(pred_path), str(gt_path), "--json", "--iou", "0.9"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["tp"], data["fn"], data["iou_threshold"]) == (0, 2, 0.9)
    assert main(["evaluate", str(pred_path), str(gt_path), "--iou", "1.5"]) == 2


# --- out of core ------------------------------------------------------------------------


def test_out_of_core_equals_in_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A prediction dataset of 5 parts against a GT file, both GeoParquet: same counts,
    same matches (row numbers and IoU) as evaluating in memory, and chosen by default
    for a folder."""
    rng = np.random.default_rng(3)
    n = 3000
    x, y = rng.uniform(0, 20_000, n), rng.uniform(0, 20_000, n)
    gt = frame([at(box(a, b, a + 10, b + 10)) for a, b in zip(x, y)])
    gt.loc[7, "geometry"] = None  # dropped, counted as such
    shift = rng.normal(0, 2.5, (n, 2))
    keep = rng.random(n) < 0.8
    pred = frame([at(box(a + dx, b + dy, a + dx + 10, b + dy + 10))
                  for a, b, (dx, dy), k in zip(x, y, shift, keep) if k])
    pred = pd.concat([pred, frame([at(box(30_000, 0, 30_010, 10)), None])], ignore_index=True)  # FP, dropped
    gt_path, folder = tmp_path / "gt.parquet", tmp_path / "pred"
    gt.to_parquet(gt_path, write_covering_bbox=True, row_group_size=500)
    folder.mkdir()
    for k, rows in enumerate(np.array_split(np.arange(len(pred)), 5)):
        pred.iloc[rows].to_parquet(folder / f"part-{k}.parquet", write_covering_bbox=True)
    in_memory = evaluate(folder, gt_path, out_of_core=False)
    out_of_core = evaluate(folder, gt_path)  # a folder against GeoParquet: out of core by default
    assert in_memory.to_dict() == out_of_core.to_dict()
    assert in_memory.tp > 1000 and in_memory.n_pred_dropped == 1 and in_memory.n_gt_dropped == 1
    a = in_memory.matches.sort_values("pred_index").reset_index(drop=True)
    b = out_of_core.matches.sort_values("pred_index").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(ConfigError, match="no AOI or key"):
        evaluate(folder, gt_path, key="x", out_of_core=True)
    with pytest.raises(PromptError, match="GeoParquet"):
        evaluate(folder, tmp_path / "gt.gpkg", out_of_core=True)
    assert main(["evaluate", str(folder), str(gt_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["f1"] == in_memory.f1
