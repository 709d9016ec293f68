"""``gradscope report``: build the page for a run and its compares, write it, show it in Jupyter.

The recommendation is :func:`gradscope.recommend.recommend`'s, rendered from the same blocks as
the terminal report (``recommend.view.blocks``), so the page and ``gradscope recommend`` never
disagree. The layers table, the large one, is read once and streamed: the batches of recommend's
own pass (per-layer statistics, the layers behind spikes) also feed the heat map (:class:`FeedingRun`).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from html import escape
from pathlib import Path

import pyarrow as pa

from gradscope import __version__
from gradscope.errors import GradscopeError
from gradscope.recommend import DEFAULT_PERCENTILE, Recommendation, recommend
from gradscope.recommend.view import blocks
from gradscope.report import charts, page
from gradscope.report.compares import CHART_NOTE, CompareData, compare_chart, find_compares
from gradscope.report.data import OptimizerSeries, binned, read_series
from gradscope.report.heatmap import HeatMap, HeatMaps, heat_maps
from gradscope.store import Run

REPORT_NAME = "report.html"
FEED_AHEAD = 2  # layer batches that may wait for the heat map's worker thread
METRICS_SHOWN = ("final_loss", "best_loss", "volatility", "loss_spikes", "norm_spikes", "nonfinite", "clipped_fraction")


@dataclass(frozen=True)
class Report:
    """A written report: its file, and its page inline in Jupyter (``_repr_html_``)."""

    path: Path
    size: int  # bytes

    def _repr_html_(self) -> str:
        # An iframe keeps the page's style and script to itself inside the notebook.
        text = self.path.read_text(encoding="utf-8")
        return (f'<iframe srcdoc="{escape(text, quote=True)}" style="width:100%;height:900px;border:1px solid #ccc">'
                "</iframe>")


def default_path(run: Run) -> Path:
    """Where ``gradscope report`` writes when no ``-o`` is given: ``report.html`` in the run directory."""
    return run.path / REPORT_NAME


def write_report(run: Run, path: str | os.PathLike[str] | None = None, compare_dirs: Sequence[Path] = (),
                 percentile: float = DEFAULT_PERCENTILE, skip_steps: int = 0) -> Report:
    """Write the report of ``run`` (and of its compares) to ``path`` (default: ``report.html`` in the run).

    Raises:
        UsageError, NoDataError: as :func:`gradscope.recommend.recommend` (no usable step, bad options).
        GradscopeError: the file cannot be written, or a ``compare_dirs`` entry holds no compare.json.
    """
    target = Path(path) if path is not None else default_path(run)
    text = build_page(run, find_compares(run, list(compare_dirs)), percentile, skip_steps)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise GradscopeError(f"cannot write the report {target}: {exc.strerror or exc}") from None
    return Report(target, len(text.encode("utf-8")))


def build_page(run: Run, compares: Sequence[CompareData], percentile: float = DEFAULT_PERCENTILE,
               skip_steps: int = 0) -> str:
    """The report's HTML for ``run`` and ``compares``."""
    series = read_series(run)
    ranges = {k: (int(s.step[0]), int(s.step[-1])) for k, s in series.items() if len(s.step)}
    feeding = FeedingRun(**{f.name: getattr(run, f.name) for f in fields(run)})
    feeding.feed = HeatMaps(run, ranges)
    recs = recommend(feeding, percentile=percentile, skip_steps=skip_steps)
    maps = feeding.feed.finish() if feeding.feed.fed else heat_maps(run, ranges)  # recommend read no layers: a pass
    body = [_optimizer_section(run, rec, series[rec.optimizer], maps.get(rec.optimizer)) for rec in recs]
    body += [_compare_section(data, index) for index, data in enumerate(compares)]
    body.append(page.paragraph(f"written by gradscope {__version__}: one self-contained file, it loads nothing"))
    links = [(f"optimizer-{rec.optimizer}", f"optimizer {rec.optimizer_label}") for rec in recs]
    links += [(f"compare-{i}", f"compare {d.path.name}") for i, d in enumerate(compares)]
    return page.document(f"gradscope report: {run.id}", _header(run, recs, links), body)


class FeedingRun(Run):
    """The run as recommend reads it, with the batches of its pass over the layers fed to the heat maps too.

    Only the first pass that carries what the heat maps need is fed (value clipping's pass reads other
    columns); when recommend reads no layers at all, the report makes a pass of its own.
    """

    feed: HeatMaps | None = None

    def iter_batches(self, kind: str, columns: Sequence[str] | None = None,
                     batch_size: int = 1 << 20) -> Iterator[pa.RecordBatch]:
        """:meth:`Run.iter_batches`, each batch of the layers pass also given to :attr:`feed`."""
        batches = super().iter_batches(kind, columns, batch_size)
        feed = self.feed
        if kind != "layers" or feed is None or feed.fed or not feed.accepts(list(columns or ())):
            return batches
        return _fed(batches, feed)


def _fed(batches: Iterator[pa.RecordBatch], feed: HeatMaps) -> Iterator[pa.RecordBatch]:
    """The batches, each also added to ``feed`` in a worker thread, in order, while recommend works on the next.

    Both sides spend most of their time in pyarrow and numpy, which release the GIL: on two cores the
    heat map costs little wall time. At most :data:`FEED_AHEAD` batches wait for the worker (bounded memory).
    """
    with ThreadPoolExecutor(1) as worker:  # one worker: the batches are added in step order
        pending: deque[Future[None]] = deque()
        for batch in batches:
            pending.append(worker.submit(feed.add, batch))
            while len(pending) > FEED_AHEAD:
                pending.popleft().result()  # re-raises a failure of the heat map here
            yield batch
        for done in pending:
            done.result()


