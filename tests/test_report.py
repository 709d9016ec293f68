"""``gradscope report`` and ``gradscope export`` on one real recorded run with two optimizers and a real compare.

The page is opened in headless Chromium (Debian's /usr/bin/chromium) with every host name mapped to
nowhere: it must render without a console message, draw a non-blank screenshot, and show each
optimizer's max_norm exactly as ``gradscope recommend --json`` gives it. The TensorBoard export is
read back with tensorboard's own EventAccumulator and compared value by value with the run's tables.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import GRADSCOPE, SCRIPTS, assert_exit_ok, clean_env

import gradscope
from gradscope import plots, recommend

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _cli(*args: str, cwd: Path = SCRIPTS, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GRADSCOPE, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One GAN run (two Adam optimizers, 40 steps), one compare of it (one seed), its report and recommend --json."""
    tmp = tmp_path_factory.mktemp("report")
    runs = tmp / "runs"
    profile = _cli("profile", "--runs-dir", str(runs), "cmp_gan.py", "--steps", "40")
    assert_exit_ok(profile)
    compare = _cli("compare", "--runs-dir", str(runs), "--max-norm", "auto", "--seeds", "1")
    assert_exit_ok(compare)
    report = _cli("report", "--runs-dir", str(runs), "-o", str(tmp / "report.html"))
    assert_exit_ok(report)
    rec = _cli("recommend", "--runs-dir", str(runs), "--json")
    assert_exit_ok(rec)
    return {"tmp": tmp, "runs": runs, "html": tmp / "report.html", "profile": profile, "compare": compare,
            "report": report, "recommend": json.loads(rec.stdout), "run": gradscope.load_run(runs_dir=runs)}


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp}",
            '--host-resolver-rules=MAP * ~NOTFOUND', "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_the_page_renders_offline_without_errors_and_shows_each_max_norm(reported: dict[str, Any]) -> None:
    from matplotlib.image import imread

    tmp, html = reported["tmp"], reported["html"]
    dom = _chromium(tmp / "profile-dom", "--dump-dom", html.as_uri())
    assert dom.returncode == 0, dom.stderr[-3000:]
    assert ":CONSOLE" not in dom.stderr, [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    text = re.sub(r"<[^>]+>", " ", dom.stdout)
    for rec in reported["recommend"]["recommendations"]:
        assert f"optimizer {rec['optimizer_label']}: max_norm = {rec['max_norm']:.6g}" in text
        assert f"max_norm={rec['max_norm']:.6g}" in text  # recommend's own line to paste, as on the terminal
    assert 'id="optimizer-0"' in dom.stdout and 'id="optimizer-1"' in dom.stdout
    assert dom.stdout.count('alt="per-layer heat map, optimizer') == 2
    assert 'id="compare-0"' in dom.stdout and "verdict (" in text
    assert 'id="layers-0"' in dom.stdout and 'class="sortable"' in dom.stdout
    shot = tmp / "shot.png"
    proc = _chromium(tmp / "profile-shot", "--window-size=1280,2400", f"--screenshot={shot}", html.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-3000:]
    pixels = imread(shot)[..., :3]
    assert pixels.std() > 0.05 and (pixels < 0.5).mean() > 0.01  # drawn: text and charts, not a blank page


def test_the_page_refers_to_nothing_outside_itself(reported: dict[str, Any]) -> None:
    page = reported["html"].read_text(encoding="utf-8")
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page, flags=re.I)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs)
    assert not re.search(r"<link|@import|url\(|<iframe|<object|<embed", page, flags=re.I)
    assert reported["html"].stat().st_size < 5_000_000


def test_profile_and_compare_name_the_report_command_and_the_report_finds_the_compare(reported: dict[str, Any]) -> None:
    assert "then: gradscope report --runs-dir" in reported["profile"].stderr + reported["profile"].stdout
    compare_out = reported["compare"].stdout + reported["compare"].stderr
    assert f"next: gradscope report {reported['run'].path}" in compare_out
    assert "wrote " in reported["report"].stdout and "report.html" in reported["report"].stdout


def test_python_api_writes_the_report_and_shows_it_in_jupyter(reported: dict[str, Any]) -> None:
    run = gradscope.load_run(runs_dir=reported["runs"])
    written = run.report(reported["tmp"] / "api.html")
    assert written.path.is_file() and written.size == written.path.stat().st_size
    shown = written._repr_html_()
    assert shown.startswith("<iframe srcdoc=") and "gradscope report: " in shown


def test_bad_output_and_missing_run_are_one_line_each(reported: dict[str, Any]) -> None:
    missing_dir = _cli("report", "--runs-dir", str(reported["runs"]), "-o", str(reported["tmp"] / "no" / "r.html"))
    assert missing_dir.returncode == 2 and missing_dir.stderr.count("\n") == 1
    assert missing_dir.stderr.startswith("gradscope: --output")
    no_run = _cli("report", "nosuchrun", "--runs-dir", str(reported["runs"]))
    assert no_run.returncode == 1 and no_run.stderr.startswith("gradscope: ") and no_run.stderr.count("\n") == 1
    neither = _cli("export", "--runs-dir", str(reported["runs"]))
    assert neither.returncode == 2 and "--tensorboard" in neither.stderr


def test_recommend_plot_marks_the_first_steps_and_names_the_percentile_max_norm_is(reported: dict[str, Any]) -> None:
    run = reported["run"]
    recs = recommend.recommend(run)
    fig = plots.plot_recommend(run, recs)
    assert "optimizers 0 (Adam), 1 (Adam)" in fig.get_suptitle()
    series, histogram = fig.axes[0], fig.axes[1]
    labels = series.get_legend_handles_labels()[1]
    assert any(label.startswith(("early steps", "lr warm-up")) for label in labels)
    hist_labels = histogram.get_legend_handles_labels()[1]
    assert f"max_norm = p95 = {recs[0].max_norm:.3g}" in hist_labels
    assert not any(label.startswith("p95 =") for label in hist_labels)  # not drawn hidden under max_norm


