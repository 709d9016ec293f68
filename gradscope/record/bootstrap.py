"""Recording the Python processes a profiled script starts: the environment protocol and the child's side.

``gradscope profile`` records its own process. The ranks a script starts itself are other interpreters:
``torch.multiprocessing.spawn`` children, a launcher that re-runs the script (Lightning's ``ddp``),
Lightning's ``ddp_spawn``, the workers of ``torch.distributed.run`` run under ``gradscope profile``. Hooks
installed in the parent do not reach them. So, after its own start-up, the parent exports
(:func:`child_env`):

- ``GRADSCOPE_JOB``: JSON ``{"run_dir", "config", "quiet"}``, the job a child records into;
- ``PYTHONPATH`` with ``gradscope/_boot`` first, whose ``sitecustomize`` calls :func:`install` at the
  start of every child interpreter (and gives that child back the ``sys.path`` Python gives it).

:func:`install` costs a child nothing until it imports torch: a post-import hook on ``torch`` (a finder on
``sys.meta_path``, removed at its first use) then calls :func:`gradscope.record.job.start_child_recorder`,
which writes only once the process makes an optimizer. A Python child that never imports torch (a tool
the script runs) is untouched, and does not see ``GRADSCOPE_PROFILING`` either; a DataLoader worker
imports torch but makes no optimizer, so it records nothing.

Torch-free (so is :mod:`gradscope.record.job`, whose :class:`~gradscope.record.job.JobEnv` is the one
reader and writer of ``GRADSCOPE_JOB``): this module runs at the start of every child interpreter.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from gradscope.record.job import JOB_ENV, JobEnv

PROFILING_ENV = "GRADSCOPE_PROFILING"
#: The directory ``gradscope profile`` puts first on its children's ``PYTHONPATH``.
BOOT_DIR = Path(__file__).resolve().parent.parent / "_boot"


def child_env(job: JobEnv, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables a parent exports so that the Python processes it starts record into ``job``.

    Args:
        job: the job's run directory (absolute), recording options and ``--quiet``.
        environ: the parent's environment (its ``PYTHONPATH`` is kept after gradscope's entry).
    """
    boot = str(BOOT_DIR)
    rest = [entry for entry in environ.get("PYTHONPATH", "").split(os.pathsep) if entry and entry != boot]
    return {JOB_ENV: job.to_env(), "PYTHONPATH": os.pathsep.join([boot, *rest])}


def install() -> None:
    """The child's side, from ``sitecustomize``: record this interpreter into the job once it imports torch."""
    job = JobEnv.from_environ(os.environ)  # a malformed one warns once and records nothing
    if job is None:
        return
    # Only a process that may train sees GRADSCOPE_PROFILING: it comes back when torch is imported.
    profiling = os.environ.pop(PROFILING_ENV, None)

    def on_torch() -> None:
        if profiling is not None:
            os.environ[PROFILING_ENV] = profiling
        from gradscope.record.job import start_child_recorder

        start_child_recorder(job)

    when_imported("torch", on_torch)


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` once, right after top-level module ``name`` has been imported (now if it has been).

    A failure of the callback is one warning; the import itself always succeeds as it would have.
    """
    if name in sys.modules:
        _guarded(callback)
    else:
        sys.meta_path.insert(0, _PostImportFinder(name, callback))


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds ``name`` through the other finders and wraps its loader's ``exec_module`` to call back after it."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self._name = name
        self._callback = callback

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self._name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once: later imports pay nothing
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original, callback = loader.exec_module, self._callback

        def exec_module(module: types.ModuleType) -> None:
            try:
                original(module)
            finally:
                vars(loader).pop("exec_module", None)  # the loader is the module's own: put it back as it was
            _guarded(callback)  # only after a successful import

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _guarded(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception as exc:  # noqa: BLE001 - the child runs on unrecorded rather than fail
        _warn(f"this process is not recorded ({type(exc).__name__}: {exc})")


def _warn(message: str) -> None:
    print(f"gradscope: warning: {message}", file=sys.stderr, flush=True)
