"""Automatic segmentation of a whole scene: every object, one polygon each.

>>> import sam_geo
>>> gdf = sam_geo.segment_auto("scene.tif", output="objects.gpkg", max_area_m2=50_000)

Each tile of a :class:`~sam_geo.geo.tiles.TileGrid` is encoded once and prompted with a
regular grid of points (SAM's automatic mask generation, per tile); the masks that pass
SAM's quality filters come back from the model actors as polygons
(:class:`~sam_geo.geo.stitch.Piece`), and :func:`sam_geo.geo.stitch.stitch` joins the pieces
that overlapping tiles saw of one object into one polygon. No whole-scene array is made.

Per tile, in three stages (:class:`~sam_geo.run.tasks.TileTask`): steps 1-2 in the load
stage, 3-4 in the model host, 5-6 in the finish stage:

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

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import torch
import torch.nn.functional as F
from affine import Affine

from sam_geo.errors import ConfigError
from sam_geo.geo.stitch import Piece, SeamBuffer, greedy_suppression, piece_from_geometry, stitch
from sam_geo.geo.tiles import PixelBox, TileGrid
from sam_geo.geo.vectorize import geometry_area_m2, mask_to_geometry
from sam_geo.io.labels import check_labels_path, write_labels_raster
from sam_geo.io.scenes import SceneInfo, SceneReader, compute_stretch
from sam_geo.model.registry import get_spec
from sam_geo.model.sam_backend import SamBackend
from sam_geo.run.host import ModelHost, cpu_timed, timed
from sam_geo.run.pipeline import COMMON_TILE_SETTINGS, area_in_crs_units, reproject_geometries
from sam_geo.run.summary import RunSummary
from sam_geo.run.tasks import PostConfig, TileInput, TileResult, TileTask
from sam_geo.settings import Settings

AUTO_COLUMNS = ("object_id", "score", "stability", "area_m2", "n_tiles")
"""Columns of an automatic-segmentation output, besides the geometry."""

GPU_POINTS_PER_BATCH = 64
CPU_POINTS_PER_BATCH = 4
"""Points per mask-decoder call. On CPU the decoder is memory-bound and small batches
are fastest per point: MobileSAM on 2 cores, three masks per point, 112 ms per point at
1-4 points per call and 138 ms at 64 in fp32, 50 ms at 1-4 and 92 ms at 16 in bf16
(``benchmarks/decoder_batch.py --points``). Small batches also let
:attr:`~sam_geo.settings.Settings.skip_covered` see the masks of one batch before
choosing the next."""

STITCH_EVERY = 8
"""Tiles between two looks for closed clusters to stitch (:class:`~sam_geo.geo.stitch.SeamBuffer`)."""

LABELS_MAX_ID = 2**32 - 1
"""Object ids of a labels raster are uint32 (0 = no object); ids are scene pixel numbers."""

MIN_OVERLAP_PX = 16
"""Smallest tile overlap (model pixels) automatic mode accepts: pieces of an object are
matched inside the band two tiles share, which must have some width."""

LOGIT_CROP_MARGIN = 2
"""Low-resolution logit cells kept around each candidate mask's box until it is vectorized."""


# --- tile task and result --------------------------------------------------------------


@dataclass
class AutoTileResult(TileResult):
    """What a worker sends back for one tile of automatic segmentation (no pixels).

    ``objects``: the tile's masks as :class:`~sam_geo.geo.stitch.Piece` (WKB polygon in the
    scene CRS, predicted IoU, stability, box in scene pixels, read-window sides facing
    another tile that the mask reaches); ``points``: grid points decoded (on valid
    pixels); ``seconds``: read, encode, decode, vectorize.
    """

    objects: list[Piece] = field(default_factory=list)
    points: int = 0
    points_skipped: int = 0


