"""Benchmark ``gradscope report`` on a large synthetic run: the page's size and the time to write it.

Builds a run of STEPS optimizer steps x LAYERS layers through the store API (bench_recommend's
builder: lognormal per-layer norms, rare spikes, AMP skips, non-finite steps), then runs
``python -m gradscope report RUN -o FILE`` in a subprocess and prints the file's size, the wall
and CPU seconds and the peak resident memory of that one child::

    python bench/report.py                          # 1,000,000 steps x 100 layers (the target case)
    python bench/report.py --steps 2000 --layers 5  # seconds: proves the harness works
    python bench/report.py --keep /tmp/big          # build once into /tmp/big, reuse it next time

Targets: under 5 MB and under 15 s for 1,000,000 x 100. ``bench/run.py --only report`` calls :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_recommend import build_run, find_run, size_arguments

TARGET_SECONDS = 15.0
TARGET_MB = 5.0


def time_report(run_dir: Path, out: Path) -> tuple[float, float, float, int]:
    """Run ``python -m gradscope report RUN -o OUT``: (wall s, CPU s, peak RSS MB, exit code)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gradscope", "report", str(run_dir), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and proc.stderr is not None:
        print(proc.stderr.read().decode(), file=sys.stderr)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0, code


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring. Exits 1 when the report failed."""
    args = size_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gradscope-bench-report-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        run_dir = (find_run(root, args.steps, args.layers) if args.keep else None) or \
            build_run(root, args.steps, args.layers)
        build_s = time.perf_counter() - start
        out = Path(tmp) / "report.html"
        wall, cpu, peak, code = time_report(run_dir, out)
        size = out.stat().st_size / 1e6 if code == 0 else float("nan")
    ok = code == 0 and wall < TARGET_SECONDS and size < TARGET_MB
    print("gradscope report on a synthetic run")
    print(f"{'steps':>10} {'layers':>6} {'build s':>8} {'wall s':>7} {'cpu s':>6} {'peak MB':>8} {'size MB':>8} "
          f"{'load':>5}  target")
    print(f"{args.steps:>10,} {args.layers:>6} {build_s:>8.1f} {wall:>7.2f} {cpu:>6.2f} {peak:>8.0f} {size:>8.2f} "
          f"{os.getloadavg()[0]:>5.1f}  < {TARGET_SECONDS:g} s, < {TARGET_MB:g} MB: {'ok' if ok else 'MISSED'}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
