"""Automatic segmentation of a whole scene: every object, one polygon each.

>>> import sam_geo
>>> gdf = sam_geo.segment_auto("scene.tif", output="objects.gpkg", max_area_m2=50_000)

Each tile of a :class:`~sam_geo.geo.tiles.TileGrid` is encoded once and prompted with a
regular grid of points (SAM's automatic mask generation, per tile); the masks that pass
SAM's quality filters come back from the model actors as polygons
(:class:`~sam_geo.geo.stitch.Piece`), and :func:`sam_geo.geo.stitch.stitch` joins the pieces
that overlapping tiles saw of one object into one polygon. No whole-scene array is made.

Per tile (:meth:`AutoTileTask.execute`, in the model actor):

1. read the window; a window without valid pixels is reported as ``skipped_nodata``;
2. ``points_per_side ** 2`` points (segment-anything's ``build_point_grid``) over the
   tile array; points on nodata are dropped;
3. encode once; decode the points in batches against the one embedding, three masks
   per point (SAM's multimask output: sub-part, part, whole);
4. keep masks with predicted IoU ``> pred_iou_thresh`` and stability score ``>=
   stability_score_thresh`` (computed on SAM's 256 x 256 logits, which is 16 times
   cheaper than on the upsampled masks and ranks masks the same way);
5. upsample each kept mask only over its box, AND it with the valid mask, vectorize it
   on the tile's affine, keep the connected part under its prompt point (else the
   largest), and note which read-window sides facing another tile it reaches;
6. non-maximum suppression on the polygons' boxes (torchvision ``batched_nms``, IoU
   ``box_nms_thresh``, highest predicted IoU first), as ``SamAutomaticMaskGenerator``
   does on its masks' boxes.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import rasterio.features
import rasterio.windows
import shapely
import torch
import torch.nn.functional as F
from affine import Affine
from rasterio.errors import RasterioError
from rasterio.windows import Window

from sam_geo import __version__
from sam_geo.api import (
    SegmentSettings,
    _check_summary_path,
    _regularize,
    expand_scenes,
    _merge_settings,
    _metres_in_crs_units,
    _min_area_in_crs_units,
    run_with_work_dir,
)
from sam_geo.engine import (
    EngineConfig,
    SamBackend,
    TileSegmenter,
    precision_name,
    resolve_device,
    task_key,
    timed,
)
from sam_geo.errors import ConfigError, OutputError, OutputExistsError, RunError, WriteError
from sam_geo.model.registry import get_spec, resolve_weights
from sam_geo.io.scenes import SceneInfo, Stretch, compute_stretch, open_scene
from sam_geo.run.runtime import RuntimeOptions
from sam_geo.geo.stitch import DEFAULT_MATCH_IOU, Piece, StitchedObjects, greedy_suppression, piece_from_geometry, stitch
from sam_geo.run.summary import RunSummary, write_json_atomic
from sam_geo.geo.tiles import Tile, TileGrid, validate_tiling
from sam_geo.geo.vectorize import geometry_area_m2, mask_to_geometry
from sam_geo.run.workdir import WorkDir, fingerprint_file
from sam_geo.io.labels import check_labels_path, write_labels_raster
from sam_geo.io.writers import check_output_path, write_vector

__all__ = ["AUTO_COLUMNS", "AutoParams", "AutoTileResult", "AutoTileTask", "segment_auto", "write_labels_raster"]

AUTO_COLUMNS = ("object_id", "score", "stability", "area_m2", "n_tiles")
"""Columns of an automatic-segmentation output, besides the geometry."""

GPU_POINTS_PER_BATCH = 64
CPU_POINTS_PER_BATCH = 4
"""Points per mask-decoder call. On CPU the decoder is memory-bound and small batches
are fastest per point: MobileSAM on 2 cores, three masks per point, 112 ms per point at
1-4 points per call and 138 ms at 64 in fp32, 50 ms at 1-4 and 92 ms at 16 in bf16
(``benchmarks/decoder_batch.py --points``). Small batches also let
:attr:`AutoParams.skip_covered` see the masks of one batch before choosing the next."""


MIN_OVERLAP_PX = 16
"""Smallest tile overlap (model pixels) automatic mode accepts: pieces of an object are
matched inside the band two tiles share, which must have some width."""

LOGIT_CROP_MARGIN = 2
"""Low-resolution logit cells kept around each candidate mask's box until it is vectorized."""