@dataclass(frozen=True)
class AutoTileTask(TileTask):
    """One tile to segment automatically; ``settings`` carries the grid and filters."""

    settings: Settings

    def load(self, reader: SceneReader) -> TileInput:
        """Read the window and lay the point grid on its valid pixels."""
        tile_input = TileInput(window=None)
        with cpu_timed(tile_input.seconds, "read"):
            window = self.read(reader)
        if not window.valid.any():
            tile_input.needs_model = False
            return tile_input
        points = grid_points(window.valid, self.settings.points_per_side)
        if self.settings.skip_covered:
            points = points[coarse_to_fine_order(window.valid.shape, points, self.settings.points_per_side)]
        tile_input.window, tile_input.payload = window, points
        tile_input.needs_model = len(points) > 0
        return tile_input

    def infer(self, host: ModelHost, tile_input: TileInput) -> AutoCandidates:
        """Encode once, decode the point grid, keep the masks that pass SAM's filters."""
        return decode_grid(self, host, tile_input)

    def finish(self, tile_input: TileInput, output: AutoCandidates | None, post: PostConfig) -> AutoTileResult:
        """Kept masks -> pieces (polygons in the scene CRS), non-maximum suppressed."""
        result = self.new_result(AutoTileResult, tile_input)
        if output is None:
            return result
        result.encoded = True
        result.points, result.points_skipped = output.points, output.points_skipped
        with cpu_timed(result.seconds, "vectorize"):
            frame = _Frame(tile_input.window.valid.shape, output.input_hw)
            pieces = _vectorize(output.candidates, tile_input.window.valid, frame, self, post)
            result.objects = _box_nms(pieces, self.settings.box_nms_thresh)
        return result


@dataclass
class _Candidate:
    """A mask that passed the filters, kept as a crop of its low-resolution logits."""

    logits: Any  # (h, w) float16 tensor, then numpy: cells of SAM's 256 x 256 output
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


@dataclass
class AutoCandidates:
    """The model stage's output for an automatic tile: masks that passed the filters."""

    candidates: list[_Candidate]
    input_hw: tuple[int, int]
    points: int
    points_skipped: int


