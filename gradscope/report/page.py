"""The report's HTML: one self-contained page, its style and its one small script inline.

Nothing on the page refers outside it: no font, stylesheet, script or image is loaded from
anywhere (the charts are data URIs), so it opens offline, from a mail attachment, or in a sandbox.
The script (vanilla JS, no library) only sorts and filters the layer tables. Every text that comes
from a run (layer names, paths, the script's command) is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from gradscope.recommend.view import Line, Table

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#fff}
main{max-width:1180px;margin:0 auto;padding:0 24px 48px}
header{background:#f3f5f8;border-bottom:1px solid #d8dde3;padding:16px 24px}
header h1{margin:0 0 4px;font-size:22px}
nav a{margin-right:14px}
h2{border-bottom:2px solid #d8dde3;padding-bottom:4px;margin-top:40px}
h3{margin-top:26px}
p.line{margin:4px 0;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;white-space:pre-wrap}
p.bold{font-weight:bold}
p.green{color:#176a2f}
p.yellow{color:#8a5a00}
p.note{color:#5b6570;font-size:13px;margin:2px 0 14px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid #d8dde3;padding:3px 8px}
th{background:#f3f5f8;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer}
table.sortable th:after{content:" \\2195";color:#9aa3ad}
caption{caption-side:top;text-align:left;font-weight:bold;padding:4px 0}
img{max-width:100%;height:auto;display:block;margin:6px 0}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:13px}
input.filter{padding:4px 8px;font-size:13px;width:320px}
"""

SCRIPT = """
(function () {
  function value(cell) {
    var v = cell.getAttribute("data-v");
    return v === null ? cell.textContent.toLowerCase() : parseFloat(v);
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var body = table.tBodies[0];
    table.querySelectorAll("th").forEach(function (th, col) {
      th.addEventListener("click", function () {
        var up = th.getAttribute("data-dir") !== "asc";
        th.setAttribute("data-dir", up ? "asc" : "desc");
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = value(a.cells[col]), y = value(b.cells[col]);
          var r = x < y ? -1 : (x > y ? 1 : 0);
          return up ? r : -r;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
  document.querySelectorAll("input.filter").forEach(function (input) {
    input.addEventListener("input", function () {
      var table = document.getElementById(input.getAttribute("data-table"));
      var query = input.value.toLowerCase();
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
        row.style.display = row.cells[0].textContent.toLowerCase().indexOf(query) >= 0 ? "" : "none";
      });
    });
  });
})();
"""


def document(title: str, header: str, body: Sequence[str]) -> str:
    """The whole page: ``header`` (already HTML) above the sections of ``body``."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{STYLE}</style></head>\n<body>\n<header>{header}</header>\n"
            f"<main>\n{''.join(body)}\n</main>\n<script>{SCRIPT}</script>\n</body></html>\n")


def section(anchor: str, title: str, parts: Sequence[str]) -> str:
    """A titled section the header's navigation links to."""
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>\n{"".join(parts)}</section>\n'


def heading(text: str) -> str:
    """A sub-heading inside a section."""
    return f"<h3>{escape(text)}</h3>\n"


def paragraph(text: str, css: str = "note") -> str:
    """One paragraph of escaped text."""
    return f'<p class="{css}">{escape(text)}</p>\n' if text else ""


def preformatted(text: str) -> str:
    """Text shown as written (a verdict, a command line)."""
    return f"<pre>{escape(text)}</pre>\n"


def image(uri: str, alt: str, note: str = "") -> str:
    """A chart (a data URI), with what was downsampled said under it."""
    return f'<figure><img src="{uri}" alt="{escape(alt)}">{paragraph(note)}</figure>\n'


def blocks_html(items: Sequence[Line | Table]) -> str:
    """``gradscope recommend``'s report blocks as HTML: the same lines and tables, in the same order."""
    out = []
    for item in items:
        if isinstance(item, Line):
            styles = " ".join(word for word in ("bold", "green", "yellow") if word in item.style)
            out.append(paragraph(item.text, f"line {styles}".strip()))
        else:
            out.append(table(item.headers, item.rows, caption=item.title, numeric_from=max(item.text_columns) + 1))
            out.append(paragraph(item.caption))
    return "".join(out)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "", numeric_from: int = 1,
          table_id: str = "", sortable: bool = False) -> str:
    """A table; cells from column ``numeric_from`` on are right-aligned, and numbers carry ``data-v`` for sorting."""
    attrs = (f' id="{escape(table_id)}"' if table_id else "") + (' class="sortable"' if sortable else "")
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(value, col >= numeric_from) for col, value in enumerate(row)) + "</tr>\n"
                   for row in rows)
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f"<table{attrs}>{cap}<thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>\n"


def _cell(value: object, numeric: bool) -> str:
    if isinstance(value, float | int) and not isinstance(value, bool):
        number = float(value)
        key = number if math.isfinite(number) else (-1e308 if math.isnan(number) else math.copysign(1e308, number))
        text = f"{value:,}" if isinstance(value, int) else f"{number:.4g}"
        return f'<td class="num" data-v="{key!r}">{escape(text)}</td>'
    css = ' class="num"' if numeric else ""
    return f"<td{css}>{escape(str(value))}</td>"


def filter_box(table_id: str, what: str) -> str:
    """A text box that shows only the rows of ``table_id`` whose first cell contains what is typed."""
    return (f'<p><input class="filter" type="search" data-table="{escape(table_id)}" '
            f'placeholder="filter {escape(what)} by name"></p>\n')


def navigation(links: Sequence[tuple[str, str]]) -> str:
    """The header's links to each section: (anchor, text)."""
    return "<nav>" + "".join(f'<a href="#{escape(a)}">{escape(t)}</a>' for a, t in links) + "</nav>"