# --- parameters ------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoParams:
    """Parameters of automatic segmentation (units in the names; areas in m^2).

    ``points_per_side``: the prompt grid is ``points_per_side ** 2`` points *per tile*,
    so the spacing is ``tile_size / points_per_side`` model pixels (32 on 1024 px tiles:
    one point every 32 px); an object needs about one spacing across to be hit.
    ``pred_iou_thresh``, ``stability_score_thresh``, ``stability_score_offset``,
    ``box_nms_thresh``: SAM's automatic-mask-generator filters (defaults are SAM's).
    ``min_area_m2`` / ``max_area_m2``: stitched objects outside this range are dropped
    (None: no upper bound). ``points_per_batch``: points per decoder call (None: 64 on
    GPU, 4 on CPU). ``match_iou``: IoU, inside the zone two tiles share, at which their
    pieces are one object (see :mod:`sam_geo.geo.stitch`). ``max_tile_fraction``: masks
    covering more than this share of a tile are dropped as background (None keeps
    them; objects larger than a tile need None or a value near 1). ``nested_thresh``:
    nested-mask suppression on the stitched objects in the area range: greedy, by
    descending predicted IoU, a kept object drops every object nested with it (at least
    this share of the smaller one's area inside the other; see
    :func:`sam_geo.geo.stitch.greedy_suppression`). None: off, SAM's behaviour; 0.8 in
    ``configs/buildings.yaml``, where SAM's part and whole masks of one roof would
    otherwise both come out. ``skip_covered``: grid points are decoded coarse to fine
    (:func:`coarse_to_fine_order`) and a point on a cell already covered by a kept mask
    of at most ``cover_max_fraction`` of the tile is not decoded (SAM prompted inside
    an object it has segmented gives that object again); about half the decoder work
    on Banepa buildings.
    """

    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_area_m2: float = 0.0
    max_area_m2: float | None = None
    points_per_batch: int | None = None
    match_iou: float = DEFAULT_MATCH_IOU
    max_tile_fraction: float | None = None
    nested_thresh: float | None = None
    skip_covered: bool = True
    cover_max_fraction: float = 0.1

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first value out of range."""
        if not isinstance(self.points_per_side, int) or not 1 <= self.points_per_side <= 256:
            raise ConfigError(f"points per side must be an integer from 1 to 256, got {self.points_per_side!r}")
        for name in ("pred_iou_thresh", "stability_score_thresh"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name.replace('_', ' ')} must be in [0, 1), got {value}")
        for name in ("box_nms_thresh", "match_iou"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{name.replace('_', ' ')} must be in (0, 1], got {value}")
        if not 0.0 < self.stability_score_offset <= 16.0:
            raise ConfigError(f"stability score offset must be in (0, 16] logits, got {self.stability_score_offset}")
        if not math.isfinite(self.min_area_m2) or self.min_area_m2 < 0:
            raise ConfigError(f"min area must be a finite number of square metres >= 0, got {self.min_area_m2}")
        if self.max_area_m2 is not None and not self.max_area_m2 > self.min_area_m2:
            raise ConfigError(
                f"max area ({self.max_area_m2} m^2) must be larger than min area ({self.min_area_m2} m^2)"
            )
        if self.points_per_batch is not None and not 1 <= self.points_per_batch <= 1024:
            raise ConfigError(f"points per batch must be from 1 to 1024, got {self.points_per_batch}")
        if self.max_tile_fraction is not None and not 0.0 < self.max_tile_fraction <= 1.0:
            raise ConfigError(f"max tile fraction must be in (0, 1], got {self.max_tile_fraction}")
        if not 0.0 < self.cover_max_fraction <= 1.0:
            raise ConfigError(f"cover max fraction must be in (0, 1], got {self.cover_max_fraction}")
        if self.nested_thresh is not None and not 0.0 < self.nested_thresh <= 1.0:
            raise ConfigError(f"nested thresh must be in (0, 1], got {self.nested_thresh}")


# --- tile task and result --------------------------------------------------------------


@dataclass
class AutoTileResult:
    """What a worker sends back for one tile of automatic segmentation (no pixels).

    ``objects``: the tile's masks as :class:`~sam_geo.geo.stitch.Piece` (WKB polygon in the
    scene CRS, predicted IoU, stability, box in scene pixels, read-window sides facing
    another tile that the mask reaches); ``points``: grid points decoded (on valid
    pixels); ``seconds``: read, encode, decode, vectorize.
    """

    tile_key: str
    objects: list[Piece] = field(default_factory=list)
    points: int = 0
    points_skipped: int = 0
    skipped_nodata: bool = False
    encoded: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 0


@dataclass(frozen=True)
class AutoTileTask:
    """One tile to segment automatically: descriptors only, no pixels (picklable)."""

    scene: SceneInfo
    stretch: Stretch
    tile: Tile
    params: AutoParams

    @property
    def key(self) -> str:
        return task_key(self.scene, self.tile)

    def execute(self, segmenter: TileSegmenter) -> AutoTileResult:
        return run_auto_tile(self, segmenter)


@dataclass
class _Candidate:
    """A mask that passed the filters, kept as a crop of its low-resolution logits."""

    logits: torch.Tensor  # (h, w) float16, cells of SAM's 256 x 256 output
    origin: tuple[int, int]  # (row, col) of the crop's first cell
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) cells, inclusive
    score: float
    stability: float
    point: tuple[float, float]  # prompt (x = col, y = row), tile-array pixels


@dataclass(frozen=True)
class _Frame:
    """How tile-array pixels map onto SAM's low-resolution logit cells."""

    tile_hw: tuple[int, int]
    input_hw: tuple[int, int]  # the tile resized for the encoder (longer side 1024)

    @property
    def logit_hw(self) -> tuple[int, int]:
        """Cells of the 256 x 256 logits that cover the image (the rest is padding)."""
        return math.ceil(self.input_hw[0] / 4), math.ceil(self.input_hw[1] / 4)


