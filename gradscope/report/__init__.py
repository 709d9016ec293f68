"""``gradscope report``: one self-contained HTML page for a run and its compares.

* ``data.py`` reads each optimizer's series from the steps table and downsamples it (max and
  median per bin);
* ``heatmap.py`` streams the layers table into a layers x step-bins heat map;
* ``compares.py`` finds the compares of the run (their compare.json) and the arms' runs;
* ``charts.py`` draws the charts (matplotlib, PNG data URIs), ``page.py`` writes the HTML;
* ``view.py`` puts them together (:func:`write_report`) and shows a report in Jupyter.

Reads the store only; never imports torch.
"""

from gradscope.report.view import REPORT_NAME, Report, build_page, default_path, report_command, write_report

__all__ = ["REPORT_NAME", "Report", "build_page", "default_path", "report_command", "write_report"]
