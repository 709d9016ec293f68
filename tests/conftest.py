"""Shared test helpers: run a fixture script for real, under `python -m gradscope profile`.

Scripts live in tests/scripts. Besides training, a fixture script may print reference lines
``REF {json}`` (values computed with torch's own functions); they come back parsed in ``.refs``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import gradscope

SCRIPTS = Path(__file__).parent / "scripts"
GRADSCOPE = [sys.executable, "-m", "gradscope"]
#: Subprocesses that ``profiled_once.prefetch`` runs at the same time (the CI machine has 2 cores).
PARALLEL = int(os.environ.get("GRADSCOPE_TEST_PARALLEL", "2"))


@dataclass
class Profiled:
    """One finished subprocess: the process, the run it recorded and its REF lines."""

    proc: subprocess.CompletedProcess[str]
    run: Any  # gradscope.Run; None when no run was recorded
    refs: list[dict[str, Any]]

    def ref(self, case: str) -> list[dict[str, Any]]:
        """The REF lines of one sub-case, in the order they were printed."""
        return [r for r in self.refs if r.get("case") == case]


def parse_refs(stdout: str) -> list[dict[str, Any]]:
    """Every ``REF {json}`` line of ``stdout``, parsed (NaN and Infinity allowed)."""
    return [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("REF ")]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without gradscope's own variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADSCOPE_")}
    env.update(extra or {})
    return env


def interruptible() -> None:
    """``preexec_fn`` for a child the test interrupts: SIGINT back to its default action, since a test run
    started in the background by a non-interactive shell hands its children SIGINT ignored, and python
    then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_exit_ok(proc: subprocess.CompletedProcess[str]) -> None:
    """Fail with the command and the end of its stderr unless it exited 0."""
    assert proc.returncode == 0, f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n{proc.stderr[-4000:]}"


def run_profile(script: str, *args: str, runs_dir: Path, options: tuple[str, ...] = (), plain: bool = False,
                cwd: Path = SCRIPTS, env: dict[str, str] | None = None, timeout: float = 300,
                check: bool = True) -> Profiled:
    """``python -m gradscope profile --runs-dir RUNS_DIR [options] SCRIPT ARGS`` as a real subprocess.

    ``plain=True`` runs ``python SCRIPT ARGS`` instead, with ``GRADSCOPE_DIR=RUNS_DIR`` (a script that
    uses the Python API). With ``check`` (the default) a non-zero exit fails the test.
    """
    if plain:
        argv, env = [sys.executable, script, *args], {**(env or {}), "GRADSCOPE_DIR": str(runs_dir)}
    else:
        argv = [*GRADSCOPE, "profile", "--runs-dir", str(runs_dir), *options, script, *args]
    proc = subprocess.run(argv, cwd=cwd, env=clean_env(env), capture_output=True, text=True, timeout=timeout)
    if check:
        assert_exit_ok(proc)
    run = gradscope.load_run(runs_dir=runs_dir) if (runs_dir / "latest").exists() else None
    return Profiled(proc, run, parse_refs(proc.stdout))


@pytest.fixture
def profile_script(tmp_path: Path) -> Callable[..., Profiled]:
    """``profile_script(script, *args, **kw) -> Profiled``: one fresh run (see run_profile)."""
    counter = iter(range(1_000_000))

    def profile(script: str, *args: str, **kwargs: Any) -> Profiled:
        return run_profile(script, *args, runs_dir=tmp_path / f"runs{next(counter)}", **kwargs)

    return profile


class ProfiledOnce:
    """Session cache of runs, keyed by their arguments: tests that check sub-cases of one script share
    a single subprocess (each pays ~3-5 s of interpreter, torch and gradscope start-up).
    ``prefetch`` starts runs in the background, ``PARALLEL`` at a time; calling waits for the result."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._pool = ThreadPoolExecutor(max_workers=max(1, PARALLEL))
        self._runs: dict[tuple[Any, ...], Future[Profiled]] = {}
        self._marked_started = False

    def prefetch_marked(self, items: list[pytest.Item]) -> None:
        """Start the run of every collected test marked ``profiled`` (once a session), in test order."""
        if self._marked_started:
            return
        self._marked_started = True
        for item in items:
            marker = item.get_closest_marker("profiled")
            if marker is not None:
                self.prefetch(*marker.args, **marker.kwargs)

    def prefetch(self, script: str, *args: str, **kwargs: Any) -> Future[Profiled]:
        key = (script, args, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in self._runs:  # a failed run is kept too: its dependants fail without re-running it
            runs_dir = self._factory.mktemp("runs")
            self._runs[key] = self._pool.submit(run_profile, script, *args, runs_dir=runs_dir, check=False, **kwargs)
        return self._runs[key]

    def __call__(self, script: str, *args: str, check: bool = True, **kwargs: Any) -> Profiled:
        result = self.prefetch(script, *args, **kwargs).result()
        if check:
            assert_exit_ok(result.proc)
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "profiled(script, *args, **kwargs): the test reads this run through the `profiled` fixture; "
        "the runs of all selected tests start in the background when the first one is needed")


@pytest.fixture(scope="session")
def profiled_once(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProfiledOnce]:
    """A session-wide :class:`ProfiledOnce`."""
    runs = ProfiledOnce(tmp_path_factory)
    yield runs
    runs.close()


@pytest.fixture
def profiled(request: pytest.FixtureRequest, profiled_once: ProfiledOnce) -> Profiled:
    """The run named by the test's ``@pytest.mark.profiled(script, *args, **kwargs)``, shared by every
    test that names the same one. The first use starts every selected test's run in the background."""
    marker = request.node.get_closest_marker("profiled")
    assert marker is not None, "the profiled fixture needs @pytest.mark.profiled(script, *args)"
    profiled_once.prefetch_marked(request.session.items)
    return profiled_once(*marker.args, **marker.kwargs)
