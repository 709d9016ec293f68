"""Render :class:`gradscope.recommend.Recommendation` objects: rich tables, plain text, or JSON.

The text report is built once as a list of neutral blocks (lines and tables) and then drawn either
with rich (when stdout is a terminal) or as plain aligned text (when piped), so both show the same
numbers. The JSON document starts with ``"format": "gradscope-recommend"`` and an integer
``"schema_version"``, as every gradscope JSON output does; its keys are stable and documented in
docs/recommend.md. rich is imported only when a terminal will see it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from gradscope import __version__, jsondoc
from gradscope.recommend.analysis import PERCENTILE_METHOD
from gradscope.recommend.model import Recommendation, Spike, ValueClipping
from gradscope.recommend.notes import MIN_PERCENTILE_STEPS
from gradscope.recommend.schedule import WARMUP_MAX_STEPS, lr_evidence

#: The ``format`` of the JSON document, and its ``schema_version``: bump it when a key changes
#: meaning or goes away.
JSON_FORMAT = "gradscope-recommend"
JSON_SCHEMA_VERSION = 1
#: Layers listed in the text report (the JSON lists all of them).
LAYERS_SHOWN = 10
CLIP_RULE = "a threshold clips a step when the step's pre-clip global norm is greater than it"


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------


def to_json(recommendations: Sequence[Recommendation]) -> dict[str, Any]:
    """The JSON document for ``recommendations`` (one run), as plain dicts; NaN and inf become null."""
    first = recommendations[0]
    run = {"id": first.run_id, "path": first.run_path, "status": first.run_status,
           "complete": first.complete, "note": first.status_note}
    per_optimizer = []
    for rec in recommendations:
        body = dataclasses.asdict(rec)
        for key in ("run_id", "run_path", "run_status", "complete", "status_note", "percentile", "skip_steps"):
            body.pop(key)
        if rec.n_ranks == 1 and rec.norm_scope == "global":  # a single process: the document as it always was
            body.pop("n_ranks")
            body.pop("norm_scope")
        per_optimizer.append(body)
    return jsondoc.document(JSON_FORMAT, JSON_SCHEMA_VERSION, {
        "gradscope_version": __version__, "run": run, "percentile": first.percentile,
        "percentile_method": PERCENTILE_METHOD, "clip_rule": CLIP_RULE, "skip_steps": first.skip_steps,
        "recommendations": per_optimizer,
    })


def render_json(recommendations: Sequence[Recommendation], file: TextIO | None = None) -> None:
    """Write the JSON document, indented, to ``file`` (stdout by default)."""
    out = file or sys.stdout
    json.dump(to_json(recommendations), out, indent=2, allow_nan=False)
    out.write("\n")


# --------------------------------------------------------------------------------------------------
# Neutral blocks: what the text report says, before it is drawn
# --------------------------------------------------------------------------------------------------


@dataclass
class Line:
    """A line of text; ``style`` is a rich style, ignored in plain text."""

    text: str
    style: str = ""


@dataclass
class Table:
    """A titled table; text columns (the first, by default) left-aligned, numbers right-aligned."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    text_columns: tuple[int, ...] = (0,)


Block = Line | Table


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def _share(value: float) -> str:
    return "<1%" if value < 0.005 else f"{value:.0%}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


#: How each norm scope (docs/distributed.md) is described in the report.
SCOPE_TEXT = {"global": "global (every rank held the whole gradients)",
              "sharded": "global, combined from the ranks' shards",
              "rank-local": "rank-local (one rank's own gradients, not the global norm)"}


def blocks(rec: Recommendation) -> list[Block]:
    """Everything the text report shows for one recommendation, in order."""
    out: list[Block] = [Line(f"run {rec.run_id} ({rec.run_status}), optimizer {rec.optimizer_label}", "bold")]
    if rec.status_note:
        out.append(Line(rec.status_note, "bold yellow"))
    if rec.n_ranks > 1 or rec.norm_scope != "global":
        ranks = "1 rank" if rec.n_ranks == 1 else f"{rec.n_ranks} ranks"
        out.append(Line(f"{ranks} read; norms: {SCOPE_TEXT.get(rec.norm_scope, rec.norm_scope)}"))
    out += [
        *_closure_lines(rec), _headline(rec), Line(f"intent: {rec.intent_text}"),
        _distribution_table(rec), _clip_table(rec), *_value_blocks(rec.value_clipping), *_spike_blocks(rec),
        _nonfinite_line(rec), *_warmup_lines(rec), _layers_table(rec),
    ]
    out += [Line(f"warning [{note.slug}]: {note.message}", "yellow") for note in rec.notes]
    params = f"# params: what optimizer {rec.optimizer_label} updates"
    use = "use" if rec.distribution.n_used >= MIN_PERCENTILE_STEPS else "use (indicative only)"
    out.append(Line(f"{use}: torch.nn.utils.clip_grad_norm_(params, max_norm={_num(rec.max_norm, 6)})  {params}",
                    "bold"))
    if rec.clip_value is not None:
        out.append(Line(f"or, clipping by value: torch.nn.utils.clip_grad_value_(params, "
                        f"clip_value={_num(rec.clip_value, 6)})  {params}", "bold"))
    return out


