"""Atomic file writes: the one temp-file-then-rename helper of sam-geo.

Every file sam-geo writes (vector outputs, label rasters, quicklooks and maps, run
summaries, work-directory manifests and tile results, downloaded weights) goes through
:func:`atomic_path`: the data is written to a hidden temporary file in the target's own
directory, ``.<name>.<random>.tmp<suffix>``, flushed to disk (fsync), then moved onto
the target in one step (:func:`os.replace`, or a hard link that refuses an existing
target when ``overwrite`` is false). Readers therefore see either the previous file or
the whole new one, never a half-written file; a failed or interrupted write leaves the
previous file byte-for-byte as it was and removes the temporary file (only a hard kill,
e.g. SIGKILL, can leave one behind: its name starts with a dot and contains ``.tmp``).

The temporary file lives in the target's directory because a rename is atomic only
within one file system, and keeps the caller's ``suffix`` (e.g. ``.gpkg``) because GDAL
and pyogrio pick their driver from the file name.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sam_geo.errors import OutputError, OutputExistsError, SamGeoError, WriteError

__all__ = ["atomic_path", "check_target", "exists_message", "write_bytes_atomic", "write_error"]

SIDECAR_SUFFIXES = ("-journal", "-wal", "-shm")
"""Files SQLite (GeoPackage) may create next to a database while writing it."""


@contextmanager
def atomic_path(
    target: str | os.PathLike[str],
    *,
    suffix: str = "",
    overwrite: bool = True,
    wrap_errors: bool = True,
) -> Iterator[Path]:
    """Yield a hidden temporary path next to ``target``; publish it there on success.

    The body of the ``with`` block writes the file at the yielded path (which does not
    exist yet: create it, e.g. ``open(tmp, "wb")`` or a GDAL driver). When the block
    ends without an exception the file is fsynced (if it is a regular file), moved onto
    ``target`` and the directory entry fsynced (best effort, POSIX only).

    Args:
        target: the final path. Its directory must exist; it is never created.
        suffix: appended to the temporary name, ``.<name>.<random>.tmp<suffix>`` (give
            the target's suffix when a library picks its format from the file name).
        overwrite: ``True`` replaces an existing ``target`` atomically; ``False``
            publishes with a hard link, which fails atomically if ``target`` exists
            (also when another process created it during the write). Where the file
            system has no hard links, existence check and rename are two steps.
        wrap_errors: ``True`` turns an :class:`OSError` (disk full, permissions ...)
            into :class:`~sam_geo.errors.WriteError`; ``False`` lets it propagate
            unchanged, for callers that report failures of their own sources (a
            download) themselves.

    Yields:
        The temporary path, in ``target``'s directory.

    Raises:
        OutputExistsError: ``overwrite`` is false and ``target`` exists.
        WriteError: an OSError while writing or publishing (with ``wrap_errors``); the
            previous ``target`` is unchanged. Raised ``from`` the OSError, with its
            ``errno`` copied.

    On any exception (``KeyboardInterrupt`` included) the temporary file and its
    SQLite sidecars (``-journal``, ``-wal``, ``-shm``) are removed; sam-geo's own errors
    and non-OSError exceptions are re-raised as they are.
    """
    final = Path(target)
    tmp = _temp_path(final, suffix)
    try:
        yield tmp
        _fsync_file(tmp)
        _publish(tmp, final, overwrite=overwrite)
        _fsync_dir(final.parent)
    except BaseException as exc:
        _remove_temp(tmp)
        if wrap_errors and isinstance(exc, OSError) and not isinstance(exc, SamGeoError):
            raise write_error(final, exc) from exc
        raise
    _remove_temp(tmp)  # a leftover hard link or stale sidecar of the published file


def write_bytes_atomic(
    target: str | os.PathLike[str], data: bytes, *, overwrite: bool = True
) -> Path:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_path`); return the path.

    Raises:
        OutputExistsError: ``overwrite`` is false and ``target`` exists.
        WriteError: the write failed (disk full, permissions); ``target`` is unchanged.
    """
    final = Path(target)
    with atomic_path(final, overwrite=overwrite) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return final


def exists_message(target: Path, what: str = "output") -> str:
    """Error message for a refused overwrite of ``target`` (``what``: how to name it)."""
    return (
        f"{what} {str(target)!r} already exists; pass --overwrite (overwrite=True) to "
        "replace it, or choose another output path"
    )


def check_target(path: str | os.PathLike[str], *, what: str = "output", overwrite: bool = False) -> Path:
    """Check, before any work, that a file can be written at ``path``; return it (``~``
    expanded). The caller checks the suffix (each writer knows its formats).

    Raises :class:`OutputError` when the parent directory is missing (it is never
    created silently), not a directory or not writable, or when ``path`` is a
    directory; :class:`OutputExistsError` when the file exists and not ``overwrite``.
    ``what`` names the file in the messages ("output", "labels raster" ...).
    """
    target = Path(path).expanduser()
    parent = target.parent
    if not parent.exists():
        raise OutputError(
            f"directory {str(parent)!r} of the {what} does not exist; create it first "
            f"(e.g. `mkdir -p {parent}`) or choose another path"
        )
    if not parent.is_dir():
        raise OutputError(f"{str(parent)!r} is not a directory; choose another path for the {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"directory {str(parent)!r} of the {what} is not writable; fix its permissions or choose another path"
        )
    if target.is_dir():
        raise OutputError(f"{what} path {str(target)!r} is a directory; give a file name")
    if target.exists() and not overwrite:
        raise OutputExistsError(exists_message(target, what))
    return target


def write_error(target: Path, exc: BaseException, advice: str | None = None) -> WriteError:
    """:class:`WriteError` for a failed write of ``target``, saying what to do.

    The advice follows ``exc.errno`` (disk full, permission denied, read-only file
    system); other OSErrors get "check free disk space and permissions"; anything else
    gets ``advice`` (default: the same). ``errno`` is copied onto the error.
    """
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC:
        advice = f"the disk holding {str(target.parent)!r} is full; free space and retry"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = f"check write permission on {str(target.parent)!r} and retry"
    elif isinstance(exc, OSError) or advice is None:
        advice = "check free disk space and permissions, then retry"
    error = WriteError(
        f"writing {str(target)!r} failed ({type(exc).__name__}: {exc}); {advice}. "
        "Any previous file at that path is unchanged."
    )
    error.errno = code
    return error


# --- steps ------------------------------------------------------------------------------


def _temp_path(target: Path, suffix: str) -> Path:
    """An unused hidden name ``.<name>.<random>.tmp<suffix>`` in ``target``'s directory."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp{suffix}")
        if not tmp.exists():
            return tmp


def _fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk; directories and special files are left alone."""
    if not path.is_file():
        return
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry change (the rename) to disk; best effort, POSIX only."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Move the finished ``tmp`` onto ``target`` in one step (see :func:`atomic_path`)."""
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise OutputExistsError(exists_message(target)) from None
    except OSError:  # no hard links on this file system
        if target.exists():
            raise OutputExistsError(exists_message(target)) from None
        os.replace(tmp, target)


def _remove_temp(tmp: Path) -> None:
    """Delete ``tmp`` and any SQLite sidecars of it; never raises."""
    for path in (tmp, *(Path(f"{tmp}{s}") for s in SIDECAR_SUFFIXES)):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
