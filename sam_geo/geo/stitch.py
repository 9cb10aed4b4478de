"""Seamless stitching of per-tile masks into whole-scene objects, with vectors only.

Automatic segmentation (:mod:`sam_geo.modes.automatic`) runs SAM on every tile of a
:class:`~sam_geo.geo.tiles.TileGrid`. Tiles overlap, so an object near a tile edge is seen
by several tiles: whole by some, cut by the read window of others; an object larger
than a tile is seen only in pieces. This module turns the tiles' polygons
(:class:`Piece`) into one polygon per object.

The rule, in words:

1. **Truncated or complete.** A piece is *truncated* when it reaches (within a small
   margin) a side of its tile's read window beyond which the scene goes on (another
   tile sees further there); otherwise it is *complete*: its tile saw all of it.
2. **Same object.** Two pieces from different tiles are the same object when, inside
   the zone both tiles see (the intersection of their two read windows), their IoU is
   at least ``match_iou``. Comparing only inside the shared zone is what lets a piece
   cut by one tile's edge match the whole object seen by the neighbour. Candidate pairs
   come from an :class:`shapely.STRtree` query, never from all pairs. Where a tile's
   window splits an object in two (the arms of a U whose base it does not see), the
   neighbour's piece is compared with the split parts together.
3. **Groups.** Matching pairs are joined with union-find, strongest IoU first, in three
   rounds by how specific the pieces are: *parts* first, then *window* pieces (covering
   their whole read window: inside a lake larger than the tile), then *holders*
   (masks holding another, smaller mask of their tile: a roof and its planes, or
   everything a tile shows), so the finest masks decide what is one object and wholes
   take the tiles still free. A join is refused when both groups hold a piece of the
   same tile, unless both pieces are cut by that tile's window and do not overlap (the
   split arms above): a tile that saw an object whole saw it once. This keeps a mask
   of two neighbouring objects (or a part of an object) from chaining distinct objects
   together; the rounds keep a whole window, which matches every neighbour because it
   fills every seam, from taking the tile of the object's own piece.

4. **One geometry per group.**

   * With a complete piece: the complete piece seen most centrally (largest distance,
     in scene pixels, from its box to the interior sides of its read window; then the
     highest score) is the object, unchanged. Other tiles' versions are dropped.
   * Only truncated pieces (an object larger than a tile, or seen whole by no tile): a
     mosaic. Inside the core of a tile that has a piece in the group, that tile's
     piece decides; outside every such core, the union of the pieces. Cores partition
     the scene, so there is no double boundary, and a region no member's tile owns is
     still covered by whoever saw it.

5. **Ownership.** Cores partition the scene and every tile sees its whole core, so the
   tile owning a place has always seen it. An object is kept only when the tiles that
   contributed to its group own at least ``min_owned`` (half, by default) of its area.
   Otherwise the owners of most of it looked and found no such object: typically a
   mask that runs on, past the object, into the halo up to the read-window edge (where
   its tile lacks context), or a fragment seen only in a neighbour's halo. A truncated
   piece that matched nothing is therefore kept when it lies mostly in its own tile's
   core (cut where its read window ends: the best view there is), and dropped when it
   lies mostly in a place another tile owns.

6. **Wholes that cut objects.** An object assembled only from window pieces and
   holders, all cut by their read windows (no tile saw it whole), that holds part of
   another object, but not all of it, and does not lie in
   it, is dropped: masks nest or keep apart, and a mask made of a part of an object
   and the ground beside it (an arm of a large object with the background next to it,
   a tile's whole window) is not an object. Of two crossing masks the more specific
   one stays.

7. **Duplicates.** Objects that still overlap with IoU above ``nms_iou`` (the same
   object from tiles whose views disagreed too much to match) are reduced to the one
   with the highest score (greedy non-maximum suppression on polygon IoU).

Objects are returned in reading order of their representative points (top to bottom,
then left to right in scene pixels), which gives stable ids across reruns.

Cost: one STRtree over the pieces, vectorized shapely intersections per candidate pair
(pairs exist only in tile overlaps), a near-linear union-find and one union per
mosaicked group: 20,000 objects stitch in seconds (``benchmarks/stitch_scaling.py``).
No raster of the scene is ever made.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely
from affine import Affine

from sam_geo.errors import ConfigError
from sam_geo.settings import DEFAULT_MATCH_IOU
from sam_geo.geo.tiles import PixelBox, Tile

__all__ = [
    "BOTTOM",
    "greedy_suppression",
    "LEFT",
    "RIGHT",
    "TOP",
    "Piece",
    "SeamBuffer",
    "StitchedObjects",
    "interior_sides",
    "piece_from_geometry",
    "pixel_bounds",
    "stitch",
]

TOP, LEFT, BOTTOM, RIGHT = 1, 2, 4, 8
"""Bits of :attr:`Piece.edges`: sides of a tile's read window."""

DEFAULT_NMS_IOU = 0.7
"""Final duplicate suppression: polygon IoU above which the lower-scored object goes."""

