"""Helpers shared by the benchmark scripts (paths to ../shared, per-object IoU)."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely

SHARED = Path(__file__).resolve().parents[2] / "shared"
BANEPA = SHARED / "data" / "banepa"
FIELDS = SHARED / "data" / "fields"
WEIGHTS = SHARED / "weights" / "mobile_sam.pt"


def per_object_iou(pred: gpd.GeoDataFrame, truth: gpd.GeoDataFrame, key: str) -> np.ndarray:
    """IoU of each truth row with the prediction rows sharing its ``key`` (0 if none)."""
    pred = pred.to_crs(truth.crs).dissolve(by=key)
    matched = pred.reindex(truth[key]).geometry.to_numpy()
    has = ~gpd.GeoSeries(matched).isna().to_numpy()
    ious = np.zeros(len(truth))
    t, p = truth.geometry.to_numpy()[has], matched[has]
    ious[has] = shapely.area(shapely.intersection(t, p)) / shapely.area(shapely.union(t, p))
    return ious