def _headline(rec: Recommendation) -> Line:
    d, p = rec.distribution, f"p{rec.percentile:g}"
    if d.n_used < MIN_PERCENTILE_STEPS:
        return Line(f"max_norm = {_num(rec.max_norm, 6)}   {p} of only {d.n_used} used step{'s' * (d.n_used != 1)}: "
                    f"too few to support a percentile ({MIN_PERCENTILE_STEPS} needed); indicative only", "bold yellow")
    return Line(f"max_norm = {_num(rec.max_norm, 6)}   {p} of the pre-clip global L2 norm over "
                f"{d.n_used} steps; clips {_pct(rec.clip_rate)} of them", "bold green")


def _closure_lines(rec: Recommendation) -> list[Line]:
    c = rec.closure
    if c is None:
        return []
    evaluations = ("closure evaluations not recorded" if c.n_evaluations is None else
                   f"{c.n_evaluations} closure evaluations (~{c.per_step:.3g} per step)")
    return [Line(f"closure optimizer: {c.n_steps} step{'s' * (c.n_steps != 1)} recorded, {evaluations}; "
                 f"one norm per step (its first evaluation's gradient)")]


def _value_blocks(v: ValueClipping | None) -> list[Block]:
    if v is None:
        return []
    lines: list[Block] = []
    if v.script_clip_value is not None:
        lines.append(Line(f"the script clips by value: clip_grad_value_ at {_num(v.script_clip_value)} changed "
                          f"{v.script_n_clipped} of {v.n_steps} steps ({_pct(v.script_clip_rate)}): those whose "
                          f"largest |gradient| exceeded it", "bold"))
    if v.injected_clip_value is not None:
        lines.append(Line(f"injected clip_value {_num(v.injected_clip_value)} changed {v.injected_n_clipped} of "
                          f"{v.n_steps} steps"))
    rows = [[str(v.n_steps), _num(v.median), _num(v.p95), _num(v.p99), _num(v.max), _num(v.clip_value),
             _pct(v.clip_rate)]]
    headers = ["steps", "median", "p95", "p99", "max", "clip_value", "clip rate"]
    caption = ("clip_value: max_norm's percentile of each step's largest |g|, for clip_grad_value_; "
               "a step is clipped when its largest |g| is above it")
    return [*lines, Table("Largest |gradient| element per step (before clipping)", headers, [rows[0]], caption)]


def _distribution_table(rec: Recommendation) -> Table:
    d = rec.distribution
    headers = ["steps used", "min", "median", "p90", "p95", "p99", "max"]
    row = [str(d.n_used), *(_num(v) for v in (d.min, d.median, d.p90, d.p95, d.p99, d.max))]
    caption = f"of {d.n_recorded} recorded: {d.n_nonfinite} non-finite, {d.n_skipped} AMP-skipped"
    if d.n_before_skip:
        caption += f", the first {d.n_before_skip} left out (--skip-steps {rec.skip_steps})"
    return Table("Pre-clip global gradient norm", headers, [row], caption)


def _clip_table(rec: Recommendation) -> Table:
    rows = [[row.label + ("  <- recommended" if row.recommended else ""), _num(row.threshold),
             f"{row.n_clipped}", _pct(row.clip_rate), _num(row.mean_scale, 3)]
            for row in rec.clip_rates]
    caption = "mean scale-down: the mean factor clip_grad_norm_ multiplies the clipped steps' gradients by"
    if rec.distribution.n_used < MIN_PERCENTILE_STEPS:
        caption += f"; over {rec.distribution.n_used} steps a rate counts single steps"
    return Table("What each threshold would clip", ["threshold", "max_norm", "steps clipped", "clip rate",
                                                     "mean scale-down"], rows, caption)


def _spike_blocks(rec: Recommendation) -> list[Block]:
    s = rec.spikes
    rule = f"norm > {s.factor:g}x the median of the {s.window} steps before"
    if not s.count:
        return [Line(f"spikes ({rule}): none")]
    rows = [[str(sp.step), _num(sp.norm), _num(sp.rolling_median), f"{sp.ratio:.1f}x", _spike_layers(sp)]
            for sp in s.shown]
    title = f"Spikes ({rule}): {s.count}" + (f", the {len(s.shown)} largest shown" if s.count > len(s.shown) else "")
    headers = ["step", "norm", "rolling median", "ratio", "layers (share of squared norm)"]
    return [Table(title, headers, rows, text_columns=(0, 4))]


