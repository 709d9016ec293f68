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
import shlex
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from gradscope import jsondoc
from gradscope.compare.arms import ArmOutcome, CompareResult, arm_argv
from gradscope.compare.metrics import METRICS, ArmResult, SeedResult
from gradscope.compare.plan import ArmSpec, Plan, describe, per_optimizer, shell_line
from gradscope.compare.verdict import CONFIDENCE, MIN_PAIRS, TEST, Effect

JSON_FORMAT = "gradscope-compare"
JSON_SCHEMA_VERSION = 2  # an integer: bump when a key of compare.json changes meaning or goes away


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
        self._label = f"arm {index + 1}/{total} {spec.clip.title} seed {spec.seed}"
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


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def print_plan(plan: Plan, console: Console | None = None) -> None:
    """The notes, what will run, and the exact command, directory and interpreter of every arm (stderr).

    The arms rerun the user's script in its own working directory: whatever it writes there
    (checkpoints, logs) is written again, so that is said before anything runs.
    """
    console = console or Console(stderr=True)
    for note in plan.notes:
        _say(console, f"gradscope: {note}")
    runs = [s for s in plan.arms if not s.reuse]
    cap = f", {plan.step_cap} steps each" if plan.step_cap else ""
    auto = ""
    if plan.auto_max_norm is not None:
        auto = f" (auto: each optimizer's gradscope recommend p95, {'/'.join(f'{v:.4g}' for v in plan.auto_max_norm.values)})"
    if plan.auto_clip_value is not None:
        auto += f" (clip_value auto: gradscope recommend's, {plan.auto_clip_value:.4g})"
    arms = ", ".join(c.title for c in plan.clips)
    _say(console, f"gradscope: comparing run {plan.run.id}: {arms}{auto} against no clipping, seeds "
                  f"{', '.join(map(str, plan.seeds))} (paired across arms): {len(runs)} runs{cap}")
    for name in plan.optimizers.values():
        _say(console, f"gradscope:   {name}")
    _say(console, f"gradscope: every arm runs in {plan.cwd} with {plan.python}, with this environment "
                  "(GRADSCOPE_PROFILING and GRADSCOPE_JOB removed)")
    if plan.launcher_args is not None:
        _say(console, f"gradscope: run {plan.run.id} is a distributed job: every arm is a job started by torchrun "
                      f"{shell_line(list(plan.launcher_args))}, its ranks recorded in one run")
    _say(console, f"gradscope: warning: the arms run your script again in {plan.cwd}: whatever it writes there "
                  "(checkpoints, logs, outputs) is written again, once per arm")
    for spec in runs:
        _say(console, f"gradscope:   $ {shell_line(arm_argv(plan, spec))}")


def dry_run(plan: Plan, as_json: bool = False) -> int:
    """``--dry-run``: print the plan (stdout) and run nothing. Returns exit code 0."""
    if as_json:
        commands = [{"arm": s.arm, "seed": s.seed, "argv": arm_argv(plan, s)} for s in plan.arms if not s.reuse]
        print(json.dumps(jsondoc.document(JSON_FORMAT, JSON_SCHEMA_VERSION, {
            **describe(plan), "notes": plan.notes, "dry_run": True, "commands": commands}), indent=2))
    else:
        print_plan(plan, _stdout_console())
        print("gradscope: --dry-run: nothing was run", flush=True)
    return 0


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


def _effect_cell(effect: Effect | None) -> str:
    """The paired difference of final losses and its interval, as the verdict reads it."""
    if effect is None:
        return "-"
    diff = effect.diff
    if diff is None:
        return "could not compare"
    text = f"{diff.mean:+.3g}"
    if diff.low is not None and diff.high is not None:
        text += f" [{diff.low:+.3g}, {diff.high:+.3g}]"
    return text + (f" (n={diff.n}, indicative)" if diff.n < MIN_PAIRS else f" (n={diff.n})")


#: Table columns: heading, metric, significant digits, shown as a percentage.
COLUMNS = (("final loss", "final_loss", 4, False), ("best loss", "best_loss", 4, False),
           ("volatility", "volatility", 3, False), ("loss spikes", "loss_spikes", 3, False),
           ("norm spikes", "norm_spikes", 3, False), ("non-finite", "nonfinite", 3, False),
           ("clipped", "clipped_fraction", 3, True), ("train time (s)", "train_time_s", 3, False))
DIFF_HEADING = "vs no clipping [95% CI]"  # the final-loss difference: kept whole on one line
WIDE_TABLE_COLUMNS = 130  # narrower consoles get one column per arm instead of one row per arm


