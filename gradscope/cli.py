"""The command line: ``gradscope profile | recommend | compare``, and (in :mod:`gradscope.cli_runs`)
``report | export | merge``.

The only module that imports typer. Each command declares its options and makes one call into a
module that knows nothing of the CLI. ``main`` is the one place where a :class:`GradscopeError`
becomes one line on stderr and an exit code. torch and matplotlib are imported lazily inside the
commands that need them, so ``--help`` and ``recommend`` start fast.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from gradscope import __version__, console
from gradscope.cli_runs import RunArg, RunsDirOpt, export, merge, report
from gradscope.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, GradscopeError, UsageError
from gradscope.record.config import DEFAULT_FLUSH_EVERY, torchrun_form

try:  # the base of typer's (click's) own errors: typer vendors click in recent releases
    from typer import TyperException as CliError
except ImportError:  # typer on top of click
    from click import ClickException as CliError

app = typer.Typer(
    name="gradscope",
    help="Measure what your gradients do, and choose clip_grad_norm_'s max_norm from the measurement.",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)


def _version_callback(value: bool) -> None:
    if value:
        print(f"gradscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print gradscope's version and exit."),
    ] = False,
) -> None:
    """Measure what your gradients do, and choose clip_grad_norm_'s max_norm from the measurement."""


@app.command(
    context_settings={"allow_interspersed_args": False},
    no_args_is_help=True,
)
def profile(
    script: Annotated[
        str,
        typer.Argument(help="The training script to run, as you would give it to python (or a module name with -m).", show_default=False),
    ],
    script_args: Annotated[
        list[str] | None,
        typer.Argument(help="Arguments for the script. Everything after the script belongs to it, --help included.", show_default=False),
    ] = None,
    module: Annotated[
        bool,
        typer.Option("-m", "--module", help="Run SCRIPT as a module, like python -m. It must be the last gradscope option."),
    ] = False,
    runs_dir: RunsDirOpt = None,
    flush_every: Annotated[
        int,
        typer.Option(
            min=1,
            help="Write a part file after this many steps (and at least 2 seconds after the last one). "
            "A killed run keeps everything up to its last part.",
        ),
    ] = DEFAULT_FLUSH_EVERY,
    max_norm: Annotated[
        str | None,
        typer.Option(
            "--max-norm",
            help="Inject clip_grad_norm_(params, MAX_NORM) before every optimizer step, replacing the script's own "
            "clipping: one positive number for every optimizer, or one per optimizer index separated by '/' "
            "(1/5: optimizer 0 at 1, optimizer 1 at 5). Used by gradscope compare; useful by hand to try a threshold.",
            show_default=False,
        ),
    ] = None,
    clip_value: Annotated[
        str | None,
        typer.Option(
            "--clip-value",
            help="Inject clip_grad_value_(params, CLIP_VALUE) before every optimizer step, replacing the script's "
            "own clipping as --max-norm does (both: the value clip first).",
            show_default=False,
        ),
    ] = None,
    no_clip: Annotated[
        bool,
        typer.Option(
            "--no-clip",
            help="Disable the script's own clip_grad_norm_/clip_grad_value_ calls: they still measure, but no longer scale.",
        ),
    ] = False,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed torch before the script runs and replace the seed of every torch.manual_seed call the script makes.",
            show_default=False,
        ),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Stop the script cleanly after this many optimizer steps (of its first optimizer).",
            show_default=False,
        ),
    ] = None,
    max_time: Annotated[
        float | None,
        typer.Option(min=0.0, help="Stop the script cleanly at the first optimizer step after this many seconds.", show_default=False),
    ] = None,
    label: Annotated[
        str | None,
        typer.Option(help="Name of the run (the run id is LABEL-YYYYmmdd-HHMMSS). Defaults to the script's name.", show_default=False),
    ] = None,
    quiet: Annotated[
        bool,
        typer.Option("-q", "--quiet", help="Print nothing of gradscope's own, only the script's output."),
    ] = False,
) -> None:
    """Run a training script as [bold]python SCRIPT ARGS[/bold] would, and record every optimizer step.

    Records the global gradient norm before clipping, per-layer norms, loss, learning rate, clipping,
    GradScaler scale and skipped steps to a run directory (parquet). The script is not modified.
    """
    from gradscope.errors import UsageError
    from gradscope.record.config import (
        ProfileOptions,
        RecorderConfig,
        check_profile_options,
        parse_clip_value,
        parse_thresholds,
    )
    from gradscope.record.profile import run_profile

    try:  # a bad value stops here, before the script runs
        thresholds = parse_thresholds(max_norm, "--max-norm") if max_norm is not None else None
        value = parse_clip_value(clip_value, "--clip-value") if clip_value is not None else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    injecting = thresholds is not None or value is not None
    recording = RecorderConfig(flush_every=flush_every, inject_max_norm=thresholds, inject_clip_value=value,
                               disable_script_clip=no_clip or injecting, seed=seed,
                               max_steps=max_steps, max_time=max_time)
    options = ProfileOptions(target=script, args=list(script_args or []), as_module=module, runs_dir=runs_dir,
                             label=label, quiet=quiet, recording=recording)
    try:
        check_profile_options(options)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    raise typer.Exit(run_profile(options))


