"""Turn exceptions into one or two plain lines on stderr and the documented exit code."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from conv3dt.plan import MemoryLimitError
    from conv3dt.spec import ChannelMismatchError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID",
    "CommandError",
    "exit_code_for",
    "message_for",
    "reporting",
]

EXIT_FAILURE = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A request refused before any work for what it asks, not for how it is written.

    Shown in one line like the library's errors, without Click's pointer to
    ``--help``, and exits with code 2.
    """

    exit_code = EXIT_INVALID


def exit_code_for(error: BaseException) -> int:
    """2 for invalid specs, inputs and arguments (ValueError); 130 for interrupts; else 1.

    An exception class may set ``exit_code`` itself (a failed write is a
    ValueError of the volume layer but a runtime failure).
    """
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    declared = getattr(error, "exit_code", None)
    if isinstance(declared, int):
        return declared
    if isinstance(error, ValueError):
        return EXIT_INVALID
    return EXIT_FAILURE


def message_for(error: BaseException) -> str:
    """A one-line (at most two-line) description of an error."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, MemoryError):
        return "out of memory; lower --memory-limit"
    from conv3dt.plan import MemoryLimitError

    if isinstance(error, MemoryLimitError):
        return _memory_limit_message(error)
    from conv3dt.spec import ChannelMismatchError

    if isinstance(error, ChannelMismatchError):
        return f"{error}\n  {_channel_hint(error)}"
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return text


def _memory_limit_message(error: MemoryLimitError) -> str:
    from conv3dt.plan import format_bytes

    shape = "x".join(map(str, error.min_tile_shape))
    # Whole MiB, rounded up, so that the value suggested is one that works.
    suggested = -(-error.minimum // 2**20)
    return (
        f"--memory-limit {format_bytes(error.memory_limit)} is too small: the smallest tile "
        f"({shape} output voxels) needs {format_bytes(error.minimum)} ({error.minimum} bytes), "
        f"engine work blocks included\n  give --memory-limit {suggested}M or more"
    )


def _channel_hint(error: ChannelMismatchError) -> str:
    make = f"a spec for {error.got} input channels (conv3dt init --in-channels {error.got})"
    if error.four_d and error.expected == 1:
        return (
            f"give --4d-as-batch to read its 4th dimension as a batch of 1-channel volumes, "
            f"or {make}"
        )
    return f"give {make}"


def report(error: BaseException, debug: bool) -> None:
    """Print an error as ``conv3dt: error: ...`` (with the traceback when ``debug``)."""
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    click.echo(f"conv3dt: error: {message_for(error)}", err=True)


@contextmanager
def reporting(debug: bool) -> Iterator[None]:
    """Run a command body, mapping exceptions to messages and exit codes."""
    try:
        yield
    except (click.exceptions.Exit, click.ClickException, SystemExit):
        raise
    except (Exception, KeyboardInterrupt) as error:
        report(error, debug)
        sys.exit(exit_code_for(error))
