"""Exit codes and the exceptions that carry them.

Domain code raises a :class:`GradscopeError` with one user-facing sentence; ``cli.main`` is the one
place that turns it into a line on stderr and an exit code. Nothing here imports torch.
"""

from __future__ import annotations

#: The run (or the report) finished normally.
EXIT_OK = 0
#: gradscope could not do what was asked, or the profiled script raised (as ``python`` exits 1).
EXIT_ERROR = 1
#: The command line was wrong (typer's own code for usage errors).
EXIT_USAGE = 2
#: The run exists but holds nothing to analyse (zero steps, or no finite norm).
EXIT_NO_DATA = 3
#: Interrupted by Ctrl-C, after everything recorded so far was saved (the shell's 128 + SIGINT).
EXIT_INTERRUPTED = 130


class GradscopeError(Exception):
    """An expected failure: printed as one line on stderr, never as a traceback.

    Args:
        message: one sentence that names the problem and, where possible, what to do next.
        exit_code: the process exit code ``cli.main`` returns for it.
    """

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UsageError(GradscopeError):
    """The arguments name something that cannot be used (a missing script, a bad value)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


class RunNotFoundError(GradscopeError):
    """No run matches the id or path that was given, or no run was ever recorded."""


class RunFormatError(GradscopeError):
    """A file or directory is not a gradscope run, or was written by a newer schema."""


class NoDataError(GradscopeError):
    """The run holds no step that can be analysed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_NO_DATA)


class StopRun(BaseException):
    """Raised out of an optimizer step to end the script early (``--max-steps``/``--max-time``).

    A ``BaseException``, like ``KeyboardInterrupt``, so that a script's ``except Exception`` does not
    swallow it; the runner treats it as a clean, complete end of the run.
    """