DEFAULT_MIN_OWNED = 0.5
"""Share of an object's area that the cores of its own tiles must hold for it to be kept."""

DEFAULT_EDGE_MARGIN_PX = 4.0
"""A piece closer than this (scene pixels) to an interior read-window side is truncated."""

CONTAINED_SHARE = 0.9
"""Share of a smaller piece's area inside a larger piece of the same tile at which the
larger one counts as a whole made of parts (it is grouped after the parts)."""

APART_SHARE = 0.01
"""Two pieces of one tile overlapping by at most this share of the smaller one's area
do not overlap (:func:`_same_tile_clash`)."""

WINDOW_SHARE = 0.98
"""A piece covering this share of its read window is a window piece (:func:`_whole_kinds`)."""

PART, WINDOW, HOLDER = 0, 1, 2
"""Kinds of piece, from most to least specific (:func:`_whole_kinds`)."""

CROSSING_SHARE = 0.1
"""An object made only of wholes that holds between this and 1 - this of another
object's area (and does not lie inside it) cuts through it and is dropped."""

SLIVER_PX = 0.5
"""Parts of a mosaic of this many scene pixels or fewer are slivers left by the seams
of cores (floating point), not parts of the object: dropped."""

_SEAM_EPS_PX = 1e-3
"""Cores are grown by this many pixels in mosaics, so pieces clipped on both sides of a
core boundary overlap by a hair and their union has no floating-point gap."""


@dataclass(frozen=True, slots=True)
class Piece:
    """One mask of one tile, as a polygon: the unit stitching works on (picklable).

    ``wkb``: the polygon in the scene CRS; ``score``: SAM's predicted IoU;
    ``stability``: SAM's stability score; ``bbox``: ``(row0, col0, row1, col1)`` of the
    polygon in scene pixels (half-open, full resolution); ``edges``: bits
    (:data:`TOP`, :data:`LEFT`, :data:`BOTTOM`, :data:`RIGHT`) of the read-window sides
    facing another tile that the piece reaches, 0 for a complete piece.
    """

    wkb: bytes
    score: float
    stability: float
    bbox: tuple[float, float, float, float]
    edges: int = 0

    @property
    def truncated(self) -> bool:
        return self.edges != 0


@dataclass
class StitchedObjects:
    """Stitched objects as parallel arrays, in reading order (see module docs).

    ``geometry``: (Multi)Polygons in the scene CRS, holes kept; ``score`` and
    ``stability``: the chosen piece's, or the area-weighted mean over a mosaic's
    pieces; ``n_tiles``: tiles that saw the object (pieces in its group); ``stats``:
    counts of the stitching steps (pieces, pairs tested, matches, joins, groups,
    mosaics, objects dropped by the ownership rule, suppressed duplicates).
    """

    geometry: np.ndarray
    score: np.ndarray
    stability: np.ndarray
    n_tiles: np.ndarray
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.geometry)

    def take(self, rows: np.ndarray) -> StitchedObjects:
        return StitchedObjects(
            self.geometry[rows], self.score[rows], self.stability[rows], self.n_tiles[rows], dict(self.stats)
        )


# --- building pieces -------------------------------------------------------------------


def interior_sides(tile: Tile, scene_shape: tuple[int, int]) -> int:
    """Bits of the sides of ``tile``'s read window beyond which the scene goes on.

    ``scene_shape`` is (rows, cols) of the full-resolution scene. A read window at the
    scene's edge has no tile beyond that side, so a mask touching it is complete there.
    """
    rows, cols = scene_shape
    read = tile.read
    bits = 0
    bits |= TOP if read.row_start > 0 else 0
    bits |= LEFT if read.col_start > 0 else 0
    bits |= BOTTOM if read.row_stop < rows else 0
    bits |= RIGHT if read.col_stop < cols else 0
    return bits


def pixel_bounds(geom: shapely.Geometry, transform: Affine) -> tuple[float, float, float, float]:
    """``(row0, col0, row1, col1)`` of a geometry in the pixels of ``transform``.

    Exact for any affine (rotated or sheared): the geometry's vertices are mapped back
    to pixel coordinates and their extent taken.
    """
    coords = shapely.get_coordinates(geom)
    inverse = ~transform
    cols = inverse.a * coords[:, 0] + inverse.b * coords[:, 1] + inverse.c
    rows = inverse.d * coords[:, 0] + inverse.e * coords[:, 1] + inverse.f
    return float(rows.min()), float(cols.min()), float(rows.max()), float(cols.max())


