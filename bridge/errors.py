"""User-facing errors and the exit codes the CLI maps them to.

Every error a user can cause carries a one-line message that names the thing at fault
(a file and a position, a URI, an option). The CLI prints that line and exits with the
code of the error class; only ``--debug`` shows a traceback. The codes are part of the
public contract (documented in docs/cli.md), so scripts and schedulers can branch on them.
"""

from __future__ import annotations


class ExitCode:
    OK = 0
    PARTIAL = 1  # some runs failed, the rest went through
    USAGE = 2  # bad option, unknown URI scheme, bad configuration
    BAD_INPUT = 3  # missing source, corrupt file, unknown schema version, unsafe path
    DIFFERENT = 4  # `verify` found a difference
    DESTINATION = 5  # the destination refused or could not be reached
    INTERNAL = 70  # a bug in trackbridge: please report it with --debug output
    INTERRUPTED = 130


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line for a user: its message's first line, else its type."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


class TrackbridgeError(Exception):
    """Base class: a problem the user can act on, reported as one line."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(TrackbridgeError):
    exit_code = ExitCode.USAGE


class BadInputError(TrackbridgeError):
    """Input that cannot be read as it is: say the file and, where known, the position."""

    exit_code = ExitCode.BAD_INPUT


class SourceNotFoundError(BadInputError):
    pass


class DestinationError(TrackbridgeError):
    exit_code = ExitCode.DESTINATION


class MissingExtraError(UsageError):
    """A tracker SDK is needed but not installed; name the extra that brings it."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"the {package!r} package is not installed; install it with pip install 'trackbridge[{extra}]'"
        )
