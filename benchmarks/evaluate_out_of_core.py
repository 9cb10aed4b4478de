"""Evaluation of a partitioned prediction layer: out of core (dask) against in memory.

Builds a ground-truth layer of ``--features`` 10 m squares over 100 km x 100 km
(GeoParquet, covering bbox, Hilbert order, row groups of 100,000) and a prediction
dataset of 80 % of the same squares shifted by 1 m in x and y, written as parts of
100,000 rows (what ``sam-geo ... -o out/`` writes). Each evaluation runs in a fresh
process and prints its wall seconds, peak RSS (VmHWM) and the scores.

    python benchmarks/evaluate_out_of_core.py                        # 2,000,000 features
    python benchmarks/evaluate_out_of_core.py --features 200000 --keep /tmp/evalooc
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely

CHILD = """
import json, sys, time
from sam_geo.evaluate import evaluate
def peak_rss_mib():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
start = time.perf_counter()
result = evaluate(sys.argv[1], sys.argv[2], out_of_core=sys.argv[3] == "1")
print(json.dumps({"wall_s": round(time.perf_counter() - start, 1), "peak_rss_mib": round(peak_rss_mib()),
                  "f1": result.f1, "tp": result.tp, "n_pred": result.n_pred, "n_gt": result.n_gt}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=2_000_000)
    parser.add_argument("--keep", type=Path, default=None, help="build (or reuse) the layers in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        gt, pred = build(folder, args.features)
        for mode in ("1", "0"):
            done = subprocess.run([sys.executable, "-c", CHILD, str(pred), str(gt), mode],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps({"features": args.features, "out_of_core": mode == "1", **row}))


def build(folder: Path, n: int) -> tuple[Path, Path]:
    gt_path, pred_path = folder / f"gt-{n}.parquet", folder / f"pred-{n}"
    if gt_path.exists() and pred_path.exists():
        return gt_path, pred_path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(500_000, 600_000, n), rng.uniform(3_000_000, 3_100_000, n)
    gt = gpd.GeoDataFrame({"id": np.arange(n)}, geometry=shapely.box(x, y, x + 10, y + 10), crs="EPSG:32645")
    gt = gt.iloc[gt.geometry.hilbert_distance().argsort()].reset_index(drop=True)
    gt.to_parquet(gt_path, write_covering_bbox=True, row_group_size=100_000)
    kept = gt[rng.random(n) < 0.8]
    pred = kept.set_geometry(kept.geometry.translate(1.0, 1.0))  # IoU 81 / 119 = 0.68 with its square
    pred_path.mkdir()
    for k, start in enumerate(range(0, len(pred), 100_000)):
        pred.iloc[start : start + 100_000].to_parquet(pred_path / f"part-{k:05d}.parquet", write_covering_bbox=True)
    return gt_path, pred_path


if __name__ == "__main__":
    main()