def piece_from_geometry(
    geom: shapely.Geometry,
    tile: Tile,
    scene_shape: tuple[int, int],
    *,
    score: float = 1.0,
    stability: float = 1.0,
    edge_margin: float = DEFAULT_EDGE_MARGIN_PX,
) -> Piece | None:
    """A :class:`Piece` of ``tile`` from a polygon in the scene CRS (None when empty).

    ``edge_margin`` (scene pixels): a polygon whose box comes this close to an interior
    side of the read window is truncated on that side. SAM's masks come from 256 x 256
    logits, so an object cut by the window edge may stop a few pixels short of it.
    """
    if geom is None or geom.is_empty or geom.area <= 0:
        return None
    bbox = pixel_bounds(geom, tile.scene_transform)
    row0, col0, row1, col1 = bbox
    read = tile.read
    touching = 0
    touching |= TOP if row0 <= read.row_start + edge_margin else 0
    touching |= LEFT if col0 <= read.col_start + edge_margin else 0
    touching |= BOTTOM if row1 >= read.row_stop - edge_margin else 0
    touching |= RIGHT if col1 >= read.col_stop - edge_margin else 0
    edges = touching & interior_sides(tile, scene_shape)
    return Piece(shapely.to_wkb(geom), float(score), float(stability), bbox, edges)


# --- the piece table -------------------------------------------------------------------


@dataclass
class _Table:
    """All pieces as arrays, ordered by tile key then by position in the tile."""

    geoms: np.ndarray
    tile: np.ndarray  # index into tiles
    score: np.ndarray
    stability: np.ndarray
    edges: np.ndarray
    bbox: np.ndarray  # (n, 4) row0, col0, row1, col1 in scene px
    margin: np.ndarray  # scene px from the box to the nearest interior read side
    tiles: list[Tile]
    read_polys: np.ndarray
    core_polys: np.ndarray
    grown_cores: np.ndarray
    read_boxes: np.ndarray  # (tiles, 4) scene px
    core_boxes: np.ndarray
    kind: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))  # see _whole_kinds

    @property
    def complete(self) -> np.ndarray:
        return self.edges == 0


def _box_polygon(box: PixelBox, transform: Affine) -> shapely.Geometry:
    """A pixel box as a polygon in the CRS of ``transform`` (exact for rotations)."""
    corners = [
        (box.col_start, box.row_start),
        (box.col_stop, box.row_start),
        (box.col_stop, box.row_stop),
        (box.col_start, box.row_stop),
    ]
    return shapely.Polygon([transform * c for c in corners])


def _extent(tiles: Sequence[Tile]) -> PixelBox:
    """The pixel box all read windows together cover (the scene, for a whole grid)."""
    return PixelBox(
        min(t.read.row_start for t in tiles),
        min(t.read.col_start for t in tiles),
        max(t.read.row_stop for t in tiles),
        max(t.read.col_stop for t in tiles),
    )


def _margins(bbox: np.ndarray, tiles: list[Tile], tile_index: np.ndarray, extent: PixelBox | None) -> np.ndarray:
    """Distance (scene px) from each box to the nearest read side facing another tile.

    Sides at the edge of ``extent`` (default: the tiles' own extent) face nothing and
    count as infinitely far.
    """
    if len(bbox) == 0:
        return np.zeros(0)
    extent = extent or _extent(tiles)
    read = np.array([[t.read.row_start, t.read.col_start, t.read.row_stop, t.read.col_stop] for t in tiles])
    r = read[tile_index]
    inf = np.inf
    top = np.where(r[:, 0] > extent.row_start, bbox[:, 0] - r[:, 0], inf)
    left = np.where(r[:, 1] > extent.col_start, bbox[:, 1] - r[:, 1], inf)
    bottom = np.where(r[:, 2] < extent.row_stop, r[:, 2] - bbox[:, 2], inf)
    right = np.where(r[:, 3] < extent.col_stop, r[:, 3] - bbox[:, 3], inf)
    return np.minimum.reduce([top, left, bottom, right])


def _build_table(parts: Iterable[tuple[Tile, Sequence[Piece]]], extent: PixelBox | None = None) -> _Table:
    """Collect the pieces (tiles sorted by key, so the result does not depend on the
    order tiles finished in), repair invalid polygons and drop empty ones."""
    by_key = {tile.key: (tile, list(pieces)) for tile, pieces in parts}
    tiles = [by_key[k][0] for k in sorted(by_key)]
    records = [(i, p) for i, t in enumerate(tiles) for p in by_key[t.key][1]]
    geoms = np.asarray(shapely.from_wkb([p.wkb for _, p in records]) if records else [], dtype=object)
    if len(geoms):
        invalid = ~shapely.is_valid(geoms)
        geoms[invalid] = shapely.make_valid(geoms[invalid])
    usable = shapely.area(geoms) > 0 if len(geoms) else np.zeros(0, dtype=bool)
    records = [r for r, ok in zip(records, usable) if ok]
    geoms = geoms[usable]
    tile_index = np.array([i for i, _ in records], dtype=np.int64)
    bbox = np.array([p.bbox for _, p in records], dtype=np.float64).reshape(-1, 4)
    eps = _SEAM_EPS_PX
    table = _Table(
        geoms=geoms,
        tile=tile_index,
        score=np.array([p.score for _, p in records], dtype=np.float64),
        stability=np.array([p.stability for _, p in records], dtype=np.float64),
        edges=np.array([p.edges for _, p in records], dtype=np.int64),
        bbox=bbox,
        margin=_margins(bbox, tiles, tile_index, extent),
        tiles=tiles,
        read_polys=np.array([_box_polygon(t.read, t.scene_transform) for t in tiles], dtype=object),
        core_polys=np.array([_box_polygon(t.core, t.scene_transform) for t in tiles], dtype=object),
        grown_cores=np.array([_box_polygon(t.core.buffer(eps), t.scene_transform) for t in tiles], dtype=object),
        read_boxes=_boxes([t.read for t in tiles]),
        core_boxes=_boxes([t.core for t in tiles]),
    )
    table.kind = _whole_kinds(table)
    return table


