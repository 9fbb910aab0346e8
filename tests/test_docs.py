"""Every ```python block of the documentation runs: the README's and those of docs/**/*.md.

One page's blocks run in order in one namespace (a later block may use what an earlier one
built), inside a fresh temporary folder, as a reader pasting them one after the other would.
A block that cannot run here (your own files, a GPU, several machines) is marked by an HTML
comment right before it that says why::

    <!-- not-run: needs a GPU -->

A marker without a reason, or one before something that is not a python block, fails.
docs/notes/ holds helpers' drafts outside the site and is not read.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OLD_README = ROOT / "tests" / "data" / "readme_before_21.md"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run\b:?(?P<reason>.*?)-->\s*$")


@dataclass
class Block:
    """One fenced code block: its language, its code, where it starts, and why it does not
    run (``None`` when it runs)."""

    lang: str
    code: str
    line: int
    not_run: str | None


def pages() -> list[Path]:
    """The README and every page under docs/, drafts in docs/notes/ left out."""
    found = [ROOT / "README.md"]
    found += sorted(p for p in DOCS.rglob("*.md") if "notes" not in p.relative_to(DOCS).parts)
    return found


def blocks(text: str) -> list[Block]:
    """The fenced blocks of a markdown text, with the not-run marker that precedes each
    (only blank lines may stand between the marker and the fence)."""
    found: list[Block] = []
    lines = text.splitlines()
    i, marker = 0, None
    while i < len(lines):
        not_run = NOT_RUN.match(lines[i])
        fence = FENCE.match(lines[i])
        if not_run:
            marker = (not_run.group("reason").strip(), i + 1)
        elif fence:
            start, indent = i, fence.group("indent")
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][len(indent) :])
                i += 1
            reason = marker[0] if marker else None
            found.append(Block(fence.group("lang"), "\n".join(body) + "\n", start + 1, reason))
            marker = None
        elif lines[i].strip() and marker:
            raise AssertionError(
                f"line {marker[1]}: a not-run marker must sit right before a block"
            )
        i += 1
    return found


def page_id(path: Path) -> str:
    """The path of a page relative to the repository, as test ids and tracebacks show it."""
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", [*pages(), OLD_README], ids=page_id)
def test_every_not_run_marker_gives_a_reason_and_precedes_a_python_block(path):
    for block in blocks(path.read_text()):
        if block.not_run is None:
            continue
        assert block.not_run, f"{page_id(path)}:{block.line}: not-run without a reason"
        assert block.lang == "python", f"{page_id(path)}:{block.line}: only python blocks run"


def test_the_marker_grammar_is_what_the_docs_use():
    text = "<!-- not-run: needs a GPU -->\n```python\nx = 1\n```\n\n```bash\nls\n```\n"
    first, second = blocks(text)
    assert (first.lang, first.not_run, first.code) == ("python", "needs a GPU", "x = 1\n")
    assert (second.lang, second.not_run) == ("bash", None)
    assert blocks("<!-- not-run -->\n```python\npass\n```\n")[0].not_run == ""


def test_readme_quickstart_is_the_getting_started_quickstart_that_runs():
    """The README's quickstart is marked not-run because the same code runs on the getting
    started page; this keeps the two from drifting apart."""

    def quickstart(path: Path) -> str:
        return next(b.code for b in blocks(path.read_text()) if "netgraft.save" in b.code)

    assert quickstart(ROOT / "README.md") == quickstart(DOCS / "getting-started.md")


def test_readme_is_short_and_links_pages_that_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link


def run_blocks(path: Path, *, allow_old_names: bool) -> None:
    """Run the page's python blocks in order in one namespace, in the current folder; unless
    ``allow_old_names``, fail when a block uses a deprecated netgraft name."""
    runnable = [b for b in blocks(path.read_text()) if b.lang == "python" and b.not_run is None]
    if not runnable:
        pytest.skip("no runnable python block")
    namespace = {"__name__": "__main__"}
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for block in runnable:
            code = compile(block.code, f"{page_id(path)}:{block.line}", "exec")
            exec(code, namespace)  # the documentation's own examples
    old_spellings = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) and ".md:" in w.filename
    ]
    assert allow_old_names or not old_spellings, "the docs use deprecated names:\n" + "\n".join(
        old_spellings
    )


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A fresh working folder, also standing in for the home folder (a page writing under
    ``~`` writes here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "in_tmp")
@pytest.mark.parametrize("path", pages(), ids=page_id)
def test_python_blocks_run(path):
    run_blocks(path, allow_old_names=False)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "in_tmp")
def test_every_example_of_the_readme_before_issue_21_still_runs():
    """The README's examples from before the API was made consistent (issue 21) run as they
    were written: old names warn, nothing breaks."""
    run_blocks(OLD_README, allow_old_names=True)


def _architecture_rows() -> list[list[str]]:
    """The layering table of docs/architecture.md: per row, lowest first, the module names
    (``grow/`` as ``grow``; ``grow/during`` as ``grow.during``)."""
    rows = []
    for line in (DOCS / "architecture.md").read_text().splitlines():
        cells = line.split("|")
        if len(cells) == 4 and "`" in cells[2] and not cells[1].strip().startswith("-"):
            names = re.findall(r"`([\w/]+?)/?`", cells[2])
            rows.append([n.replace("/", ".") for n in names])
    return rows


def _row_of(module: str, rows: list[list[str]]) -> int | None:
    """The row of ``module`` (dotted, without ``netgraft.``): its longest listed prefix."""
    found = [
        (len(name), i)
        for i, row in enumerate(rows)
        for name in row
        if module == name or module.startswith(name + ".")
    ]
    return max(found)[1] if found else None


def _relative_imports(path: Path, module: str) -> set[str]:
    """The netgraft modules ``path`` (module ``module``) imports with relative imports."""
    import ast

    is_package = path.name == "__init__.py"
    base = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = base.split(".") if base else []
            parent = ".".join(parts[: len(parts) - node.level + 1])
            target = ".".join(p for p in (parent, node.module) if p)
            found |= {target, *(f"{target}.{a.name}" for a in node.names)}
    return found


def test_the_architecture_page_layout_exists_and_its_layers_point_down():
    """Every path the layout names exists, and no module imports from a layer above its own
    (a package's ``__init__`` re-exporting a submodule's names is how it is reached, not a
    dependency, so it is left out)."""
    page = (DOCS / "architecture.md").read_text()
    layout = page.split("```", 2)[1]
    src = ROOT / "src" / "netgraft"
    for name in re.findall(r"^  (\w+(?:\.py|/))", layout, re.M):
        assert (src / name).exists(), f"docs/architecture.md names {name}, which is gone"
    rows = _architecture_rows()
    assert len(rows) >= 5, rows
    modules = {}
    for path in src.rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    upward = []
    for module, path in modules.items():
        mine = _row_of(module, rows)
        if not module or mine is None or path.name == "__init__.py":
            continue
        for target in _relative_imports(path, module) & modules.keys():
            theirs = _row_of(target, rows)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} (row {mine}) imports {target} (row {theirs})")
    assert not upward, "\n".join(upward)
