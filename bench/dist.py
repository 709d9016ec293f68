"""Per-rank cost of recording a distributed job: the same DDP workload under plain torchrun and under
``gradscope profile --nproc-per-node N``, for N = 1 and N = 2, in interleaved rounds.

Each rank times its own steps after a warm-up (bench/dist_train.py), so process start-up is left out;
the figure is the profiled step time over the plain one, per rank, median over rounds. Recording a
rank costs what recording a single process costs when the two ratios agree.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOAD = HERE / "dist_train.py"


def _step_us(argv: list[str]) -> list[float]:
    """Run one job and return each rank's microseconds per step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    found = [float(us) for _rank, us in re.findall(r"STEP_US (\d+) ([\d.]+)", proc.stdout)]
    if not found:
        raise RuntimeError(f"{' '.join(argv)} printed no step time:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return found


def _commands(nproc: int, steps: int, runs_dir: str) -> dict[str, list[str]]:
    torchrun = ["--standalone", "--nproc-per-node", str(nproc), str(WORKLOAD), str(steps)]
    return {"plain": [sys.executable, "-m", "torch.distributed.run", *torchrun],
            "gradscope": [sys.executable, "-m", "gradscope", "profile", "-q", "--runs-dir", runs_dir, *torchrun]}


def measure(rounds: int = 3, steps: int = 300, sizes: tuple[int, ...] = (1, 2)) -> list[dict[str, Any]]:
    """Per world size: the median per-rank step time, plain and profiled, and their ratio."""
    results = []
    with tempfile.TemporaryDirectory(prefix="gradscope-bench-dist-") as tmp:
        for nproc in sizes:
            times: dict[str, list[float]] = {"plain": [], "gradscope": []}
            ratios: list[float] = []
            for round_ in range(rounds):
                commands = _commands(nproc, steps, tmp)
                order = ["plain", "gradscope"] if round_ % 2 == 0 else ["gradscope", "plain"]
                got = {arm: statistics.median(_step_us(commands[arm])) for arm in order}
                for arm in order:
                    times[arm].append(got[arm])
                ratios.append(got["gradscope"] / got["plain"])
            results.append({"nproc": nproc, "steps": steps, "rounds": rounds,
                            "plain_us": statistics.median(times["plain"]),
                            "gradscope_us": statistics.median(times["gradscope"]),
                            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)})
    return results


def report(results: list[dict[str, Any]]) -> None:
    """Print the table."""
    print("\nDistributed: per-rank step time, DDP (gloo, CPU) MLP 0.3M params, AdamW + clip_grad_norm_; "
          "median over interleaved rounds")
    print(f"{'ranks':>5} {'plain µs/step':>14} {'profiled µs/step':>17} {'ratio (min–max)':>20}")
    for r in results:
        print(f"{r['nproc']:>5} {r['plain_us']:>14,.0f} {r['gradscope_us']:>17,.0f} "
              f"{r['ratio']:>9.3f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})")


if __name__ == "__main__":
    report(measure(rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 3))
