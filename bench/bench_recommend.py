"""Benchmark ``gradscope recommend`` on a large synthetic run: wall time and peak memory.

Builds a run of STEPS optimizer steps x LAYERS layers through the store API (in chunks, so the
build itself stays small), then runs ``python -m gradscope recommend RUN --json`` in a subprocess
and reports its wall time and peak resident memory (``os.wait4``'s rusage of that one child)::

    python bench/bench_recommend.py                        # 1,000,000 steps x 100 layers (the target case)
    python bench/bench_recommend.py --steps 2000 --layers 5  # seconds: proves the harness works
    python bench/bench_recommend.py --keep /tmp/big        # build once into /tmp/big, reuse it next time

Target: under 10 s and under 2 GB for 1,000,000 x 100. ``bench/run.py`` calls :func:`bench`.
The table also shows the process's CPU seconds and the 1-minute load average: on a shared machine the
wall time grows with other people's load, the CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from gradscope import store

TARGET_SECONDS = 10.0
TARGET_MB = 2048.0
CHUNK_ROWS = 2_000_000  # layer rows per part file: ~60 MB of arrays while building


@dataclass
class BenchResult:
    """One timed ``gradscope recommend`` run."""

    steps: int
    layers: int
    build_s: float
    wall_s: float
    cpu_s: float  # user + system CPU of the recommend process: what load on a shared machine cannot inflate
    peak_mb: float
    load: float  # 1-minute load average when it ran
    exit_code: int
    max_norm: float | None

    @property
    def within_target(self) -> bool:
        return self.exit_code == 0 and self.wall_s < TARGET_SECONDS and self.peak_mb < TARGET_MB


def layer_names(n_layers: int) -> list[str]:
    """Transformer-like parameter names, as long as real ones."""
    kinds = ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight",
             "mlp.up.weight", "mlp.down.weight", "ln_1.weight", "ln_2.weight"]
    return [f"model.layers.{i // len(kinds)}.{kinds[i % len(kinds)]}" for i in range(n_layers)]


def build_run(root: Path, n_steps: int, n_layers: int, seed: int = 0) -> Path:
    """Write a synthetic, compacted run: lognormal per-layer norms, rare spikes, AMP skips, one inf step."""
    rng = np.random.default_rng(seed)
    run_dir = store.create_run_dir(root, "bench")
    names = layer_names(n_layers)
    store.write_meta(run_dir, store.RunMeta(status="running", pid=os.getpid(), host="bench", norm_type=2.0,
                                            optimizers=(store.OptimizerMeta(0, "AdamW", tuple(names)),)))
    writer = store.RunWriter(run_dir)
    scales = rng.lognormal(-2.0, 1.0, n_layers)  # layers differ by orders of magnitude, as real ones do
    chunk = max(1, CHUNK_ROWS // n_layers)
    for start in range(0, n_steps, chunk):
        steps = np.arange(start, min(start + chunk, n_steps), dtype=np.int64)
        per = _layer_norms(rng, len(steps), scales)
        writer.write_part("steps", _steps_columns(rng, steps, per))
        writer.write_part("layers", _layers_columns(steps, per, names))
    writer.compact()
    store.write_meta(run_dir, replace(store.read_meta(run_dir), status="complete", n_steps=n_steps))
    store.point_latest(root, run_dir)
    return run_dir


def _layer_norms(rng: np.random.Generator, n: int, scales: np.ndarray) -> np.ndarray:
    per = (rng.lognormal(0.0, 0.25, (n, len(scales))) * scales).astype(np.float32)  # (steps, layers)
    spikes = rng.random(n) < 1e-3  # one step in a thousand: one layer jumps 50x
    per[spikes, rng.integers(0, len(scales), int(spikes.sum()))] *= 50
    if n > 100:
        per[n // 2, len(scales) // 2] = np.inf  # one non-finite step per chunk
    return per


def _steps_columns(rng: np.random.Generator, steps: np.ndarray, per: np.ndarray) -> dict[str, object]:
    n = len(steps)
    grad_norm = np.sqrt(np.square(per, dtype=np.float64).sum(axis=1))
    skipped = rng.random(n) < 1e-4
    return {
        "step": steps, "optimizer": np.zeros(n, np.int16), "grad_norm": grad_norm, "applied_norm": grad_norm,
        "max_norm": pa.nulls(n, pa.float64()), "clip_source": pa.array(["none"] * n), "clip_coef": np.ones(n),
        "loss": np.exp(-steps / 1e5), "n_backward": np.ones(n, np.int32), "lr": np.full(n, 3e-4),
        "loss_scale": pa.nulls(n, pa.float64()), "skipped": skipped, "nonfinite": ~np.isfinite(grad_norm),
        "time_s": steps * 0.05,
    }


def _layers_columns(steps: np.ndarray, per: np.ndarray, names: list[str]) -> dict[str, object]:
    n, n_layers = per.shape
    codes = pa.array(np.tile(np.arange(n_layers, dtype=np.int32), n))
    layer = pa.DictionaryArray.from_arrays(codes, pa.array(names)).cast(pa.string())  # no Python strings
    return {"step": np.repeat(steps, n_layers), "optimizer": np.zeros(n * n_layers, np.int16),
            "layer": layer, "norm": per.reshape(-1)}


def time_recommend(run_dir: Path) -> tuple[float, float, float, int, float | None]:
    """Run ``python -m gradscope recommend RUN --json``: (wall s, CPU s, peak RSS MB, exit code, max_norm)."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "gradscope", "recommend", str(run_dir), "--json"],
                                stdout=out, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        out.seek(0)
        text = out.read().decode()
    if proc.returncode != 0:
        print(stderr, file=sys.stderr)
    max_norm = json.loads(text)["recommendations"][0]["max_norm"] if proc.returncode == 0 else None
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024.0, proc.returncode, max_norm  # ru_maxrss is in KiB on Linux


