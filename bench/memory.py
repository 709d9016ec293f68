"""Memory over a long run: resident memory of one process training a tiny model for many steps.

Run as its own process, so that nothing else in it holds memory::

    python bench/memory.py --steps 100000            # recorded by a default Recorder
    python bench/memory.py --steps 100000 --plain    # the same loop with no recorder (reference)

It prints one line ``MEMORY {json}``: resident set size (RSS, from /proc/self/statm) sampled every
``steps / 20`` steps, the baseline taken after 200 warm-up steps (the recorder started and the first
step named), the peak (``ru_maxrss``) during the steps and after ``stop()`` (compaction), the most
rows ever pending in the recorder's buffer and the number of part files written. Flat memory means
the rows are flushed and dropped: RSS at the end of the run is about RSS after the first flushes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch
from torch import nn

WARMUP = 200


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    """High-water RSS of this process since it started, MB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _growth(peak: float, peak_before: float, baseline: float, max_sample: float) -> float:
    """Peak RSS growth over ``baseline``: from ``ru_maxrss`` when the run raised the high-water mark, else
    from the samples (an earlier transient, e.g. while importing, set a mark the run never reached)."""
    return peak - baseline if peak > peak_before else max_sample - baseline


def run(steps: int, plain: bool, threads: int) -> dict[str, object]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 8), torch.randn(8, 1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    tmp = tempfile.TemporaryDirectory(prefix="gradscope-mem-")
    rec = None
    if not plain:
        from gradscope.record.config import RecorderConfig
        from gradscope.record.recorder import Recorder

        rec = Recorder(runs_dir=tmp.name, label="memory", config=RecorderConfig())
        rec.start()
    for _ in range(WARMUP):
        step()
    baseline = rss_mb()
    peak_at_baseline = peak_mb()  # the high-water mark so far (imports may have peaked above baseline)
    every = max(1, steps // 20)
    samples: list[tuple[int, float]] = [(0, baseline)]
    max_pending = 0
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step()
        if rec is not None:
            max_pending = max(max_pending, rec.buffer.pending)
        if i % every == 0:
            samples.append((i, rss_mb()))
    seconds = time.perf_counter() - start
    peak_steps = peak_mb()
    parts = 0
    n_steps = None
    if rec is not None:
        parts_dir = rec.run_dir / "parts"
        parts = sum(1 for p in parts_dir.iterdir() if p.name.startswith("layers-")) if parts_dir.is_dir() else 0
        rec.stop()
        n_steps = rec.n_steps
    peak_all = peak_mb()
    tmp.cleanup()
    rss = [r for _, r in samples]
    fifth = len(samples) // 5  # after the first fifth: the one-off costs (first flush's imports) are behind
    return {
        "plain": plain, "steps": steps, "threads": threads, "seconds": seconds, "us_per_step": seconds / steps * 1e6,
        "baseline_mb": baseline, "samples": samples,
        "growth_max_sample_mb": max(rss) - baseline,
        "growth_peak_steps_mb": _growth(peak_steps, peak_at_baseline, baseline, max(rss)),
        "growth_peak_with_stop_mb": _growth(peak_all, peak_at_baseline, baseline, max(rss)),  # + stop(): compaction
        "drift_after_first_fifth_mb": rss[-1] - rss[fifth],
        "max_pending_rows": max_pending, "part_files": parts, "recorded_steps": n_steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--plain", action="store_true", help="no recorder: the reference loop")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print("MEMORY " + json.dumps(run(args.steps, args.plain, args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
