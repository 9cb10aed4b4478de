"""Score predicted polygons against ground truth: object-level precision, recall, F1.

:func:`evaluate` matches predictions to ground-truth (GT) polygons one-to-one, SpaceNet
style, and optionally measures per-object IoU for prompted runs, where each prediction
carries the id of the GT object it was prompted with.

Steps, in order:

1. **Read** both layers (any format :func:`sam_geo.io.prompts.read_prompt_layer` reads, or
   GeoDataFrames); each must have a CRS. An empty prediction layer is allowed (every GT
   object is then missed); an empty GT layer is an error.
2. **Reproject** both to one *projected* CRS, so areas are planar and in metres-like
   units: the GT's CRS when it is projected, else the UTM zone of the GT
   (:meth:`geopandas.GeoDataFrame.estimate_utm_crs`).
3. **Clean**: Z dropped; invalid geometries repaired with :func:`shapely.make_valid`
   (``method="structure"``, collapsed parts dropped); only polygonal parts are kept.
   Missing, empty, non-polygonal and zero-area geometries are dropped and counted
   (``n_pred_dropped``, ``n_gt_dropped``).
4. **AOI** (optional): a polygon counts only if its representative point
   (:func:`shapely.point_on_surface`, always inside the polygon) lies inside or on the
   boundary of the union of the AOI polygons. The others are left out of every count
   and reported (``n_pred_outside_aoi``, ``n_gt_outside_aoi``). This rule gives each
   polygon one unambiguous side of the AOI border, so a building cut by the border is
   counted on at most one side and predictions and GT are treated alike.
5. **Match**: candidate pairs come from an :class:`shapely.STRtree` query
   (``predicate="intersects"``); pairs whose IoU cannot reach the threshold (by their
   areas and bounding boxes) are discarded cheaply, the others get exact
   intersection areas (vectorized, union area = ``a + b - intersection``). Then greedy
   one-to-one matching: all candidate pairs with ``IoU >= iou`` sorted by IoU
   descending (ties: lower prediction row, then lower GT row, first), a pair accepted
   when neither side is taken yet. Matched pairs are true positives (TP), unmatched
   predictions false positives (FP), unmatched GT false negatives (FN).

``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``f1`` their harmonic mean;
a ratio with a zero denominator is reported as ``0.0`` (not NaN, so JSON stays valid).

Cost: O((n_pred + n_gt) log n) for the tree plus one intersection per surviving
candidate pair; 100,000 x 100,000 polygons take seconds (see
``benchmarks/evaluate_scaling.py``), never an all-pairs loop.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyproj
import shapely

from sam_geo.errors import ConfigError, CRSError, PromptError
from sam_geo.io.layers import Area, is_parquet, read_layer_near
from sam_geo.io.prompts import read_prompt_layer

__all__ = [
    "EvaluationResult",
    "ObjectIoU",
    "candidate_ious",
    "clean_polygons",
    "evaluate",
    "match_polygons",
    "read_layer",
]

LayerSource = str | os.PathLike[str] | gpd.GeoDataFrame

#: Slack on the cheap IoU upper bound, so rounding never discards a pair at the threshold.
_BOUND_SLACK = 1e-9

_POLYGON_TYPE_IDS = (3, 6)  # shapely type ids of Polygon and MultiPolygon


# --- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectIoU:
    """Per-object IoU of a prompted run: GT and prediction rows sharing a key value.

    Attributes:
        key: Name of the attribute joining predictions to GT.
        n_objects: GT objects (distinct non-null key values among the counted GT).
        n_missing: GT objects without any prediction carrying their key; their IoU is 0.
        n_extra: Distinct key values among predictions that match no counted GT object
            (ignored in the statistics).
        median: Median IoU over the ``n_objects`` objects (missing ones as 0).
        mean: Mean IoU over the same.
        share_ge_50: Fraction of objects with IoU >= 0.5.
        share_ge_75: Fraction of objects with IoU >= 0.75.

    Statistics of zero objects are ``0.0``.
    """

    key: str
    n_objects: int
    n_missing: int
    n_extra: int
    median: float
    mean: float
    share_ge_50: float
    share_ge_75: float


@dataclass(frozen=True)
class EvaluationResult:
    """Outcome of :func:`evaluate`; counts are numbers of polygons (rows).

    Attributes:
        precision: TP / (TP + FP), 0.0 without predictions.
        recall: TP / (TP + FN), 0.0 without GT.
        f1: Harmonic mean of precision and recall, 0.0 if both are 0.
        tp: Matched pairs.
        fp: Predictions left unmatched.
        fn: GT polygons left unmatched.
        n_pred: Predictions counted (``tp + fp``): usable and, with an AOI, inside it.
        n_gt: GT polygons counted (``tp + fn``).
        iou_threshold: Minimum IoU of a match.
        crs: The projected CRS the comparison ran in (e.g. ``"EPSG:32645"``).
        mean_matched_iou: Mean IoU of the matched pairs (0.0 without matches).
        n_pred_dropped: Prediction rows dropped as missing, empty or without area.
        n_gt_dropped: GT rows dropped for the same reasons.
        n_pred_outside_aoi: Usable predictions left out by the AOI rule.
        n_gt_outside_aoi: Usable GT polygons left out by the AOI rule.
        per_object: Per-object IoU statistics when ``key`` was given, else ``None``.
        matches: One row per TP: ``pred_index``, ``gt_index`` (0-based row positions in
            the input layers) and ``iou``. Not part of :meth:`to_dict`.
        object_ious: IoU per GT key value (missing objects 0.0) when ``key`` was given,
            else ``None``. Not part of :meth:`to_dict`.
    """

    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    n_pred: int
    n_gt: int
    iou_threshold: float
    crs: str
    mean_matched_iou: float
    n_pred_dropped: int = 0
    n_gt_dropped: int = 0
    n_pred_outside_aoi: int = 0
    n_gt_outside_aoi: int = 0
    per_object: ObjectIoU | None = None
    matches: pd.DataFrame | None = field(default=None, repr=False, compare=False)
    object_ious: pd.Series | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dict of the scores and counts (no per-row tables)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            if name in ("matches", "object_ious"):
                continue
            value = getattr(self, name)
            if isinstance(value, ObjectIoU):
                value = {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
            out[name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    """NumPy scalars as Python scalars (for JSON)."""
    return value.item() if isinstance(value, np.generic) else value


# --- entry point -----------------------------------------------------------------------


def evaluate(
    pred: LayerSource,
    gt: LayerSource,
    *,
    iou: float = 0.5,
    aoi: LayerSource | None = None,
    key: str | None = None,
    out_of_core: bool | None = None,
) -> EvaluationResult:
    """Match predicted polygons to GT one-to-one at ``IoU >= iou`` and score them.

    See the module docstring for every step and rule.

    Args:
        pred: Predicted polygons: a vector file path or a GeoDataFrame, any CRS.
        gt: Ground-truth polygons: a vector file path or a GeoDataFrame, any CRS.
        iou: Minimum intersection over union of a match, in ``(0, 1]``.
        aoi: Optional area of interest (path or GeoDataFrame of polygons, any CRS):
            only polygons whose representative point is inside it count.
        key: Optional attribute present in both layers (e.g. ``"osm_id"``); adds
            per-object IoU between the GT object and the union of the predictions
            sharing its key value. Values are compared as they are, or as text when one
            side's column is numeric and the other's is not. GT rows with a null key
            are left out of the per-object statistics. All usable predictions are used
            for the per-object IoU (the AOI filters GT objects only).
        out_of_core: Read GeoParquet layers partition by partition
            (:func:`evaluate_out_of_core`, same result); ``None``: when ``pred`` is a
            GeoParquet dataset folder, ``gt`` GeoParquet, and neither ``aoi`` nor ``key``
            is given.

    Returns:
        An :class:`EvaluationResult`.

    Raises:
        ConfigError: ``iou`` is not in ``(0, 1]`` or ``key`` is not a column of both.
        PromptError: a layer is missing, unreadable, or the GT has no features.
        CRSError: a layer has no CRS or cannot be reprojected.
    """
    threshold = _check_iou(iou)
    if out_of_core is None:
        out_of_core = aoi is None and key is None and _is_dataset(pred) and _is_dataset(gt, folder=False)
    if out_of_core:
        if aoi is not None or key is not None:
            raise ConfigError("out-of-core evaluation takes no AOI or key; evaluate in memory for those")
        return evaluate_out_of_core(pred, gt, iou=threshold)
    pred_frame, gt_frame = _read_inputs(pred, gt, key)
    crs = _common_crs(gt_frame)
    pred_layer = _Layer(*_prepare(pred_frame, crs, "prediction"))
    gt_layer = _Layer(*_prepare(gt_frame, crs, "ground-truth"))
    if aoi is not None:
        area = _aoi_union(aoi, crs)
        pred_layer.inside, gt_layer.inside = _inside(pred_layer.geoms, area), _inside(gt_layer.geoms, area)

    p_idx, g_idx, ious = match_polygons(pred_layer.counted, gt_layer.counted, iou=threshold)
    matches = pd.DataFrame(
        {"pred_index": pred_layer.counted_rows[p_idx], "gt_index": gt_layer.counted_rows[g_idx], "iou": ious}
    )
    object_ious = None
    if key is not None:
        object_ious = _object_ious(
            pred_frame[key].to_numpy()[pred_layer.rows],
            pred_layer.geoms,
            gt_frame[key].to_numpy()[gt_layer.counted_rows],
            gt_layer.counted,
        )
    return _result(threshold, crs, pred_layer, gt_layer, matches, key, object_ious)


@dataclass
class _Layer:
    """One layer's usable polygons (reprojected, cleaned) and which of them count.

    ``geoms``: the usable polygons; ``rows``: their 0-based row positions in the input
    layer; ``dropped``: input rows left out as unusable; ``inside``: boolean mask over
    ``geoms`` of the polygons inside the AOI, ``None`` without an AOI (all count).
    """

    geoms: np.ndarray
    rows: np.ndarray
    dropped: int
    inside: np.ndarray | None = None

    @property
    def counted(self) -> np.ndarray:
        """The polygons that count (inside the AOI, or all)."""
        return self.geoms if self.inside is None else self.geoms[self.inside]

    @property
    def counted_rows(self) -> np.ndarray:
        """Input row positions of :attr:`counted`."""
        return self.rows if self.inside is None else self.rows[self.inside]

    @property
    def outside(self) -> int:
        """Usable polygons left out by the AOI rule (0 without an AOI)."""
        return 0 if self.inside is None else int((~self.inside).sum())


def _read_inputs(
    pred: LayerSource, gt: LayerSource, key: str | None
) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """Both layers read; PromptError for an empty GT, ConfigError for a missing ``key``."""
    pred_frame = read_layer(pred, role="prediction")
    gt_frame = read_layer(gt, role="ground-truth")
    if len(gt_frame) == 0:
        raise PromptError(
            "the ground-truth layer has no features; nothing to evaluate against. "
            "Check that you passed the right file (and layer)."
        )
    if key is not None:
        _check_key(key, pred_frame, gt_frame)
    return pred_frame, gt_frame


def _result(
    threshold: float,
    crs: pyproj.CRS,
    pred: _Layer,
    gt: _Layer,
    matches: pd.DataFrame,
    key: str | None,
    object_ious: pd.Series | None,
) -> EvaluationResult:
    """Scores and counts of a finished matching (ratios with a zero denominator: 0.0)."""
    tp, n_pred, n_gt = len(matches), len(pred.counted), len(gt.counted)
    precision, recall = _ratio(tp, n_pred), _ratio(tp, n_gt)
    return EvaluationResult(
        precision=precision,
        recall=recall,
        f1=_ratio(2 * precision * recall, precision + recall),
        tp=tp,
        fp=n_pred - tp,
        fn=n_gt - tp,
        n_pred=n_pred,
        n_gt=n_gt,
        iou_threshold=threshold,
        crs=_crs_name(crs),
        mean_matched_iou=float(matches["iou"].to_numpy().mean()) if tp else 0.0,
        n_pred_dropped=pred.dropped,
        n_gt_dropped=gt.dropped,
        n_pred_outside_aoi=pred.outside,
        n_gt_outside_aoi=gt.outside,
        per_object=None if key is None or object_ious is None else _object_stats(key, object_ious),
        matches=matches,
        object_ious=object_ious,
    )


def _check_iou(iou: float) -> float:
    """``iou`` as a float in ``(0, 1]`` or ConfigError."""
    try:
        value = float(iou)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the IoU threshold must be a number in (0, 1], got {iou!r}") from exc
    if not 0.0 < value <= 1.0:
        raise ConfigError(
            f"the IoU threshold must be in (0, 1], got {value}; 0.5 is the usual choice"
        )
    return value


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, 0.0 when the denominator is 0."""
    return float(numerator) / float(denominator) if denominator else 0.0