def test_tensorboard_export_reads_back_every_series(reported: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, logdir = reported["run"], reported["tmp"] / "tb"
    proc = _cli("export", str(run.path), "--tensorboard", str(logdir), "--csv", str(reported["tmp"] / "csv"))
    assert_exit_ok(proc)
    steps, layers = run.steps, run.layers
    for k in (0, 1):
        folder = logdir / run.id / f"optimizer-{k}-Adam"
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
        mine = steps[steps["optimizer"] == k]
        for tag in ("grad_norm", "applied_norm", "clip_coef", "loss", "lr"):
            got = events.Scalars(f"gradscope/{tag}")
            assert [e.step for e in got] == mine["step"].tolist()
            assert np.array_equal([e.value for e in got], mine[tag].to_numpy(np.float32))
        mine_layers = layers[layers["optimizer"] == k]
        layer_tags = [t for t in events.Tags()["scalars"] if t.startswith("gradscope_layers/")]
        assert sorted(layer_tags) == sorted(f"gradscope_layers/{n}" for n in mine_layers["layer"].unique())
        for name, rows in mine_layers.groupby("layer", observed=True):
            got = events.Scalars(f"gradscope_layers/{name}")
            assert [e.step for e in got] == rows["step"].tolist()
            assert np.array_equal([e.value for e in got], rows["norm"].to_numpy(np.float32))
    import pandas as pd

    csv_steps = pd.read_csv(reported["tmp"] / "csv" / "steps.csv")
    assert len(csv_steps) == len(steps) and math.isclose(csv_steps["grad_norm"].sum(), steps["grad_norm"].sum())
    assert len(pd.read_csv(reported["tmp"] / "csv" / "layers.csv")) == len(layers)


def test_export_without_tensorboard_names_the_extra(reported: dict[str, Any]) -> None:
    code = ("import sys; sys.modules['tensorboard'] = None\n"  # an interpreter where tensorboard cannot import
            "from gradscope.cli import main\n"
            f"sys.exit(main(['export', {str(reported['run'].path)!r}, '--tensorboard', {str(reported['tmp'] / 'x')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "gradscope: --tensorboard needs the tensorboard package: pip install 'gradscope[tensorboard]'\n"


def test_heat_map_bins_hold_each_layers_max_and_median_over_their_steps(tmp_path: Path) -> None:
    """A run written through the store API: 2,500 steps x 3 layers, streamed in batches of 1,000 rows."""
    import pyarrow as pa

    from gradscope import store
    from gradscope.report.data import binned
    from gradscope.report.heatmap import heat_maps

    n, names = 2500, ["a.weight", "b.weight", "c.bias"]
    norms = np.random.default_rng(0).lognormal(0.0, 1.0, (n, 3)).astype(np.float32)
    norms[7, 1] = np.nan  # a layer without a gradient at one step
    run_dir = store.create_run_dir(tmp_path, "heat")
    store.write_meta(run_dir, store.RunMeta(status="complete", optimizers=(store.OptimizerMeta(0, "SGD", tuple(names)),)))
    writer = store.RunWriter(run_dir)
    steps = np.arange(n, dtype=np.int64)
    layer = pa.DictionaryArray.from_arrays(pa.array(np.tile(np.arange(3, dtype=np.int32), n)), pa.array(names))
    writer.write_part("layers", {"step": np.repeat(steps, 3), "optimizer": np.zeros(3 * n, np.int16),
                                 "layer": layer.cast(pa.string()), "norm": norms.reshape(-1)})
    writer.compact()
    heat = heat_maps(store.load_run(run_dir), {0: (0, n - 1)}, max_bins=10, batch_rows=1000)[0]
    assert heat.layers == names and heat.width == 250 and heat.max.shape == (3, 10)
    blocks = norms.T.reshape(3, 10, 250)
    assert np.array_equal(heat.max, np.nanmax(blocks, axis=2))
    expected = np.sort(blocks, axis=2)[:, :, 125]  # 250 steps a bin: the upper of the two middle values
    expected[1, 0] = np.nanmedian(blocks[1, 0])  # the bin where a step of layer 1 has no value: 249 values
    assert np.array_equal(heat.median, expected)
    line = binned(steps, norms[:, 0], max_points=100)
    assert line.width == 25 and np.array_equal(line.max, norms[:, 0].reshape(100, 25).max(axis=1))


def test_a_compare_written_elsewhere_is_reported_with_compare_dir(reported: dict[str, Any]) -> None:
    tmp, run = reported["tmp"], reported["run"]
    found = sorted(reported["runs"].glob("compare-*/compare.json"))
    assert len(found) == 1
    elsewhere = shutil.copytree(found[0].parent, tmp / "elsewhere")  # as `compare --out elsewhere` leaves it
    proc = _cli("report", str(run.path), "-o", str(tmp / "both.html"), "--compare", str(elsewhere))
    assert_exit_ok(proc)
    page = (tmp / "both.html").read_text(encoding="utf-8")
    assert 'id="compare-0"' in page and 'id="compare-1"' in page and "compare elsewhere" in page
    empty = _cli("report", str(run.path), "-o", str(tmp / "none.html"), "--compare", str(tmp))
    assert empty.returncode == 1 and empty.stderr.startswith(f"gradscope: --compare {tmp}: no readable compare.json")
