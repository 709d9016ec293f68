"""The commands that turn recorded runs into files: ``gradscope report | export | merge``, and the options
every command that names a run shares.

Registered on the app by :mod:`gradscope.cli` (the one place errors become exit codes). Each command makes
one call into a module that knows nothing of the CLI; those modules are imported inside the command, so
``--help`` stays fast and none of them pays for torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

# Options shared by several commands, defined once.
RunsDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--runs-dir",
        envvar="GRADSCOPE_DIR",
        help="Directory that holds the runs. Defaults to [blue].gradscope[/blue] in the working directory.",
        show_default=False,
    ),
]
RunArg = Annotated[
    str | None,
    typer.Argument(help="A run id or run directory. Defaults to the latest run.", show_default=False),
]


def report(
    run: RunArg = None,
    runs_dir: RunsDirOpt = None,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="The HTML file to write. Defaults to report.html in the run directory.",
                     show_default=False),
    ] = None,
    compare: Annotated[
        list[Path] | None,
        typer.Option(help="Also show the compare written to this directory with compare --out; give it once per "
                          "compare. Compares in the runs directory are found without it.", show_default=False),
    ] = None,
) -> None:
    """Write one self-contained HTML page for a run and its compares, to open, keep or send.

    Exit codes: 0 written, 1 no such run or the file cannot be written, 2 a bad option, 3 no usable steps
    (docs/report.md).
    """
    from gradscope.report import report_command

    report_command(run, runs_dir, output, compare or [])


def export(
    run: RunArg = None,
    runs_dir: RunsDirOpt = None,
    tensorboard: Annotated[
        Path | None,
        typer.Option(help="Write the recorded series as TensorBoard scalars into this directory, one folder per "
                          "optimizer. Needs gradscope[tensorboard].", show_default=False),
    ] = None,
    csv: Annotated[
        Path | None,
        typer.Option(help="Write the steps and layers tables as CSV files into this directory.", show_default=False),
    ] = None,
) -> None:
    """Export a run to what you already use: TensorBoard scalars beside your own curves, or CSV.

    Exit codes: 0 written, 1 no such run, a directory that cannot be written or no tensorboard, 2 a bad
    option (docs/report.md).
    """
    from gradscope.export import export_command

    export_command(run, runs_dir, tensorboard, csv)


def merge(
    out: Annotated[Path, typer.Argument(help="The merged job's run directory; it must not exist.", show_default=False)],
    runs: Annotated[list[str], typer.Argument(help="The job runs of the nodes: run ids or directories.")],
    runs_dir: RunsDirOpt = None,
    force: Annotated[bool, typer.Option(help="Merge runs that ran different scripts.")] = False,
) -> None:
    """Merge the job runs of several nodes of one distributed job into one job run OUT.

    Each rank's sub-run is hard-linked (or copied) into OUT/ranks/; the inputs are left as they are.

    Exit codes: 0 merged, 1 an input is not a finished job, two inputs hold the same rank, or they ran
    different scripts, 2 OUT exists.
    """
    from gradscope import store

    done = store.merge_jobs(out, [store.resolve_run(ref, runs_dir) for ref in runs], force)
    print(f"gradscope: {done.summary()}", file=sys.stderr)
