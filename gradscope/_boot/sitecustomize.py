"""gradscope's interpreter-start hook for the Python processes a profiled script starts.

``gradscope profile`` puts this directory first on ``PYTHONPATH``; Python's ``site`` imports this module
at start-up in every child interpreter (``torch.multiprocessing.spawn``, torchrun's workers, a launcher
that re-runs the script, DataLoader workers with spawn, any ``python`` the script runs). It does three
things, and nothing else:

1. removes its own directory from ``sys.path``, so the child's ``sys.path`` is what Python gives;
2. imports the next ``sitecustomize`` further on ``sys.path`` (Debian ships one), as if this one were not
   there;
3. when ``GRADSCOPE_JOB`` is set, hands over to :mod:`gradscope.record.bootstrap`, which waits for
   ``import torch`` before doing anything.

It must never raise: an error is one warning line, and the child goes on as under plain ``python``.
"""

import os
import sys


def _gradscope_boot() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [entry for entry in sys.path if not _same_dir(entry, here)]
    _chain(here)
    if not os.environ.get("GRADSCOPE_JOB"):
        return
    try:
        from gradscope.record import bootstrap
    except ImportError:
        # gradscope is not importable from this interpreter's path (its parent found it elsewhere):
        # borrow the package's own location for this one import, then give sys.path back.
        saved = sys.path[:]
        sys.path.append(os.path.dirname(os.path.dirname(here)))
        try:
            from gradscope.record import bootstrap
        finally:
            sys.path[:] = saved
    bootstrap.install()


def _same_dir(entry: str, here: str) -> bool:
    try:
        return os.path.abspath(entry or os.curdir) == here
    except (TypeError, ValueError):
        return False


def _chain(here: str) -> None:
    """Import the next ``sitecustomize`` on ``sys.path``; it replaces this module in ``sys.modules``,
    as it would be there without gradscope. Its failure is reported as ``site`` reports it."""
    ours = sys.modules.pop("sitecustomize", None)
    try:
        import sitecustomize  # noqa: F401 - the next one on sys.path (this directory is off it now)
    except ImportError as exc:
        if exc.name == "sitecustomize":
            if ours is not None:
                sys.modules["sitecustomize"] = ours  # none further on: this module stays the one imported
            return
        _site_error(exc)
    except Exception as exc:  # noqa: BLE001 - site prints it and starts the interpreter anyway
        _site_error(exc)


def _site_error(exc: BaseException) -> None:
    if sys.flags.verbose:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    else:
        sys.stderr.write(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{type(exc).__name__}: {exc}\n")


try:
    _gradscope_boot()
except Exception as _exc:  # noqa: BLE001 - the child must start as under python whatever happens here
    print(f"gradscope: warning: child process not recorded ({type(_exc).__name__}: {_exc})", file=sys.stderr)