# --- reading and preparing ---------------------------------------------------------------


def read_layer(source: LayerSource, *, role: str = "vector") -> gpd.GeoDataFrame:
    """Read a polygon layer from a path or copy a GeoDataFrame; row order is kept.

    Files are read by :func:`sam_geo.io.prompts.read_prompt_layer` (Shapefile, GeoJSON,
    GeoPackage, GeoParquet ...); unlike there, an empty layer is returned (zero rows)
    rather than refused. ``role`` names the layer in error messages.

    Raises:
        PromptError: the file does not exist or cannot be read.
        CRSError: the layer has no CRS.
    """
    if isinstance(source, gpd.GeoDataFrame):
        if source.crs is None:
            raise CRSError(
                f"the {role} GeoDataFrame has no CRS; set it with .set_crs(EPSG code) first"
            )
        return source.reset_index(drop=True)
    path = Path(source).expanduser()
    if not path.exists():
        raise PromptError(f"the {role} layer {path} does not exist; check the path")
    try:
        return read_prompt_layer(path)
    except CRSError as exc:
        raise CRSError(
            f"the {role} layer {path} has no CRS; set it, e.g. "
            f"`ogr2ogr -a_srs EPSG:XXXX fixed.gpkg {path}`"
        ) from exc
    except PromptError as exc:
        empty = _empty_layer(path)
        if empty is None:
            raise PromptError(f"cannot use the {role} layer {path}: {exc}") from exc
        return empty


