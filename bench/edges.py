"""Cost at the edges of a run: start-up, a long run of tiny steps, and compaction at the end.

    python bench/run.py --only edges              # this section of make bench
    python bench/edges.py compact RUN_DIR         # child: compact a synthesized run, print COMPACT {json}

Three measurements, each whole processes, so that what gradscope imports and what it holds count:

start-up   ``python S`` vs ``gradscope profile S`` for two scripts: one that only imports torch, one that
           makes one optimizer step (bench/e2e.py's launcher: wall time and the child's own peak RSS),
           interleaved pairs; the figure is the median of the per-pair differences, in wall time and in
           CPU time (user + system; on a shared machine the wall time carries other people's load).
tiny run   the same pairs on 100,000 steps of a 3-layer MLP of ~600 parameters, batch 8: every Python
           call per step shows here, and the end of the run (the last flush, compaction) is included.
compaction a run of part files synthesized through the store API (``store.RunWriter``, the parts the
           recorder writes), compacted by ``RunWriter.compact`` in a fresh process: its time, and its
           peak RSS above that process before it started. 1,000,000 steps x 100 layers by default.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import e2e

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this tree's gradscope, as the profiled children (cwd ROOT) run it

SCRIPTS = {
    "imports torch": "import torch\n",
    "one optimizer step": (
        "import torch\n"
        "model = torch.nn.Linear(4, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "model(torch.randn(2, 4)).sum().backward()\n"
        "opt.step()\n"
    ),
}

TINY = """import sys
import torch
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 1))  # 633 params
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
x, y = torch.randn(8, 8), torch.randn(8, 1)
for _ in range(int(sys.argv[1])):
    opt.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
"""
TINY_LAYERS = 6  # the tiny MLP's parameter tensors

TARGET_STARTUP_S = 0.25
TARGET_STARTUP_MB = 40.0
TARGET_TINY_RATIO = 1.2
TARGET_TINY_MB = 50.0
TARGET_COMPACT_MB = 50.0


def _paired(result: dict[str, Any], key: str) -> list[float]:
    per = result["per_round"]
    return [b - a for a, b in zip(per["python"][key], per["profile"][key], strict=True)]


def _pairs(script: Path, rounds: int, threads: int, args: list[str] | None = None) -> dict[str, Any]:
    """``python`` vs ``gradscope profile`` on ``script``: medians, and medians of the per-pair differences."""
    got = e2e.compare(str(script), rounds, threads, args)
    per = got["per_round"]
    return {"rounds": rounds, "python_wall_s": got["python_wall_s"], "profile_wall_s": got["profile_wall_s"],
            "added_s": statistics.median(_paired(got, "wall_s")),
            "added_cpu_s": statistics.median(_paired(got, "cpu_s")), "cpu_ratio": got["cpu_ratio_median"],
            "added_mb": statistics.median(_paired(got, "peak_mb")),
            "wall_ratio": got["wall_ratio_median"], "python_peak_mb": got["python_peak_mb"],
            "profile_peak_mb": got["profile_peak_mb"], "exit_codes": got["exit_codes"], "per_round": per}


def startup(rounds: int, threads: int) -> dict[str, dict[str, Any]]:
    """Start-up added by ``gradscope profile`` to each of :data:`SCRIPTS`."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="gradscope-edges-") as tmp:
        for name, text in SCRIPTS.items():
            path = Path(tmp) / (name.replace(" ", "_") + ".py")
            path.write_text(text)
            out[name] = _pairs(path, rounds, threads)
    return out


def tiny_run(steps: int, rounds: int, threads: int) -> dict[str, Any]:
    """``steps`` tiny steps, python vs profile, whole processes (the end of the run included)."""
    with tempfile.TemporaryDirectory(prefix="gradscope-edges-") as tmp:
        path = Path(tmp) / "tiny_steps.py"
        path.write_text(TINY)
        out = _pairs(path, rounds, threads, [str(steps)])
    out["steps"] = steps
    return out