def run_auto_tile(task: AutoTileTask, segmenter: TileSegmenter) -> AutoTileResult:
    """Segment one tile automatically (see the module docs); polygons in the scene CRS."""
    result = AutoTileResult(tile_key=task.key)
    seconds = result.seconds
    backend = segmenter.backend
    if not isinstance(backend, SamBackend):
        raise ConfigError(
            f"automatic segmentation needs a SAM or MobileSAM model; {segmenter.config.model!r} is not one"
        )
    with timed(seconds, "read"):
        window = segmenter.read(task.scene, task.stretch, task.tile)
    if not window.valid.any():
        result.skipped_nodata = True
        return result
    points = grid_points(window.valid, task.params.points_per_side)
    if task.params.skip_covered:
        points = points[coarse_to_fine_order(window.valid.shape, points, task.params.points_per_side)]
    if len(points) == 0:
        return result
    embedding, input_hw = segmenter.encode(window.rgb, seconds)
    result.encoded = True
    frame = _Frame(window.valid.shape, input_hw)
    batch = task.params.points_per_batch or (
        GPU_POINTS_PER_BATCH if segmenter.device.type == "cuda" else CPU_POINTS_PER_BATCH
    )
    candidates: list[_Candidate] = []
    coverage = _Coverage(frame, task.params) if task.params.skip_covered else None
    decoded = 0
    for part in _point_batches(points, batch, coverage):
        with segmenter.model_call(), timed(seconds, "decode"):
            logits, iou = _decode_points(backend, embedding, part * (input_hw[0] / frame.tile_hw[0]))
            found = _filter_masks(logits, iou, part, frame, task.params)
        if coverage is not None:
            coverage.add(found)
        candidates += found
        decoded += len(part)
    result.points = decoded
    result.points_skipped = len(points) - decoded
    with timed(seconds, "vectorize"):
        pieces = _vectorize(candidates, window.valid, frame, task, segmenter.config)
        result.objects = _box_nms(pieces, task.params.box_nms_thresh)
    return result


def grid_points(valid: np.ndarray, points_per_side: int) -> np.ndarray:
    """(n, 2) prompt points (x = col, y = row) in tile-array pixels, on valid pixels.

    segment-anything's ``build_point_grid``: cell centres of an ``n x n`` grid over the
    array, so the spacing is ``cols / n`` by ``rows / n`` pixels. Points falling on
    nodata are dropped (SAM would segment the nodata fill).
    """
    from segment_anything.utils.amg import build_point_grid

    rows, cols = valid.shape
    points = build_point_grid(points_per_side) * np.array([cols, rows], dtype=np.float64)
    r = np.clip(points[:, 1].astype(np.int64), 0, rows - 1)
    c = np.clip(points[:, 0].astype(np.int64), 0, cols - 1)
    return points[valid[r, c]]


def coarse_to_fine_order(hw: tuple[int, int], points: np.ndarray, points_per_side: int) -> np.ndarray:
    """Indices that sort grid ``points`` coarse to fine (stable: raster order within a level).

    The grid index ``i`` (column) and ``j`` (row) of a point of the ``n x n`` grid each
    get a level, the number of times two divides their distance from the middle index
    ``n // 2`` (see :func:`_grid_level`); a point's level is the smaller of the two. The
    middle point comes first, then the grids of stride ``n/4``, ``n/8``... that refine
    it (each holds the coarser ones), so early batches spread over the whole tile and
    later ones fill in between. ``hw``: (rows, cols) of the tile array, in whose pixels
    ``points`` are (x, y).
    """
    rows, cols = hw
    i = np.clip(np.floor(points[:, 0] / cols * points_per_side), 0, points_per_side - 1).astype(np.int64)
    j = np.clip(np.floor(points[:, 1] / rows * points_per_side), 0, points_per_side - 1).astype(np.int64)
    level = np.minimum(_grid_level(i, points_per_side), _grid_level(j, points_per_side))
    return np.argsort(-level, kind="stable")