def _header(run: Run, recs: Sequence[Recommendation], links: list[tuple[str, str]]) -> str:
    meta = run.meta
    command = " ".join(meta.provenance.argv) if meta.provenance else "recorded through the Recorder API"
    facts = (f"status {run.status}; {meta.n_steps or 0:,} steps recorded; started {meta.start_time or '-'}; "
             f"gradscope {meta.gradscope_version or '-'}, torch {meta.torch_version or '-'}")
    maxima = "; ".join(f"optimizer {r.optimizer_label}: max_norm = {r.max_norm:.6g}" for r in recs)
    return (f"<h1>gradscope report: {escape(run.id)}</h1>\n" + page.paragraph(f"script: {command}")
            + page.paragraph(facts) + page.paragraph(maxima, "line bold") + page.navigation(links))


def _optimizer_section(run: Run, rec: Recommendation, s: OptimizerSeries, heat: HeatMap | None) -> str:
    k, label = rec.optimizer, rec.optimizer_label
    parts = [page.paragraph(_params_text(run, k)), page.heading("recommendation (gradscope recommend)"),
             page.blocks_html(blocks(rec)), page.heading("global gradient norm")]
    note = binned(s.step, s.grad_norm).note
    parts.append(page.image(charts.data_uri(charts.norm_chart(s, rec)), f"gradient norm of optimizer {label}",
                            "; ".join(x for x in (note, "red dots: steps above max_norm; shaded: the first steps "
                                                  "recommend judges (warm-up or early steps)") if x)))
    parts.append(page.image(charts.data_uri(charts.distribution_chart(s, rec)), f"distribution, optimizer {label}"))
    if heat is not None and heat.layers:
        parts += [page.heading("per-layer norms"),
                  page.image(charts.data_uri(charts.heat_chart(heat, label)), f"per-layer heat map, optimizer {label}",
                             heat.note + f"; {len(heat.layers)} layers, in the optimizer's parameter order")]
    parts += [page.heading("loss and learning rate"),
              page.image(charts.data_uri(charts.loss_lr_chart(s, label)), f"loss and lr, optimizer {label}",
                         binned(s.step, s.loss).note)]
    parts += _layers_table(rec)
    return page.section(f"optimizer-{k}", f"optimizer {label}", parts)


def _params_text(run: Run, k: int) -> str:
    names = next((o.names for o in run.meta.optimizers if o.index == k), ())
    if not names:
        return ""
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} tensors)" if len(names) > 4 else "")
    return f"updates {shown}"


def _layers_table(rec: Recommendation) -> list[str]:
    table_id = f"layers-{rec.optimizer}"
    rows = [[x.layer, x.n, x.median, x.p95, x.threshold, x.max, x.sq_share] for x in rec.layers]
    headers = ["layer", "steps", "median", "p95", f"p{rec.percentile:g} (a per-layer max_norm)", "max",
               "share of squared norm"]
    return [page.heading(f"layers ({len(rows)}): click a heading to sort"), page.filter_box(table_id, "layers"),
            page.table(headers, rows, table_id=table_id, sortable=True)]


def _compare_section(data: CompareData, index: int) -> str:
    doc, verdict = data.doc, data.doc.get("verdict", {})
    parts = [page.paragraph(f"{data.path}: arms {', '.join(map(str, doc.get('arms_planned', [])))}; "
                            f"seeds {doc.get('seeds')}; at most {doc.get('step_cap')} steps per arm"),
             page.heading(f"verdict ({verdict.get('test', '')}, {verdict.get('confidence', '')})"),
             page.preformatted(str(verdict.get("text", ""))),
             page.table(["optimizer", "arm", "claim", "pairs", "mean difference", "CI low", "CI high"],
                        [[e["optimizer"], e["arm"], e["claim"], e["n_pairs"], _num(e["mean_diff"]),
                          _num(e["ci_low"]), _num(e["ci_high"])] for e in verdict.get("effects", [])],
                        caption="final loss, clipped arm minus baseline, paired over seeds")]
    if data.missing:
        parts.append(page.paragraph(f"runs no longer there (not drawn): {', '.join(data.missing)}"))
    for k, name in data.names.items():
        parts += [page.heading(name), page.image(charts.data_uri(compare_chart(data, k)), f"compare, {name}", CHART_NOTE),
                  _metrics_table(doc, k)]
    return page.section(f"compare-{index}", f"compare {data.path.name}", parts)


def _metrics_table(doc: dict, k: int) -> str:
    rows = []
    for arm in doc.get("arms", []):
        for entry in arm.get("optimizers", []):
            if entry.get("optimizer") == k:
                mean, std = entry.get("mean", {}), entry.get("std", {})
                rows.append([arm.get("title", arm.get("arm")), entry.get("n_finished", 0),
                             *[f"{_num(mean.get(m))} ± {_num(std.get(m))}" for m in METRICS_SHOWN]])
    return page.table(["arm", "seeds finished", *METRICS_SHOWN], rows, caption="mean ± std over seeds")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def report_command(ref: str | None, runs_dir: Path | None, output: Path | None, compare_dirs: Sequence[Path]) -> None:
    """``gradscope report``: check the output file, write the page, say where it is (stdout)."""
    from gradscope import console, store

    if output is not None:
        console.check_output_file(output, "--output")
    run = store.load_run(ref, runs_dir)
    written = write_report(run, output or default_path(run), compare_dirs)
    print(f"wrote {written.path} ({written.size / 1e6:.2f} MB): open it in a browser")