def decode_grid(task: AutoTileTask, host: ModelHost, tile_input: TileInput) -> AutoCandidates:
    """Encode the tile once and decode its point grid in batches (see the module docs)."""
    backend = host.backend
    if not isinstance(backend, SamBackend):
        raise ConfigError(
            f"automatic segmentation needs a SAM or MobileSAM model; {host.config.model!r} is not one"
        )
    seconds, window, points = tile_input.seconds, tile_input.window, tile_input.payload
    embedding, input_hw = host.encode(window.rgb, seconds)
    frame = _Frame(window.valid.shape, input_hw)
    batch = task.settings.batch_size or (
        GPU_POINTS_PER_BATCH if host.device.type == "cuda" else CPU_POINTS_PER_BATCH
    )
    candidates: list[_Candidate] = []
    coverage = _Coverage(frame, task.settings) if task.settings.skip_covered else None
    decoded = 0
    for part in _point_batches(points, batch, coverage):
        with host.model_call(), timed(seconds, "decode"):
            logits, iou = _decode_points(backend, embedding, part * (input_hw[0] / frame.tile_hw[0]))
            found = _filter_masks(logits, iou, part, frame, task.settings)
        if coverage is not None:
            coverage.add(found)
        candidates += found
        decoded += len(part)
    for cand in candidates:  # numpy through the object store
        cand.logits = cand.logits.numpy()
    return AutoCandidates(candidates, input_hw, decoded, len(points) - decoded)


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

    A grid point on a covered cell is not decoded (``Settings.skip_covered``): SAM
    prompted inside an object it has already segmented with confidence gives that
    object again, which box NMS would then drop. Only masks up to
    ``cover_max_fraction`` of the tile count, so a large background mask (a field, a
    road network) does not hide the objects inside it.
    """

    def __init__(self, frame: _Frame, params: Settings) -> None:
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
    logits: torch.Tensor, iou: torch.Tensor, points: np.ndarray, frame: _Frame, params: Settings
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
    candidates: list[_Candidate], valid: np.ndarray, frame: _Frame, task: AutoTileTask, config: PostConfig
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
    logits = torch.from_numpy(np.array(cand.logits, dtype=np.float32))  # a copy: Ray's arrays are read-only
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


# --- driver ---

class AutoMode:
    """Automatic segmentation as a :class:`~sam_geo.run.pipeline.Mode`: every tile of
    every scene prompted with a point grid; each scene's pieces stitched on their own.

    ``labels_raster``: also write an instance-label GeoTIFF (``object_id``) on the scene's
    grid; one scene only.
    """

    name = "auto"
    order_by = "object_id"
    tile_settings = (
        *COMMON_TILE_SETTINGS, "points_per_side", "pred_iou_thresh", "stability_score_thresh",
        "stability_score_offset", "box_nms_thresh", "max_tile_fraction", "skip_covered", "cover_max_fraction",
    )

    def __init__(self, labels_raster: str | None = None) -> None:
        self.labels_raster = labels_raster
        self.settings: Settings | None = None
        self.tasks: list[AutoTileTask] = []
        self.scenes: list[SceneInfo] = []
        self.scene_of_tile: dict[str, SceneInfo] = {}
        self.buffers: dict[str, SeamBuffer] = {}
        self.since_stitch = 0
        self.points_used = 0
        self.points_skipped = 0
        self.counts: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.kept: list[gpd.GeoDataFrame] = []

    @property
    def inputs(self) -> dict[str, Any]:
        """No input files besides the scenes."""
        return {}

    def check(self, settings: Settings) -> None:
        """SAM-family model, an overlap wide enough to stitch in and no prompt-only
        settings (``flip_views``), else ConfigError."""
        if settings.flip_views != 1:
            raise ConfigError(
                "flip views average the masks of each prompt over mirrored tiles; automatic mode has no prompts "
                "to average (its grid differs per view). Drop flip_views, or use it with sam-geo segment or text"
            )
        family = get_spec(settings.model).family
        if family not in ("sam", "mobile_sam"):
            kinds = {"sam3": "a SAM 3 model: it finds instances of phrases (sam-geo text)", "edgetam": "an EdgeTAM model"}
            kind = kinds.get(family, "a SAM 2.1 model")
            raise ConfigError(
                f"automatic segmentation runs SAM and MobileSAM models; {settings.model!r} is {kind}. "
                "Use --model mobile_sam (or vit_b, vit_l, vit_h)"
            )
        if settings.overlap_px < MIN_OVERLAP_PX:
            raise ConfigError(
                f"automatic segmentation needs tiles that overlap by at least {MIN_OVERLAP_PX} px to stitch "
                f"objects across tile edges (got {settings.overlap_px}); use --overlap 64 or more, ideally about "
                "half the size in pixels of the largest objects you expect"
            )

    def check_outputs(self, overwrite: bool) -> None:
        """The labels raster's path is valid and not in the way (unless ``overwrite``)."""
        if self.labels_raster is not None:
            check_labels_path(self.labels_raster, overwrite=overwrite)

    def plan(self, scenes: list[SceneInfo], settings: Settings) -> list[TileTask]:
        """Every tile of every scene, at ``settings.zoom`` (1 when unset)."""
        if self.labels_raster is not None and len(scenes) > 1:
            raise ConfigError(
                f"a labels raster is written on one scene's pixel grid, but {len(scenes)} scenes were given; "
                "run each scene on its own to get its labels raster"
            )
        if self.labels_raster is not None and scenes[0].height * scenes[0].width >= LABELS_MAX_ID:
            raise ConfigError(
                f"a labels raster holds object ids below {LABELS_MAX_ID:,} (uint32), but this scene has "
                f"{scenes[0].height * scenes[0].width:,} pixels; run without --labels-raster"
            )
        self.settings, self.scenes, self.tasks = settings, scenes, []
        for info in scenes:
            grid = TileGrid(info.height, info.width, info.transform, settings.tile_size_px, settings.overlap_px,
                            settings.zoom or 1)
            stretch = compute_stretch(info, method=settings.stretch)
            tasks = [AutoTileTask(info, stretch, tile, settings) for tile in grid]
            self.buffers[info.path] = SeamBuffer({t.key: t.tile for t in tasks})
            self.tasks += tasks
        self.scene_of_tile = {t.key: t.scene for t in self.tasks}
        return list(self.tasks)

    def fingerprint(self) -> dict[str, Any]:
        """The speck area (parts and holes dropped per tile); the object filters are not in
        it: changing them reruns the stitching only."""
        return {"speck_area_m2": self.settings.speck_area_m2(self.name)}

    def summary_settings(self) -> dict[str, Any]:
        """The zoom the tiles ran at."""
        return {"zoom": self.settings.zoom or 1}

    def accept(self, result: TileResult) -> gpd.GeoDataFrame | None:
        """The tile's pieces into its scene's :class:`~sam_geo.geo.stitch.SeamBuffer`; every
        :data:`STITCH_EVERY` tiles (and when a scene is done) the closed clusters are
        stitched and their objects returned."""
        self.points_used += getattr(result, "points", 0)
        self.points_skipped += getattr(result, "points_skipped", 0)
        scene = self.scene_of_tile[result.tile_key]
        buffer = self.buffers[scene.path]
        buffer.add(result.tile_key, [] if result.error else result.objects)
        self.since_stitch += 1
        if self.since_stitch < STITCH_EVERY and not buffer.done:
            return None
        self.since_stitch = 0
        return self._stitch_closed()

    def finish(self, summary: RunSummary) -> Iterator[gpd.GeoDataFrame]:
        """The objects still held (every tile is back, so every cluster is closed); counts."""
        yield self._stitch_closed()
        summary.prompts.used = self.points_used
        summary.prompts.skipped_covered = self.points_skipped
        _add_counts(summary.objects, self.counts)
        summary.add_seconds(self.seconds)

    def _stitch_closed(self) -> gpd.GeoDataFrame:
        """Objects of every closed cluster of every scene, in the first scene's CRS."""
        frames = []
        with cpu_timed(self.seconds, "stitch"):
            for info in self.scenes:
                parts = self.buffers[info.path].pop_closed()
                if parts or info is self.scenes[0]:  # the first scene's frame sets the CRS
                    frame = stitched_frame(info, parts, self.settings, self.counts, self.buffers[info.path].extent)
                    frames.append(frame.assign(scene=info.path) if len(self.scenes) > 1 else frame)
        out = frames[0] if len(frames) == 1 else merge_scene_frames(frames)
        if self.labels_raster is not None:
            self.kept.append(out)
        return out

    def write_outputs(self, overwrite: bool, summary: RunSummary) -> None:
        """The labels raster, when asked for."""
        if self.labels_raster is not None:
            gdf = pd.concat(self.kept, ignore_index=True) if self.kept else stitched_frame(
                self.scenes[0], [], self.settings, {}, None)
            gdf = gpd.GeoDataFrame(gdf, geometry=gdf.geometry.name, crs=self.scenes[0].crs)
            path = write_labels_raster(gdf, self.scenes[0], self.labels_raster, overwrite=overwrite)
            summary.objects["labels_raster"] = str(path)


