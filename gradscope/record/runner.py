"""Run a script (or a module) exactly as ``python script.py args`` (``python -m module args``) would.

Two stages, as coverage.py's ``PyRunner`` does it: :func:`prepare` validates and compiles the target
*before* anything heavy is imported (a typo'd path fails in milliseconds, not after ``import torch``);
:func:`run` executes it. This module knows nothing of torch or of recording: the caller installs the
recorder between the two.

What the script sees, as under ``python``: ``__name__ == "__main__"``, its own absolute ``__file__``,
``sys.argv == [script, *args]``, its directory as ``sys.path[0]`` (the working directory for ``-m``),
the unchanged working directory, a fresh ``__main__`` module installed in ``sys.modules`` (and left
there, so ``atexit`` handlers, pickling and spawned DataLoader workers find the script's classes), and
nothing of gradscope's in its globals.
"""

from __future__ import annotations

import builtins
import importlib.machinery
import importlib.util
import os
import signal
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

from gradscope.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, GradscopeError, StopRun


class Terminated(BaseException):
    """SIGTERM arrived (raised by the caller's handler): unwind the script like Ctrl-C would, print
    nothing (python prints nothing when SIGTERM kills it), and end as ``128 + SIGTERM``."""


@dataclass
class Target:
    """A validated, compiled script or module, ready to run."""

    name: str  # as the user gave it
    as_module: bool
    path: Path  # the file that runs (a module's origin)
    code: types.CodeType
    argv: list[str]  # sys.argv as the script will see it
    path0: str | None  # the new sys.path[0]; None leaves sys.path alone (python -P)
    spec: importlib.machinery.ModuleSpec | None = None


@dataclass
class Outcome:
    """How the script ended: the exit code ``python`` would give, and a status for the run."""

    exit_code: int
    status: str  # "complete" | "failed" | "interrupted"
    error: str | None = None
    exception: BaseException | None = None


def prepare(name: str, args: list[str], as_module: bool = False) -> Target:
    """Validate and compile the target without running it.

    Raises:
        GradscopeError: the file does not exist, is not Python source, has a syntax error, or the
            module cannot be found.
    """
    return _prepare_module(name, args) if as_module else _prepare_file(name, args)


def _prepare_file(name: str, args: list[str]) -> Target:
    path = Path(name)
    if not path.exists():
        raise GradscopeError(f"can't open file {name!r}: no such file", EXIT_USAGE)
    if path.is_dir():
        raise GradscopeError(f"{name!r} is a directory: give the training script inside it", EXIT_USAGE)
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise GradscopeError(f"can't open file {name!r}: {exc.strerror}", EXIT_USAGE) from None
    absolute = path.absolute()
    code = _compile(source, str(absolute), name)
    path0 = None if sys.flags.safe_path else str(absolute.parent)
    return Target(name, False, absolute, code, [name, *args], path0)


def _compile(source: bytes, filename: str, shown: str) -> types.CodeType:
    if b"\x00" in source:
        raise GradscopeError(f"{shown!r} is not a Python file (it contains binary data)", EXIT_USAGE)
    try:
        # dont_inherit: gradscope's own `from __future__` flags must not leak into the user's code.
        return compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"line {exc.lineno}" if exc.lineno else "unknown line"
        raise GradscopeError(f"syntax error in {shown} ({where}): {exc.msg}", EXIT_ERROR) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise GradscopeError(f"{shown!r} is not a Python file: {exc}", EXIT_USAGE) from None


def _prepare_module(name: str, args: list[str]) -> Target:
    path0 = None if sys.flags.safe_path else os.getcwd()
    if path0 is not None:
        sys.path[0:1] = [path0]  # find the module as `python -m` would: from the working directory
    spec = _find_spec(name)
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        spec = _find_spec(f"{name}.__main__", package=name)
    loader = spec.loader
    if loader is None or not hasattr(loader, "get_code") or spec.origin is None:
        raise GradscopeError(f"no code object available for {name}", EXIT_ERROR)
    code = loader.get_code(spec.name)
    if code is None:
        raise GradscopeError(f"no code object available for {name}", EXIT_ERROR)
    return Target(name, True, Path(spec.origin), code, [spec.origin, *args], path0, spec)


