"""The README and docs/ stay short, linked, current and about the product.

- README.md is at most 350 lines and links every reference page in docs/;
- every relative link (and image) in README.md and docs/*.md resolves to a file of the repository,
  and every ``#anchor`` to a heading of its target, slugged the way GitHub slugs headings;
- every repository file the pages name in inline code (``gradscope/store.py``, ``bench/run.py``)
  exists, and docs/architecture.md names every module of the package;
- no page speaks of the project's history (issue numbers, stops, reviews): that belongs in commits.

The last test feeds the checkers a page with every kind of fault, so a checker that stopped finding
them would fail too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 350
REFERENCE_PAGES = ("recording.md", "recommend.md", "compare.md", "run-format.md", "performance.md",
                   "architecture.md")

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\(\s*<?(?P<target>[^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(?P<target>[^\s>]+)>?", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(?P<title>.+?)\s*#*\s*$", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
REPO_PATH = re.compile(r"^(?:gradscope|bench|tests|sample_runs|docs)/[\w./-]*\w\.\w+$")
HISTORY = [
    re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE),
    re.compile(r"\bstops?\s+\d+\b(?!\s*(?:ms|µs|us|s)\b)", re.IGNORECASE),  # not "stop 18 ms"
    re.compile(r"\b(?:this|last|that|previous|next|each|every) stop\b", re.IGNORECASE),
    re.compile(r"\breview(?:s|ed|er|ers|ing)?\b", re.IGNORECASE),
    re.compile(r"\bthis session\b", re.IGNORECASE),
    re.compile(r"\b(?:PR|pull request)\s*#?\s*\d+", re.IGNORECASE),
]


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _ids(path: Path) -> str:
    return str(path.relative_to(ROOT))


def without_fences(text: str) -> str:
    """The text with fenced code blocks blanked (line count kept, for line numbers)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def prose(text: str) -> str:
    """The text without fenced code and without inline code spans (a link inside code is no link)."""
    return INLINE_CODE.sub("code", without_fences(text))


def slug(title: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation dropped, spaces to '-'."""
    text = LINK.sub(lambda m: m.group("text"), title)
    text = INLINE_CODE.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for match in HEADING.finditer(without_fences(path.read_text(encoding="utf-8"))):
        base = slug(match.group("title"))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path) -> list[str]:
    """The link targets of a markdown file, outside code."""
    text = prose(path.read_text(encoding="utf-8"))
    return [m.group("target") for m in LINK.finditer(text)] + [m.group("target") for m in REFERENCE_LINK.finditer(text)]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of ``path`` that leads nowhere, with the reason."""
    problems = []
    for target in links(path):
        if SCHEME.match(target):
            continue  # https:, mailto: ...: not checked offline
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not target:
            problems.append("empty link target")
        elif not dest.is_relative_to(root.resolve()):
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            problems.append(f"{target}: no heading #{anchor} in {dest.name}")
    return problems


def missing_named_files(path: Path, root: Path = ROOT) -> list[str]:
    """Repository paths the page names in inline code (outside fenced blocks) that do not exist."""
    spans = (m.group(2).strip() for m in INLINE_CODE.finditer(without_fences(path.read_text(encoding="utf-8"))))
    return sorted({span for span in spans if REPO_PATH.match(span) and not (root / span).exists()})


def history(path: Path) -> list[str]:
    """Lines that speak of the project's history rather than the product (code blocks included)."""
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for pattern in HISTORY:
            match = pattern.search(line)
            if match:
                found.append(f"line {number}: {match.group(0)!r}")
    return found


def test_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


def test_readme_links_every_reference_page() -> None:
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in links(README)}
    for page in REFERENCE_PAGES:
        assert (DOCS / page).is_file(), f"docs/{page} is missing"
        assert (DOCS / page).resolve() in linked, f"README.md does not link docs/{page}"


@pytest.mark.parametrize("path", _pages(), ids=_ids)
def test_every_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


@pytest.mark.parametrize("path", _pages(), ids=_ids)
def test_every_named_file_exists(path: Path) -> None:
    assert missing_named_files(path) == []


@pytest.mark.parametrize("path", _pages(), ids=_ids)
def test_pages_speak_of_the_product_not_its_history(path: Path) -> None:
    assert history(path) == []


def _has_own_code(path: Path) -> bool:
    """A module to describe: not ``__main__``, and not an ``__init__`` that only re-exports (its
    functions, if any, are the lazy ``__getattr__``/``__dir__``)."""
    if path.name == "__main__.py":
        return False
    if path.name != "__init__.py":
        return True
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(node, ast.ClassDef) or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                                                   and node.name not in ("__getattr__", "__dir__"))
               for node in tree.body)


def test_architecture_lists_every_module() -> None:
    text = without_fences((DOCS / "architecture.md").read_text(encoding="utf-8"))
    named = {m.group(2).strip() for m in INLINE_CODE.finditer(text)}
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "gradscope").rglob("*.py") if _has_own_code(p))
    assert [m for m in modules if m not in named] == [], "docs/architecture.md does not describe these modules"


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## `gradscope profile`: options\n\n## Notes\n## Notes\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine anchor](other.md#gradscope-profile-options) [second notes](other.md#notes-1)\n"
        "[own heading](#page) [web](https://example.com/x.md) ![image](other.md)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [out](../../outside.md) [top](#)\n"
        "`[in code](missing-in-code.md)` and `gradscope/nowhere.py`\n\n"
        "```\n[in a fence](missing-in-fence.md)\n```\n\n"
        "As found in issue 5 at this stop, after review; stop 7. Compaction: stop 18 ms.\n"
    )
    assert broken_links(page, tmp_path) == [
        "missing.md: no such file",
        "other.md#nope: no heading #nope in other.md",
        "../../outside.md: outside the repository",
    ]
    assert missing_named_files(page, tmp_path) == ["gradscope/nowhere.py"]
    assert len(history(page)) == 4
    assert slug("`steps.parquet`") == "stepsparquet"
    assert slug("How clipping is injected (and why it is exact)") == "how-clipping-is-injected-and-why-it-is-exact"
    assert slug("`gradscope compare`: does clipping actually help *your* run?") == \
        "gradscope-compare-does-clipping-actually-help-your-run"