def _boxes(boxes: list[PixelBox]) -> np.ndarray:
    """(n, 4) array of row0, col0, row1, col1."""
    rows = [[b.row_start, b.col_start, b.row_stop, b.col_stop] for b in boxes]
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def _clipped_areas(geoms: np.ndarray, bbox: np.ndarray, windows: np.ndarray, polygons: np.ndarray) -> np.ndarray:
    """Area of each geometry inside its window (pixel box + the same box as a CRS polygon).

    Geometries whose pixel box lies inside (or outside) the window need no overlay,
    which is most of them: only the others are intersected.
    """
    inside = (bbox[:, 0] >= windows[:, 0]) & (bbox[:, 1] >= windows[:, 1])
    inside &= (bbox[:, 2] <= windows[:, 2]) & (bbox[:, 3] <= windows[:, 3])
    outside = (bbox[:, 0] >= windows[:, 2]) | (bbox[:, 1] >= windows[:, 3])
    outside |= (bbox[:, 2] <= windows[:, 0]) | (bbox[:, 3] <= windows[:, 1])
    areas = np.where(inside, shapely.area(geoms), 0.0)
    cut = ~inside & ~outside
    areas[cut] = shapely.area(shapely.intersection(geoms[cut], polygons[cut]))
    return areas


# --- matching and grouping -------------------------------------------------------------


def _candidate_pairs(table: _Table) -> _Pairs:
    """Pairs of intersecting pieces from different tiles, and their IoU in the zone both
    tiles see. Each pair once (left < right)."""
    geoms = table.geoms
    if len(geoms) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return _Pairs(empty, empty, np.zeros(0))
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    keep = (left < right) & (table.tile[left] != table.tile[right])
    left, right = left[keep], right[keep]
    zones, zone_boxes = _shared_zones(table, table.tile[left], table.tile[right])
    a = _clipped_areas(geoms[left], table.bbox[left], zone_boxes, zones)
    b = _clipped_areas(geoms[right], table.bbox[right], zone_boxes, zones)
    inter = shapely.area(shapely.intersection(geoms[left], geoms[right]))
    union = a + b - inter
    iou = np.divide(inter, union, out=np.zeros_like(union), where=union > 0)
    iou = np.maximum(iou, _split_iou(table, left, right, a, b, inter))
    return _Pairs(left, right, iou)


def _split_iou(
    table: _Table, left: np.ndarray, right: np.ndarray, a: np.ndarray, b: np.ndarray, inter: np.ndarray
) -> np.ndarray:
    """Per pair, the IoU in the shared zone of one piece against *all* the pieces of the
    other's tile that it meets, when those are split parts of one object.

    A tile whose window cuts a U below its base sees two arms, both cut by its window;
    the neighbour that sees the base returns one piece, whose IoU with each arm alone
    is about one half. Against the arms together it is high. The parts are the other
    tile's pieces lying mostly (over half their area in the zone) in the piece; they
    count as split when there are two or more, all cut by their window and not
    overlapping (the sum of their areas exceeds the area of their union by at most
    :data:`APART_SHARE`); otherwise 0 is returned for the pair. ``a``, ``b``: areas of
    the left and right pieces in the zone; ``inter``: their intersection's area.
    """
    out = np.zeros(len(left))
    if len(left) == 0:
        return out
    # both directions: (piece, other tile's piece)
    piece = np.concatenate([left, right])
    other = np.concatenate([right, left])
    piece_area, other_area = np.concatenate([a, b]), np.concatenate([b, a])
    inter2, row = np.concatenate([inter, inter]), np.concatenate([np.arange(len(left))] * 2)
    key = piece * len(table.tiles) + table.tile[other]
    order = np.argsort(key, kind="stable")
    starts = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(order)]):
        rows = order[start:stop]
        rows = rows[inter2[rows] > 0.5 * other_area[rows]]  # parts lying mostly in the piece
        if len(rows) < 2 or not table.edges[other[rows]].all():
            continue
        parts = table.geoms[other[rows]]
        if shapely.area(parts).sum() > (1.0 + APART_SHARE) * shapely.area(shapely.union_all(parts)):
            continue
        union = piece_area[rows[0]] + other_area[rows].sum() - inter2[rows].sum()
        if union > 0:
            out[row[rows]] = np.maximum(out[row[rows]], inter2[rows].sum() / union)
    return out