# --- recommend: see gradscope/recommend/ ----------------------------------------------------------


@app.command()
def recommend(
    run: RunArg = None,
    runs_dir: RunsDirOpt = None,
    percentile: Annotated[
        float,
        typer.Option(
            help="Set max_norm at this percentile (0 < P <= 100) of the pre-clip global norm. "
            "A high one (95-99) guards against spikes; a low one (AutoClip's 10) clips most steps.",
        ),
    ] = 95.0,
    skip_steps: Annotated[
        int,
        typer.Option(min=0, help="Leave each optimizer's first N steps (an lr warm-up) out of the analysis."),
    ] = 0,
    optimizer: Annotated[
        int | None,
        typer.Option(
            help="Analyse only the optimizer with this index. By default each optimizer gets its own recommendation.",
            show_default=False,
        ),
    ] = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON document (format gradscope-recommend) instead of the report."),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Also draw the norm over steps with max_norm, and its histogram, to this file (.png, .svg or .pdf).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Recommend a [bold]clip_grad_norm_[/bold] max_norm from a recorded run, with the evidence for it.

    By default max_norm is the 95th percentile (numpy's linear interpolation) of the pre-clip global
    gradient norm over the finite steps GradScaler did not skip. The report shows the distribution, what
    candidate thresholds would clip, spikes and the layers behind them, the first non-finite step, the
    first steps (an lr warm-up, or the early steps), per-layer norms, and the caveats that apply: too
    few steps, a closure optimizer (LBFGS), a script that clips by value (with a clip_grad_value_
    threshold too). Exit codes: 0 ok, 1 no such run or not readable, 2 bad option, 3 no usable steps.
    """
    from gradscope import plots, store
    from gradscope.recommend import recommend as recommend_max_norm
    from gradscope.recommend import view

    if not (math.isfinite(percentile) and 0.0 < percentile <= 100.0):
        raise UsageError(f"--percentile must be in (0, 100], got {percentile:g}")
    if optimizer is not None and optimizer < 0:
        raise UsageError(f"--optimizer takes an optimizer index (0 or more), got {optimizer}")
    if plot is not None:
        console.check_output_file(plots.check_path(plot), "--plot")  # a bad file name fails before the analysis
    loaded = store.load_run(run, runs_dir)
    recommendations = recommend_max_norm(loaded, percentile=percentile, skip_steps=skip_steps, optimizer=optimizer)
    if plot is not None:
        with plots.quiet():
            written = plots.save_figure(plots.plot_recommend(loaded, recommendations), plot)
        print(f"gradscope: wrote {written}", file=sys.stderr)
    if json_output:
        view.render_json(recommendations)
    else:
        view.render_text(recommendations)


# --- compare: see gradscope/compare/ -------------------------------------------------------------


@app.command()
def compare(
    run: RunArg = None,
    max_norm: Annotated[
        str | None,
        typer.Option(
            "--max-norm",
            help="Thresholds to try, separated by commas: a positive number (every optimizer), one per optimizer "
            "separated by '/' (1/5: optimizer 0 at 1, optimizer 1 at 5), or auto (each optimizer's own gradscope "
            "recommend max_norm, p95). Several values make a sweep. Default auto, unless --clip-value is given.",
            show_default=False,
        ),
    ] = None,
    clip_value: Annotated[
        str | None,
        typer.Option(
            "--clip-value",
            help="Also try clip_grad_value_ at these thresholds, separated by commas: positive numbers, or auto "
            "(gradscope recommend's value-clipping threshold, when it gives one).",
            show_default=False,
        ),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(min=1, max=MAX_SEEDS, help="Run every arm with this many seeds (the recorded seed, +1, +2...), "
                     "paired across arms. The verdict claims an effect only with 3 or more."),
    ] = 3,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Stop each arm cleanly after this many optimizer steps. Defaults to the "
                                 "number of steps the recorded run made.", show_default=False),
    ] = None,
    max_time: Annotated[
        float | None,
        typer.Option(min=0.0, help="Stop each arm cleanly at its first optimizer step after this many seconds.",
                     show_default=False),
    ] = None,
    python: Annotated[
        str | None,
        typer.Option("--python", help="Run the arms with this Python interpreter. Defaults to the one that "
                                      "recorded the run.", show_default=False),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory for the arm logs, the plots and compare.json. Defaults to a new "
                                   "compare-TIME directory in the runs directory.", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan (every arm's command, directory and interpreter) and run nothing."),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the comparison as one JSON document instead of the table."),
    ] = False,
    trust_run: Annotated[
        bool,
        typer.Option("--trust-run", help="Run the recorded command even when its script, command line or "
                                         "interpreter does not match the record or this machine (see --dry-run)."),
    ] = False,
    runs_dir: RunsDirOpt = None,
) -> None:
    """Rerun the script of RUN with clipping injected before every optimizer step, and compare.

    Each arm is a fresh [bold]gradscope profile[/bold] of the recorded command (same arguments, working
    directory, interpreter and seed), one at a time, with its output in a log file. The unclipped
    baseline is the recorded run when it was seeded and unclipped, else a baseline arm with the
    script's own clipping disabled. Prints a table per arm and optimizer, a verdict from a paired t
    interval over seeds, and writes loss and gradient-norm plots.
    Exit codes: 0 ok (also when an arm crashed, diverged or could not be injected: the table says so),
    1 no such run, script or interpreter gone or not matching the record (see --trust-run), or every
    arm failed, 2 bad option, 3 no steps, 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP.
    """
    from gradscope.compare import CompareOptions, plan_compare, run_compare, view

    if max_time is not None and not (math.isfinite(max_time) and max_time > 0):
        raise UsageError(f"--max-time takes a positive number of seconds, got {max_time:g}")
    options = CompareOptions(run=run, runs_dir=runs_dir, max_norm=max_norm or (None if clip_value else "auto"),
                             clip_value=clip_value, seeds=seeds, steps=steps, max_time=max_time, out_dir=out,
                             python=python, trust_run=trust_run)
    plan = plan_compare(options)
    if dry_run:
        raise typer.Exit(view.dry_run(plan, as_json=as_json))
    view.print_plan(plan)
    with view.ArmProgress(plan.step_cap) as progress:
        result = run_compare(plan, progress)
    raise typer.Exit(view.report(result, as_json=as_json))


MAX_SEEDS = 1000  # compare --seeds: more is a typo, not a plan

# The commands that read recorded runs into files: gradscope/cli_runs.py.
for _command in (report, export, merge):
    app.command()(_command)


def _torchrun_form(argv: list[str]) -> list[str]:
    """``profile [options] [torchrun's options] train.py ...`` as ``profile [options] -m torch.distributed.run
    ...`` (see :func:`gradscope.record.config.torchrun_form`)."""
    if not argv or argv[0] != "profile":
        return argv
    command = typer.main.get_command(app).commands["profile"]  # type: ignore[attr-defined]
    ours = {name for param in command.params for name in getattr(param, "opts", ())}
    takes_value = {name for param in command.params if not getattr(param, "is_flag", True)
                   for name in getattr(param, "opts", ())}
    return torchrun_form(argv, ours, takes_value)
def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and ``python -m gradscope``; returns the exit code.

    Every error is one line on stderr starting with ``gradscope:``, never a traceback or a box: a
    usage error (typer's own too: an unknown option, a missing argument, a bad number) exits 2, a
    :class:`GradscopeError` with its own exit code. A closed stdout (``| head``) ends quietly with 0.
    """
    stdout_was_devnull = console.stdout_is_devnull()
    try:
        argv = _torchrun_form(list(sys.argv[1:] if argv is None else argv))
        result = app(args=argv, prog_name="gradscope", standalone_mode=False)
    except GradscopeError as exc:
        return console.error_line(exc.message, exc.exit_code)
    except CliError as exc:
        return console.cli_error(exc)
    except typer.Abort:
        return console.error_line("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        return console.closed_stdout()
    except SystemExit as exc:
        if exc.code == EXIT_ERROR and isinstance(exc.__context__, BrokenPipeError):
            return console.closed_stdout()  # typer met the closed pipe and exited 1
        if exc.code == EXIT_ERROR and not stdout_was_devnull and console.stdout_is_devnull():
            return EXIT_OK  # rich met the closed pipe: it sent stdout to /dev/null and exited 1
        return console.exit_status(exc.code)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return console.closed_stdout()
    return console.exit_status(result)
