"""What compare will run, checked against the recorded run before any arm starts.

A run directory is data that people send each other: its meta.json names a script, arguments, a
working directory and an interpreter, and compare runs them. This module resolves the file an arm
will run exactly as the arm will (the recorded target, from the recorded working directory), hashes
that same file, and checks the recorded command and interpreter. A mismatch refuses the run (exit
1) unless the user passes ``--trust-run``; the interpreter is accepted only when it is this one, or
the run was recorded on this host in a run directory the current user owns. Never imports torch.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from pathlib import Path

from gradscope import store
from gradscope.errors import GradscopeError, UsageError

TRUST_HINT = "check it, then rerun with --trust-run to run it anyway"


def target_file(prov: store.Provenance) -> Path | None:
    """The file an arm will run: the target resolved from the recorded working directory.

    A module (``-m``) is looked up as ``python -m`` finds it first: in the working directory. None
    when no such file is there (an installed module: it cannot be checked without running code).
    """
    cwd = Path(prov.cwd)
    if not prov.as_module:
        return (cwd / prov.target).resolve()
    base = cwd.joinpath(*prov.target.split("."))
    for candidate in (base.with_name(base.name + ".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_script(run: store.Run, prov: store.Provenance, trust: bool, notes: list[str]) -> bool:
    """Check that the file the arms run is the recorded script, unchanged; return True when it changed.

    Raises:
        GradscopeError: the script is gone (always), or it differs from the record and ``trust`` is False.
    """
    recorded = prov.script_sha256 or "unknown"
    found = target_file(prov)
    path = found if found is not None else Path(prov.script_path).resolve()
    if not path.is_file():
        raise GradscopeError(f"the script {path} of run {run.id} no longer exists (recorded sha256 {recorded[:12]}); "
                             "restore it or profile the script again")
    problem = None
    if found is None:
        problem = (f"run {run.id} runs the module {prov.target}, which is not in its working directory {prov.cwd}: "
                   "which file the interpreter picks cannot be checked without running code")
    elif path != Path(prov.script_path).resolve():
        problem = f"run {run.id} would run {path}, but its meta.json records the script {prov.script_path}"
    elif prov.script_sha256 is None:
        problem = f"run {run.id} records no sha256 of its script {path}, so it cannot be checked"
    current = sha256_of(path)
    changed = problem is not None or current != prov.script_sha256
    if problem is None and changed:
        problem = (f"{path} changed since run {run.id} was recorded (sha256 {recorded[:12]} then, "
                   f"{current[:12]} now)")
    if problem is None:
        return False
    if not trust:
        raise GradscopeError(f"{problem}; {TRUST_HINT}")
    notes.append(f"warning: {problem}: --trust-run: the arms run the current file")
    return changed


def check_command(run: store.Run, prov: store.Provenance, trust: bool, notes: list[str]) -> None:
    """The recorded command line must be the one compare rebuilds from the target and arguments.

    Raises:
        GradscopeError: it differs (or the working directory would shadow gradscope) and ``trust`` is False.
    """
    launch = run.meta.launch
    # A job started by `gradscope profile --nproc-per-node` records torchrun's options before the script.
    options = launch.launcher_args if run.ranks and launch is not None and launch.via == "gradscope" else ()
    expected = ("gradscope", "profile", *options, *(["-m"] if prov.as_module else []), prov.target,
                *prov.script_args)
    problems = []
    if tuple(prov.command) != expected or tuple(prov.argv[1:]) != tuple(prov.script_args):
        problems.append(f"its recorded command ({' '.join(prov.command)}) is not its target and arguments")
    cwd = Path(prov.cwd)
    own = Path(__file__).resolve().parents[2]  # the directory that holds this gradscope package
    if any((cwd / name).exists() for name in ("gradscope", "gradscope.py")) and cwd.resolve() != own:
        problems.append(f"its working directory {cwd} holds a 'gradscope' that python -m gradscope would import")
    if not problems:
        return
    problem = f"run {run.id}: {'; '.join(problems)}"
    if not trust:
        raise GradscopeError(f"{problem}; {TRUST_HINT}")
    notes.append(f"warning: {problem}: --trust-run: running it anyway")


def _owned_here(run: store.Run) -> bool:
    """Recorded on this host, in a run directory (and meta.json) owned by the current user."""
    if run.meta.host != socket.gethostname() or not hasattr(os, "getuid"):
        return False
    try:
        return all(p.stat().st_uid == os.getuid() for p in (run.path, run.path / "meta.json"))
    except OSError:
        return False


def interpreter(run: store.Run, prov: store.Provenance, chosen: str | None, trust: bool, notes: list[str]) -> str:
    """The interpreter the arms run with: ``--python``, else the recorded one when it can be trusted.

    Raises:
        UsageError: ``--python`` names no executable file (exit 2).
        GradscopeError: the recorded interpreter is gone, or is another one from a run not recorded
            here by this user, and neither ``--python`` nor ``--trust-run`` was given (exit 1).
    """
    if chosen is not None:
        path = os.path.abspath(os.path.expanduser(chosen))  # a symlink stays itself: its venv is where it sits
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise UsageError(f"--python {chosen}: no executable file there")
        return path
    recorded = prov.executable
    if recorded is None:
        notes.append(f"run {run.id} does not record its interpreter (an older gradscope recorded it): the arms "
                     f"run with this one, {sys.executable}; choose another with --python PATH")
        return sys.executable
    if not os.path.isfile(recorded):
        raise GradscopeError(f"the interpreter {recorded} that ran run {run.id} no longer exists; "
                             "choose one with --python PATH")
    if os.path.abspath(recorded) == os.path.abspath(sys.executable) or _owned_here(run) or trust:
        return recorded
    raise GradscopeError(f"run {run.id} was recorded with the interpreter {recorded}, on another host or in a run "
                         f"directory another user owns; choose one with --python PATH, or {TRUST_HINT}")
