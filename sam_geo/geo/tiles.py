"""Immutable tile grid over a scene.

A scene of ``height x width`` pixels is cut into tiles. Each :class:`Tile` knows

* its **read window**: the scene pixels handed to the model (``tile_size`` square, or
  the whole scene along an axis shorter than ``tile_size``);
* its **core window**: the part of the scene it *owns*. Core windows partition the scene
  (every pixel belongs to exactly one core); the band between core and read window is
  the tile's **halo** (at least ``overlap`` pixels on every side that faces another tile,
  zero on sides at the scene edge);
* its **affine transform**: pixel (col, row) of the tile array to scene CRS x/y. For a
  downsampled tile (:meth:`TileGrid.window_tile` on a box larger than a tile) the array
  is smaller than the read window and the transform is scaled accordingly.

Layout along one axis of length ``n`` with tile size ``T``, overlap ``o`` and stride
``s = T - 2*o``: read windows start at ``min(k*s, n - T)`` for ``k = 0, 1, ...`` (the
last one is shifted back inside the scene, so every read window is a full ``T`` pixels
when ``n >= T``); core boundaries sit in the middle of the band two neighbouring read
windows share. Units are pixels of the full-resolution scene throughout; axis order is
(row, col) unless a name says x/y.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from affine import Affine
from rasterio.windows import Window

from sam_geo.errors import ConfigError
from sam_geo.settings import DEFAULT_OVERLAP, DEFAULT_TILE_SIZE

ZOOMS = (1, 2, 4)
"""Allowed zoom factors: model pixels per scene pixel (upsampling for small objects)."""


@dataclass(frozen=True, slots=True)
class PixelBox:
    """A half-open box of scene pixels ``[row_start, row_stop) x [col_start, col_stop)``.

    Coordinates may be fractional (prompt boxes) or whole (windows). Degenerate boxes
    (zero height or width) are allowed and describe a point or a line.
    """

    row_start: float
    col_start: float
    row_stop: float
    col_stop: float

    @property
    def height(self) -> float:
        return self.row_stop - self.row_start

    @property
    def width(self) -> float:
        return self.col_stop - self.col_start

    @property
    def center(self) -> tuple[float, float]:
        """(row, col) of the box centre."""
        return (self.row_start + self.row_stop) / 2, (self.col_start + self.col_stop) / 2

    def contains(self, other: PixelBox) -> bool:
        return (
            self.row_start <= other.row_start
            and self.col_start <= other.col_start
            and other.row_stop <= self.row_stop
            and other.col_stop <= self.col_stop
        )

    def buffer(self, pixels: float) -> PixelBox:
        return PixelBox(
            self.row_start - pixels,
            self.col_start - pixels,
            self.row_stop + pixels,
            self.col_stop + pixels,
        )

    @classmethod
    def from_window(cls, window: Window) -> PixelBox:
        return cls(
            window.row_off,
            window.col_off,
            window.row_off + window.height,
            window.col_off + window.width,
        )

    def to_window(self) -> Window:
        """The box as a rasterio window (integer offsets; outward rounding)."""
        row0, col0 = math.floor(self.row_start), math.floor(self.col_start)
        row1, col1 = math.ceil(self.row_stop), math.ceil(self.col_stop)
        return Window(col0, row0, col1 - col0, row1 - row0)


@dataclass(frozen=True, slots=True)
class Tile:
    """One unit of work: the pixels a model sees and the part of the scene it owns.

    ``key`` is a stable, human-readable id (``"r0003c0007"`` for grid tiles,
    ``"w<row>_<col>_<size>"`` for windows made around one large prompt); ``core`` and
    ``read`` are integer pixel boxes of the full-resolution scene; ``shape`` is the
    (rows, cols) of the array given to the model (equal to the read window's size
    unless the tile is downsampled); ``scene_transform`` is the scene's affine.
    """

    key: str
    core: PixelBox
    read: PixelBox
    shape: tuple[int, int]
    scene_transform: Affine

    @property
    def read_window(self) -> Window:
        return self.read.to_window()

    @property
    def core_window(self) -> Window:
        return self.core.to_window()

    @property
    def scale(self) -> float:
        """Scene pixels per tile-array pixel (1.0 at full resolution, > 1 downsampled)."""
        return self.read.height / self.shape[0]

    @property
    def transform(self) -> Affine:
        """Affine of the tile array: (col, row) of the array -> scene CRS (x, y)."""
        window_transform = self.scene_transform @ Affine.translation(
            self.read.col_start, self.read.row_start
        )
        return window_transform @ Affine.scale(
            self.read.width / self.shape[1], self.read.height / self.shape[0]
        )

    @property
    def halo(self) -> tuple[int, int, int, int]:
        """Halo widths in scene pixels: (top, left, bottom, right)."""
        return (
            int(self.core.row_start - self.read.row_start),
            int(self.core.col_start - self.read.col_start),
            int(self.read.row_stop - self.core.row_stop),
            int(self.read.col_stop - self.core.col_stop),
        )

    def to_tile_pixels(self, box: PixelBox) -> PixelBox:
        """Scene-pixel box -> box in this tile array's pixels (offset and scale)."""
        s = self.scale
        return PixelBox(
            (box.row_start - self.read.row_start) / s,
            (box.col_start - self.read.col_start) / s,
            (box.row_stop - self.read.row_start) / s,
            (box.col_stop - self.read.col_start) / s,
        )