@dataclass
class _Pairs:
    """Candidate pairs (left < right, different tiles, intersecting) and their IoU inside
    the zone both tiles see."""

    left: np.ndarray
    right: np.ndarray
    iou: np.ndarray


def _shared_zones(table: _Table, tiles_a: np.ndarray, tiles_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection of two tiles' read windows per pair, as CRS polygons and pixel boxes
    (each tile pair computed once)."""
    if len(tiles_a) == 0:
        return np.zeros(0, dtype=object), np.zeros((0, 4))
    pairs = np.stack([np.minimum(tiles_a, tiles_b), np.maximum(tiles_a, tiles_b)], axis=1)
    unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
    zones = shapely.intersection(table.read_polys[unique[:, 0]], table.read_polys[unique[:, 1]])
    ra, rb = table.read_boxes[unique[:, 0]], table.read_boxes[unique[:, 1]]
    boxes = np.concatenate([np.maximum(ra[:, :2], rb[:, :2]), np.minimum(ra[:, 2:], rb[:, 2:])], axis=1)
    inverse = inverse.reshape(-1)
    return zones[inverse], boxes[inverse]


def _same_tile_clash(table: _Table, group_a: list[int], group_b: list[int]) -> bool:
    """Whether two groups hold pieces of one tile that cannot be parts of one object.

    Two pieces of one tile may be parts of one object only when both are cut by the
    tile's read window (the tile did not see where they meet, as for the two arms of
    a U crossing its edge) and they overlap by at most :data:`APART_SHARE` of the
    smaller one. A tile that saw a piece whole has seen one object, so it never gives
    two pieces of it.
    """
    for a in group_a:
        for b in group_b:
            if table.tile[a] != table.tile[b]:
                continue
            if not (table.edges[a] and table.edges[b]):
                return True
            smaller = min(table.geoms[a].area, table.geoms[b].area)
            if shapely.intersection(table.geoms[a], table.geoms[b]).area > APART_SHARE * smaller:
                return True
    return False


def _whole_kinds(table: _Table, inside: float = CONTAINED_SHARE, window: float = WINDOW_SHARE) -> np.ndarray:
    """Per piece, how little it says about one object: :data:`PART`, :data:`WINDOW` or
    :data:`HOLDER` (int8).

    A *holder* holds another, smaller piece of its own tile (at least ``inside`` of the
    other's area lies in it: a roof and its planes, a shape with the ground beside it,
    everything the tile shows). A *window* piece holds nothing but covers at least
    ``window`` of its read window (inside a lake or a field larger than the tile).
    Anything else is a *part*. Pieces are grouped in this order (:func:`_group`), and
    objects made only of windows and holders may not cut through other objects
    (:func:`_crossing_wholes`).
    """
    geoms = table.geoms
    kinds = np.full(len(geoms), PART, dtype=np.int8)
    if len(geoms) == 0:
        return kinds
    area = shapely.area(geoms)
    kinds[area >= window * shapely.area(table.read_polys[table.tile])] = WINDOW
    outer, inner = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    same = (outer != inner) & (table.tile[outer] == table.tile[inner])
    outer, inner = outer[same], inner[same]
    smaller = area[inner] < area[outer]
    outer, inner = outer[smaller], inner[smaller]
    shared = shapely.area(shapely.intersection(geoms[outer], geoms[inner]))
    kinds[outer[shared >= inside * area[inner]]] = HOLDER
    return kinds


def _group(table: _Table, pairs: _Pairs, match_iou: float) -> tuple[np.ndarray, dict[str, int]]:
    """Group id per piece: union-find over matching pairs, strongest first.

    Pairs of parts join first, so that the finest masks decide which pieces are one
    object; pairs with a window piece next, pairs with a holder last, where their
    tiles are still free (:func:`_whole_kinds`). A join is refused when the two groups
    hold pieces of one tile that cannot be parts of one object
    (:func:`_same_tile_clash`). Returns the ids and the counts of joins and refusals.
    """
    n = len(table.geoms)
    parent = list(range(n))
    members: dict[int, list[int]] = {}

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    matched = pairs.iou >= match_iou
    left, right, iou = pairs.left[matched], pairs.right[matched], pairs.iou[matched]
    late = np.maximum(table.kind[left], table.kind[right])
    order = np.lexsort((right, left, -iou, late))
    counts = {"joins": 0, "refused_same_tile": 0}
    for a, b in zip(left[order].tolist(), right[order].tolist()):
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        ma, mb = members.get(ra) or [ra], members.get(rb) or [rb]
        if _same_tile_clash(table, ma, mb):
            counts["refused_same_tile"] += 1
            continue
        if len(ma) < len(mb):  # union by size
            ra, rb, ma, mb = rb, ra, mb, ma
        parent[rb] = ra
        members[ra] = ma + mb
        members.pop(rb, None)
        counts["joins"] += 1
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1].reshape(-1), counts


# --- one geometry per group ------------------------------------------------------------


def _mosaic(table: _Table, members: np.ndarray) -> tuple[shapely.Geometry | None, np.ndarray]:
    """Geometry of a group of truncated pieces, and each member's contributed area.

    Inside the core of a member's tile that tile's piece decides; outside all member
    cores, the union of the pieces (see module docs).
    """
    geoms = table.geoms[members]
    member_tiles = np.unique(table.tile[members])
    member_cores = shapely.union_all(table.core_polys[member_tiles])
    owned = shapely.intersection(geoms, table.grown_cores[table.tile[members]])
    unowned = shapely.difference(geoms, member_cores)
    contributions = shapely.area(owned) + shapely.area(unowned)
    merged = shapely.union_all(np.concatenate([owned, unowned]))
    pixel_area = abs(table.tiles[0].scene_transform.determinant)
    return _polygonal(merged, SLIVER_PX * pixel_area), contributions


def _polygonal(geom: shapely.Geometry, min_area: float = 0.0) -> shapely.Geometry | None:
    """The polygonal part of a geometry (valid), without parts of ``min_area`` or less
    (CRS units), or None when nothing is left."""
    if geom is None or geom.is_empty:
        return None
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    parts = [p for p in shapely.get_parts(geom) if isinstance(p, shapely.Polygon) and p.area > min_area]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def _owned_share(table: _Table, group_tiles: np.ndarray, geometry: np.ndarray, bbox: np.ndarray) -> np.ndarray:
    """Per group, the share of its geometry inside the cores of the tiles in the group.

    ``group_tiles``: unique (group, tile) rows; ``bbox``: each group geometry's pixel
    box. Cores are disjoint, so the owned area is the sum over the group's tiles.
    Groups without geometry get 0.
    """
    has = np.array([g is not None for g in geometry], dtype=bool)
    pairs = group_tiles[has[group_tiles[:, 0]]]
    g, t = pairs[:, 0], pairs[:, 1]
    owned = _clipped_areas(geometry[g], bbox[g], table.core_boxes[t], table.core_polys[t])
    total = np.zeros(len(geometry))
    total[has] = shapely.area(geometry[has])
    owned_sum = np.bincount(g, weights=owned, minlength=len(geometry))
    return np.divide(owned_sum, total, out=np.zeros_like(total), where=total > 0)


def _assemble(
    table: _Table, group: np.ndarray, min_owned: float
) -> tuple[StitchedObjects, dict[str, int], np.ndarray]:
    """One object per group, kept when its own tiles own enough of it (module docs, 4-5).

    Also returns, per kept object, whether it is made only of wholes
    (:func:`_whole_kinds`) all cut by their windows (no tile saw it whole)."""
    n_groups = int(group.max()) + 1 if len(group) else 0
    # Best piece per group first: complete, most central, highest score, then order.
    order = np.lexsort((np.arange(len(group)), -table.score, -table.margin, ~table.complete, group))
    first = order[np.r_[True, group[order][1:] != group[order][:-1]]] if len(order) else order
    sizes = np.bincount(group, minlength=n_groups)
    group_tiles = np.unique(np.stack([group, table.tile], axis=1), axis=0)  # (group, tile) rows
    tiles_per_group = np.bincount(group_tiles[:, 0], minlength=n_groups).astype(np.int64)

    geometry = np.empty(n_groups, dtype=object)
    bbox = table.bbox[first].copy()
    score = table.score[first].copy()
    stability = table.stability[first].copy()
    keep = np.ones(n_groups, dtype=bool)
    stats = {"mosaics": 0, "disowned": 0}

    has_complete = table.complete[first]
    geometry[has_complete | (sizes == 1)] = table.geoms[first[has_complete | (sizes == 1)]]
    members_of = np.split(order, np.cumsum(sizes)[:-1]) if len(order) else []
    for g in np.flatnonzero(~has_complete & (sizes > 1)):
        members = members_of[g]
        geom, weights = _mosaic(table, members)
        stats["mosaics"] += 1
        if geom is None:
            keep[g] = False
            continue
        geometry[g] = geom
        bbox[g] = pixel_bounds(geom, table.tiles[0].scene_transform)
        if weights.sum() > 0:
            score[g] = float(np.average(table.score[members], weights=weights))
            stability[g] = float(np.average(table.stability[members], weights=weights))
    owned = _owned_share(table, group_tiles, geometry, bbox)
    disowned = keep & (owned < min_owned)
    keep &= ~disowned
    stats["disowned"] = int(disowned.sum())
    objects = StitchedObjects(geometry, score, stability, tiles_per_group)
    wholes = (np.bincount(group, weights=table.kind == PART, minlength=n_groups) == 0) & ~has_complete
    rows = np.flatnonzero(keep)
    return objects.take(rows), stats, wholes[rows]


def _crossing_wholes(objects: StitchedObjects, wholes: np.ndarray, cut: float = CROSSING_SHARE) -> np.ndarray:
    """Rows of objects made only of cut wholes (``wholes``) that cut through another object.

    A whole W cuts object P when W holds part of P but not all of it (between ``cut``
    and ``1 - cut`` of P's area, or P's part is at least ``cut`` of W's area and less
    than ``1 - cut`` of P), while W does not lie (90 % or more) inside P. Masks nest or
    keep apart; a mask that holds part of an object and the ground beside it is not an
    object (a tile's whole window, a part of a large object with the background next
    to it). Only objects assembled purely from wholes are judged, and only against
    objects with a finer piece, so of two crossing masks the more specific one stays.
    """
    geoms = objects.geometry
    if len(geoms) < 2 or not wholes.any():
        return np.zeros(0, dtype=np.int64)
    whole, other = shapely.STRtree(geoms).query(geoms[wholes], predicate="intersects")
    whole = np.flatnonzero(wholes)[whole]
    keep = ~wholes[other]
    whole, other = whole[keep], other[keep]
    area = shapely.area(geoms)
    shared = shapely.area(shapely.intersection(geoms[whole], geoms[other]))
    of_other, of_whole = shared / area[other], shared / area[whole]
    partial = (of_other <= 1.0 - cut) & ((of_other >= cut) | (of_whole >= cut))
    crossing = partial & (of_whole < CONTAINED_SHARE)
    return np.unique(whole[crossing])


def _suppress_duplicates(objects: StitchedObjects, nms_iou: float) -> np.ndarray:
    """Rows kept by greedy NMS on polygon IoU (highest score first, ties by row)."""
    return greedy_suppression(objects.geometry, objects.score, nms_iou, overlap="iou")


def greedy_suppression(
    geoms: np.ndarray, score: np.ndarray, threshold: float, *, overlap: str = "iou"
) -> np.ndarray:
    """Rows kept by greedy non-maximum suppression on polygons, sorted ascending.

    Objects are visited by descending ``score`` (ties: larger area first, then row); one
    that is not yet suppressed is kept and suppresses every other object overlapping it
    by more than ``threshold``, measured as polygon IoU (``overlap="iou"``: duplicates)
    or as the share of the *smaller* polygon's area inside the other (``"ios"``,
    intersection over smaller: nested masks, SAM's part and whole of one object).
    A suppressed object suppresses nothing, so of a chain whole > part > sub-part with
    the whole best scored, the sub-part survives when it is not nested in the whole.
    Candidate pairs come from an STR-tree, so the cost grows with the pairs that touch.
    """
    n = len(geoms)
    if n < 2:
        return np.arange(n)
    if overlap not in ("iou", "ios"):
        raise ValueError(f"overlap must be 'iou' or 'ios', got {overlap!r}")
    area = shapely.area(geoms)
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pairs = left < right
    left, right = left[pairs], right[pairs]
    inter = shapely.area(shapely.intersection(geoms[left], geoms[right]))
    if overlap == "iou":
        over = inter > threshold * (area[left] + area[right] - inter)
    else:
        over = inter >= threshold * np.minimum(area[left], area[right])
    left, right = left[over], right[over]
    neighbours: dict[int, list[int]] = {}
    for a, b in zip(left.tolist(), right.tolist()):
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    suppressed = np.zeros(n, dtype=bool)
    for i in np.lexsort((np.arange(n), -area, -np.asarray(score, dtype=np.float64))).tolist():
        if suppressed[i]:
            continue
        for j in neighbours.get(i, ()):
            suppressed[j] = True
    return np.flatnonzero(~suppressed)


def _reading_order(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Rows sorted by representative point: scene row, then column (pixels)."""
    if len(geoms) == 0:
        return np.zeros(0, dtype=np.int64)
    xy = shapely.get_coordinates(shapely.point_on_surface(geoms))
    inverse = ~transform
    cols = inverse.a * xy[:, 0] + inverse.b * xy[:, 1] + inverse.c
    rows = inverse.d * xy[:, 0] + inverse.e * xy[:, 1] + inverse.f
    return np.lexsort((cols, rows))


