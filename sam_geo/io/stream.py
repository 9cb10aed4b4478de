"""Output layers written chunk by chunk while a run goes on (:class:`VectorStream`).

A run hands its polygons to the stream as tiles finish, so the driver never holds the
whole output. Formats follow :mod:`sam_geo.io.writers` (same columns, CRS handling and
GeoJSON rules); what differs is when data reaches the disk:

* **GeoPackage** and **GeoJSON**: one hidden temporary file next to the target
  (:func:`~sam_geo.io.atomic.atomic_path`), published onto the target by one rename
  when the run succeeds. GeoPackage chunks are appended by GDAL, one transaction each;
  the layer is typed MultiPolygon (Polygons are promoted), since a later chunk may hold
  a MultiPolygon. GeoJSON is one FeatureCollection whose features GDAL writes chunk by
  chunk (:func:`~sam_geo.io.writers.geojson_features`) and this module appends to the
  open file: GDAL's own GeoJSON append rereads the whole file each time.
* **GeoParquet file** (``.parquet``): chunks are gathered into parts of
  :data:`PART_ROWS` rows in a hidden folder next to the target; at the end the parts are copied, batch by batch, into one file (one
  row group per part, GeoParquet 1.1 with a ``bbox`` covering column) and published.
* **GeoParquet dataset** (a folder: ``out/``, or ``partitioned=True``): chunks are
  gathered into parts of :data:`PART_ROWS` rows, ``part-<run>-<n>.parquet``, each
  published atomically into the folder as soon as it is written (the last one at the end), rows in Hilbert order, GeoParquet 1.1 with the ``bbox`` covering column. It
  opens with ``geopandas.read_parquet(folder)`` and ``dask_geopandas.read_parquet``.
  With ``overwrite``, parts of an earlier dataset in the folder are deleted only once
  the new run succeeded; a failed run deletes its own parts. With ``on_part`` (a work
  dir records each part) an interrupted run (Ctrl-C, or killed) leaves its parts, and
  the resumed run keeps them (``keep``) and adds the rest.

A failed run (any exception inside ``with``) leaves no output and every previous file
untouched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import ExitStack
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import geopandas
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sam_geo.errors import OutputError, OutputExistsError, SamGeoError
from sam_geo.io.atomic import atomic_path, check_target, exists_message, write_error
from sam_geo.io.writers import (
    check_output_path,
    format_for,
    geojson_features,
    gpkg_chunk,
    parquet_ready,
)

__all__ = ["PART_GLOB", "VectorStream", "check_stream_path", "is_dataset_path"]

PART_GLOB = "part-*.parquet"
"""Names of the parts of a GeoParquet dataset written by sam-geo."""

PART_ROWS = 100_000
"""Rows gathered before a GeoParquet part is written: parts of useful size (a few MiB)
whatever the batches are (a prompted tile gives a few dozen rows)."""

_ADVICE = "the data could not be stored in this format; write another one (.gpkg, .parquet or a folder)"


def is_dataset_path(path: str | os.PathLike[str], partitioned: bool = False) -> bool:
    """True when ``path`` names a GeoParquet dataset (a folder): ``partitioned`` is set,
    the path ends with a separator, or it is an existing directory."""
    text = os.fspath(path)
    return partitioned or text.endswith(("/", os.sep)) or Path(text).expanduser().is_dir()


def check_stream_path(
    path: str | os.PathLike[str], *, overwrite: bool, partitioned: bool = False, others: dict[str, Any] | None = None,
    resumable: Sequence[Path] = (),
) -> Path:
    """Check an output path before any work (see :func:`sam_geo.io.writers.check_output_path`);
    a dataset folder must be new, empty, hold only ``resumable`` parts (published by the
    interrupted run being resumed), or be a sam-geo dataset with ``overwrite``.

    Raises :class:`OutputError` / :class:`~sam_geo.errors.OutputExistsError`.
    """
    if not is_dataset_path(path, partitioned):
        return check_output_path(path, overwrite=overwrite, others=others)
    folder = Path(os.fspath(path).rstrip("/" + os.sep) or "/").expanduser()
    for what, other in (others or {}).items():
        if isinstance(other, (str, os.PathLike)) and "://" not in os.fspath(other) and _inside(Path(other), folder):
            raise OutputError(
                f"output folder {str(folder)!r} holds {what} ({other}); writing it would replace that file. "
                "Choose another output folder"
            )
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{str(folder)!r} is a file; a partitioned output is a folder. Choose another path")
    if not folder.exists():
        return check_target(folder, what="output folder")
    ours = {Path(p).resolve() for p in resumable}
    content = [p for p in folder.iterdir() if not p.name.startswith(".") and p.resolve() not in ours]
    if content and not overwrite:
        raise OutputExistsError(exists_message(folder, "output folder") + " (it is not empty)")
    foreign = [p.name for p in content if not p.match(PART_GLOB)]
    if foreign:
        raise OutputError(
            f"output folder {str(folder)!r} holds files sam-geo did not write ({', '.join(sorted(foreign)[:3])}); "
            "choose an empty or new folder"
        )
    return folder


def _inside(path: Path, folder: Path) -> bool:
    """True if ``path`` is ``folder`` or lies in it."""
    target, base = os.path.abspath(path.expanduser()), os.path.abspath(folder)
    return target == base or target.startswith(base + os.sep)


class VectorStream:
    """An output layer written chunk by chunk and published when the run succeeds.

    Use as a context manager: ``with VectorStream(path, overwrite=False) as out:
    out.write(gdf)``. Leaving the block normally publishes the output (``out.path``);
    an exception discards it. Chunks must share columns and CRS; empty chunks only fix
    the columns of an output that stays empty. Check the path first with
    :func:`check_stream_path`.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, overwrite: bool = False, partitioned: bool = False,
        part_rows: int | None = None, keep: Sequence[Path] = (), on_part: Callable[[Path], None] | None = None,
    ) -> None:
        self.dataset = is_dataset_path(path, partitioned)
        self.path = Path(os.fspath(path).rstrip("/" + os.sep) if self.dataset else path).expanduser()
        self.overwrite = overwrite
        self.format = "GeoParquet" if self.dataset else format_for(self.path)
        self.rows = 0
        self.parts: list[Path] = []
        self._template: geopandas.GeoDataFrame | None = None
        self._stack = ExitStack()
        self._tmp: Path | None = None
        self._handle: Any = None
        self._created = False
        self._run = secrets.token_hex(4)
        self.part_rows = part_rows or PART_ROWS
        self._pending: list[geopandas.GeoDataFrame] = []
        self.kept = [Path(p).resolve() for p in keep]
        self._on_part = on_part

    def __enter__(self) -> VectorStream:
        if self.dataset:
            self._created = not self.path.exists()
            self.path.mkdir(exist_ok=True)
        elif self.format == "GeoParquet":
            self._tmp = self.path.parent / f".{self.path.name}.{self._run}.parts"
            self._tmp.mkdir()
        else:
            self._tmp = self._stack.enter_context(atomic_path(self.path, suffix=self.path.suffix, overwrite=self.overwrite))
            if self.format == "GeoJSON":
                self._handle = self._stack.enter_context(open(self._tmp, "wb"))
                name = json.dumps(self.path.stem)
                self._handle.write(b'{"type": "FeatureCollection", "name": ' + name.encode() + b', "features": [\n')
        return self

    def write(self, gdf: geopandas.GeoDataFrame) -> None:
        """Append ``gdf`` (may be empty) to the output."""
        if len(gdf) == 0:
            if self._template is None:
                self._template = gdf
            return
        try:
            if self.format == "GeoParquet":
                self._pending.append(gdf)
                if sum(map(len, self._pending)) >= self.part_rows:
                    self._write_part()
            elif self.format == "GPKG":
                gpkg_chunk(gdf, self._tmp, self.path.stem, append=self.rows > 0)
            else:
                separator = b",\n" if self.rows else b""
                self._handle.write(separator + b",\n".join(geojson_features(gdf)))
        except SamGeoError:
            raise
        except Exception as exc:
            raise write_error(self.path, exc, _ADVICE) from exc
        self.rows += len(gdf)
        self._template = gdf.iloc[:0]

    def _write_part(self) -> None:
        """The pending batches as one part, rows in Hilbert order, with the bbox covering column."""
        gdf = pd.concat(self._pending, ignore_index=True) if len(self._pending) > 1 else self._pending[0]
        gdf = geopandas.GeoDataFrame(gdf, geometry=self._pending[0].geometry.name, crs=self._pending[0].crs)
        self._pending = []
        if len(gdf) > 1:
            gdf = gdf.iloc[gdf.geometry.hilbert_distance().argsort(kind="stable")]
        folder = self.path if self.dataset else self._tmp
        part = folder / f"part-{self._run}-{len(self.parts):05d}.parquet"
        with atomic_path(part, suffix=".parquet", overwrite=False) as tmp:
            parquet_ready(gdf).to_parquet(tmp, index=False, write_covering_bbox=True, schema_version="1.1.0")
        self.parts.append(part)
        if self.dataset and self._on_part is not None:
            self._on_part(part)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self._discard(kind, exc, tb)
            return
        try:
            self._publish()
        except BaseException as error:
            self._discard(type(error), error, error.__traceback__)
            raise

    def _publish(self) -> None:
        if self._pending:
            self._write_part()
        if self.format == "GeoJSON":
            self._handle.write(b"\n]}\n")
        elif self.rows == 0 and self.format == "GPKG":  # nothing appended: an empty layer
            gpkg_chunk(self._empty(), self._tmp, self.path.stem, append=False)
        if self.dataset:
            if not self.parts and not self.kept:
                self._write_part_empty()
            self._remove_old_parts()
        elif self.format == "GeoParquet":
            self._merge_parts()
        self._stack.close()

    def _empty(self) -> geopandas.GeoDataFrame:
        if self._template is not None:
            return self._template
        return geopandas.GeoDataFrame(geometry=geopandas.GeoSeries([], crs=4326))

    def _write_part_empty(self) -> None:
        part = self.path / f"part-{self._run}-00000.parquet"
        with atomic_path(part, suffix=".parquet", overwrite=False) as tmp:
            parquet_ready(self._empty()).to_parquet(tmp, index=False, write_covering_bbox=True, schema_version="1.1.0")
        self.parts.append(part)

    def _remove_old_parts(self) -> None:
        ours = {p.resolve() for p in self.parts} | set(self.kept)
        for part in self.path.glob(PART_GLOB):
            if part.resolve() not in ours:
                part.unlink()

    def _merge_parts(self) -> None:
        """The parts copied batch by batch into one GeoParquet file, published atomically."""
        if not self.parts:
            with atomic_path(self.path, suffix=".parquet", overwrite=self.overwrite) as tmp:
                parquet_ready(self._empty()).to_parquet(tmp, index=False, write_covering_bbox=True, schema_version="1.1.0")
        else:
            with atomic_path(self.path, suffix=".parquet", overwrite=self.overwrite) as tmp:
                merge_parquet_parts(self.parts, tmp)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _discard(self, kind: Any, exc: Any, tb: Any) -> None:
        interrupted = kind is not None and issubclass(kind, (KeyboardInterrupt, SystemExit))
        if self.dataset and interrupted and self._on_part is not None:
            return  # an interrupted run with a record of its parts: they stay for the resumed run
        if self.dataset:
            for part in self.parts:
                part.unlink(missing_ok=True)
            if self._created and not any(self.path.iterdir()):
                self.path.rmdir()
        elif self._tmp is not None and self.format == "GeoParquet":
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._stack.__exit__(kind, exc, tb)


def merge_parquet_parts(parts: list[Path], target: Path) -> None:
    """GeoParquet parts of one layer -> one file at ``target``, one row group per part
    batch (memory: one batch at a time). The ``geo`` metadata is the first part's with
    the geometry types of all parts and no file-wide ``bbox`` (the covering column
    holds each row's)."""
    schemas = [pq.read_schema(p) for p in parts]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    geo = json.loads(schemas[0].metadata[b"geo"])
    for name, column in geo["columns"].items():
        types = {t for s in schemas for t in json.loads(s.metadata[b"geo"])["columns"][name].get("geometry_types", [])}
        column["geometry_types"] = sorted(types)
        column.pop("bbox", None)
    metadata = {**(schemas[0].metadata or {}), b"geo": json.dumps(geo).encode()}
    schema = schema.with_metadata(metadata)
    with pq.ParquetWriter(target, schema) as writer:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches(batch_size=65_536):
                table = pa.Table.from_batches([batch])
                writer.write_table(table.select(schema.names).cast(schema))
