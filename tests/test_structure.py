"""The shape of the package: sizes a reader can hold, imports that flow one way, no torch where none is needed.

Read from the source with ``ast`` (nothing imported), except the torch checks, which import the
reporting modules in a fresh interpreter and look at ``sys.modules``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradscope"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _span(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1  # type: ignore[attr-defined,operator]


def _body_span(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement of the body to the end: a CLI command's option declarations
    live in its signature and do not count."""
    first = node.body[0]
    return node.end_lineno - first.lineno + 1  # type: ignore[operator]


def _defs(tree: ast.Module) -> Iterator[ast.AST]:
    yield from (node for node in ast.walk(tree) if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))


def test_the_package_has_the_layout_of_its_verbs() -> None:
    for sub in ("record", "store", "recommend", "compare"):
        assert (PACKAGE / sub / "__init__.py").is_file(), sub
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert {"cli.py", "errors.py", "plots.py", "stats.py"} <= top


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_sizes_stay_readable(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines"
    for node in _defs(_tree(path)):
        if isinstance(node, ast.ClassDef):
            assert _span(node) <= MAX_CLASS_LINES, f"class {node.name}: {_span(node)} lines"
        else:
            assert _body_span(node) <= MAX_FUNCTION_LINES, f"{node.name}(): {_body_span(node)} lines"  # type: ignore[union-attr]


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradscope"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in _MODULE_ALIASES:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{node.value.id}.{node.attr}")
    return found


# Names our modules are imported under (import gradscope.store as store, ...), and the names a Recorder
# goes by in hooks and tests: its private members belong to it alone.
_MODULE_ALIASES = {"gradscope", "store", "recommend", "compare", "plots", "stats", "cli", "view", "recorder", "rec"}


@pytest.mark.parametrize("path", [*_modules(), *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "bench").glob("*.py"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_is_imported_across_modules(path: Path) -> None:
    assert _private_imports(path) == []


def test_the_private_import_check_catches_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from gradscope.record.recorder import _x\nimport gradscope.store as store\nstore._RUNS\n")
    assert _private_imports(bad) == ["gradscope.record.recorder._x", "store._RUNS"]


def test_reporting_modules_import_no_torch() -> None:
    code = ("import sys\n"
            "import gradscope.cli, gradscope.cli_runs, gradscope.store, gradscope.recommend, gradscope.compare, gradscope.stats\n"
            "import gradscope.compare.view, gradscope.recommend.view, gradscope.record.config\n"
            "import gradscope.report, gradscope.report.charts, gradscope.report.compares, gradscope.export\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_only_record_imports_torch_at_module_level() -> None:
    importers = []
    for path in _modules():
        for node in _tree(path).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "torch" or n.startswith("torch.") for n in names):
                importers.append(path.relative_to(PACKAGE).parts[0])
    assert importers and set(importers) == {"record"}
