"""Faults and bad input on the reading side, for real: crafted runs, signals, pipes, usage errors.

Every case runs the CLI as a subprocess (``python -m gradscope``) on a run recorded for real; the
rows of docs/reliability.md name these tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GRADSCOPE, SCRIPTS, assert_exit_ok, clean_env

SLOW = "cmp_slow.py"


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GRADSCOPE, *argv], cwd=cwd, env=clean_env(env), capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(working directory, run directory) of a 5-step run of cmp_slow.py, recorded in its own directory."""
    work = tmp_path_factory.mktemp("work")
    shutil.copy(SCRIPTS / SLOW, work / SLOW)
    assert_exit_ok(_run(["profile", "-q", "--runs-dir", "runs", SLOW], work))
    (run,) = [p for p in (work / "runs").iterdir() if p.is_dir() and not p.is_symlink()]
    return work, run


def _craft(run: Path, where: Path, **changes: object) -> Path:
    """A copy of ``run`` in ``where`` with meta.json's keys changed."""
    copy = where / "runs" / f"crafted-{len(list((where / 'runs').glob('crafted-*')))}"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta.update(changes)
    (copy / "meta.json").write_text(json.dumps(meta))
    return copy


def _one_line(proc: subprocess.CompletedProcess[str], code: int, start: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith(start), (proc.returncode, proc.stderr)


# --------------------------------------------------------------------------------------------------
# Nothing runs unseen
# --------------------------------------------------------------------------------------------------


def test_crafted_meta_pointing_at_another_program_is_refused_and_it_never_runs(recorded: tuple[Path, Path]) -> None:
    work, run = recorded
    marker = work / "PWNED"
    (work / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    fake = work / "fakepython"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    cases = {
        "target": _craft(run, work, target="evil.py", argv=["evil.py"], command=["gradscope", "profile", "evil.py"]),
        "args": _craft(run, work, script_args=["--evil"]),
        "interpreter": _craft(run, work, executable=str(fake), host="elsewhere"),
    }
    for name, crafted in cases.items():
        for extra in ([], ["--dry-run"]):
            proc = _run(["compare", "--runs-dir", "runs", str(crafted), "--max-norm", "1", "--seeds", "1", *extra], work)
            _one_line(proc, 1, "gradscope: ")
            assert "--trust-run" in proc.stderr or "--python" in proc.stderr, (name, proc.stderr)
    assert not marker.exists()
    chosen = _run(["compare", "--runs-dir", "runs", str(cases["interpreter"]), "--python", sys.executable,
                   "--dry-run"], work)
    assert chosen.returncode == 0 and f"with {sys.executable}" in chosen.stdout, chosen.stderr
    (work / "gradscope").mkdir()  # a working directory that would shadow gradscope itself
    try:
        shadow = _run(["compare", "--runs-dir", str(work / "runs"), str(run), "--dry-run"], work.parent)
        _one_line(shadow, 1, "gradscope: run ")
        assert "holds a 'gradscope'" in shadow.stderr
    finally:
        (work / "gradscope").rmdir()
    assert not marker.exists()


def test_a_changed_script_is_refused_unless_trust_run(recorded: tuple[Path, Path], tmp_path: Path) -> None:
    work, run = recorded
    shutil.copytree(work, tmp_path / "w")
    script = tmp_path / "w" / SLOW
    copy = _craft(run, tmp_path / "w", cwd=str(tmp_path / "w"), script_path=str(script))
    script.write_text(script.read_text() + "# edited\n")
    refused = _run(["compare", "--runs-dir", "runs", str(copy), "--dry-run"], tmp_path / "w")
    _one_line(refused, 1, f"gradscope: {script} changed since run {copy.name} was recorded (sha256 ")
    trusted = _run(["compare", "--runs-dir", "runs", str(copy), "--dry-run", "--trust-run"], tmp_path / "w")
    assert trusted.returncode == 0 and "--trust-run: the arms run the current file" in trusted.stdout, trusted.stderr


# --------------------------------------------------------------------------------------------------
# Bad input before any work
# --------------------------------------------------------------------------------------------------


def test_zero_step_run_and_out_a_file_are_refused_before_any_arm(recorded: tuple[Path, Path], tmp_path: Path) -> None:
    shutil.copy(SCRIPTS / SLOW, tmp_path / SLOW)
    assert_exit_ok(_run(["profile", "-q", "--runs-dir", "runs", SLOW], tmp_path, {"CMP_SLOW_STEPS": "0"}))
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    for max_norm in ("1", "auto"):
        proc = _run(["compare", "--runs-dir", "runs", "--max-norm", max_norm], tmp_path)
        _one_line(proc, 3, "gradscope: run ")
        assert "recorded no optimizer step" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == before  # no arm ran, no compare directory
    work, run = recorded
    before = sorted(p.name for p in (work / "runs").iterdir())
    (tmp_path / "afile").write_text("")
    out = _run(["compare", "--runs-dir", "runs", str(run), "--max-norm", "1", "--out", str(tmp_path / "afile")], work)
    _one_line(out, 2, f"gradscope: --out {tmp_path / 'afile'}: a file is there")
    assert sorted(p.name for p in (work / "runs").iterdir()) == before


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """``path`` made unwritable for real: mode 555, or for root (who ignores modes) the immutable attribute."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("root, and no immutable attribute on this filesystem: nothing makes a directory read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_runs_dir_is_refused_before_any_arm(recorded: tuple[Path, Path], tmp_path: Path) -> None:
    work, run = recorded
    runs = tmp_path / "runs"
    shutil.copytree(run, runs / run.name)
    with _read_only(runs):
        proc = _run(["compare", "--runs-dir", str(runs), run.name, "--max-norm", "1"], work)
    _one_line(proc, 1, f"gradscope: the runs directory {runs} is not writable")


USAGE = [
    ["compare", "--bogus"], ["compare", "--seeds", "0"], ["compare", "--seeds", "x"], ["compare", "--max-time", "nan"],
    ["compare", "--max-norm", "0"], ["recommend", "--percentile", "0"], ["recommend", "--percentile", "abc"],
    ["recommend", "--skip-steps", "-1"], ["recommend", "--optimizer", "-1"], ["recommend", "a", "b"],
    ["recommend", "--plot", "out.txt"], ["recommend", "--plot", "nodir/out.png"], ["frobnicate"],
]


def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    for argv in USAGE:
        proc = _run([*argv, "--runs-dir", str(tmp_path)] if argv[0] != "frobnicate" else argv, tmp_path)
        _one_line(proc, 2, "gradscope: ")
        assert proc.stdout == "", argv


def test_closed_pipes_end_quietly_with_0(recorded: tuple[Path, Path]) -> None:
    work, run = recorded
    for argv in (["recommend"], ["recommend", "--json"], ["compare", "--dry-run"], ["compare", "--help"]):
        proc = subprocess.Popen([*GRADSCOPE, *argv, "--runs-dir", "runs", str(run)], cwd=work, env=clean_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the first line: every write meets a closed pipe
        err = proc.stderr.read().decode()
        assert proc.wait(60) == 0 and "Error" not in err and "Traceback" not in err, (argv, err)


def test_an_overflowing_threshold_draws_without_warnings(recorded: tuple[Path, Path], tmp_path: Path) -> None:
    work, run = recorded
    proc = _run(["compare", "--runs-dir", "runs", str(run), "--max-norm", "1e308", "--seeds", "1", "--json",
                 "--out", str(tmp_path / "cmp")], work)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cmp" / "grad_norm.png").is_file()
    assert all(line.startswith("gradscope: ") for line in proc.stderr.splitlines()), proc.stderr


# --------------------------------------------------------------------------------------------------
# The arms end whenever compare ends
# --------------------------------------------------------------------------------------------------


def _arm_pid(runs: Path, known: set[str], deadline: float) -> int:
    """The pid of the arm that started after ``known`` (from its meta.json)."""
    while time.monotonic() < deadline:
        for path in runs.iterdir():
            if path.name not in known and (path / "meta.json").is_file():
                try:
                    pid = json.loads((path / "meta.json").read_text()).get("pid")
                except ValueError:
                    continue
                if pid:
                    return int(pid)
        time.sleep(0.2)
    raise AssertionError("no arm started")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie no parent reaped yet has stopped running


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_the_arm_ends_when_compare_is_killed(signum: int, recorded: tuple[Path, Path]) -> None:
    work, run = recorded
    runs = work / "runs"
    known = {p.name for p in runs.iterdir()}
    env = clean_env({"CMP_SLOW_STEPS": "100000", "CMP_SLOW_DELAY": "0.05"})
    proc = subprocess.Popen([*GRADSCOPE, "compare", "--runs-dir", "runs", str(run), "--max-norm", "1", "--seeds",
                             "1", "--steps", "100000"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        pid = _arm_pid(runs, known, time.monotonic() + 60)
        time.sleep(0.5)
        assert _alive(pid)
        proc.send_signal(signum)
        code = proc.wait(30)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"arm {pid} still runs after compare got signal {signum}"
        assert code == (-signum if signum == signal.SIGKILL else 128 + signum), proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