def _rows(result: CompareResult) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Row names (arm, and optimizer when there are several) and the cells of every column."""
    comparison = result.comparison
    arms = comparison.arms
    several = len(comparison.names) > 1
    names = [f"{a.title} | {comparison.names[a.optimizer]}" if several else a.title for a in arms]
    effects = {(e.optimizer, e.arm): e for e in comparison.verdict.effects}
    cells = [(h, [_cell(a, m, d, p) for a in arms]) for h, m, d, p in COLUMNS]
    cells.insert(1, (DIFF_HEADING, [_effect_cell(effects.get((a.optimizer, a.arm))) for a in arms]))
    cells.append(("status", [_status(a) for a in arms]))
    return names, cells


def comparison_table(result: CompareResult, width: int = 200) -> Table:
    """Every metric of every arm (per optimizer): the mean over finished seeds, ± their standard
    deviation, and the paired difference to no clipping with its 95% interval.

    One row per arm and optimizer on a wide console; on a narrow one the table is transposed (one
    column per arm), which keeps the ``mean ± std`` cells whole.
    """
    n_seeds = len(result.plan.seeds)
    title = f"gradscope compare: run {result.plan.run.id}" + (f" ({n_seeds} seeds: mean ± std)" if n_seeds > 1 else "")
    names, rows = _rows(result)
    table = Table(title=title, title_justify="left")
    if width >= WIDE_TABLE_COLUMNS:
        table.add_column("arm", no_wrap=True)
        for heading, _ in rows:
            table.add_column(heading, justify="left" if heading == "status" else "right",
                             no_wrap=heading == DIFF_HEADING)
        for index, name in enumerate(names):
            table.add_row(name, *(cells[index] for _, cells in rows))
        return table
    table.add_column("", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")
    for heading, cells in rows:
        table.add_row(heading, *cells)
    return table


def print_report(result: CompareResult, console: Console | None = None) -> None:
    """The table, the verdict (one line per arm and optimizer, then the summary), and where the files are."""
    console = console or Console()
    console.print(comparison_table(result, console.width))
    _say(console, f"verdict: by the {TEST}; an effect is claimed only when the interval excludes 0 with "
                  f"{MIN_PAIRS}+ paired seeds")
    for line in result.comparison.verdict.text.splitlines():
        _say(console, f"  {line}")
    for name, path in result.plots.items():
        _say(console, f"plot ({name}): {path}")
    _say(console, f"arm logs and compare.json: {result.out_dir}")
    elsewhere = "" if result.out_dir.parent == result.plan.root.resolve() else f" --compare {shlex.quote(str(result.out_dir))}"
    _say(console, f"next: gradscope report {shlex.quote(str(result.plan.run.path))}{elsewhere}   (one HTML page)")


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def _seed_json(seed: SeedResult, outcome: ArmOutcome | None) -> dict[str, Any]:
    """A seed's run: identity, status and how its subprocess ended."""
    return {"seed": seed.seed, "run_id": seed.run_id, "status": seed.status, "error": seed.error,
            "reused_recorded_run": seed.reused, "wall_s": outcome.wall_s if outcome else None,
            "exit_code": outcome.exit_code if outcome else None, "log": seed.log}


def _optimizer_json(arm: ArmResult, name: str) -> dict[str, Any]:
    seeds = [{"seed": s.seed, "status": s.status, "n_steps": s.n_steps, "first_nonfinite_step": s.first_nonfinite_step,
              "final_loss_nonfinite": not math.isfinite(s.metrics["final_loss"]) and s.n_steps > 0, **s.metrics}
             for s in arm.seeds]
    return {"optimizer": arm.optimizer, "name": name, "max_norm": arm.max_norm, "n_finished": arm.n_counted,
            "mean": {m: arm.mean(m) for m in METRICS}, "std": {m: arm.std(m) for m in METRICS}, "seeds": seeds}


def _arms_json(result: CompareResult) -> list[dict[str, Any]]:
    comparison, plan = result.comparison, result.plan
    outcomes = {(o.spec.arm, o.spec.seed): o for o in result.outcomes}
    out: dict[str, dict[str, Any]] = {}
    for arm in comparison.arms:
        entry = out.get(arm.arm)
        if entry is None:
            entry = out[arm.arm] = {
                "arm": arm.arm, "title": arm.title, "max_norm": per_optimizer(plan, arm.clip.max_norm),
                "clip_value": arm.clip.clip_value, "n_seeds": len(arm.seeds),
                "seeds": [_seed_json(s, outcomes.get((arm.arm, s.seed))) for s in arm.seeds], "optimizers": []}
        entry["optimizers"].append(_optimizer_json(arm, comparison.names[arm.optimizer]))
    return list(out.values())


def _verdict_json(result: CompareResult) -> dict[str, Any]:
    verdict = result.comparison.verdict
    effects = [{"optimizer": e.optimizer, "arm": e.arm, "claim": e.claim, "n_pairs": e.diff.n if e.diff else 0,
                "mean_diff": e.diff.mean if e.diff else None, "ci_low": e.diff.low if e.diff else None,
                "ci_high": e.diff.high if e.diff else None, "relative": e.relative, "text": e.text}
               for e in verdict.effects]
    return {"metric": "final_loss", "test": TEST, "confidence": CONFIDENCE, "min_pairs": MIN_PAIRS,
            "best": verdict.best, "effects": effects, "summary": verdict.summary, "text": verdict.text}


def to_json(result: CompareResult) -> dict[str, Any]:
    """The whole comparison as a JSON-ready dict (the shape of compare.json; see docs/compare.md)."""
    return jsondoc.document(JSON_FORMAT, JSON_SCHEMA_VERSION, {
        **describe(result.plan),
        "notes": result.plan.notes, "out_dir": result.out_dir,
        "arms": _arms_json(result), "verdict": _verdict_json(result),
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