def _axis_read_starts(length: int, tile_size: int, stride: int) -> list[int]:
    """Start offsets (pixels) of read windows along an axis of ``length`` pixels."""
    if length <= tile_size:
        return [0]
    count = math.ceil((length - tile_size) / stride) + 1
    return [min(k * stride, length - tile_size) for k in range(count)]


def _axis_core_bounds(length: int, starts: list[int], read_len: int) -> list[int]:
    """Core boundaries along an axis: ``len(starts) + 1`` values from 0 to ``length``.

    The boundary between tiles k and k+1 is the middle of the band their read windows
    share, so each core keeps at least half that band as halo on its interior sides.
    """
    bounds = [0]
    for left, right in zip(starts[:-1], starts[1:]):
        bounds.append((right + left + read_len) // 2)
    bounds.append(length)
    return bounds


@dataclass(frozen=True)
class TileGrid:
    """A regular grid of overlapping tiles over a ``height x width`` pixel scene.

    ``tile_size`` is the side of each tile array given to the model (1024 is SAM's
    native input) and ``overlap`` the halo kept on each interior side, both in model
    pixels; ``0 <= 2 * overlap < tile_size``. ``zoom`` is model pixels per scene pixel:
    at ``zoom=1`` (default) model and scene pixels are the same; at 2 or 4, read windows
    cover ``tile_size / zoom`` scene pixels and are upsampled, which helps SAM with
    objects only a few dozen pixels across (10 m fields). Along an axis shorter than
    the read window there is one tile whose read window is the whole axis.
    """

    height: int
    width: int
    transform: Affine = Affine.identity()
    tile_size: int = DEFAULT_TILE_SIZE
    overlap: int = DEFAULT_OVERLAP
    zoom: int = 1

    def __post_init__(self) -> None:
        validate_tiling(self.tile_size, self.overlap)
        if self.zoom not in ZOOMS or self.tile_size % self.zoom or self.overlap % self.zoom:
            raise ConfigError(
                f"zoom must be one of {ZOOMS} and divide the tile size and overlap "
                f"(got zoom {self.zoom}, tile size {self.tile_size}, overlap {self.overlap})"
            )
        if self.height < 1 or self.width < 1:
            raise ConfigError(f"a scene must have at least 1 x 1 pixels, got {self.height} x {self.width}")

    @property
    def read_size(self) -> int:
        """Side of a read window in scene pixels: ``tile_size / zoom``."""
        return self.tile_size // self.zoom

    @property
    def halo(self) -> int:
        """Minimum halo in scene pixels: ``overlap / zoom``."""
        return self.overlap // self.zoom

    @property
    def stride(self) -> int:
        """Distance in scene pixels between the starts of neighbouring read windows."""
        return self.read_size - 2 * self.halo

    @cached_property
    def _rows(self) -> tuple[list[int], list[int]]:
        starts = _axis_read_starts(self.height, self.read_size, self.stride)
        return starts, _axis_core_bounds(self.height, starts, min(self.read_size, self.height))

    @cached_property
    def _cols(self) -> tuple[list[int], list[int]]:
        starts = _axis_read_starts(self.width, self.read_size, self.stride)
        return starts, _axis_core_bounds(self.width, starts, min(self.read_size, self.width))

    @property
    def shape(self) -> tuple[int, int]:
        """Number of tiles as (rows, cols)."""
        return len(self._rows[0]), len(self._cols[0])

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def __iter__(self) -> Iterator[Tile]:
        rows, cols = self.shape
        for i in range(rows):
            for j in range(cols):
                yield self.tile(i, j)

    def tile(self, i: int, j: int) -> Tile:
        """The tile at grid row ``i``, grid column ``j`` (0-based)."""
        rows, cols = self.shape
        if not (0 <= i < rows and 0 <= j < cols):
            raise IndexError(f"tile ({i}, {j}) outside a {rows} x {cols} grid")
        row_starts, row_bounds = self._rows
        col_starts, col_bounds = self._cols
        read_h = min(self.read_size, self.height)
        read_w = min(self.read_size, self.width)
        read = PixelBox(row_starts[i], col_starts[j], row_starts[i] + read_h, col_starts[j] + read_w)
        core = PixelBox(row_bounds[i], col_bounds[j], row_bounds[i + 1], col_bounds[j + 1])
        shape = (read_h * self.zoom, read_w * self.zoom)
        return Tile(f"r{i:04d}c{j:04d}", core, read, shape, self.transform)

    def index_of(self, row: float, col: float) -> tuple[int, int]:
        """Grid (i, j) of the tile whose core contains scene pixel (row, col).

        Positions outside the scene are clamped to the nearest edge tile.
        """
        return (
            _bisect_bounds(self._rows[1], row),
            _bisect_bounds(self._cols[1], col),
        )

    def tile_for_box(self, box: PixelBox) -> Tile | None:
        """A grid tile whose read window contains ``box`` whole, or None.

        Prefers the tile whose core holds the box centre, then the neighbour in which
        the box sits most centrally. ``box`` is in scene pixels and should already carry
        whatever margin the caller wants around the object.
        """
        ci, cj = self.index_of(*box.center)
        rows, cols = self.shape
        candidates = [
            (i, j)
            for i in range(max(0, ci - 1), min(rows, ci + 2))
            for j in range(max(0, cj - 1), min(cols, cj + 2))
        ]
        fitting = [self.tile(i, j) for i, j in candidates if self.tile(i, j).read.contains(box)]
        if not fitting:
            return None
        home = self.tile(ci, cj)
        if home in fitting:
            return home
        return max(fitting, key=lambda t: _margin(t.read, box))

    def window_tile(self, box: PixelBox, *, margin: float = 0.0) -> Tile:
        """A tile made around one box that no grid tile holds whole.

        The read window is a square of side ``max(read_size, longest box side + 2 *
        margin + 2)`` scene pixels centred on the box and shifted inside the scene
        (clipped where the scene is smaller). It is resampled by ``zoom``, or less where
        that would exceed ``tile_size`` (downsampled if need be), so the model still sees
        the whole object.
        The core window equals the read window.
        """
        side = max(self.read_size, math.ceil(max(box.height, box.width) + 2 * margin) + 2)
        row0 = _place(box.center[0], side, self.height)
        col0 = _place(box.center[1], side, self.width)
        read_h, read_w = min(side, self.height), min(side, self.width)
        read = PixelBox(row0, col0, row0 + read_h, col0 + read_w)
        scale = min(float(self.zoom), self.tile_size / max(read_h, read_w))
        shape = (max(1, round(read_h * scale)), max(1, round(read_w * scale)))
        key = f"w{row0}_{col0}_{side}"
        return Tile(key, read, read, shape, self.transform)


def validate_tiling(tile_size: int, overlap: int) -> None:
    """Raise :class:`ConfigError` unless ``0 <= 2 * overlap < tile_size`` (pixels)."""
    if not isinstance(tile_size, int) or tile_size < 64:
        raise ConfigError(f"tile size must be an integer of at least 64 pixels, got {tile_size!r}")
    if tile_size > 8192:
        raise ConfigError(f"tile size {tile_size} px is larger than 8192 px; SAM encodes 1024 px, use 512-2048")
    if not isinstance(overlap, int) or overlap < 0:
        raise ConfigError(f"overlap must be a non-negative integer number of pixels, got {overlap!r}")
    if 2 * overlap >= tile_size:
        raise ConfigError(
            f"tile size ({tile_size} px) must be larger than twice the overlap ({overlap} px); "
            f"lower --overlap below {tile_size // 2} or raise --tile-size"
        )


def _bisect_bounds(bounds: list[int], value: float) -> int:
    """Index k with bounds[k] <= value < bounds[k+1], clamped to [0, len(bounds) - 2]."""
    import bisect

    k = bisect.bisect_right(bounds, value) - 1
    return min(max(k, 0), len(bounds) - 2)


def _margin(outer: PixelBox, inner: PixelBox) -> float:
    """Smallest distance in pixels from ``inner``'s sides to ``outer``'s sides."""
    return min(
        inner.row_start - outer.row_start,
        inner.col_start - outer.col_start,
        outer.row_stop - inner.row_stop,
        outer.col_stop - inner.col_stop,
    )


def _place(center: float, side: int, length: int) -> int:
    """Start (pixels) of a window of ``side`` centred on ``center``, kept inside [0, length)."""
    start = math.floor(center - side / 2)
    return int(min(max(start, 0), max(length - side, 0)))
