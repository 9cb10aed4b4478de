"""The ``sam-geo`` command line: a thin layer over the Python API.

One module per command (``segment``, ``auto``, ``text``, ``evaluate``, ``show``,
``models``); the options shared by the segmentation commands are built from
:class:`sam_geo.settings.Settings` in :mod:`sam_geo.cli.options`. The API (torch, ray,
geopandas) is imported inside the commands, so ``sam-geo --help`` stays fast.

Exit codes: 0 success; 1 the run failed (an error while running, see the message);
2 bad input or usage (nothing was run); 130 interrupted. With ``--debug`` errors show
their traceback.
"""

from __future__ import annotations

import sys
import traceback

import click

from sam_geo.cli import auto, evaluate, models, options, segment, show, text
from sam_geo.errors import SamGeoError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "cli", "main"]


@click.group(context_settings=options.HELP_SETTINGS)
@click.version_option(package_name="sam-geo")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Segment satellite and aerial scenes with Segment Anything; get georeferenced polygons."""
    ctx.obj = {"debug": debug}


for _command in (segment.segment, auto.auto, text.text, evaluate.evaluate_command, show.show_command,
                 models.models):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sam-geo`` script; returns the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="sam-geo", standalone_mode=False)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            return _interrupted()
        click.echo("sam-geo: aborted", err=True)
        return EXIT_FAILED
    except click.ClickException as exc:
        exc.show()
        return EXIT_BAD_INPUT
    except SamGeoError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"sam-geo: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as exc:  # the last line of defence: no traceback without --debug
        return _unexpected(exc, debug)
    return EXIT_OK


def _interrupted() -> int:
    """Ctrl-C: say that nothing was written; exit 130."""
    click.echo("sam-geo: interrupted; no output was written", err=True)
    return EXIT_INTERRUPTED


def _unexpected(exc: Exception, debug: bool) -> int:
    """An error that is not a SamGeoError: one paragraph (the traceback with --debug)."""
    if debug:
        traceback.print_exc()
    click.echo(
        f"sam-geo: unexpected error ({type(exc).__name__}): {exc}\n"
        "Run again with --debug for the traceback and report it if it looks like a bug.",
        err=True,
    )
    return EXIT_FAILED
