"""The one error convention of every verb, and a closed stdout.

Every error is one line on stderr starting with ``gradscope:``, never a traceback or a box; usage
errors exit 2. When the reader of stdout goes away (``gradscope recommend | head -1``), gradscope
stops writing and exits 0, as other CLIs do. ``cli.main`` calls these; nothing here imports typer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gradscope.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, UsageError


def check_output_file(path: Path, option: str) -> None:
    """A file to write: refuse a directory there, or a directory that does not exist (exit 2)."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: a directory is there; give a file name")
    if not path.absolute().parent.is_dir():
        raise UsageError(f"{option} {path}: the directory {path.absolute().parent} does not exist")


def cli_error(exc: Exception) -> int:
    """typer's (click's) own error as one line, exit 2 for usage; no arguments at all prints the help.

    Read by duck typing (``ctx``, ``format_message``, ``exit_code``), so nothing here imports typer.
    """
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        print(ctx.get_help(), file=sys.stderr)
        return EXIT_USAGE
    format_message = getattr(exc, "format_message", None)
    message = " ".join((format_message() if format_message else str(exc)).split())
    code = getattr(exc, "exit_code", EXIT_USAGE)
    return error_line(message, code if isinstance(code, int) and code else EXIT_USAGE)


def error_line(message: str, code: int) -> int:
    """Print ``gradscope: MESSAGE`` on stderr (after what stdout holds) and return ``code``."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        closed_stdout()
    print(f"gradscope: {message}", file=sys.stderr)
    return code


def stdout_is_devnull() -> bool:
    """Whether file descriptor 1 is /dev/null (rich points it there when the pipe closed)."""
    try:
        out, null = os.fstat(sys.stdout.fileno()), os.stat(os.devnull)
    except (OSError, ValueError, AttributeError):
        return False
    return (out.st_dev, out.st_ino) == (null.st_dev, null.st_ino)


def closed_stdout() -> int:
    """The reader of stdout went away (``| head``): stop writing, quietly, with 0 as other CLIs do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
    except (OSError, ValueError):
        pass
    return EXIT_OK


def exit_status(code: object) -> int:
    """A ``SystemExit`` code as an exit status: None is 0, a message is printed and is 1."""
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_ERROR
