"""End to end: ``gradscope profile`` vs ``python`` on the bundled sample scripts, wall time and peak RSS.

Each round runs ``python SCRIPT`` and ``python -m gradscope profile --runs-dir TMP SCRIPT`` back to
back (the order alternates between rounds), each as its own child process, with the same
environment. Each child is started by a small launcher that reports the child's wall time, CPU time
(user + system) and peak RSS (``ru_maxrss`` from ``os.wait4``, this one child's, not
``RUSAGE_CHILDREN``). All include interpreter and torch start-up, which the two arms share. On a
shared machine the wall time carries other people's load; the CPU time much less.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PRIMARY = "sample_runs/rnn_exploding.py"  # the README's demo script; reported first, or as skipped


def samples() -> list[str]:
    """The primary sample, then every other script in sample_runs/."""
    others = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "sample_runs").glob("*.py") if not p.name.startswith("_"))
    return [PRIMARY] + [s for s in others if s != PRIMARY]


@dataclass
class Arm:
    """Every round of one way of running a script."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)


# A small launcher process forks and execs the command and reports its rusage. Run directly from the
# benchmark, the child's ru_maxrss would start from the benchmark's own RSS (Linux carries the RSS
# high-water mark of the process image that exec replaces), so the launcher must be small.
_LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"wall": time.perf_counter() - start, "cpu": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss,
               "code": os.waitstatus_to_exitcode(status)}, out)
"""


def _run_child(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """wall seconds, CPU seconds (user + system), peak RSS (MB) and exit code of one child process."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        subprocess.run([sys.executable, "-c", _LAUNCHER, report.name, *cmd], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        data = json.loads(Path(report.name).read_text())
    return {"wall": data["wall"], "cpu": data["cpu"], "peak_mb": data["maxrss_kb"] / 1024, "code": data["code"]}


def compare(script: str, rounds: int, threads: int, extra_args: list[str] | None = None) -> dict[str, Any]:
    """Alternate ``python SCRIPT`` and ``gradscope profile SCRIPT`` for ``rounds`` rounds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADSCOPE_")}
    env["OMP_NUM_THREADS"] = str(threads)  # the same for both arms; the script may still set its own
    args = list(extra_args or [])
    arms = {"python": Arm(), "profile": Arm()}
    with tempfile.TemporaryDirectory(prefix="gradscope-e2e-") as tmp:
        cmds = {"python": [sys.executable, script, *args],
                "profile": [sys.executable, "-m", "gradscope", "profile", "--quiet", "--runs-dir", tmp, script, *args]}
        for r in range(rounds):
            for name in ("python", "profile") if r % 2 == 0 else ("profile", "python"):
                got = _run_child(cmds[name], env)
                arms[name].wall_s.append(got["wall"])
                arms[name].cpu_s.append(got["cpu"])
                arms[name].peak_mb.append(got["peak_mb"])
                arms[name].exit_codes.append(int(got["code"]))
    py, pr = arms["python"], arms["profile"]
    ratios = [b / a for a, b in zip(py.wall_s, pr.wall_s, strict=True)]
    cpu_ratios = [b / a for a, b in zip(py.cpu_s, pr.cpu_s, strict=True)]
    return {
        "script": script, "rounds": rounds, "args": args,
        "python_wall_s": statistics.median(py.wall_s), "profile_wall_s": statistics.median(pr.wall_s),
        "wall_ratio_median": statistics.median(ratios), "wall_ratio_min": min(ratios), "wall_ratio_max": max(ratios),
        "python_cpu_s": statistics.median(py.cpu_s), "profile_cpu_s": statistics.median(pr.cpu_s),
        "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratio_min": min(cpu_ratios),
        "cpu_ratio_max": max(cpu_ratios),
        "python_peak_mb": statistics.median(py.peak_mb), "profile_peak_mb": statistics.median(pr.peak_mb),
        "exit_codes": {"python": py.exit_codes, "profile": pr.exit_codes},
        "per_round": {"python": asdict(py), "profile": asdict(pr)},  # paired by index (bench/edges.py)
    }


def run(rounds: int, threads: int, scripts: list[str] | None = None) -> list[dict[str, Any]]:
    """Every sample script (or ``scripts``) that exists; a missing one is reported and skipped."""
    out = []
    for script in scripts or samples():
        if not (ROOT / script).is_file():
            out.append({"script": script, "skipped": "not found"})
            continue
        out.append(compare(script, rounds, threads))
    return out
