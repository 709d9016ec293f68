"""What a run records about what ran (meta.json's provenance), and how gradscope names a path to the user.

Shared by ``gradscope profile`` (one process) and its torchrun launcher (a job), so that both record a
script the same way and ``compare`` can verify and rerun either. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gradscope import store
from gradscope.record.runner import Target


def provenance(target: Target, name: str, as_module: bool, args: Sequence[str], command: Sequence[str],
               launcher: str | None) -> store.Provenance:
    """The provenance of ``target`` (the script ``name`` as given, run with ``args``), recorded by ``command``."""
    digest = hashlib.sha256(target.path.read_bytes()).hexdigest() if target.path.is_file() else None
    return store.Provenance(target=name, as_module=as_module, script_path=str(target.path), script_sha256=digest,
                            argv=tuple(target.argv), script_args=tuple(args), cwd=os.getcwd(),
                            command=tuple(command), executable=sys.executable or None, launcher=launcher)


def launcher(argv0: str) -> str | None:
    """How gradscope was started, from its own ``sys.argv[0]`` (read before the script's replaces it):
    ``python -m gradscope``, or the console script's absolute path."""
    path = Path(argv0)
    if argv0 == "-m" or (path.name == "__main__.py" and path.parent.name == "gradscope"):
        return "python -m gradscope"
    if not argv0 or argv0 == "-c":
        return None  # started from Python code: no command to name
    return str(path.absolute())


def shown(path: Path) -> str:
    """``path`` as the user is shown it: relative to the working directory when it lies under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