# --- entry point -----------------------------------------------------------------------


def stitch(
    parts: Iterable[tuple[Tile, Sequence[Piece]]],
    *,
    match_iou: float = DEFAULT_MATCH_IOU,
    nms_iou: float = DEFAULT_NMS_IOU,
    min_owned: float = DEFAULT_MIN_OWNED,
    extent: PixelBox | None = None,
) -> StitchedObjects:
    """Stitch the pieces of overlapping tiles into one polygon per object.

    Args:
        parts: ``(tile, pieces)`` for each tile (in any order; a tile without pieces may
            be left out, but should be given when it was segmented, since its read
            window bounds where neighbours are complete). All tiles share one scene
            affine; pieces are in the scene CRS.
        match_iou: IoU (0-1], inside the zone two read windows share, at or above
            which two pieces from different tiles are one object.
        nms_iou: objects overlapping another of higher score with polygon IoU above
            this (0-1] are dropped as duplicates.
        min_owned: share [0, 1] of an object's area that the cores of the tiles in its
            group must hold for it to be kept (0 keeps every object).
        extent: the pixel box the whole grid covers (the scene), when ``parts`` hold
            only some of its tiles (a :class:`SeamBuffer`'s closed clusters); default:
            the extent of the tiles given.

    Returns:
        :class:`StitchedObjects` in reading order. See the module docs for the rule.

    Raises:
        ConfigError: a threshold outside (0, 1].
    """
    for name, value in (("match IoU", match_iou), ("NMS IoU", nms_iou)):
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"stitching {name} must be in (0, 1], got {value}")
    if not 0.0 <= min_owned <= 1.0:
        raise ConfigError(f"stitching min owned share must be in [0, 1], got {min_owned}")
    table = _build_table(parts, extent)
    pairs = _candidate_pairs(table)
    group, counts = _group(table, pairs, match_iou)
    objects, stats, wholes = _assemble(table, group, min_owned)
    crossing = _crossing_wholes(objects, wholes)
    objects = objects.take(np.setdiff1d(np.arange(len(objects)), crossing))
    kept = _suppress_duplicates(objects, nms_iou)
    stats.update(
        pieces=len(table.geoms),
        pairs=len(pairs.iou),
        matches=int((pairs.iou >= match_iou).sum()),
        **counts,
        groups=int(group.max()) + 1 if len(group) else 0,
        crossing_wholes=len(crossing),
        duplicates_suppressed=len(objects) - len(kept),
    )
    objects = objects.take(kept)
    transform = table.tiles[0].scene_transform if table.tiles else Affine.identity()
    objects = objects.take(_reading_order(objects.geometry, transform))
    objects.stats = stats
    return objects


