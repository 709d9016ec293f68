"""`gradscope profile X` behaves like `python X`: differential tests against the real interpreter.

Every test runs real subprocesses: once under plain `python`, once under the installed CLI, and
compares what the script saw and how the process ended (cf. coverage.py's EnvironmentTest).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import interruptible, parse_refs

import gradscope

SCRIPTS = Path(__file__).parent / "scripts"
GRADSCOPE = [sys.executable, "-m", "gradscope"]


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("GRADSCOPE_PROFILING", None)
    return subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def _profile(args: list[str], cwd: Path, runs: Path, env: dict[str, str] | None = None, **kw: float) -> subprocess.CompletedProcess[str]:
    return _run([*GRADSCOPE, "profile", "--runs-dir", str(runs), *args], cwd, env, **kw)


def _dump(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# What the script sees
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cwd_rel", "script_rel", "args"),
    [
        (".", "env_dump.py", ["a", "--b", "--help"]),  # flags after the script, --help included, go to it
        ("..", "scripts/env_dump.py", ["--lr=3e-4"]),  # a far-away script: sys.path[0] is its directory
        (".", "env_dump.py", ["--", "x"]),  # a literal -- after the script is the script's too
    ],
)
def test_script_sees_what_python_gives_it(tmp_path: Path, cwd_rel: str, script_rel: str, args: list[str]) -> None:
    cwd = (SCRIPTS / cwd_rel).resolve()
    plain = _run([sys.executable, script_rel, *args], cwd)
    profiled = _profile(["-q", script_rel, *args], cwd, tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert profiled.returncode == 0, profiled.stderr
    expected, seen = _dump(plain.stdout), _dump(profiled.stdout)
    assert seen.pop("profiling_env") == "1"
    assert expected.pop("profiling_env") is None
    assert seen == expected
    assert seen["argv"] == [script_rel, *args]


def test_module_sees_what_python_m_gives_it(tmp_path: Path) -> None:
    plain = _run([sys.executable, "-m", "pkg.env_mod", "x", "--flag"], SCRIPTS)
    profiled = _profile(["-q", "-m", "pkg.env_mod", "x", "--flag"], SCRIPTS, tmp_path)
    assert profiled.returncode == 0, profiled.stderr
    expected, seen = _dump(plain.stdout), _dump(profiled.stdout)
    seen.pop("profiling_env"), expected.pop("profiling_env")
    assert seen == expected
    assert seen["spec"] == "pkg.env_mod" and seen["package"] == "pkg"


def test_console_script_and_python_m_agree(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("gradscope")
    if not exe.exists():
        pytest.skip("the gradscope console script is not installed next to this interpreter")
    via_m = _profile(["-q", "env_dump.py", "1"], SCRIPTS, tmp_path)
    via_exe = _run([str(exe), "profile", "--runs-dir", str(tmp_path), "-q", "env_dump.py", "1"], SCRIPTS)
    assert via_exe.returncode == 0, via_exe.stderr
    assert _dump(via_exe.stdout) == _dump(via_m.stdout)


# --------------------------------------------------------------------------------------------------
# How the script ends
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("raises.py", []),
        ("exits.py", ["17"]),
        ("exits.py", ["msg"]),
        ("exits.py", ["none"]),
        ("exits.py", ["0"]),
        ("exits.py", ["kbd"]),
    ],
)
def test_exit_code_and_traceback_match_python(tmp_path: Path, script: str, args: list[str]) -> None:
    plain = _run([sys.executable, script, *args], SCRIPTS)
    profiled = _profile(["-q", script, *args], SCRIPTS, tmp_path)
    assert profiled.returncode == plain.returncode
    assert profiled.stderr == plain.stderr  # the traceback text, sys.exit("msg") text, byte for byte
    assert profiled.stdout == plain.stdout


def test_failed_script_keeps_its_steps(tmp_path: Path) -> None:
    result = _profile(["fails_midway.py"], SCRIPTS, tmp_path)
    assert result.returncode == 1
    assert "RuntimeError: data loader exploded at step 3" in result.stderr
    run = gradscope.load_run(runs_dir=tmp_path)
    assert run.status == "failed"
    assert run.meta.error == "RuntimeError: data loader exploded at step 3"
    assert run.meta.exit_code == 1
    assert len(run.steps) == 3 and run.complete


def test_zero_steps_warns_and_keeps_exit_code(tmp_path: Path) -> None:
    result = _profile(["no_steps.py"], SCRIPTS, tmp_path)
    assert result.returncode == 0
    assert "no training here" in result.stdout
    assert "no optimizer step was recorded" in result.stderr
    assert "subprocess" in result.stderr  # says why this can happen
    assert len(gradscope.load_run(runs_dir=tmp_path).steps) == 0
    # Nothing the run does not need: torch alone loads neither (start-up cost, bench/edges.py).
    assert parse_refs(result.stdout) == [{"torch._dynamo": False, "pandas": False}]


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_dataloader_workers_with_dataset_in_main(tmp_path: Path, method: str) -> None:
    result = _profile(["-q", "dl_workers.py", method], SCRIPTS, tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "STEPS 4" in result.stdout
    run = gradscope.load_run(runs_dir=tmp_path)
    assert list(run.steps["step"]) == [0, 1, 2, 3]
    assert run.complete


# --------------------------------------------------------------------------------------------------
# Bad input: one line, a documented code, no traceback, and no torch import
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def torch_poison(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH with a `torch` that fails on import: proves the error came before torch."""
    fake = tmp_path / "poison" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('gradscope imported torch before validating')\n")
    return {"PYTHONPATH": str(fake.parent)}


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], int, str]]:
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\x02torch")
    syntax = tmp_path / "broken.py"
    syntax.write_text("for i in range(3)\n    print(i)\n")
    return [
        (["missing_script.py"], 2, "can't open file 'missing_script.py'"),
        ([str(tmp_path)], 2, "is a directory"),
        ([str(binary)], 2, "is not a Python file"),
        ([str(syntax)], 1, "syntax error in"),
        (["-m", "no_such_module_xyz"], 1, "no module named 'no_such_module_xyz'"),
        (["-m", "pkg"], 1, "is a package and cannot be directly executed"),
    ]


