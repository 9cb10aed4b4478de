"""The one exception tree of sam-geo.

Every error a user can cause or meet derives from :class:`SamGeoError`. Classes also
derive from the matching built-in (``ValueError`` for bad values, ``OSError`` for files,
``FileExistsError`` for refused overwrites ...) so callers that already catch those keep
working. Messages name the offending input and say what to do about it.

The CLI maps the tree onto exit codes: :class:`InputError` (and subclasses) exit with
``2`` (bad input: nothing was run), every other :class:`SamGeoError` with ``1`` (the run
failed). See README, "Exit codes".
"""

from __future__ import annotations


class SamGeoError(Exception):
    """Base class of all sam-geo errors."""

    exit_code: int = 1


# --- bad input: exit code 2 ---------------------------------------------------------


class InputError(SamGeoError, ValueError):
    """The user's input (file, argument, config) cannot be used as given."""

    exit_code = 2


class RasterError(InputError):
    """A scene cannot be opened or used: missing, not a raster, unusable georeferencing."""


class CRSError(InputError):
    """A dataset has no CRS, or two CRSs cannot be reconciled."""


class PromptError(InputError):
    """A prompt layer cannot be read or contains nothing usable."""


class ConfigError(InputError):
    """A configuration value or command-line argument is invalid."""


class UnknownModelError(ConfigError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsError(InputError):
    """Model weights cannot be found, do not match their checksum or their model."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """No weights file in any of the places searched."""


class ChecksumMismatchError(WeightsError):
    """A weights file's sha256 differs from the registry's."""


class OutputError(InputError, OSError):
    """An output path cannot be written as asked (bad suffix, missing directory)."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and ``overwrite`` was not asked for."""


# --- failed run: exit code 1 -------------------------------------------------------


class RasterReadError(SamGeoError, OSError):
    """Reading a window of a scene failed (corrupt or truncated file, I/O error)."""


class WriteError(SamGeoError, OSError):
    """Writing an output failed; the previous file (if any) is left untouched."""


class RunError(SamGeoError):
    """A run finished with more failed tiles than allowed."""
