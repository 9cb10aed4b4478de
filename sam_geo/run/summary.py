"""The run summary: what was planned, done, skipped and why, and where time went.

Written as JSON with ``--summary PATH`` (atomically) and attached to the returned
GeoDataFrame as ``gdf.attrs["summary"]``. Shape (more keys may be added)::

    {"tiles": {"planned", "processed", "skipped_nodata", "failed", "resumed"},
     "prompts": {"used", "outside", "on_nodata", "invalid", "empty", ...id lists},
     "seconds": {"startup", "read", "encode", "decode", "vectorize", "write", "total"},
     "model": {"name", "weights_sha256", "weights_source", "device"}, ...}

``tiles.processed`` counts image-encoder passes actually run; stage seconds of workers
(read, encode, decode, vectorize) are summed over workers. Model stages (encode,
decode, detect) count wall seconds of model calls; the stages outside the model (read,
vectorize, stitch, regularize, write) count CPU seconds of the thread running them
(:func:`time.thread_time`), so they say how many cores the work needs whatever else
shared the machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sam_geo.io.atomic import write_bytes_atomic

STAGES = ("startup", "read", "encode", "decode", "vectorize", "write", "total")


@dataclass
class TileCounts:
    planned: int = 0
    processed: int = 0
    skipped_nodata: int = 0
    failed: int = 0
    resumed: int = 0


@dataclass
class PromptCounts:
    """Prompt counts; the ``*_ids`` lists hold the ids (id column, else prompt_index)."""

    total: int = 0
    """Prompts read: a file layer is read only near the scenes (see ``layer_features``)."""
    layer_features: int | None = None
    """Features in the whole prompt layer, where its format says so cheaply."""
    used: int = 0
    outside: int = 0
    on_nodata: int = 0
    invalid: int = 0
    empty: int = 0
    skipped_covered: int = 0
    """Automatic mode: grid points not decoded because a kept mask already covered them."""
    outside_ids: list[Any] = field(default_factory=list)
    on_nodata_ids: list[Any] = field(default_factory=list)
    invalid_ids: list[Any] = field(default_factory=list)
    empty_ids: list[Any] = field(default_factory=list)


@dataclass
class RunSummary:
    scene: str
    mode: str
    tiles: TileCounts = field(default_factory=TileCounts)
    prompts: PromptCounts = field(default_factory=PromptCounts)
    seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    model: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    features: int = 0
    regularize: dict[str, Any] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    """Tiles that failed after all retries: ``{"tile", "error", "attempts"}``."""
    objects: dict[str, Any] = field(default_factory=dict)
    """Automatic mode: stitching counts (pieces, joins, mosaics ...); ``labels_raster``."""
    workers: list[dict[str, Any]] = field(default_factory=list)
    """Per model host (Ray actor, or this process with ``workers=0``): ``node_id``,
    ``device``, ``tiles``, ``encoder_calls`` (fewer than tiles when the encoder ran
    batches of tiles), ``model_seconds`` (in model calls), ``wall_seconds`` (since its
    first tile) and ``model_busy_share`` (their ratio)."""
    mosaics: dict[str, list[str]] = field(default_factory=dict)
    """Scenes that are mosaics sam-geo joined (:mod:`sam_geo.io.mosaic`): VRT -> its files."""
    rates: dict[str, float] = field(default_factory=dict)
    """``tiles_per_s`` (tiles run over the runtime's wall seconds, start-up excluded) and
    ``cpu_ms_per_tile`` (CPU milliseconds outside the model per tile encoded: read and
    vectorize on the workers, stitch, regularize and write on the driver)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        """The summary a :meth:`to_dict` (``gdf.attrs["summary"]``) came from."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["tiles"] = TileCounts(**data.get("tiles", {}))
        values["prompts"] = PromptCounts(**data.get("prompts", {}))
        return cls(**values)

    def add_seconds(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + value

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return data

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write as indented JSON, atomically (temp file in the same directory, then rename)."""
        return write_json_atomic(self.to_dict(), path)


def write_json_atomic(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as indented UTF-8 JSON, atomically; return the path.

    Via :func:`sam_geo.io.atomic.write_bytes_atomic` (temp file in the same directory,
    fsync, rename): a failure leaves any previous file unchanged and no temporary file
    behind. NumPy scalars are written as numbers, other non-JSON values as text.

    Raises:
        WriteError: the file could not be written (disk full, permissions).
    """
    text = json.dumps(data, indent=2, ensure_ascii=False, default=_json_default)
    return write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)