def _grid_level(index: np.ndarray, n: int) -> np.ndarray:
    """Per grid index along one axis: how often 2 divides ``|index - n // 2|`` (the
    middle index itself gets the highest level, 64)."""
    distance = np.abs(index - n // 2)
    lowest_bit = distance & -distance
    level = np.where(distance == 0, 64, 0)
    nonzero = distance > 0
    level[nonzero] = np.log2(lowest_bit[nonzero]).astype(np.int64)
    return level


class _Coverage:
    """Low-resolution cells of a tile already covered by a kept mask.

    A grid point on a covered cell is not decoded (``AutoParams.skip_covered``): SAM
    prompted inside an object it has already segmented with confidence gives that
    object again, which box NMS would then drop. Only masks up to
    ``cover_max_fraction`` of the tile count, so a large background mask (a field, a
    road network) does not hide the objects inside it.
    """

    def __init__(self, frame: _Frame, params: AutoParams) -> None:
        self.frame = frame
        self.cells = torch.zeros(frame.logit_hw, dtype=torch.bool)
        self.max_cells = params.cover_max_fraction * frame.logit_hw[0] * frame.logit_hw[1]
        self.per_px = _cells_per_px(frame)

    def add(self, candidates: list[_Candidate]) -> None:
        """Cover the cells of each prompt point's best kept mask (the highest predicted
        IoU of those that passed the filters), unless it spans more than
        ``cover_max_fraction`` of the tile. A point's other masks (its sub-part or the
        larger whole) cover nothing: a point inside them may still find another object."""
        best: dict[tuple[float, float], _Candidate] = {}
        for cand in candidates:
            if cand.point not in best or cand.score > best[cand.point].score:
                best[cand.point] = cand
        for cand in best.values():
            inside = cand.logits > 0
            if int(inside.sum()) > self.max_cells:
                continue
            r0, c0 = cand.origin
            h, w = inside.shape
            self.cells[r0 : r0 + h, c0 : c0 + w] |= inside

    def covers(self, points: np.ndarray) -> np.ndarray:
        """(n,) bool: the points (x, y tile pixels) whose cell is covered."""
        h, w = self.frame.logit_hw
        r = np.clip((points[:, 1] * self.per_px).astype(np.int64), 0, h - 1)
        c = np.clip((points[:, 0] * self.per_px).astype(np.int64), 0, w - 1)
        return self.cells.numpy()[r, c]


def _point_batches(points: np.ndarray, batch: int, coverage: _Coverage | None) -> Iterator[np.ndarray]:
    """Batches of up to ``batch`` points in order; with ``coverage``, points whose cell
    was covered by the masks of earlier batches are left out (checked batch by batch)."""
    start = 0
    while start < len(points):
        if coverage is None:
            part = points[start : start + batch]
            start += batch
        else:
            rest = points[start:]
            free = np.flatnonzero(~coverage.covers(rest))
            if len(free) == 0:
                return
            take = free[:batch]
            part = rest[take]
            start += int(take[-1]) + 1
        yield part


@torch.inference_mode()
def _decode_points(
    backend: SamBackend, embedding: torch.Tensor, points: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Three masks per point: low-res logits (n, 3, 256, 256) and predicted IoU (n, 3).

    ``points`` are (x, y) in the model's input frame (tile pixels times the resize ratio).
    """
    coords = torch.as_tensor(points, dtype=torch.float32, device=backend.device)[:, None, :]
    labels = torch.ones((len(points), 1), dtype=torch.int64, device=backend.device)
    sparse, dense = backend.model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    low_res, iou = backend.run_mask_decoder(embedding, sparse, dense, multimask=True)
    return low_res, iou


def _filter_masks(
    logits: torch.Tensor, iou: torch.Tensor, points: np.ndarray, frame: _Frame, params: AutoParams
) -> list[_Candidate]:
    """SAM's quality filters on one batch; survivors keep a crop of their logits (on CPU).

    Predicted IoU ``> pred_iou_thresh``, stability ``>= stability_score_thresh`` (on
    the 256 x 256 logits), not empty, and at most ``max_tile_fraction`` of the tile.
    """
    from segment_anything.utils.amg import batched_mask_to_box, calculate_stability_score

    lr_h, lr_w = frame.logit_hw
    masks = logits[:, :, :lr_h, :lr_w].flatten(0, 1)
    scores = iou.flatten().float()
    owner = torch.arange(len(points), device=logits.device).repeat_interleave(logits.shape[1])
    keep = scores > params.pred_iou_thresh
    masks, scores, owner = masks[keep], scores[keep], owner[keep]
    stability = calculate_stability_score(masks, 0.0, params.stability_score_offset)
    area = (masks > 0.0).flatten(1).sum(dim=1)
    keep = (stability >= params.stability_score_thresh) & (area > 0)
    if params.max_tile_fraction is not None:
        keep &= area <= params.max_tile_fraction * lr_h * lr_w
    if not bool(keep.any()):
        return []
    masks = masks[keep].to(device="cpu", dtype=torch.float16)
    boxes = batched_mask_to_box(masks > 0.0).tolist()
    scores, stability, owners = scores[keep].tolist(), stability[keep].tolist(), owner[keep].tolist()
    out: list[_Candidate] = []
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        r0, c0 = max(0, y0 - LOGIT_CROP_MARGIN), max(0, x0 - LOGIT_CROP_MARGIN)
        r1, c1 = min(lr_h, y1 + 1 + LOGIT_CROP_MARGIN), min(lr_w, x1 + 1 + LOGIT_CROP_MARGIN)
        x, y = points[owners[k]]
        crop = masks[k, r0:r1, c0:c1].clone()
        out.append(_Candidate(crop, (r0, c0), (x0, y0, x1, y1), scores[k], stability[k], (float(x), float(y))))
    return out


def _box_nms(pieces: list[Piece], threshold: float) -> list[Piece]:
    """Non-maximum suppression on the pieces' boxes, highest predicted IoU first.

    Run on the final polygons (after the part under the prompt point was chosen), so
    two masks that differ only by a stray blob elsewhere are recognised as one.
    """
    if len(pieces) < 2:
        return pieces
    from torchvision.ops.boxes import batched_nms

    rows = torch.tensor([p.bbox for p in pieces], dtype=torch.float64)
    boxes = rows[:, [1, 0, 3, 2]]  # (row0, col0, row1, col1) -> (x0, y0, x1, y1)
    scores = torch.tensor([p.score for p in pieces], dtype=torch.float64)
    keep = batched_nms(boxes, scores, torch.zeros(len(pieces), dtype=torch.int64), threshold)
    return [pieces[i] for i in sorted(keep.tolist())]


def _vectorize(
    candidates: list[_Candidate], valid: np.ndarray, frame: _Frame, task: AutoTileTask, config: EngineConfig
) -> list[Piece]:
    """Kept masks -> pieces: upsampled over their box, ANDed with valid, vectorized."""
    tile = task.tile
    scene_shape = (task.scene.height, task.scene.width)
    px_per_cell = 1.0 / _cells_per_px(frame)
    edge_margin = px_per_cell * tile.scale + 1.0
    pieces: list[Piece] = []
    for cand in candidates:
        crop = _pixel_crop(cand.box, px_per_cell, valid.shape)
        mask = _upsample_cells(cand, crop, frame) & valid[crop[0] : crop[2], crop[1] : crop[3]]
        transform = tile.transform @ Affine.translation(crop[1], crop[0])
        geom = mask_to_geometry(mask, transform, min_area=config.min_area, simplify=config.simplify)
        if geom is None:
            continue
        geom = _part_at(geom, tile.transform * cand.point)
        piece = piece_from_geometry(
            geom, tile, scene_shape, score=cand.score, stability=cand.stability, edge_margin=edge_margin
        )
        if piece is not None:
            pieces.append(piece)
    return pieces


def _cells_per_px(frame: _Frame) -> float:
    """Logit cells per tile pixel (0.25 for a 1024 px tile, 1 for a 256 px one): the
    tile is resized by ``input / tile`` for the encoder and the logits are 1/4 of that."""
    return frame.input_hw[0] / frame.tile_hw[0] / 4.0


def _pixel_crop(box: tuple[int, int, int, int], px_per_cell: float, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) of tile pixels around a box of cells, one cell of margin."""
    x0, y0, x1, y1 = box
    rows, cols = hw
    r0 = max(0, math.floor((y0 - 1) * px_per_cell))
    c0 = max(0, math.floor((x0 - 1) * px_per_cell))
    r1 = min(rows, math.ceil((y1 + 2) * px_per_cell))
    c1 = min(cols, math.ceil((x1 + 2) * px_per_cell))
    return r0, c0, max(r1, r0 + 1), max(c1, c0 + 1)


def _upsample_cells(cand: _Candidate, crop: tuple[int, int, int, int], frame: _Frame) -> np.ndarray:
    """Threshold the candidate's logits bilinearly sampled at the crop's pixel centres.

    Same sampling as SAM's ``postprocess_masks`` (bilinear, pixel centres): tile pixel
    ``(r, c)`` sits at cell coordinate ``(r + 0.5) * cells_per_px - 0.5``. Returns a
    (rows, cols) bool array.
    """
    r0, c0, r1, c1 = crop
    scale = _cells_per_px(frame)
    logits = cand.logits.float()
    h, w = logits.shape
    ys = (torch.arange(r0, r1, dtype=torch.float32) + 0.5) * scale - 0.5 - cand.origin[0]
    xs = (torch.arange(c0, c1, dtype=torch.float32) + 0.5) * scale - 0.5 - cand.origin[1]
    ys = ys * (2.0 / max(h - 1, 1)) - 1.0
    xs = xs * (2.0 / max(w - 1, 1)) - 1.0
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]
    sampled = F.grid_sample(logits[None, None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return (sampled[0, 0] > 0.0).numpy()


def _part_at(geom: shapely.Geometry, xy: tuple[float, float]) -> shapely.Geometry:
    """The polygon of a multi-part mask that holds the prompt point, else the largest.

    One prompt, one object: SAM sometimes adds look-alike regions elsewhere in the tile
    to a mask; they are not the object the point is on.
    """
    if not isinstance(geom, shapely.MultiPolygon):
        return geom
    parts = list(geom.geoms)
    point = shapely.Point(xy)
    for part in parts:
        if part.covers(point):
            return part
    return max(parts, key=lambda p: p.area)


# --- driver ----------------------------------------------------------------------------


@dataclass
class AutoRunSummary(RunSummary):
    """The run summary (see :mod:`sam_geo.run.summary`) plus stitching counts in ``objects``.

    ``prompts.used`` counts the grid points decoded, ``prompts.skipped_covered`` those
    left out because a kept mask covered them (:attr:`AutoParams.skip_covered`).
    """

    objects: dict[str, int] = field(default_factory=dict)


def segment_auto(
    scenes: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    params: AutoParams | None = None,
    settings: SegmentSettings | None = None,
    runtime: RuntimeOptions | None = None,
    summary_path: str | os.PathLike[str] | None = None,
    labels_raster: str | os.PathLike[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    restart: bool = False,
    max_failed_tiles: int = 0,
    **overrides: Any,
) -> gpd.GeoDataFrame:
    """Segment every object of a scene automatically; one polygon per object.

    Every tile is prompted with a grid of points (see :class:`AutoParams`) and the
    tiles' masks are stitched across tile edges (:func:`sam_geo.geo.stitch.stitch`): an
    object seen by several tiles comes out once, an object larger than a tile is
    assembled from its pieces, and the result does not depend on the tile size and
    overlap beyond small boundary differences. Returns one row per object with
    ``object_id`` (1, 2, ... in reading order: top to bottom, then left to right),
    ``score`` (SAM's predicted IoU), ``stability``, ``area_m2`` and ``n_tiles`` (tiles
    that saw it), in the scene CRS; holes are kept.

    Objects outside ``[params.min_area_m2, params.max_area_m2]`` are dropped after
    stitching; ``settings.min_area_m2`` is the speck threshold applied to every mask
    (parts and holes smaller are dropped / filled). ``labels_raster`` (``.tif``) also
    writes an instance-label GeoTIFF on the scene's grid (uint32, 0 = no object,
    otherwise ``object_id``), window by window. ``work_dir`` keeps finished tiles so a
    rerun resumes; more than ``max_failed_tiles`` failed tiles raise
    :class:`~sam_geo.errors.RunError` and write nothing.

    ``scenes`` is one path or URL rasterio can open, a glob, a ``.txt`` file of paths
    (one per line), or a list of those (see :func:`sam_geo.api.expand_scenes`). Several
    scenes give one merged layer in the first scene's CRS (reprojected explicitly) with a
    ``scene`` column; ``object_id`` then counts per scene, so ``(scene, object_id)`` is the
    stable key. ``labels_raster`` needs a single scene. ``max_failed_tiles`` counts
    over all scenes; with a ``work_dir`` each scene keeps its tiles in its own
    sub-directory (named after the scene), so a rerun resumes every scene.
    ``settings.regularize_m`` regularizes the outlines as for prompted building runs.

    Outputs are checked before any work and written atomically, never overwritten
    unless ``overwrite``. Keyword arguments are fields of :class:`SegmentSettings`
    (``tile_size=512`` ...) or of :class:`AutoParams` (``points_per_side=16`` ...).
    """
    paths = expand_scenes(scenes)
    if len(paths) == 1:
        return _segment_auto_scene(
            paths[0], output=output, overwrite=overwrite, params=params, settings=settings, runtime=runtime,
            summary_path=summary_path, labels_raster=labels_raster, work_dir=work_dir, restart=restart,
            max_failed_tiles=max_failed_tiles, **overrides,
        )
    if labels_raster is not None:
        raise ConfigError(
            f"a labels raster is written on one scene's pixel grid, but {len(paths)} scenes were given; "
            "run each scene on its own to get its labels raster"
        )
    t_total = time.perf_counter()
    output_path = check_output_path(output, overwrite=overwrite) if output is not None else None
    if summary_path is not None:
        _check_summary_path(Path(summary_path), overwrite)
    frames: list[gpd.GeoDataFrame] = []
    summaries: list[dict[str, Any]] = []
    for path in paths:
        failed_so_far = sum(s["tiles"]["failed"] for s in summaries)
        frame = _segment_auto_scene(
            path, params=params, settings=settings, runtime=runtime,
            work_dir=Path(work_dir) / scene_work_dir_name(path) if work_dir is not None else None,
            restart=restart, max_failed_tiles=max_failed_tiles - failed_so_far, **overrides,
        )
        summaries.append(frame.attrs["summary"])
        frames.append(frame.assign(scene=path))
    merged = _merge_scene_frames(frames)
    summary = merged_summary(summaries)
    if output_path is not None:
        start = time.perf_counter()
        write_vector(merged, output_path, overwrite=overwrite)
        summary["seconds"]["write"] += time.perf_counter() - start
        summary["output"] = str(output_path)
    summary["features"] = len(merged)
    summary["seconds"]["total"] = round(time.perf_counter() - t_total, 3)
    merged.attrs["summary"] = summary
    if summary_path is not None:
        write_json_atomic(summary, summary_path)
    return merged


def scene_work_dir_name(path: str) -> str:
    """Sub-directory of a work dir for one scene: its file stem and a hash of its path."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path).stem)[:60] or "scene"
    return f"{stem}-{hashlib.sha1(path.encode('utf-8')).hexdigest()[:8]}"


def _merge_scene_frames(frames: list[gpd.GeoDataFrame]) -> gpd.GeoDataFrame:
    """Concatenate per-scene outputs in the first scene's CRS (reprojected explicitly)."""
    crs = frames[0].crs
    same_crs = [f if f.crs == crs else f.to_crs(crs) for f in frames]
    merged = pd.concat(same_crs, ignore_index=True)
    return gpd.GeoDataFrame(merged, geometry="geometry", crs=crs)


def merged_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One run summary for several scenes: counts and seconds summed, each scene's kept."""
    first = summaries[0]
    out: dict[str, Any] = {
        "scene": ", ".join(s["scene"] for s in summaries),
        "mode": first["mode"],
        "model": first["model"],
        "settings": first["settings"],
        "output": None,
        "features": 0,
        "failures": [f | {"scene": s["scene"]} for s in summaries for f in s.get("failures", [])],
        "scenes": summaries,
    }
    for key in ("tiles", "prompts", "seconds", "objects", "regularize"):
        out[key] = _sum_numbers([s.get(key, {}) for s in summaries])
    return out


def _sum_numbers(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total


def _segment_auto_scene(
    scene: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    params: AutoParams | None = None,
    settings: SegmentSettings | None = None,
    runtime: RuntimeOptions | None = None,
    summary_path: str | os.PathLike[str] | None = None,
    labels_raster: str | os.PathLike[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    restart: bool = False,
    max_failed_tiles: int = 0,
    **overrides: Any,
) -> gpd.GeoDataFrame:
    """:func:`segment_auto` on one scene."""
    t_total = time.perf_counter()
    settings, params = _split_overrides(settings, params, overrides)
    runtime = runtime or RuntimeOptions()
    if max_failed_tiles < 0:
        raise ConfigError(f"max failed tiles must be >= 0, got {max_failed_tiles}")
    validate_tiling(settings.tile_size, settings.overlap)
    if get_spec(settings.model).family == "sam2":
        raise ConfigError(
            f"automatic segmentation runs SAM and MobileSAM models; {settings.model!r} is a SAM 2.1 model. "
            "Use --model mobile_sam (or vit_b, vit_l, vit_h)"
        )
    if settings.overlap < MIN_OVERLAP_PX:
        raise ConfigError(
            f"automatic segmentation needs tiles that overlap by at least {MIN_OVERLAP_PX} px to stitch "
            f"objects across tile edges (got {settings.overlap}); use --overlap 64 or more, ideally about "
            "half the size in pixels of the largest objects you expect"
        )
    output_path = check_output_path(output, overwrite=overwrite) if output is not None else None
    labels_path = check_labels_path(labels_raster, overwrite=overwrite) if labels_raster is not None else None
    if summary_path is not None:
        _check_summary_path(Path(summary_path), overwrite)

    info = open_scene(scene, bands=settings.bands, assume_crs=settings.assume_crs)
    weights = resolve_weights(settings.model, settings.weights)
    stretch = compute_stretch(info, method=settings.stretch)
    grid = TileGrid(info.height, info.width, info.transform, settings.tile_size, settings.overlap, settings.zoom or 1)
    config = EngineConfig(
        model=settings.model,
        weights=str(weights.path),
        device=settings.device,
        batch_size=settings.batch_size,
        precision=settings.precision,
        encode_batch=settings.encode_batch,
        decoder_context_px=settings.decoder_context_px,
        min_area=_min_area_in_crs_units(info, settings.min_area_m2),
        simplify=_metres_in_crs_units(info, settings.simplify_m),
    )
    summary = AutoRunSummary(scene=info.path, mode="auto")
    summary.model = {
        "name": settings.model,
        "weights_sha256": weights.sha256,
        "weights_source": weights.source,
        "device": resolve_device(settings.device),
        "precision": precision_name(settings.precision, settings.device),
    }
    summary.settings = {**settings.__dict__, "zoom": grid.zoom, "auto": params.__dict__, "workers": runtime.workers}
    tasks = [AutoTileTask(info, stretch, tile, params) for tile in grid]
    summary.tiles.planned = len(tasks)
    store = _open_work_dir(work_dir, restart, summary, info) if work_dir else None
    results = run_with_work_dir(tasks, config, runtime, store, summary)
    summary.prompts.used = sum(getattr(r, "points", 0) for r in results)
    summary.prompts.skipped_covered = sum(getattr(r, "points_skipped", 0) for r in results)
    _raise_if_failed(results, len(tasks), max_failed_tiles, summary, summary_path, t_total)

    start = time.perf_counter()
    gdf = _stitched_frame(info, grid, tasks, results, params, settings, summary)
    summary.seconds["stitch"] = time.perf_counter() - start
    if settings.regularize_m is not None and len(gdf):
        gdf = _regularize(gdf, settings.regularize_m, summary)
    if output_path is not None:
        start = time.perf_counter()
        write_vector(gdf, output_path, overwrite=overwrite)
        summary.seconds["write"] += time.perf_counter() - start
        summary.output = str(output_path)
    if labels_path is not None:
        start = time.perf_counter()
        write_labels_raster(gdf, info, labels_path, overwrite=overwrite)
        summary.seconds["write"] += time.perf_counter() - start
        summary.objects["labels_raster"] = str(labels_path)  # type: ignore[assignment]
    summary.seconds["total"] = time.perf_counter() - t_total
    gdf.attrs["summary"] = summary.to_dict()
    if summary_path is not None:
        summary.write(summary_path)
    return gdf


def _split_overrides(
    settings: SegmentSettings | None, params: AutoParams | None, overrides: dict[str, Any]
) -> tuple[SegmentSettings, AutoParams]:
    """Keyword overrides go to SegmentSettings or AutoParams by field name."""
    auto_fields = {f.name for f in fields(AutoParams)}
    unknown = set(overrides) - auto_fields - set(SegmentSettings.__dataclass_fields__)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(sorted(unknown))}; known: "
            + ", ".join([*SegmentSettings.__dataclass_fields__, *sorted(auto_fields)])
        )
    auto_values = {k: v for k, v in overrides.items() if k in auto_fields and v is not None}
    merged = _merge_settings(settings, {k: v for k, v in overrides.items() if k not in auto_fields})
    params = AutoParams(**{**(params or AutoParams()).__dict__, **auto_values})
    params.validate()
    return merged, params


DRIVER_ONLY_PARAMS = ("min_area_m2", "max_area_m2", "match_iou", "nested_thresh", "points_per_batch")
"""AutoParams used only after the tiles come back (filters, stitching) or not changing
results: a work dir made with other values is reused, and only the stitching reruns."""

DRIVER_ONLY_SETTINGS = ("workers", "device", "batch_size", "encode_batch", "regularize_m")


def _open_work_dir(path: str | os.PathLike[str], restart: bool, summary: RunSummary, info: SceneInfo) -> WorkDir:
    settings = {k: v for k, v in summary.settings.items() if k not in DRIVER_ONLY_SETTINGS}
    settings["auto"] = {k: v for k, v in settings["auto"].items() if k not in DRIVER_ONLY_PARAMS}
    fingerprint = {
        "sam_geo": __version__,
        "mode": summary.mode,
        "model": summary.model["name"],
        "weights_sha256": summary.model["weights_sha256"],
        "settings": settings,
        "scenes": [fingerprint_file(info.path)],
    }
    return WorkDir(path, fingerprint, restart=restart)


def _raise_if_failed(
    results: list[Any],
    planned: int,
    allowed: int,
    summary: RunSummary,
    summary_path: str | os.PathLike[str] | None,
    t_total: float,
) -> None:
    failed = [r for r in results if r.error]
    if len(failed) <= allowed:
        return
    summary.seconds["total"] = time.perf_counter() - t_total
    if summary_path is not None:
        summary.write(summary_path)
    first = failed[0]
    raise RunError(
        f"{len(failed)} of {planned} tiles failed (allowed: {allowed}), so no output was written; first: "
        f"tile {first.tile_key}: {first.error}. Finished tiles are kept in the work dir if one was given; "
        "fix the input or raise --max-failed-tiles."
    )


def _stitched_frame(
    info: SceneInfo,
    grid: TileGrid,
    tasks: list[AutoTileTask],
    results: list[Any],
    params: AutoParams,
    settings: SegmentSettings,
    summary: AutoRunSummary,
) -> gpd.GeoDataFrame:
    """Stitch the tiles' pieces, clean and filter by area, number the objects."""
    tile_of = {t.key: t.tile for t in tasks}
    parts = [(tile_of[r.tile_key], r.objects) for r in results if not r.error and r.tile_key in tile_of]
    objects = stitch(parts, match_iou=params.match_iou, nms_iou=params.box_nms_thresh)
    geoms = _drop_small_parts(objects.geometry, _min_area_in_crs_units(info, settings.min_area_m2))
    area = geometry_area_m2(list(geoms), info.crs) if len(geoms) else np.zeros(0)
    keep = ~shapely.is_missing(geoms) & (area >= params.min_area_m2) & (area > 0)
    if params.max_area_m2 is not None:
        keep &= area <= params.max_area_m2
    rows = np.flatnonzero(keep)
    summary.objects = {**summary.objects, **objects.stats, "outside_area_range": int(len(objects) - len(rows))}
    if params.nested_thresh is not None:
        nested_kept = greedy_suppression(geoms[rows], objects.score[rows], params.nested_thresh, overlap="ios")
        summary.objects["nested_suppressed"] = int(len(rows) - len(nested_kept))
        rows = rows[nested_kept]
    summary.features = len(rows)
    kept: StitchedObjects = objects.take(rows)
    frame = {
        "object_id": np.arange(1, len(rows) + 1, dtype=np.int64),
        "score": kept.score.astype(np.float64),
        "stability": kept.stability.astype(np.float64),
        "area_m2": area[rows],
        "n_tiles": kept.n_tiles.astype(np.int64),
    }
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(list(geoms[rows]), crs=info.crs), crs=info.crs)


def suppress_nested(pieces: list[Piece], threshold: float) -> list[Piece]:
    """Greedy nested-mask suppression on one tile's pieces (what
    :attr:`AutoParams.nested_thresh` does to the stitched objects; see
    :func:`sam_geo.geo.stitch.greedy_suppression` with ``overlap="ios"``): visited by
    descending predicted IoU, a kept piece drops every piece with at least
    ``threshold`` of the smaller one's area inside the other. Used for per-tile
    baselines (``benchmarks/auto_banepa.py``)."""
    geoms = shapely.from_wkb([p.wkb for p in pieces])
    kept = greedy_suppression(geoms, np.array([p.score for p in pieces]), threshold, overlap="ios")
    return [pieces[i] for i in kept]


def _drop_small_parts(geoms: np.ndarray, min_area: float) -> np.ndarray:
    """Parts below ``min_area`` (CRS units^2) dropped; a geometry left empty is None.

    Stitched mosaics can gain slivers along core boundaries where two tiles disagree.
    """
    out = np.empty(len(geoms), dtype=object)
    for i, geom in enumerate(geoms):
        parts = [p for p in shapely.get_parts(geom) if p.area >= min_area and p.area > 0]
        if parts:
            out[i] = parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)
    return out
