"""Benchmark reading a distributed job: ``store.join_ranks`` over R ranks' tables of a sharded optimizer.

Builds R rank runs of STEPS steps x LAYERS layers through the store API (each rank's pieces of
sharded layers, and whole layers; ``shard_sq`` / ``whole_sq`` as the recorder writes them), then times
reading each rank's tables and joining them (the combined norms on every rank's row), per table::

    python bench/ranks.py                                   # 8 ranks x 100,000 steps x 100 layers (the target)
    python bench/ranks.py --ranks 2 --steps 2000 --layers 5   # seconds: proves the harness works

Target: steps and layers each read and joined in under 10 s. ``bench/run.py --only ranks`` calls :func:`bench`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from gradscope import store

TARGET_SECONDS = 10.0
CHUNK_ROWS = 2_000_000  # layer rows per part file


def build_rank(root: Path, rank: int, n_ranks: int, n_steps: int, n_layers: int) -> tuple[store.RunMeta, Path]:
    """One rank's compacted run: every 8th layer whole (a norm layer), the others sharded pieces."""
    rng = np.random.default_rng(rank)
    run_dir = store.create_run_dir(root, f"rank{rank}")
    names = tuple(f"model.layers.{i // 8}.w{i % 8}" for i in range(n_layers))
    weights = tuple(None if i % 8 == 7 else 1 for i in range(n_layers))
    opt = store.OptimizerMeta(0, "AdamW", names, norm_scope="sharded", shard_weights=weights)
    store.write_meta(run_dir, store.RunMeta(status="running", pid=os.getpid(), host="bench", optimizers=(opt,)))
    writer = store.RunWriter(run_dir)
    whole = np.array([w is None for w in weights])
    chunk = max(1, CHUNK_ROWS // n_layers)
    for start in range(0, n_steps, chunk):
        steps = np.arange(start, min(start + chunk, n_steps), dtype=np.int64)
        per = (rng.lognormal(-2.0, 0.5, (len(steps), n_layers)) / np.sqrt(n_ranks)).astype(np.float32)
        sq = np.square(per, dtype=np.float64)
        n = len(steps)
        grad_norm = np.sqrt(sq.sum(axis=1))
        writer.write_part("steps", {
            "step": steps, "optimizer": np.zeros(n, np.int16), "grad_norm": grad_norm, "applied_norm": grad_norm,
            "max_norm": pa.nulls(n, pa.float64()), "clip_source": pa.array(["none"] * n), "clip_coef": np.ones(n),
            "loss": np.ones(n), "n_backward": np.ones(n, np.int32), "lr": np.full(n, 3e-4),
            "loss_scale": pa.nulls(n, pa.float64()), "skipped": np.zeros(n, bool), "nonfinite": np.zeros(n, bool),
            "time_s": steps * 0.05, "shard_sq": sq[:, ~whole].sum(axis=1), "whole_sq": sq[:, whole].sum(axis=1)})
        codes = pa.array(np.tile(np.arange(n_layers, dtype=np.int32), n))
        writer.write_part("layers", {
            "step": np.repeat(steps, n_layers), "optimizer": np.zeros(n * n_layers, np.int16),
            "layer": pa.DictionaryArray.from_arrays(codes, pa.array(list(names))).cast(pa.string()),
            "norm": per.reshape(-1)})
    writer.compact()
    meta = replace(store.read_meta(run_dir), status="complete", n_steps=n_steps)
    store.write_meta(run_dir, meta)
    return meta, run_dir


def time_join(kind: str, runs: list[tuple[int, store.RunMeta, Path]]) -> tuple[float, float, float, float, int]:
    """(wall and CPU seconds reading the ranks' tables, wall and CPU seconds joining them, rows) for ``kind``.
    On a shared machine the wall time grows with other people's load, the CPU time much less."""
    started, cpu = time.perf_counter(), time.process_time()
    per_rank = [(rank, meta, store.load_run(path).read_table(kind)) for rank, meta, path in runs]
    read, read_cpu = time.perf_counter() - started, time.process_time() - cpu
    started, cpu = time.perf_counter(), time.process_time()
    joined = store.join_ranks(kind, per_rank)
    return read, read_cpu, time.perf_counter() - started, time.process_time() - cpu, joined.num_rows


def bench(n_ranks: int = 8, n_steps: int = 100_000,
          n_layers: int = 100) -> list[tuple[str, float, float, float, float, int]]:
    """Build the job in a temporary directory and time both tables; prints the table and returns its rows."""
    with tempfile.TemporaryDirectory(prefix="gradscope-ranks-") as tmp:
        started = time.perf_counter()
        runs = [(r, *build_rank(Path(tmp), r, n_ranks, n_steps, n_layers)) for r in range(n_ranks)]
        print(f"  built {n_ranks} ranks x {n_steps:,} steps x {n_layers} layers in {time.perf_counter() - started:.0f} s",
              flush=True)
        rows = [(kind, *time_join(kind, runs)) for kind in ("steps", "layers")]
    print(f"  {'table':<8} {'rows':>12} {'read s (CPU)':>14} {'join s (CPU)':>14} {'total s':>8}   target "
          f"(load average {os.getloadavg()[0]:.1f})")
    for kind, read, read_cpu, join, join_cpu, n in rows:
        total = read + join
        verdict = "ok" if total < TARGET_SECONDS else "MISSED"
        print(f"  {kind:<8} {n:>12,} {read:>6.2f} ({read_cpu:>5.2f}) {join:>6.2f} ({join_cpu:>5.2f}) {total:>8.2f}   "
              f"< {TARGET_SECONDS:g} s {verdict}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--layers", type=int, default=100)
    args = parser.parse_args(argv)
    print(f"Ranks: join_ranks over {args.ranks} ranks of a sharded optimizer")
    bench(args.ranks, args.steps, args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
