"""What a person (or a machine) sees of ``gradscope compare``: progress, the table, the verdict, JSON.

The progress display goes to stderr and is drawn only when stderr is a terminal (transient: it
disappears when done); otherwise each arm gets one plain line when it ends. The arms' own output
never reaches the terminal: it goes to one log file per arm, so nothing is drawn over it. The
table and verdict go to stdout, or, with ``--json``, one JSON document instead. Nothing here
imports torch.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from gradscope import jsondoc
from gradscope.compare.arms import ArmOutcome, CompareResult
from gradscope.compare.metrics import METRICS, ArmResult, SeedResult, arm_title
from gradscope.compare.plan import ArmSpec, Plan, describe

JSON_FORMAT = "gradscope-compare"
JSON_SCHEMA_VERSION = 1  # an integer: bump when a key of compare.json changes meaning or goes away


class ArmProgress:
    """Shows which arm runs, its step count and elapsed time (implements ``compare.ArmObserver``).

    Args:
        total_steps: the steps each arm is capped at (the bar's length); None draws no length.
        console: where to draw; stderr by default.
    """

    def __init__(self, total_steps: int | None, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.total_steps = total_steps
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._label = ""

    def __enter__(self) -> ArmProgress:
        if self.live:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("steps"), TimeElapsedColumn(), console=self.console, transient=True)
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def arm_started(self, spec: ArmSpec, index: int, total: int, log_path: Path) -> None:
        """A new arm's subprocess is about to start."""
        self._label = f"arm {index + 1}/{total} {arm_title(spec)} seed {spec.seed}"
        if self._progress is not None:
            self._task = self._progress.add_task(self._label, total=self.total_steps)

    def arm_progress(self, spec: ArmSpec, steps: int, elapsed: float) -> None:
        """The running arm has written ``steps`` steps so far."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=steps)

    def arm_finished(self, spec: ArmSpec, outcome: ArmOutcome) -> None:
        """One persistent line per arm, above the bar when there is one."""
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        error = f": {outcome.error}" if outcome.error and outcome.status != "complete" else ""
        line = f"gradscope: {self._label}: {outcome.status} in {outcome.wall_s:.1f}s{error}"
        console = self._progress.console if self._progress is not None else self.console
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def print_plan(plan: Plan, console: Console | None = None) -> None:
    """The notes (warnings) of the plan and one line saying what will run, on stderr."""
    console = console or Console(stderr=True)
    for note in plan.notes:
        console.print(f"gradscope: {note}", markup=False, highlight=False, soft_wrap=True)
    runs = sum(not s.reuse for s in plan.arms)
    cap = f", {plan.step_cap} steps each" if plan.step_cap else ""
    auto = f" (auto = {plan.auto_max_norm:.4g}, gradscope recommend's p95)" if plan.auto_max_norm else ""
    thresholds = ", ".join(f"{t:g}" for t in plan.thresholds)
    console.print(f"gradscope: comparing run {plan.run.id}: max_norm {thresholds}{auto} against {arm_title(None)}, "
                  f"seeds {', '.join(map(str, plan.seeds))}: {runs} runs{cap}", markup=False, highlight=False,
                  soft_wrap=True)


# --------------------------------------------------------------------------------------------------
# The table and the verdict
# --------------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 4) -> str:
    return str(value) if not math.isfinite(value) else f"{value:.{digits}g}"  # nan / inf: a diverged seed


def _cell(arm: ArmResult, metric: str, digits: int = 4, percent: bool = False) -> str:
    if not arm.n_counted:
        return "-"  # no seed finished: nothing to show (the status column says why)
    mean, std = arm.mean(metric), arm.std(metric)
    if percent:
        mean, std = mean * 100, std * 100
    unit = "%" if percent else ""
    text = _fmt(mean, digits) + (unit if math.isfinite(mean) else "")
    return text + (f" ± {_fmt(std, 2)}{unit}" if math.isfinite(std) else "")


def _status(arm: ArmResult) -> str:
    parts = []
    for seed in arm.seeds:
        if seed.status == "diverged":
            parts.append(f"s{seed.seed} diverged at step {seed.first_nonfinite_step}")
        elif seed.status != "ok":
            parts.append(f"s{seed.seed} {seed.status}")
    reused = any(s.reused for s in arm.seeds)
    return "; ".join(parts) or ("ok (seed 0 is the recorded run)" if reused else "ok")


#: Table columns: heading, metric, significant digits, shown as a percentage.
COLUMNS = (("final loss", "final_loss", 4, False), ("best loss", "best_loss", 4, False),
           ("volatility", "volatility", 3, False), ("loss spikes", "loss_spikes", 3, False),
           ("norm spikes", "norm_spikes", 3, False), ("non-finite", "nonfinite", 3, False),
           ("clipped", "clipped_fraction", 3, True), ("train time (s)", "train_time_s", 3, False))
WIDE_TABLE_COLUMNS = 130  # narrower consoles get one column per arm instead of one row per arm


def comparison_table(result: CompareResult, width: int = 200) -> Table:
    """Every metric of every arm: the mean over finished seeds, ± their standard deviation.

    One row per arm on a wide console; on a narrow one the table is transposed (one column per
    arm), which keeps the ``mean ± std`` cells whole.
    """
    n_seeds = len(result.plan.seeds)
    title = f"gradscope compare: run {result.plan.run.id}" + (f" ({n_seeds} seeds: mean ± std)" if n_seeds > 1 else "")
    arms = result.comparison.arms
    rows = [(heading, [_cell(a, metric, digits, percent) for a in arms]) for heading, metric, digits, percent in COLUMNS]
    rows.append(("status", [_status(a) for a in arms]))
    table = Table(title=title, title_justify="left")
    if width >= WIDE_TABLE_COLUMNS:
        table.add_column("arm", no_wrap=True)
        for heading, _ in rows:
            table.add_column(heading, justify="left" if heading == "status" else "right")
        for index, arm in enumerate(arms):
            table.add_row(arm_title(arm), *(cells[index] for _, cells in rows))
        return table
    table.add_column("", no_wrap=True)
    for arm in arms:
        table.add_column(arm_title(arm), justify="right")
    for heading, cells in rows:
        table.add_row(heading, *cells)
    return table


def print_report(result: CompareResult, console: Console | None = None) -> None:
    """The table, the verdict line, and where the plots, logs and JSON are (stdout)."""
    console = console or Console()
    console.print(comparison_table(result, console.width))
    console.print(f"verdict: {result.comparison.verdict.text}", markup=False, highlight=False, soft_wrap=True)
    for name, path in result.plots.items():
        console.print(f"plot ({name}): {path}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"arm logs and compare.json: {result.out_dir}", markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def _seed_json(seed: SeedResult, logs: dict[tuple[str, int], ArmOutcome], arm: str) -> dict[str, Any]:
    outcome = logs.get((arm, seed.seed))
    return {"seed": seed.seed, "run_id": seed.run_id, "status": seed.status, "error": seed.error,
            "reused_recorded_run": seed.reused, "n_steps": seed.n_steps,
            "first_nonfinite_step": seed.first_nonfinite_step, **seed.metrics,
            "final_loss_nonfinite": not math.isfinite(seed.metrics["final_loss"]) and seed.n_steps > 0,
            "wall_s": outcome.wall_s if outcome else None, "exit_code": outcome.exit_code if outcome else None,
            "log": outcome.log_path if outcome else None}


def _arm_json(arm: ArmResult, logs: dict[tuple[str, int], ArmOutcome]) -> dict[str, Any]:
    return {"arm": arm.arm, "title": arm_title(arm), "max_norm": arm.max_norm, "n_seeds": len(arm.seeds),
            "n_finished": arm.n_counted,
            "mean": {m: arm.mean(m) for m in METRICS}, "std": {m: arm.std(m) for m in METRICS},
            "seeds": [_seed_json(s, logs, arm.arm) for s in arm.seeds]}


def to_json(result: CompareResult) -> dict[str, Any]:
    """The whole comparison as a JSON-ready dict (the shape of compare.json; see docs/compare.md)."""
    logs = {(o.spec.arm, o.spec.seed): o for o in result.outcomes}
    verdict = result.comparison.verdict
    return jsondoc.document(JSON_FORMAT, JSON_SCHEMA_VERSION, {
        **describe(result.plan),
        "notes": result.plan.notes, "out_dir": result.out_dir,
        "arms": [_arm_json(a, logs) for a in result.comparison.arms],
        "verdict": {"best": verdict.best, "exceeds_seed_spread": verdict.exceeds_spread, "gap": verdict.gap,
                    "spread": verdict.spread, "text": verdict.text},
        "plots": result.plots, "interrupted": result.interrupted, "exit_code": result.exit_code,
        "error": result.error,
    })


def report(result: CompareResult, as_json: bool = False) -> int:
    """Write compare.json, print the report (or the JSON) to stdout and any error line to stderr.

    Returns:
        The exit code of the comparison (0, 1 when every arm failed, 130 after Ctrl-C).
    """
    document = to_json(result)
    text = json.dumps(document, indent=2)
    (result.out_dir / "compare.json").write_text(text + "\n", encoding="utf-8")
    if as_json:
        print(text, flush=True)
    else:
        print_report(result, _stdout_console())
    if result.error:
        sys.stdout.flush()
        print(f"gradscope: {result.error}", file=sys.stderr, flush=True)
    return result.exit_code


def _stdout_console() -> Console:
    console = Console()
    # Piped output gets no terminal width: keep the table's columns whole rather than wrap at 80.
    return console if console.is_terminal else Console(width=200)