def stitched_frame(
    info: SceneInfo, parts: list[tuple[Any, list[Piece]]], settings: Settings, counts: dict[str, Any],
    extent: PixelBox | None,
) -> gpd.GeoDataFrame:
    """Stitch tile pieces of one scene (all of it, or closed clusters of a
    :class:`~sam_geo.geo.stitch.SeamBuffer` with the grid's ``extent``), clean and filter
    by area, number the objects.

    Objects outside ``[min_area_m2, max_area_m2]`` are dropped, then nested ones when
    ``nested_thresh`` is set; ``object_id`` comes from :func:`object_ids`. Stitching
    counts are added to ``counts``.
    """
    objects = stitch(parts, match_iou=settings.match_iou, nms_iou=settings.box_nms_thresh, extent=extent)
    geoms = _drop_small_parts(objects.geometry, area_in_crs_units(info, settings.speck_area_m2("auto")))
    area = geometry_area_m2(list(geoms), info.crs) if len(geoms) else np.zeros(0)
    keep = ~shapely.is_missing(geoms) & (area >= settings.min_area_m2) & (area > 0)
    if settings.max_area_m2 is not None:
        keep &= area <= settings.max_area_m2
    rows = np.flatnonzero(keep)
    _add_counts(counts, {**objects.stats, "outside_area_range": int(len(objects) - len(rows))})
    if settings.nested_thresh is not None:
        nested_kept = greedy_suppression(geoms[rows], objects.score[rows], settings.nested_thresh, overlap="ios")
        _add_counts(counts, {"nested_suppressed": int(len(rows) - len(nested_kept))})
        rows = rows[nested_kept]
    kept = objects.take(rows)
    frame = {
        "object_id": object_ids(geoms[rows], info),
        "score": kept.score.astype(np.float64),
        "stability": kept.stability.astype(np.float64),
        "area_m2": area[rows],
        "n_tiles": kept.n_tiles.astype(np.int64),
    }
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(list(geoms[rows]), crs=info.crs), crs=info.crs)