def _spike_layers(spike: Spike) -> str:
    # Layers under 1% of the squared norm say nothing about the spike; the JSON keeps them.
    shown = [ls for ls in spike.layers if ls.share >= 0.01] or list(spike.layers[:1])
    return ", ".join(f"{ls.layer} {_share(ls.share)}" for ls in shown) or "-"


def _nonfinite_line(rec: Recommendation) -> Line:
    nf = rec.nonfinite
    if nf.first_step is None:
        return Line("non-finite steps: none")
    amp = " (an AMP-skipped step: routine under fp16 loss scaling)" if nf.first_step_amp_skipped else ""
    where = (f"; first non-finite layer {nf.first_layer} ({nf.n_layers} layer{'s' * (nf.n_layers != 1)} "
             f"non-finite there)" if nf.first_layer else "")
    return Line(f"non-finite steps: {nf.count}, the first at step {nf.first_step}{amp}{where}",
                "" if nf.first_step_amp_skipped else "red")


def _warmup_lines(rec: Recommendation) -> list[Line]:
    w = rec.warmup
    if w is None:
        return [Line("early steps: too few steps to tell")]
    share = "none of the clipped steps" if w.tail_share is None else f"{w.tail_share:.0%} of the clipped steps"
    without = f"{_num(w.max_norm_without)} (--skip-steps {w.skip_steps})"
    if w.kind == "warm-up":
        verdict = "they dominate the tail" if w.dominates else "they do not dominate the tail"
        return [Line(f"warm-up: {lr_evidence(w)}; those steps hold {share}: {verdict}; "
                     f"without them max_norm = {without}")]
    return [Line(f"early steps: the first {w.window} (10% of the steps, at most {WARMUP_MAX_STEPS}; "
                 f"{lr_evidence(w)}) hold {share}; after them max_norm clips {_pct(w.clip_rate_without)} of steps; "
                 f"from the later steps alone max_norm would be {without}")]


def _layers_table(rec: Recommendation) -> Table:
    by_median = sorted(rec.layers, key=lambda s: -s.median)[:LAYERS_SHOWN]
    chosen = {s.layer for s in rec.layers[:LAYERS_SHOWN]} | {s.layer for s in by_median}
    shown = [s for s in rec.layers if s.layer in chosen]  # rec.layers is largest threshold first
    p = f"p{rec.percentile:g}"
    headers = ["layer", "median", "p95", "max", "share of squared norm"] + ([p] if rec.percentile != 95 else [])
    rows = [[s.layer, _num(s.median), _num(s.p95), _num(s.max), f"{s.sq_share:.1%}",
             *([_num(s.threshold)] if rec.percentile != 95 else [])] for s in shown]
    caption = (f"the layers with the largest median and p95 of {len(rec.layers)}; --json lists every layer "
               f"with its {p} (a per-layer threshold)")
    return Table("Layers", headers, rows, caption)


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def render_text(recommendations: Sequence[Recommendation], file: TextIO | None = None,
                use_rich: bool | None = None) -> None:
    """Write the report: rich tables on a terminal, plain aligned text otherwise (or as forced)."""
    out = file or sys.stdout
    fancy = out.isatty() if use_rich is None else use_rich
    draw = _draw_rich if fancy else _draw_plain
    for index, rec in enumerate(recommendations):
        if index:
            out.write("\n")
        draw(blocks(rec), out)


def _draw_plain(items: Sequence[Block], out: TextIO) -> None:
    after_table = False
    for item in items:
        if isinstance(item, Line):
            out.write(item.text + "\n")
            after_table = False
            continue
        out.write(f"{'' if after_table else chr(10)}{item.title}\n")
        after_table = True
        widths = [max(len(cell) for cell in column) for column in zip(item.headers, *item.rows, strict=True)]
        for cells in [item.headers, *item.rows]:
            padded = [cell.ljust(w) if i in item.text_columns else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(cells, widths, strict=True))]
            out.write("  " + "  ".join(padded).rstrip() + "\n")
        if item.caption:
            out.write(f"  ({item.caption})\n")
        out.write("\n")


def _draw_rich(items: Sequence[Block], out: TextIO) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table as RichTable
    from rich.text import Text

    console = Console(file=out, highlight=False)
    for item in items:
        if isinstance(item, Line):
            console.print(Text(item.text, style=item.style))
            continue
        table = RichTable(title=item.title, caption=item.caption or None, box=box.SIMPLE_HEAD,
                          title_justify="left", caption_justify="left", title_style="bold")
        for i, header in enumerate(item.headers):  # numbers never wrap; long layer names fold
            text = i in item.text_columns
            table.add_column(header, justify="left" if text else "right", overflow="fold", no_wrap=not text)
        for row in item.rows:
            table.add_row(*row, style="bold green" if "recommended" in row[0] else None)
        console.print(table)