def _empty_layer(path: Path) -> gpd.GeoDataFrame | None:
    """The layer at ``path`` if it reads fine with zero features, else ``None``."""
    try:
        if is_parquet(path):
            frame = gpd.read_parquet(path)
        else:
            frame = gpd.read_file(path, engine="pyogrio")
    except Exception:  # unreadable: let the caller report read_prompt_layer's error
        return None
    return frame if len(frame) == 0 else None


def _check_key(key: str, pred: gpd.GeoDataFrame, gt: gpd.GeoDataFrame) -> None:
    """ConfigError if ``key`` is not an attribute column of both layers."""
    for role, frame in (("prediction", pred), ("ground-truth", gt)):
        columns = [c for c in frame.columns if c != frame.geometry.name]
        if key not in columns:
            raise ConfigError(
                f"--key {key!r} is not a column of the {role} layer; its columns are "
                f"{', '.join(map(str, columns)) or '(none)'}"
            )


def _common_crs(gt: gpd.GeoDataFrame) -> pyproj.CRS:
    """The GT's CRS if projected, else the UTM zone of the GT (from its extent)."""
    crs = pyproj.CRS.from_user_input(gt.crs)
    if crs.is_projected:
        return crs
    usable = gt[~(gt.geometry.isna() | gt.geometry.is_empty)]
    try:
        utm = usable.estimate_utm_crs() if len(usable) else None
    except (RuntimeError, ValueError, pyproj.exceptions.CRSError) as exc:
        raise CRSError(
            f"cannot find a UTM zone for the ground truth in {crs.name!r}: {exc}. "
            "Reproject the ground truth to a projected CRS first."
        ) from exc
    if utm is None:
        raise CRSError(
            "the ground truth has no usable geometry to choose a projected CRS from; "
            "check the file"
        )
    return utm