def object_ids(geoms: np.ndarray, info: SceneInfo) -> np.ndarray:
    """(n,) int64 ids that do not depend on the tile grid, the order tiles finished in or
    the rest of the scene: ``row * width + col + 1`` of the scene pixel (full resolution)
    holding each object's representative point (:func:`shapely.point_on_surface`).
    Objects given together that share that pixel (overlapping ones) get the next free
    number, in the order given (reading order, from :func:`~sam_geo.geo.stitch.stitch`)."""
    if len(geoms) == 0:
        return np.zeros(0, dtype=np.int64)
    xy = shapely.get_coordinates(shapely.point_on_surface(geoms))
    cols, rows = ~info.transform * (xy[:, 0], xy[:, 1])
    rows = np.clip(np.floor(rows), 0, info.height - 1).astype(np.int64)
    cols = np.clip(np.floor(cols), 0, info.width - 1).astype(np.int64)
    ids = rows * info.width + cols + 1
    used: set[int] = set()
    for k, value in enumerate(ids.tolist()):
        while value in used:
            value += 1
        used.add(value)
        ids[k] = value
    return ids


def _add_counts(total: dict[str, Any], counts: dict[str, Any]) -> None:
    for key, value in counts.items():
        total[key] = total.get(key, 0) + value


def merge_scene_frames(frames: list[gpd.GeoDataFrame]) -> gpd.GeoDataFrame:
    """Concatenate per-scene outputs in the first scene's CRS (reprojected explicitly)."""
    crs = frames[0].crs
    attrs = pd.concat([pd.DataFrame(f.drop(columns=f.geometry.name)) for f in frames], ignore_index=True)
    geoms = np.concatenate([f.geometry.to_numpy() for f in frames]) if frames else np.zeros(0, dtype=object)
    crss = [f.crs for f in frames for _ in range(len(f))]
    geoms = reproject_geometries(geoms, crss, crs)
    return gpd.GeoDataFrame(attrs, geometry=gpd.GeoSeries(geoms, crs=crs), crs=crs)


def suppress_nested(pieces: list[Piece], threshold: float) -> list[Piece]:
    """Greedy nested-mask suppression on one tile's pieces (what
    :attr:`~sam_geo.settings.Settings.nested_thresh` does to the stitched objects; see
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