def synthesize(run_dir: Path, steps: int, layers: int, part_steps: int = 10_000) -> int:
    """A run directory with the part files a recorder writes for ``steps`` steps of ``layers`` tensors
    (through the store API); returns the number of parts per table."""
    import numpy as np
    import pyarrow as pa

    from gradscope import store

    writer = store.RunWriter(run_dir)
    names = pa.array([f"block.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(layers)])
    rng = np.random.default_rng(0)
    parts = 0
    for lo in range(0, steps, part_steps):
        n = min(part_steps, steps - lo)
        step = np.arange(lo, lo + n, dtype=np.int64)
        writer.write_part("steps", {
            "step": step, "optimizer": np.zeros(n, np.int16), "grad_norm": rng.random(n),
            "applied_norm": rng.random(n), "max_norm": pa.nulls(n, pa.float64()), "clip_source": ["none"] * n,
            "clip_coef": np.ones(n), "loss": rng.random(n), "n_backward": np.ones(n, np.int32),
            "lr": np.full(n, 1e-3), "loss_scale": pa.nulls(n, pa.float64()), "skipped": np.zeros(n, bool),
            "nonfinite": np.zeros(n, bool), "time_s": step * 1e-4})
        layer = pa.DictionaryArray.from_arrays(pa.array(np.tile(np.arange(layers, dtype=np.int32), n)), names)
        writer.write_part("layers", {"step": np.repeat(step, layers), "optimizer": np.zeros(n * layers, np.int16),
                                     "layer": layer, "norm": rng.random(n * layers, dtype=np.float32)})
        parts += 1
    return parts


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def compact_child(run_dir: Path) -> dict[str, float]:
    """Compact ``run_dir`` here (a fresh process): seconds, and peak RSS above the process before it
    (sampled every 2 ms by a thread, and ru_maxrss when compaction raised the process's high-water mark)."""
    from gradscope import store

    writer = store.RunWriter(run_dir)
    before = _rss_mb()
    mark_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sampled = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            sampled.append(_rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    writer.compact()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    mark = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = max(max(sampled), mark if mark > mark_before else 0.0)
    return {"seconds": seconds, "rss_before_mb": before, "peak_added_mb": peak - before}


def compaction(steps: int, layers: int) -> dict[str, Any]:
    """Synthesize a run of ``steps`` x ``layers`` and compact it in a child process."""
    with tempfile.TemporaryDirectory(prefix="gradscope-edges-") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        t0 = time.perf_counter()
        parts = synthesize(run_dir, steps, layers)
        made = time.perf_counter() - t0
        proc = subprocess.run([sys.executable, __file__, "compact", str(run_dir)], capture_output=True, text=True,
                              cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("COMPACT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"bench/edges.py compact failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        out = json.loads(line[len("COMPACT "):])
    return {"steps": steps, "layers": layers, "parts": parts, "synthesize_s": made, **out}


def measure(quick: bool, rounds: int, threads: int, tiny_steps: int, compact_steps: int) -> dict[str, Any]:
    """Every edge measurement (the section ``edges`` of bench/run.py)."""
    rounds = 1 if quick else rounds
    tiny_steps = 2000 if quick else tiny_steps
    return {"startup": startup(rounds, threads),
            "tiny": tiny_run(tiny_steps, rounds, threads),
            "tiny_compaction": compaction(tiny_steps, TINY_LAYERS),
            "compaction": compaction(2000 if quick else compact_steps, 5 if quick else 100)}


def report(res: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Print the section; return its target rows for bench/run.py's table."""
    print("\nEdges: whole processes, python vs gradscope profile in interleaved pairs (medians; added = median "
          "of the per-pair differences; peak RSS: each child's own ru_maxrss)")
    targets = []
    for name, r in res["startup"].items():
        print(f"  start-up, script that {'only ' if name == 'imports torch' else 'makes '}{name}: "
              f"{r['python_wall_s']:.2f} → {r['profile_wall_s']:.2f} s ({r['added_s']:+.2f} s; CPU "
              f"{r['added_cpu_s']:+.2f} s), peak "
              f"{r['python_peak_mb']:.0f} → {r['profile_peak_mb']:.0f} MB ({r['added_mb']:+.0f} MB), "
              f"{r['rounds']} pairs")
        ok = r["added_s"] <= TARGET_STARTUP_S and r["added_mb"] <= TARGET_STARTUP_MB
        targets.append(("edges", f"start-up added ({name})", f"{r['added_s']:+.2f} s (CPU {r['added_cpu_s']:+.2f} s), "
                        f"{r['added_mb']:+.0f} MB",
                        f"≤ {TARGET_STARTUP_S:g} s, {TARGET_STARTUP_MB:g} MB", "ok" if ok else "MISSED"))
    t, c = res["tiny"], res["tiny_compaction"]
    share = c["seconds"] / t["profile_wall_s"] if t["profile_wall_s"] else float("nan")
    print(f"  {t['steps']:,} tiny steps (633 params, batch 8): {t['python_wall_s']:.1f} → {t['profile_wall_s']:.1f} s "
          f"(x{t['wall_ratio']:.2f}; CPU x{t['cpu_ratio']:.2f}), peak {t['python_peak_mb']:.0f} → {t['profile_peak_mb']:.0f} MB "
          f"({t['added_mb']:+.0f} MB); its compaction alone: {c['seconds']:.2f} s ({share:.1%} of the profiled "
          f"run), {c['peak_added_mb']:+.0f} MB")
    targets.append(("edges", f"{t['steps']:,} tiny steps: wall ratio", f"{t['wall_ratio']:.2f}x (CPU {t['cpu_ratio']:.2f}x)",
                    f"≤ {TARGET_TINY_RATIO:g}x", "ok" if t["wall_ratio"] <= TARGET_TINY_RATIO else "MISSED"))
    targets.append(("edges", f"{t['steps']:,} tiny steps: peak RSS added", f"{t['added_mb']:+.0f} MB",
                    f"≤ {TARGET_TINY_MB:g} MB", "ok" if t["added_mb"] <= TARGET_TINY_MB else "MISSED"))
    k = res["compaction"]
    print(f"  compaction of {k['steps']:,} steps x {k['layers']} layers ({k['parts']} parts per table, synthesized): "
          f"{k['seconds']:.1f} s, peak {k['peak_added_mb']:+.0f} MB above the process before it "
          f"({k['rss_before_mb']:.0f} MB)")
    targets.append(("edges", f"compaction peak, {k['steps']:,} x {k['layers']}", f"{k['peak_added_mb']:+.0f} MB",
                    f"< {TARGET_COMPACT_MB:g} MB", "ok" if k["peak_added_mb"] < TARGET_COMPACT_MB else "MISSED"))
    return targets


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "compact":
        print("COMPACT " + json.dumps(compact_child(Path(sys.argv[2]))))
    else:
        sys.exit(__doc__)