def _crs_name(crs: pyproj.CRS) -> str:
    """``"EPSG:XXXX"`` when the CRS has an EPSG code, else its name."""
    code = crs.to_epsg()
    return f"EPSG:{code}" if code else crs.name


def _to_crs(frame: gpd.GeoDataFrame, crs: pyproj.CRS, role: str) -> np.ndarray:
    """Geometries of ``frame`` reprojected to ``crs`` as an object array."""
    try:
        series = frame.geometry.to_crs(crs)
    except Exception as exc:  # pyproj raises several types for impossible transforms
        raise CRSError(
            f"cannot reproject the {role} layer from {frame.crs.name!r} to "
            f"{_crs_name(crs)!r}: {exc}; check the layer's CRS"
        ) from exc
    geoms = np.asarray(series.values, dtype=object)
    if len(geoms):
        coords = shapely.get_coordinates(geoms)
        if not np.isfinite(coords).all():
            raise CRSError(
                f"reprojecting the {role} layer to {_crs_name(crs)!r} gave non-finite "
                "coordinates; its CRS is probably wrong (or it lies far from the ground "
                "truth)"
            )
    return geoms


def _prepare(
    frame: gpd.GeoDataFrame, crs: pyproj.CRS, role: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Reprojected, cleaned polygons, their row positions, and the number dropped."""
    geoms = clean_polygons(_to_crs(frame, crs, role))
    usable = ~shapely.is_missing(geoms)
    usable[usable] = shapely.area(geoms[usable]) > 0
    rows = np.flatnonzero(usable)
    return geoms[rows], rows, int(len(geoms) - len(rows))


def clean_polygons(geoms: np.ndarray) -> np.ndarray:
    """2-D valid (Multi)Polygons; ``None`` where nothing polygonal is left.

    Invalid geometries are repaired with ``make_valid(method="structure",
    keep_collapsed=False)``; collections keep their polygonal parts (unioned); points,
    lines and empty geometries become ``None``. Returns a new object array.
    """
    out = shapely.force_2d(np.asarray(geoms, dtype=object))
    present = ~shapely.is_missing(out)
    invalid = present & ~shapely.is_valid(out)
    if invalid.any():
        out[invalid] = shapely.make_valid(out[invalid], method="structure", keep_collapsed=False)
    types = shapely.get_type_id(out)
    for i in np.flatnonzero(present & ~np.isin(types, _POLYGON_TYPE_IDS)):
        out[i] = _polygonal_part(out[i])
    present = ~shapely.is_missing(out)
    out[present & shapely.is_empty(out)] = None
    return out


def _polygonal_part(geom: shapely.Geometry) -> shapely.Geometry | None:
    """Union of the polygonal parts of a collection; ``None`` for points and lines."""
    parts = [
        p for p in shapely.get_parts(geom) if shapely.get_type_id(p) in _POLYGON_TYPE_IDS
    ]
    if not parts:
        return None
    merged = shapely.make_valid(shapely.union_all(parts), method="structure", keep_collapsed=False)
    return None if merged.is_empty else merged


def _aoi_union(aoi: LayerSource, crs: pyproj.CRS) -> shapely.Geometry:
    """Union of the AOI polygons in ``crs``, prepared; PromptError if it has no area."""
    frame = read_layer(aoi, role="AOI")
    geoms = clean_polygons(_to_crs(frame, crs, "AOI"))
    geoms = geoms[~shapely.is_missing(geoms)]
    area = shapely.union_all(geoms) if len(geoms) else None
    if area is None or area.is_empty or area.area <= 0:
        raise PromptError(
            "the AOI layer has no polygon with an area; give polygons that outline the "
            "area to evaluate"
        )
    shapely.prepare(area)
    return area


def _inside(geoms: np.ndarray, area: shapely.Geometry) -> np.ndarray:
    """Boolean mask: representative point of each polygon inside (or on) ``area``."""
    if len(geoms) == 0:
        return np.zeros(0, dtype=bool)
    return shapely.intersects(area, shapely.point_on_surface(geoms))


# --- matching ---------------------------------------------------------------------------


def match_polygons(
    pred: np.ndarray, gt: np.ndarray, *, iou: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one greedy matching of two polygon arrays at ``IoU >= iou``.

    Args:
        pred: 1-D object array of valid, non-empty polygons (planar CRS).
        gt: Same, in the same CRS.
        iou: Threshold in ``(0, 1]``.

    Returns:
        ``(pred_index, gt_index, iou)``: positions in ``pred`` and ``gt`` of the matched
        pairs and their IoU, in acceptance order (IoU descending).
    """
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if len(pred) == 0 or len(gt) == 0:
        return empty
    pi, gi, ious = candidate_ious(pred, gt, iou=iou)
    keep = ious >= iou
    return greedy_one_to_one(pi[keep], gi[keep], ious[keep])


def greedy_one_to_one(pi: np.ndarray, gi: np.ndarray, ious: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of candidate pairs ``(pi[k], gi[k])`` of IoU
    ``ious[k]``: by IoU descending (ties: lower prediction, then lower GT id first), a
    pair accepted when neither side is taken. Ids may be any integers (row numbers)."""
    order = np.lexsort((gi, pi, -ious))
    pred_taken: set[int] = set()
    gt_taken: set[int] = set()
    accepted: list[int] = []
    for k in order.tolist():
        p, g = int(pi[k]), int(gi[k])
        if p not in pred_taken and g not in gt_taken:
            pred_taken.add(p)
            gt_taken.add(g)
            accepted.append(k)
    chosen = np.asarray(accepted, dtype=np.int64)
    return (np.asarray(pi, np.int64)[chosen], np.asarray(gi, np.int64)[chosen],
            np.asarray(ious, np.float64)[chosen])


def candidate_ious(
    pred: np.ndarray, gt: np.ndarray, *, iou: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of the intersecting (pred, gt) pairs that may reach ``iou``.

    Pairs come from an STRtree over ``gt`` queried with ``predicate="intersects"``.
    Pairs whose IoU provably stays below ``iou`` are dropped before any intersection is
    computed: ``IoU <= I / (a + b - I)`` with ``I = min(a, b, bbox overlap area)``.
    ``iou=0`` keeps every intersecting pair.

    Returns:
        ``(pred_index, gt_index, iou)`` arrays, one entry per kept pair.
    """
    tree = shapely.STRtree(gt)
    gi, pi = tree.query(pred, predicate="intersects")[::-1]
    pi, gi = pi.astype(np.int64), gi.astype(np.int64)
    area_p, area_g = shapely.area(pred), shapely.area(gt)
    a, b = area_p[pi], area_g[gi]
    if iou > 0 and len(pi):
        bp, bg = shapely.bounds(pred)[pi], shapely.bounds(gt)[gi]
        overlap_w = np.minimum(bp[:, 2], bg[:, 2]) - np.maximum(bp[:, 0], bg[:, 0])
        overlap_h = np.minimum(bp[:, 3], bg[:, 3]) - np.maximum(bp[:, 1], bg[:, 1])
        inter_max = np.minimum(np.minimum(a, b), np.clip(overlap_w, 0, None) * np.clip(overlap_h, 0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = inter_max / (a + b - inter_max)
        possible = bound >= iou - _BOUND_SLACK
        pi, gi, a, b = pi[possible], gi[possible], a[possible], b[possible]
    inter = shapely.area(shapely.intersection(pred[pi], gt[gi]))
    union = a + b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        ious = np.where(union > 0, inter / union, 0.0)
    return pi, gi, np.clip(ious, 0.0, 1.0)


# --- per-object IoU ---------------------------------------------------------------------


def _object_ious(
    pred_keys: np.ndarray, pred_geoms: np.ndarray, gt_keys: np.ndarray, gt_geoms: np.ndarray
) -> pd.Series:
    """IoU per GT key value between the unions of GT and prediction rows sharing it."""
    pred_keys, gt_keys = _comparable(pred_keys, gt_keys)
    gt_by_key = _union_by_key(gt_keys, gt_geoms)
    pred_all = _union_by_key(pred_keys, pred_geoms)
    extra = int((~pred_all.index.isin(gt_by_key.index)).sum())
    pred_by_key = pred_all.reindex(gt_by_key.index)
    ious = pd.Series(0.0, index=gt_by_key.index, name="iou")
    found = pred_by_key.notna().to_numpy()
    if found.any():
        g = gt_by_key.to_numpy()[found]
        p = pred_by_key.to_numpy()[found]
        inter = shapely.area(shapely.intersection(g, p))
        union = shapely.area(g) + shapely.area(p) - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            ious.iloc[np.flatnonzero(found)] = np.clip(
                np.where(union > 0, inter / union, 0.0), 0.0, 1.0
            )
    ious.attrs.update(found=int(found.sum()), extra=extra)
    return ious


def _comparable(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Key arrays as they are, or both as text when only one side is numeric."""
    numeric_a = pd.api.types.is_numeric_dtype(pd.Series(a).dropna().infer_objects())
    numeric_b = pd.api.types.is_numeric_dtype(pd.Series(b).dropna().infer_objects())
    if numeric_a == numeric_b:
        return a, b
    return _as_text(a), _as_text(b)


def _as_text(values: np.ndarray) -> np.ndarray:
    """Values as strings (integral floats without ``.0``); nulls stay ``None``."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out[i] = None
        elif isinstance(v, (float, np.floating)) and float(v).is_integer():
            out[i] = str(int(v))
        else:
            out[i] = str(v)
    return out


def _union_by_key(keys: np.ndarray, geoms: np.ndarray) -> pd.Series:
    """One geometry per non-null key: the row's own, or the union of its rows."""
    frame = pd.DataFrame({"key": keys, "geom": geoms}).dropna(subset=["key"])
    repeated = frame["key"].duplicated(keep=False).to_numpy()
    single = frame.loc[~repeated].set_index("key")["geom"]
    if not repeated.any():
        return single
    merged = {
        k: shapely.make_valid(shapely.union_all(list(group)))
        for k, group in frame.loc[repeated].groupby("key", sort=False)["geom"]
    }
    return pd.concat([single, pd.Series(merged, dtype=object)])


def _object_stats(key: str, ious: pd.Series) -> ObjectIoU:
    """Summary of per-object IoUs (missing objects count as 0)."""
    values = ious.to_numpy(dtype=np.float64)
    n = len(values)
    return ObjectIoU(
        key=key,
        n_objects=n,
        n_missing=n - int(ious.attrs["found"]),
        n_extra=int(ious.attrs["extra"]),
        median=float(np.median(values)) if n else 0.0,
        mean=float(values.mean()) if n else 0.0,
        share_ge_50=float((values >= 0.5).mean()) if n else 0.0,
        share_ge_75=float((values >= 0.75).mean()) if n else 0.0,
    )


# --- out of core: GeoParquet datasets with dask ------------------------------------------


def evaluate_out_of_core(pred: str | os.PathLike[str], gt: str | os.PathLike[str], *, iou: float = 0.5) -> EvaluationResult:
    """:func:`evaluate` (no AOI, no key) for GeoParquet layers bigger than memory.

    ``pred`` and ``gt`` are GeoParquet files or dataset folders (a partitioned sam-geo
    output). The prediction is read partition by partition with dask-geopandas (dask's
    local threaded scheduler). For each partition, only the ground truth near its bounds is
    read (:func:`sam_geo.io.layers.read_layer_near`: covering-column statistics) and
    the candidate pairs of :func:`candidate_ious` are kept. Each prediction lies in one
    partition, so the pairs are those of the whole layers. The greedy one-to-one
    matching then runs over the pairs alone. Memory: one partition and its ground truth,
    plus the pairs. The result equals :func:`evaluate` on the same layers: same counts,
    matches and row numbers.

    Raises what :func:`evaluate` raises, and :class:`PromptError` for a layer that is
    not GeoParquet.
    """
    import dask
    import dask_geopandas

    threshold = _check_iou(iou)
    gt_path, pred_path = Path(gt).expanduser(), Path(pred).expanduser()
    for role, path in (("prediction", pred_path), ("ground-truth", gt_path)):
        if not (path.exists() and is_parquet(path)):
            raise PromptError(f"the {role} layer {path} is not a GeoParquet file or folder; out-of-core evaluation "
                              "reads GeoParquet only (evaluate it in memory, or convert it)")
    crs, n_gt, gt_dropped = _ground_truth_counts(gt_path)
    parts = dask_geopandas.read_parquet(pred_path, split_row_groups=True)
    lengths = parts.map_partitions(len).compute(scheduler="threads")
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    tasks = [dask.delayed(_partition_pairs)(parts.get_partition(k), int(offsets[k]), gt_path, crs, threshold)
             for k in range(parts.npartitions)]
    done = dask.compute(*tasks, scheduler="threads")
    pairs = pd.concat([d[0] for d in done], ignore_index=True) if done else _no_pairs()
    n_pred = sum(d[1] for d in done)
    p_idx, g_idx, ious = greedy_one_to_one(pairs["pred"].to_numpy(), pairs["gt"].to_numpy(), pairs["iou"].to_numpy())
    matches = pd.DataFrame({"pred_index": p_idx, "gt_index": g_idx, "iou": ious})
    pred_layer = _Layer(np.empty(n_pred, dtype=object), np.arange(n_pred), int(sum(lengths)) - n_pred)
    gt_layer = _Layer(np.empty(n_gt, dtype=object), np.arange(n_gt), gt_dropped)
    return _result(threshold, crs, pred_layer, gt_layer, matches, None, None)


def _is_dataset(source: LayerSource, *, folder: bool = True) -> bool:
    """A GeoParquet dataset folder (``folder``), or any GeoParquet file or folder."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source).expanduser()
    return path.is_dir() if folder else path.exists() and is_parquet(path)


def _no_pairs() -> pd.DataFrame:
    return pd.DataFrame({"pred": np.zeros(0, np.int64), "gt": np.zeros(0, np.int64), "iou": np.zeros(0)})


def _ground_truth_counts(path: Path) -> tuple[pyproj.CRS, int, int]:
    """The comparison CRS (from a sample of the ground truth when it is geographic),
    the usable ground-truth polygons and those dropped, one partition at a time."""
    import dask
    import dask_geopandas

    parts = dask_geopandas.read_parquet(path, split_row_groups=True)
    first = parts.get_partition(0).compute()
    if parts.crs is None:
        raise CRSError(f"the ground-truth layer {path} has no CRS; set it when writing the file")
    crs = _common_crs(first.set_crs(parts.crs, allow_override=True) if len(first) else first)

    def usable(frame: gpd.GeoDataFrame) -> tuple[int, int]:
        _, rows, dropped = _prepare(frame, crs, "ground-truth")
        return len(rows), dropped

    counts = dask.compute(*[dask.delayed(usable)(parts.get_partition(k)) for k in range(parts.npartitions)],
                          scheduler="threads")
    n_gt = sum(c[0] for c in counts)
    if n_gt + sum(c[1] for c in counts) == 0:
        raise PromptError("the ground-truth layer has no features; nothing to evaluate against")
    return crs, n_gt, sum(c[1] for c in counts)


def _partition_pairs(
    frame: gpd.GeoDataFrame, offset: int, gt_path: Path, crs: pyproj.CRS, threshold: float
) -> tuple[pd.DataFrame, int]:
    """Candidate pairs at ``IoU >= threshold`` of one prediction partition (rows numbered
    from ``offset``) against the ground truth near it; and its usable predictions."""
    geoms, rows, _ = _prepare(frame, crs, "prediction")
    if len(geoms) == 0:
        return _no_pairs(), 0
    near = [Area(shapely.box(*shapely.total_bounds(geoms)), crs)]
    gt_frame, _ = read_layer_near(gt_path, near)
    gt_geoms, gt_rows, _ = _prepare(gt_frame, crs, "ground-truth")
    pi, gi, ious = candidate_ious(geoms, gt_geoms, iou=threshold)
    keep = ious >= threshold
    gt_ids = gt_frame.index.to_numpy()[gt_rows]
    return pd.DataFrame({"pred": offset + rows[pi[keep]], "gt": gt_ids[gi[keep]], "iou": ious[keep]}), len(geoms)
