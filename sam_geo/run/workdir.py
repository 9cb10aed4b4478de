"""Resumable runs: a work directory with a manifest and one result file per finished tile.

Layout of ``--work-dir DIR``::

    DIR/manifest.json          {"format": 1, "fingerprint": {...}}
    DIR/tiles/<task key>.pkl   one finished tile's result (polygons as WKB, counts, seconds)
    DIR/published.txt          parts of a GeoParquet dataset output already published
                               (one path a line): a resumed run keeps them and does not
                               write their rows again
    DIR/mosaics/               VRTs of mosaics (sam_geo.io.mosaic)

A tile is *done* exactly when its result file exists: the file is written atomically
(:func:`sam_geo.io.atomic.write_bytes_atomic`: temporary name, fsync, rename), so a
killed run leaves either the whole result or nothing, and a tile done twice (a retried
task) is written once.

The fingerprint records what the results depend on (sam-geo version, model and weights
sha256, settings, scenes with size and modification time, prompts). Reusing a work
directory with a different fingerprint is refused with a message naming what changed;
``restart=True`` (``--restart``) empties it first.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

from sam_geo.errors import ConfigError
from sam_geo.io.atomic import write_bytes_atomic

MANIFEST = "manifest.json"
FORMAT = 1
PUBLISHED = "published.txt"


def published_parts(work_dir: str | os.PathLike[str]) -> list[Path]:
    """The dataset parts a run with this work dir published (none for a new one)."""
    listing = Path(work_dir) / PUBLISHED
    if not listing.exists():
        return []
    return [Path(line) for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]


def fingerprint_file(path: str) -> dict[str, Any]:
    """Identity of an input file: path, size and mtime (not a content hash: scenes are big)."""
    try:
        stat = os.stat(path)
    except OSError:  # URLs and /vsi paths: the path alone
        return {"path": path}
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def digest(*parts: bytes) -> str:
    """sha256 hex digest of byte strings."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


MOSAICS = "mosaics"
"""Sub-folder of a work dir holding the VRTs of mosaics (:mod:`sam_geo.io.mosaic`); written
before the work dir is opened, since the scenes are."""


class WorkDir:
    """A run's work directory (see module docs). ``None`` path: nothing is kept."""

    def __init__(self, path: str | os.PathLike[str], fingerprint: dict[str, Any], *, restart: bool = False) -> None:
        self.path = Path(path)
        self.tiles = self.path / "tiles"
        manifest = self.path / MANIFEST
        if restart and self.path.exists():
            if manifest.exists() or self.tiles.exists():
                manifest.unlink(missing_ok=True)
                (self.path / PUBLISHED).unlink(missing_ok=True)
                shutil.rmtree(self.tiles, ignore_errors=True)
        if manifest.exists():
            self._check(manifest, fingerprint)
        else:
            if self.path.exists() and any(p.name != MOSAICS for p in self.path.iterdir()):
                raise ConfigError(
                    f"work dir {self.path} exists, is not empty and has no {MANIFEST}; "
                    "give an empty or new directory"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(manifest, json.dumps({"format": FORMAT, "fingerprint": fingerprint}, indent=2).encode())
        self.tiles.mkdir(exist_ok=True)

    def _check(self, manifest: Path, fingerprint: dict[str, Any]) -> None:
        try:
            stored = json.loads(manifest.read_text(encoding="utf-8"))["fingerprint"]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{manifest} is unreadable; pass --restart to start over") from exc
        normalised = json.loads(json.dumps(fingerprint))
        if stored != normalised:
            changed = sorted(k for k in set(stored) | set(normalised) if stored.get(k) != normalised.get(k))
            raise ConfigError(
                f"work dir {self.path} holds a run with different {', '.join(changed)}; "
                "rerun with the same inputs and settings to resume, pass --restart to discard it, "
                "or use another --work-dir"
            )

    def add_published(self, part: Path) -> None:
        """Record a published part of the output dataset (see :func:`published_parts`)."""
        lines = [*map(str, published_parts(self.path)), str(Path(part).resolve())]
        write_bytes_atomic(self.path / PUBLISHED, ("\n".join(lines) + "\n").encode())

    def _file(self, key: str) -> Path:
        return self.tiles / f"{key}.pkl"

    def done(self, key: str) -> bool:
        return self._file(key).exists()

    def load(self, key: str) -> Any:
        with self._file(key).open("rb") as fh:
            return pickle.load(fh)

    def save(self, key: str, result: Any) -> None:
        """Store a finished tile durably; an existing result for ``key`` is kept."""
        if self.done(key):
            return
        write_bytes_atomic(self._file(key), pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