# --- streaming -------------------------------------------------------------------------


class SeamBuffer:
    """One grid's tile pieces held until no tile still running can change their objects.

    Pieces whose boxes meet, directly or through other pieces, form a *cluster*. Every
    step of :func:`stitch` (candidate pairs, groups, ownership, duplicates, and the
    nested filter after it) relates pieces whose boxes meet, so a cluster is stitched
    alone exactly as within the whole grid. A cluster is *closed* when no box of its
    pieces meets the read window of a tile that has not come back: no later piece can
    join it. :meth:`pop_closed` hands out the closed clusters and forgets them, so the
    buffer holds only pieces near unfinished tiles (and clusters chained to them: in a
    scene covered by touching masks that can be much of it).

    Args:
        tiles: every tile of the grid (descriptors only) by the key its pieces will come
            with (:meth:`add`).
    """

    def __init__(self, tiles: dict[str, Tile]) -> None:
        self.tiles = dict(tiles)
        self.extent = _extent(list(self.tiles.values()))
        self.unfinished = set(self.tiles)
        self.pending: dict[str, list[Piece]] = {}

    @property
    def done(self) -> bool:
        """Every tile came back."""
        return not self.unfinished

    def add(self, tile_key: str, pieces: Sequence[Piece]) -> None:
        """A tile came back (a failed tile with no pieces too)."""
        self.unfinished.discard(tile_key)
        if pieces:
            self.pending[tile_key] = list(pieces)

    def pop_closed(self) -> list[tuple[Tile, list[Piece]]]:
        """The pieces of every closed cluster, by tile, removed from the buffer."""
        keys = [k for k, pieces in self.pending.items() for _ in pieces]
        if not keys:
            return []
        flat = [p for pieces in self.pending.values() for p in pieces]
        boxes = np.array([p.bbox for p in flat], dtype=np.float64)
        cluster = _touching_clusters(boxes)
        blocked = self._near_unfinished(boxes)
        open_clusters = np.unique(cluster[blocked])
        closed = ~np.isin(cluster, open_clusters)
        out: dict[str, list[Piece]] = {}
        kept: dict[str, list[Piece]] = {}
        for key, piece, is_closed in zip(keys, flat, closed):
            (out if is_closed else kept).setdefault(key, []).append(piece)
        self.pending = kept
        return [(self.tiles[k], pieces) for k, pieces in out.items()]

    def _near_unfinished(self, boxes: np.ndarray) -> np.ndarray:
        """(n,) bool: the box meets the read window of a tile not back yet."""
        if not self.unfinished:
            return np.zeros(len(boxes), dtype=bool)
        reads = [self.tiles[k].read for k in self.unfinished]
        windows = shapely.box(*_boxes(reads)[:, [1, 0, 3, 2]].T)
        hits, _ = shapely.STRtree(windows).query(shapely.box(*boxes[:, [1, 0, 3, 2]].T), predicate="intersects")
        blocked = np.zeros(len(boxes), dtype=bool)
        blocked[hits] = True
        return blocked


def _touching_clusters(boxes: np.ndarray) -> np.ndarray:
    """(n,) cluster label of each ``(row0, col0, row1, col1)`` box: connected components
    of the boxes that meet (touching counts)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    geoms = shapely.box(*boxes[:, [1, 0, 3, 2]].T)
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(len(boxes), len(boxes)))
    return connected_components(graph, directed=False)[1]
