"""Faults and bad input on the recording side: the script's outcome is sacred, recorded data survives.

Every case runs for real: failing writes under a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so a
write fails with EFBIG as on a full disk), SIGTERM and SIGKILL sent to a live ``gradscope profile``,
part files damaged on disk. The case matrix is docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import gradscope
from gradscope import store

SCRIPTS = Path(__file__).parent / "scripts"
TRAIN = str(SCRIPTS / "rel_train.py")
GRADSCOPE = [sys.executable, "-m", "gradscope"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GRADSCOPE")}


def _profile(runs: Path, *args: str, limit: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # type: ignore[arg-type]

    return subprocess.run([*GRADSCOPE, "profile", "--runs-dir", str(runs), *args], cwd=runs.parent, env=_env(),
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec if limit is not None else None)


def _only_run(runs: Path) -> Path:
    found = store.list_runs(runs)
    assert len(found) == 1, found
    return found[0]


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


# --------------------------------------------------------------------------------------------------
# The script's outcome is sacred
# --------------------------------------------------------------------------------------------------


# 40 kB: meta.json is written, the parts are not; 4 kB: not even the final meta.json (the run reads as killed)
@pytest.mark.parametrize(("limit", "status"), [(4_000, "killed"), (40_000, "complete")])
def test_failing_writes_leave_the_scripts_outcome_alone(tmp_path: Path, limit: int, status: str) -> None:
    runs = tmp_path / "runs"
    plain = subprocess.run([sys.executable, TRAIN, "--steps", "300", "--layers", "30"], capture_output=True,
                           text=True, env=_env(), timeout=60)
    proc = _profile(runs, "-q", "--flush-every", "10", TRAIN, "--steps", "300", "--layers", "30", limit=limit)
    assert proc.returncode == plain.returncode == 0
    assert proc.stdout == plain.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradscope: warning: "), proc.stderr
    assert "Traceback" not in proc.stderr
    run = gradscope.load_run(_only_run(runs))
    assert run.status == status
    if status == "complete":
        assert run.meta.exit_code == 0 and run.incomplete and "File too large" in run.incomplete
        report = subprocess.run([*GRADSCOPE, "recommend", str(run.path)], capture_output=True, text=True,
                                env=_env(), timeout=60)
        if report.returncode == 0:  # some parts were written: the report says the run is incomplete
            assert "incomplete run (" in report.stdout and "File too large" in report.stdout, report.stdout
    assert len(run.steps) <= 300  # what could be written, readable
    assert _temp_files(runs) == []


# --------------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------------


def _wait_for(path: Path, steps: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"the script did not reach step {steps}")


def test_sigterm_ends_quietly_as_python_would(tmp_path: Path) -> None:
    runs, progress = tmp_path / "runs", tmp_path / "progress"
    proc = subprocess.Popen([*GRADSCOPE, "profile", "--runs-dir", str(runs), TRAIN, "--steps", "100000",
                             "--sleep", "0.005", "--progress", str(progress)], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(progress, 30, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM  # what python gives: death by the signal (a shell shows 143)
    assert "Traceback" not in err and "Terminated" not in err, err
    run = gradscope.load_run(_only_run(runs))
    assert run.status == "interrupted" and run.meta.exit_code == 143
    assert len(run.steps) >= 30


TRAINING_KILLS = 4  # of 20: killed while training, after its first step; the rest at moments of start-up


def _kill_once(root: Path, seed: int) -> tuple[Path, Path]:
    runs, progress = root / f"runs{seed}", root / f"progress{seed}"
    proc = subprocess.Popen([*GRADSCOPE, "profile", "-q", "--flush-every", "5", "--runs-dir", str(runs), TRAIN,
                             "--steps", "100000", "--sleep", "0.01", "--progress", str(progress)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jitter = random.Random(seed).random()
    if seed < TRAINING_KILLS:
        _wait_for(progress, 1, proc)
        time.sleep(0.3 + 2.5 * jitter)  # before, at and after the first parts (2 s apart)
    else:
        time.sleep(0.3 + 0.25 * (seed - TRAINING_KILLS + jitter))  # start-up (imports, run dir, meta.json, hooks)
    proc.kill()
    proc.wait(timeout=30)
    return runs, progress


def test_sigkill_at_random_moments_keeps_every_run_readable(tmp_path: Path) -> None:
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda seed: _kill_once(tmp_path, seed), range(20)))
    checked = 0
    for runs, progress in results:
        for run_dir in store.list_runs(runs):
            run = gradscope.load_run(run_dir)  # every run reads, whenever it was killed
            assert run.status == "killed"
            recorded = len(run.steps)
            assert set(run.layers["step"]) <= set(run.steps["step"])  # a step's layers part follows its steps part
            lines = progress.read_text().splitlines() if progress.exists() else []
            if not lines:
                continue
            done, elapsed = int(lines[-1].split()[0]), float(lines[-1].split()[1])
            rate = done / max(elapsed, 1e-3)
            # at most one flush interval lost: 5 steps, or the steps of the 2 s since the last part (+ slack)
            assert done - recorded <= max(5, rate * 2.5) + 5, (run_dir, done, recorded)
            checked += 1
    assert checked >= TRAINING_KILLS


# --------------------------------------------------------------------------------------------------
# Crash consistency: a damaged part is skipped, the rest read
# --------------------------------------------------------------------------------------------------


def _run_with_parts(run_dir: Path, n_parts: int = 4, rows: int = 10) -> list[Path]:
    run_dir.mkdir()
    writer = store.RunWriter(run_dir)
    store.write_meta(run_dir, store.RunMeta(status="running", host="elsewhere", pid=1))
    for k in range(n_parts):
        steps = list(range(k * rows, (k + 1) * rows))
        writer.write_part("steps", {"step": steps, "optimizer": [0] * rows, "grad_norm": [1.0] * rows,
                                    "applied_norm": [1.0] * rows, "max_norm": [None] * rows,
                                    "clip_source": ["none"] * rows, "clip_coef": [1.0] * rows,
                                    "loss": [0.5] * rows, "n_backward": [1] * rows, "lr": [0.1] * rows,
                                    "loss_scale": [None] * rows, "skipped": [False] * rows,
                                    "nonfinite": [False] * rows, "time_s": [0.0] * rows})
    return store.tables.list_parts(run_dir / "parts", "steps")


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_an_unreadable_part_is_skipped_with_one_warning(tmp_path: Path, damage: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    parts = _run_with_parts(tmp_path / "run")
    bad = parts[2]
    data = bad.read_bytes()
    bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(len(data))}[damage])
    run = gradscope.load_run(tmp_path / "run")
    assert run.status == "killed"
    assert list(run.steps["step"]) == [*range(0, 20), *range(30, 40)]
    assert sum(1 for _ in run.iter_batches("steps")) >= 1
    assert store.count_steps(tmp_path / "run") == 30
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and bad.name in err[0] and "after step 19" in err[0], err


def test_compaction_skips_a_damaged_part_and_only_then_removes_parts(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    parts = _run_with_parts(tmp_path / "run")
    parts[1].write_bytes(b"")
    store.RunWriter(tmp_path / "run").compact()
    assert not (tmp_path / "run" / "parts").exists()
    assert list(store.tables.read_final(tmp_path / "run" / "steps.parquet", "steps")["step"].to_pylist()) == [
        *range(0, 10), *range(20, 40)]
    assert parts[1].name in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# latest, empty runs, validation, steps with no gradient
# --------------------------------------------------------------------------------------------------


def test_an_empty_run_does_not_take_latest(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert _profile(runs, "-q", "--label", "good", TRAIN, "--steps", "3").returncode == 0
    good = (runs / "latest").resolve()
    helped = _profile(runs, "-q", TRAIN, "--help")
    assert helped.returncode == 0 and "tiny training loop" in helped.stdout
    assert (runs / "latest").resolve() == good
    assert len(store.list_runs(runs)) == 2  # the empty run is kept, just not shown by default


def test_latest_that_is_a_directory_is_left_alone(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "latest").mkdir(parents=True)
    proc = _profile(runs, "-q", TRAIN, "--steps", "3")
    assert proc.returncode == 0 and proc.stdout == "trained 3 steps\n"
    assert proc.stderr.count("gradscope: warning:") == 1 and "latest" in proc.stderr, proc.stderr
    assert (runs / "latest").is_dir() and not (runs / "latest").is_symlink()
    run = gradscope.load_run(_only_run(runs))
    assert run.status == "complete" and len(run.steps) == 3


@pytest.mark.parametrize("option", [["--seed", "99999999999999999999"], ["--seed", "-9223372036854775809"],
                                    ["--max-time", "nan"], ["--max-time", "inf"], ["--label", "a/b"],
                                    ["--label", ".."], ["--runs-dir", "FILE"]])
def test_bad_profile_options_are_one_line_usage_errors(tmp_path: Path, option: list[str]) -> None:
    (tmp_path / "FILE").write_text("not a directory")
    option = [str(tmp_path / "FILE") if o == "FILE" else o for o in option]
    proc = subprocess.run([*GRADSCOPE, "profile", "--runs-dir", str(tmp_path / "runs"), *option, TRAIN],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""  # the script never ran
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradscope: ") and option[0] in lines[0], proc.stderr


def test_steps_with_no_gradient_are_told_apart_from_nonfinite(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = _profile(runs, "-q", TRAIN, "--steps", "4", "--no-grad")
    assert proc.returncode == 0, proc.stderr
    steps = gradscope.load_run(_only_run(runs)).read_table("steps").to_pydict()
    assert steps["grad_norm"] == [None] * 4 and steps["applied_norm"] == [None] * 4
    assert steps["nonfinite"] == [False] * 4
    assert json.loads((_only_run(runs) / "meta.json").read_text())["n_steps"] == 4
    told = subprocess.run([*GRADSCOPE, "recommend", str(_only_run(runs))], capture_output=True, text=True,
                          env=_env(), timeout=60)
    assert told.returncode == 3, told.stderr  # no data: nothing to set a threshold from
    assert "had a gradient" in told.stderr and "non-finite" not in told.stderr, told.stderr


def test_incomplete_round_trips_and_is_absent_when_none(tmp_path: Path) -> None:
    store.write_meta(tmp_path, store.RunMeta(status="complete", incomplete="could not write (OSError: full)"))
    assert gradscope.load_run(tmp_path).incomplete == "could not write (OSError: full)"
    store.write_meta(tmp_path, store.RunMeta(status="complete"))
    assert "incomplete" not in json.loads((tmp_path / "meta.json").read_text())
    assert gradscope.load_run(tmp_path).incomplete is None


def test_point_latest_refuses_a_real_directory(tmp_path: Path) -> None:
    (tmp_path / "latest").mkdir()
    (tmp_path / "run").mkdir()
    with pytest.raises(store.GradscopeError, match="is a directory"):
        store.point_latest(tmp_path, tmp_path / "run")
    assert (tmp_path / "latest").is_dir()