def test_bad_input_gets_one_line_before_torch(tmp_path: Path, torch_poison: dict[str, str]) -> None:
    for args, code, message in _bad_inputs(tmp_path):
        result = _profile(args, SCRIPTS, tmp_path / "runs", env=torch_poison)
        assert result.returncode == code, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gradscope: "), (args, result.stderr)
        assert message in lines[0], (args, lines)


@pytest.mark.parametrize(("option", "value"), [
    ("--max-norm", "-1"), ("--max-norm", "0"), ("--max-norm", "nan"), ("--max-norm", "inf"), ("--max-norm", "abc"),
    ("--max-norm", "1/-2"), ("--max-norm", "1/"), ("--clip-value", "0"), ("--clip-value", "nan"),
    ("--clip-value", "-inf"), ("--clip-value", "1/2"),
])
def test_bad_clipping_value_is_a_usage_error_before_the_script(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              option: str, value: str) -> None:
    """One line on stderr, exit 2, no run directory, and the script never ran (it would write a marker)."""
    from gradscope.cli import main

    marker = tmp_path / "ran"
    script = tmp_path / "train.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    code = main(["profile", "--runs-dir", str(tmp_path / "runs"), option, value, str(script)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"gradscope: {option} takes"), lines
    assert repr(value.split("/")[-1] if option == "--max-norm" else value) in lines[0]
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_bad_max_norm_fails_before_torch(tmp_path: Path, torch_poison: dict[str, str]) -> None:
    result = _profile(["--max-norm", "-1", "env_dump.py"], SCRIPTS, tmp_path / "runs", env=torch_poison)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stdout == "", result.stderr


def test_unwritable_runs_dir(tmp_path: Path, torch_poison: dict[str, str]) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the runs directory should go")
    result = _profile(["env_dump.py"], SCRIPTS, blocker / "runs", env=torch_poison)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("gradscope: cannot write runs directory")
    assert "Traceback" not in result.stderr and "env_dump" not in result.stdout


def test_unknown_gradscope_option_is_a_usage_error(tmp_path: Path) -> None:
    result = _profile(["--forse", "env_dump.py"], SCRIPTS, tmp_path)
    assert result.returncode == 2
    assert "No such option" in result.stderr and "Traceback" not in result.stderr


def test_help_lists_every_option() -> None:
    result = _run([*GRADSCOPE, "profile", "--help"], SCRIPTS, env={"COLUMNS": "200"})
    assert result.returncode == 0
    for option in ("--module", "--runs-dir", "--flush-every", "--max-norm", "--clip-value", "--no-clip", "--seed",
                   "--max-steps", "--quiet"):
        assert option in result.stdout
    assert "Everything after the script belongs to it" in result.stdout


# --------------------------------------------------------------------------------------------------
# Nothing recorded is lost: kill -9, Ctrl-C, SIGTERM
# --------------------------------------------------------------------------------------------------


def _start_long_run(tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*GRADSCOPE, "profile", "--runs-dir", str(tmp_path), "--flush-every", "5", "long_train.py"],
                            cwd=SCRIPTS, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)


def _wait_for_parts(runs: Path, count: int, timeout: float = 90) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = list(runs.glob("*/parts/steps-*.arrow"))
        if len(parts) >= count:
            return parts[0].parent.parent
        time.sleep(0.2)
    raise AssertionError(f"no {count} part files in {runs} after {timeout}s")


def test_sigkill_keeps_the_flushed_steps(tmp_path: Path) -> None:
    proc = _start_long_run(tmp_path)
    try:
        run_dir = _wait_for_parts(tmp_path, 2)
    finally:
        proc.kill()  # SIGKILL: no finally, no atexit, no compaction
        proc.communicate(timeout=30)
    run = gradscope.load_run(run_dir)
    assert run.status == "killed" and not run.complete
    steps = run.steps
    assert len(steps) >= 10
    assert list(steps["step"]) == list(range(len(steps)))  # a prefix, no hole
    assert steps["grad_norm"].notna().all() and steps["loss"].notna().all()
    assert len(run.layers) == 2 * len(steps)  # weight and bias per step


@pytest.mark.parametrize(("sig", "code", "status"), [(signal.SIGINT, -signal.SIGINT, "interrupted"), (signal.SIGTERM, -signal.SIGTERM, "interrupted")])
def test_interrupt_saves_everything(tmp_path: Path, sig: signal.Signals, code: int, status: str) -> None:
    proc = _start_long_run(tmp_path)
    try:
        run_dir = _wait_for_parts(tmp_path, 1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    run = gradscope.load_run(run_dir)
    assert run.status == status and run.complete  # compacted: the unflushed tail was written too
    assert len(run.steps) > 5