def _find_spec(name: str, package: str | None = None) -> importlib.machinery.ModuleSpec:
    try:
        spec = importlib.util.find_spec(name)
    except ImportError as exc:
        if exc.name and name.startswith(exc.name):
            raise GradscopeError(f"no module named {exc.name!r}", EXIT_ERROR) from None
        raise GradscopeError(f"error while finding module {name!r}: {exc}", EXIT_ERROR) from None
    except SyntaxError as exc:
        raise GradscopeError(f"syntax error in {exc.filename} (line {exc.lineno}): {exc.msg}", EXIT_ERROR) from None
    if spec is None:
        if package is not None:
            raise GradscopeError(f"no module named {name!r}; {package!r} is a package and cannot be directly executed",
                                 EXIT_ERROR)
        raise GradscopeError(f"no module named {name!r}", EXIT_ERROR)
    return spec


def _main_module(target: Target) -> types.ModuleType:
    """A fresh ``__main__`` with exactly the globals ``python`` gives a script (or a -m module)."""
    module = types.ModuleType("__main__")
    if "__annotations__" in vars(sys.modules["__main__"]):
        module.__annotations__ = {}  # the interpreter gives __main__ one (before Python 3.14)
    module.__dict__.update(__builtins__=builtins, __file__=str(target.path), __cached__=None)
    if target.spec is not None:
        module.__dict__.update(__loader__=target.spec.loader, __package__=target.spec.parent,
                               __spec__=target.spec, __cached__=target.spec.cached)
    else:
        module.__dict__.update(__loader__=importlib.machinery.SourceFileLoader("__main__", str(target.path)),
                               __package__=None, __spec__=None)
    return module


def run(target: Target) -> Outcome:
    """Execute ``target`` as the program's ``__main__`` and report how it ended.

    ``sys.argv`` and ``sys.path[0]`` are set for the script and restored afterwards; the script's
    ``__main__`` module stays installed in ``sys.modules``. An uncaught exception is printed as
    ``python`` prints it (through the script's own ``sys.excepthook`` if it set one), minus this
    module's frame.
    """
    module = _main_module(target)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = list(target.argv)
    if target.path0 is not None:
        sys.path[0:1] = [target.path0]  # replaces the launcher's entry (gradscope's bin dir or cwd)
    sys.modules["__main__"] = module
    try:
        exec(target.code, module.__dict__)
    except SystemExit as exc:
        return _exit_outcome(exc)
    except StopRun as exc:
        return Outcome(EXIT_OK, "complete", str(exc), exc)
    except Terminated as exc:
        return Outcome(128 + signal.SIGTERM, "interrupted", "terminated by SIGTERM", exc)
    except KeyboardInterrupt as exc:
        _print_exception(exc)
        return Outcome(EXIT_INTERRUPTED, "interrupted", "KeyboardInterrupt", exc)
    except BaseException as exc:  # noqa: BLE001 - the script's exception, printed as python would
        _print_exception(exc)
        return Outcome(EXIT_ERROR, "failed", _error_line(exc), exc)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return Outcome(EXIT_OK, "complete")


def _exit_outcome(exc: SystemExit) -> Outcome:
    code = exc.code
    if code is None or code == 0:
        return Outcome(EXIT_OK, "complete", exception=exc)
    if isinstance(code, int):
        return Outcome(code, "failed", f"exit code {code}", exc)
    print(code, file=sys.stderr)  # sys.exit("message"): python prints it and exits 1
    return Outcome(EXIT_ERROR, "failed", str(code), exc)


def _error_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]


def _print_exception(exc: BaseException) -> None:
    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    exc.__traceback__ = tb  # drop run()'s own frame: the traceback then reads exactly as python's
    hook = sys.excepthook
    if getattr(hook, "__module__", "").startswith(("typer", "rich")):
        hook = sys.__excepthook__  # a CLI library's pretty hook is not the script's
    sys.stdout.flush()
    try:
        hook(type(exc), exc, tb)
    except Exception:  # a broken user hook: python prints both, and so do we
        traceback.print_exception(type(exc), exc, tb)