def bench(n_steps: int = 1_000_000, n_layers: int = 100, keep: Path | None = None) -> BenchResult:
    """Build (or reuse, with ``keep``) the synthetic run and time ``gradscope recommend`` on it."""
    with tempfile.TemporaryDirectory(prefix="gradscope-bench-") as tmp:
        root = keep or Path(tmp)
        start = time.perf_counter()
        existing = find_run(root, n_steps, n_layers) if keep else None
        run_dir = existing or build_run(root, n_steps, n_layers)
        build_s = 0.0 if existing else time.perf_counter() - start
        wall, cpu, peak, code, max_norm = time_recommend(run_dir)
    return BenchResult(n_steps, n_layers, build_s, wall, cpu, peak, os.getloadavg()[0], code, max_norm)


def find_run(root: Path, n_steps: int, n_layers: int) -> Path | None:
    for run_dir in store.list_runs(root):
        meta = store.read_meta(run_dir)
        if meta.n_steps == n_steps and meta.optimizers and len(meta.optimizers[0].names) == n_layers:
            return run_dir
    return None


def print_table(result: BenchResult) -> None:
    """The result as a small fixed-width table."""
    header = f"{'steps':>10} {'layers':>6} {'build s':>8} {'wall s':>7} {'cpu s':>6} {'peak MB':>8} {'load':>5}  target"
    verdict = "ok" if result.within_target else "MISSED"
    row = (f"{result.steps:>10,} {result.layers:>6} {result.build_s:>8.1f} {result.wall_s:>7.2f} {result.cpu_s:>6.2f} "
           f"{result.peak_mb:>8.0f} {result.load:>5.1f}  < {TARGET_SECONDS:g} s, < {TARGET_MB:.0f} MB: {verdict}")
    print("gradscope recommend --json on a synthetic run\n" + header + "\n" + row)


def size_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The synthetic run's size options, shared with bench/report.py: --steps, --layers, --keep."""
    parser.add_argument("--steps", type=int, default=1_000_000, help="optimizer steps in the synthetic run")
    parser.add_argument("--layers", type=int, default=100, help="layers (parameter tensors) per step")
    parser.add_argument("--keep", type=Path, default=None, help="build the run under this directory and reuse it")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring. Exits 1 when the recommend run failed."""
    args = size_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    result = bench(args.steps, args.layers, args.keep)
    print_table(result)
    return 0 if result.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
