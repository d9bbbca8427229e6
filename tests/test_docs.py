"""The documentation's sources, and the checks its build runs on every page.

The reST sources are checked here: development leftovers, examples that
only run inside the test suite, tables wider than the text column. The
built HTML is checked by ``docs/_ext/site_checks.py`` during every docs
build (``make test`` builds with warnings as errors), and laid out in
headless Chromium by ``docs/_ext/render_check.py`` after it (``make docs``);
the tests below prove that each of their checks catches what it is meant to
catch.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest

import tuckerlib

pytest.importorskip("bs4", reason="the site checks parse HTML with BeautifulSoup")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SOURCES = sorted(
    p
    for p in DOCS.rglob("*.rst")
    if not p.relative_to(DOCS).as_posix().startswith(("_build/", "api/generated/", "gallery/"))
)
# Longest line of a simple or grid table, without its indentation: about what
# the text column shows at a laptop's window width before it scrolls.
TABLE_WIDTH = 120
SOURCE_LEFTOVERS = {
    "mentions DESIGN": re.compile(r"\bDESIGN\b"),
    "mentions an issue": re.compile(r"\bissues?\s*#?\d|\bthe issue\b", re.IGNORECASE),
    "describes an earlier version": re.compile(r"\ban earlier version\b", re.IGNORECASE),
    "uses an internal label": re.compile(
        r"\bT[1-9]\b|\bT[1-9]\s*[-–]\s*T[1-9]\b|\bTable \d+[a-z]\b"
    ),
    "has an example that only runs in the test suite": re.compile(
        r"getfixture\(|sys\.path\.insert\("
    ),
    "names a private module": re.compile(
        r"(?<![\w.])_[a-z]\w*\.py\b|\b(?:tuckerlib|flora)(?:\.[a-z]\w*)*\._[a-z]\w*"
    ),
}


def _load_extension(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / "_ext" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


site_checks = _load_extension("site_checks")
autolinks = _load_extension("autolinks")
details = _load_extension("details")


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", [*SOURCES, ROOT / "README.md", ROOT / "CHANGELOG.md"], ids=_name)
def test_sources_have_no_development_leftovers(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    found = [
        f"line {text.count(chr(10), 0, m.start()) + 1}: {message}: {m.group(0)!r}"
        for message, pattern in SOURCE_LEFTOVERS.items()
        for m in pattern.finditer(text)
    ]
    assert not found, "\n".join(found)


def _table_blocks(lines: list[str]) -> list[tuple[int, list[str]]]:
    """The simple (``=== ===``) and grid (``+---+``) tables of a reST file, with their lines."""
    border = re.compile(r"^\s*(?:=+(?: +=+)+|\+(?:[-=]+\+)+)\s*$")
    blocks, i = [], 0
    while i < len(lines):
        if not border.match(lines[i]):
            i += 1
            continue
        indent = len(lines[i]) - len(lines[i].lstrip())
        start = i
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) >= indent
        ):
            # A simple table ends at its third border line, a grid table at its last one.
            if border.match(lines[i]) and (i + 1 == len(lines) or not lines[i + 1].strip()):
                i += 1
                break
            i += 1
        blocks.append((start + 1, [line[indent:] for line in lines[start:i]]))
    return blocks


@pytest.mark.parametrize("path", SOURCES, ids=_name)
def test_tables_fit_the_text_column(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    too_wide = [
        f"table at line {start}: a line of {len(line)} characters"
        for start, block in _table_blocks(lines)
        for line in block
        if len(line.rstrip()) > TABLE_WIDTH
    ]
    assert not too_wide, "\n".join(too_wide)


@pytest.mark.parametrize("path", SOURCES, ids=_name)
def test_list_tables_give_their_column_widths(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    missing = []
    for number, line in enumerate(lines, 1):
        if not re.match(r"\s*\.\. list-table::", line):
            continue
        options = []
        for option in lines[number:]:
            if not re.match(r"\s+:[\w-]+:", option):
                break
            options.append(option.strip())
        if not any(option.startswith(":widths:") for option in options):
            missing.append(f"list-table at line {number} has no :widths:")
    assert not missing, "\n".join(missing)


def test_table_checker_finds_wide_simple_and_grid_tables() -> None:
    wide = "x" * (TABLE_WIDTH + 1)
    rst = ["Text", "", "=== ===", "a   b", "=== ===", f"1   {wide}", "=== ===", "", "after " + wide]
    blocks = _table_blocks(rst)
    assert [start for start, _ in blocks] == [3]
    assert any(len(line) > TABLE_WIDTH for line in blocks[0][1])
    grid = ["+---+---+", "| a | b |", "+===+===+", f"| 1 | {wide} |", "+---+---+", "", wide]
    ((start, block),) = _table_blocks(grid)
    assert start == 1
    assert len(block) == 5


BENCHMARK_TABLES = sorted((DOCS / "_static" / "benchmarks").glob("*.csv"))


@pytest.mark.parametrize("path", BENCHMARK_TABLES, ids=_name)
def test_benchmark_tables_are_complete(path: Path) -> None:
    with open(path, newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    assert rows, "no rows"
    for number, row in enumerate(rows, 2):
        assert len(row) == len(header), f"row {number} has {len(row)} cells for {len(header)}"
        for cell in row:
            # A lone "-" renders as a bullet, an empty first cell merges rows.
            assert cell.strip() not in {"", "-"}, f"row {number}: write n/a, not {cell!r}"
            assert not site_checks.ZERO_SPREAD.search(cell), f"row {number}: {cell!r}"


def test_benchmark_tables_are_all_shown() -> None:
    shown = set()
    for source in SOURCES:
        shown |= set(re.findall(r":file: _static/benchmarks/(\S+\.csv)", source.read_text()))
    assert shown == {p.name for p in BENCHMARK_TABLES}


def test_citation_names_the_current_version() -> None:
    citing = (DOCS / "citing.rst").read_text(encoding="utf-8")
    assert f"version = {{{tuckerlib.__version__}}}" in citing


def test_changelog_follows_keep_a_changelog() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## (.+)$", changelog, re.MULTILINE)
    assert releases[0] == "Unreleased"
    assert re.fullmatch(r"\d+\.\d+\.\d+ - \d{4}-\d{2}-\d{2}", releases[1])
    versions = [r.split(" - ")[0] for r in releases[1:]]
    assert tuckerlib.__version__ in versions
    sections = set(re.findall(r"^### (.+)$", changelog, re.MULTILINE))
    assert sections <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


# The build-time checks of the HTML site, on small pages made to fail them.


def _page(body: str, *, head: str = "", primary: str | None = None) -> str:
    sidebar = (
        ""
        if primary is None
        else f'<div id="pst-primary-sidebar" class="bd-sidebar-primary">{primary}</div>'
    )
    return f"<html><head>{head}</head><body>{sidebar}<article>{body}</article></body></html>"


def _nav(links: str) -> str:
    return (
        f'<nav class="bd-docs-nav"><p class="bd-links__title">Section Navigation</p>{links}</nav>'
    )


def _boxed(rows: str, colgroup: str = "") -> str:
    """A table in the theme's sideways-scrolling box."""
    return (
        '<div class="pst-scrollable-table-container">'
        f'<table class="table">{colgroup}{rows}</table></div>'
    )


def test_site_check_accepts_a_clean_page() -> None:
    html = _page(
        "<p>See <a href='https://arxiv.org/abs/2405.14739'>the paper</a>; "
        "<code class='docutils literal'>__init__</code>, "
        "<code class='docutils literal'>flora.merge</code>.</p>",
        head="<script src='_static/mathjax/tex-chtml.js'></script>"
        "<link rel='stylesheet' href='_static/custom.css'>",
        primary=_nav("<ul><li><a href='theory.html'>Theory</a></li></ul>"),
    )
    assert site_checks.check_page("guide.html", html) == []


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ("<script src='https://cdn.jsdelivr.net/npm/mathjax@4/tex-mml-chtml.js'></script>", "cdn"),
        ("<link rel='stylesheet' href='//fonts.example.com/a.css'>", "fonts.example.com"),
        ("<script src='http://example.com/x.js'></script>", "example.com"),
    ],
)
def test_site_check_finds_external_assets(head: str, expected: str) -> None:
    (problem,) = site_checks.check_page("page.html", _page("<p>text</p>", head=head))
    assert expected in problem
    # Source listings are exempt from the text checks, not from this one.
    assert site_checks.check_page("_modules/flora/_cost.html", _page("", head=head))


def test_site_check_finds_empty_sidebars() -> None:
    empty = _page("<p>text</p>", primary=_nav("<div class='bd-toc-item'></div>"))
    assert "empty primary sidebar" in site_checks.check_page("page.html", empty)[0]
    hidden = _page("<p>text</p>", primary=None)
    assert site_checks.check_page("page.html", hidden) == []
    toc = _page("<p>text</p>") + '<nav class="page-toc"><ul></ul></nav>'
    assert "empty secondary sidebar" in site_checks.check_page("page.html", toc)[0]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("<p>the rules of DESIGN.md</p>", "mentions DESIGN"),
        ("<p>Targets (issue 4): faster</p>", "issue number"),
        ("<p>auto met T1 in both runs</p>", "internal label"),
        ("<p>Table 1c of the same run</p>", "internal label"),
        ("<p>a cost model (flora/_cost.py)</p>", "private module file"),
        ("<p>the cost model of flora._cost</p>", "private module or attribute"),
        ("<p>runs <code class='docutils literal'>_ops</code></p>", "private name"),
        (
            "<pre><span>tmp</span> = <span>getfixture</span>(<span>'tmp_path'</span>)</pre>",
            "only runs in the test suite",
        ),
        (_boxed("<tr><td><ul><li></li></ul></td></tr>"), "empty bullet"),
        (_boxed("<tr><td>0.745 ± 0.000</td></tr>"), "zero spread"),
    ],
)
def test_site_check_finds_leftovers_and_broken_cells(body: str, expected: str) -> None:
    problems = site_checks.check_page("page.html", _page(body))
    assert len(problems) == 1, problems
    assert expected in problems[0]
    # viewcode's source listings show private modules by design.
    if "private" in expected:
        assert site_checks.check_page("_modules/flora/layers/base.html", _page(body)) == []


def test_site_check_allowances_end_when_the_page_is_fixed(tmp_path: Path) -> None:
    (tmp_path / "a.html").write_text(_page("<p>see flora._cost</p>"))
    (tmp_path / "b.html").write_text(_page("<p>clean</p>"))
    allow = {"a": ["flora._cost"], "b": ["flora._cost"], "gone": ["x"]}
    problems = site_checks.check_site(tmp_path, allow)
    assert [(p.page, "no longer appears" in p.message) for p in problems] == [
        ("b.html", True),
        ("gone.html", False),
    ]
    assert "no such page" in problems[1].message
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "x.css").write_text("@import url(https://fonts.example.com/f.css);")
    assert any(p.page == "_static/x.css" for p in site_checks.check_site(tmp_path, {}))


def _index(objects: dict[str, list[tuple[str, str]]], titles: list[str] | None = None) -> dict:
    """A search index holding ``objects`` (prefix to (name, type)) on one page each."""
    types = ["py:module", "py:function", "py:class", "py:method"]
    docs, entries = [], {}
    for prefix, names in objects.items():
        for name, kind in names:
            docs.append(f"{prefix}.{name}" if prefix else name)
            entries.setdefault(prefix, []).append([len(docs) - 1, types.index(kind), 1, "", name])
    names = {str(i): ["py", kind.split(":")[1], f"Python {kind}"] for i, kind in enumerate(types)}
    alltitles = {title: [[0, None]] for title in titles or []}
    return {
        "objects": entries,
        "objnames": names,
        "objtypes": {str(i): kind for i, kind in enumerate(types)},
        "titles": docs,
        "alltitles": alltitles,
    }


FLORA_INDEX = {
    "": [("flora", "py:module"), ("flora.io", "py:module")],
    "flora": [
        ("merge", "py:function"),
        ("save_adapter", "py:function"),
        ("SavedAdapter", "py:class"),
        ("Linear", "py:class"),
        ("AdaptedWeight", "py:class"),
    ],
    "flora.Linear": [("merge", "py:method")],
    "flora.AdaptedWeight": [("merge", "py:method")],
}


def test_search_ranks_the_public_name_above_methods_and_partial_matches() -> None:
    index = _index(FLORA_INDEX, titles=["Merge"])
    ranking = site_checks.search_ranking(index, "merge")
    # Without the public-name rule the methods tie with flora.merge and win alphabetically.
    assert ranking[:3] == ["flora.merge", "flora.AdaptedWeight.merge", "flora.Linear.merge"]
    assert ranking[-1] == "Merge"
    assert site_checks.search_ranking(index, "save adapter")[:2] == [
        "flora.save_adapter",
        "flora.SavedAdapter",
    ]
    assert site_checks.search_ranking(index, "sthosvd") == []


def test_search_check_finds_objects_documented_twice_and_misranked_queries() -> None:
    twice = {**FLORA_INDEX, "flora.io": [("save_adapter", "py:function")]}
    index = _index(twice)
    expected = {"merge": "flora.merge", "inject": "flora.inject"}
    problems = site_checks.search_problems(index, expected)
    assert problems == [
        "flora.io.save_adapter is documented twice: also as flora.save_adapter",
        "a search for 'inject' ranks nothing before flora.inject",
    ]
    expected = {"merge": "flora.merge", "save adapter": "flora.save_adapter"}
    assert site_checks.search_problems(_index(FLORA_INDEX), expected) == []
    # A method of the same name as a public function is not a second copy of it.
    methods_only = {**FLORA_INDEX, "flora": [("Linear", "py:class")]}
    (problem,) = site_checks.search_problems(_index(methods_only), {"merge": "flora.merge"})
    assert problem.startswith("a search for 'merge' ranks flora.AdaptedWeight.merge")


def test_search_index_is_read_from_the_built_script(tmp_path: Path) -> None:
    data = _index(FLORA_INDEX)
    (tmp_path / "searchindex.js").write_text(f"Search.setIndex({json.dumps(data)})")
    assert site_checks.read_search_index(tmp_path / "searchindex.js") == data


def _prose_page(paragraphs: list[str], extra: str = "") -> str:
    return _page("".join(f"<p>{text}</p>" for text in paragraphs) + extra)


QUICKTOUR = [
    f"Step {i}: a paragraph long enough to count as prose on the page, {i}." for i in range(6)
]


def test_site_check_finds_a_page_found_twice_in_search() -> None:
    own = ["A paragraph of its own that no other page has, long enough to count here."]
    prose = {
        "gallery/quicktour": site_checks.page_prose(_prose_page(QUICKTOUR)),
        "getting_started": site_checks.page_prose(_prose_page(own + QUICKTOUR)),
        "installation": site_checks.page_prose(_prose_page(own + QUICKTOUR[:2])),
    }
    (problem,) = site_checks.duplicated_pages(prose)
    assert problem.startswith("gallery/quicktour and getting_started are both searched")
    assert "share 6 paragraphs" in problem
    del prose["gallery/quicktour"]
    assert site_checks.duplicated_pages(prose) == []


def test_page_prose_leaves_out_tables_object_descriptions_and_short_lines() -> None:
    table = f"<table><tr><td><p>{QUICKTOUR[0]}</p></td></tr></table>"
    described = f"<dl class='py method'><dd><p>{QUICKTOUR[1]}</p></dd></dl>"
    html = _prose_page([QUICKTOUR[2], "Short."], table + described + f"<pre>{QUICKTOUR[3]}</pre>")
    assert site_checks.page_prose(html) == {QUICKTOUR[2], QUICKTOUR[3]}


def test_searched_pages_are_those_indexed_with_a_title() -> None:
    index = {"docnames": ["a", "gallery/quicktour", "b"], "titles": ["A", "", "B"]}
    assert site_checks.searched_pages(index) == ["a", "b"]


def _row(cells: int) -> str:
    return "<tr>" + "<td>1</td>" * cells + "</tr>"


def test_site_check_finds_tables_that_can_run_wider_than_the_column() -> None:
    widths = "<colgroup>" + '<col style="width: 20%" />' * 5 + "</colgroup>"
    fine = [_boxed(_row(4)), _boxed(_row(5), widths), _boxed('<tr><td colspan="4">a</td></tr>')]
    assert site_checks.check_page("page.html", _page("".join(fine))) == []
    loose = "<table><caption>Runs</caption>" + _row(2) + "</table>"
    (problem,) = site_checks.check_page("page.html", _page(loose))
    assert "'Runs' is not in a box that scrolls sideways" in problem
    # Five columns sized by their content: the proxy for wider than the column.
    wide = _boxed('<tr><td colspan="2">a</td>' + "<td>1</td>" * 3 + "</tr>")
    (problem,) = site_checks.check_page("page.html", _page(wide))
    assert "has 5 columns and no widths" in problem


@pytest.mark.parametrize(
    "literal",
    [
        "σ^{(n)}_i",
        "(I_n, prod_{k != n} I_k)",
        "ΔW = s · G ×_0 U_0",
        "U_1ᵀ",
        "‖x‖²",
        "\\sum_i",
        "A^T",
        "ΔW",
        "Δb = scaling · lora_B.bias",
        "W ← W + ΔW",
        "−η·sign(g)",
        "q ≥ 1",
        "I_n² b",
        "a Z = Q₁ R₁",
        "x̂",
        "r · out",
        "U_n = Q_n R_n",
        "R_n <= I_n",
        "prod(R) + sum(I_n R_n)",
        "C / c_n",
        "R_0 R_1",
        "2 I_n",
        "U_n G_(n) = Q R",
    ],
)
def test_site_check_finds_math_set_as_code(literal: str) -> None:
    body = f"<p>with <code class='docutils literal'><span class='pre'>{literal}</span></code></p>"
    (problem,) = site_checks.check_page("page.html", _page(body))
    assert problem.startswith("math set as code")
    assert repr(literal) in problem


@pytest.mark.parametrize(
    "literal",
    [
        "x[i]",
        "math.prod(shape)",
        "--energy E[,E…]",
        "python -m flora …",
        "{'a': 1}",
        "f'{name}_{i}'",
        "-initial_core",
        "lora_B.bias",
        "W0 - delta",
        "µs",
        "R_n",
        "(I_n, R_n)",
        "kaiming_normal_(U_n, a=sqrt(3))",
        "lora_B",
        "n_iter_max=0",
        "x_train + 1",
    ],
)
def test_site_check_leaves_real_code_alone(literal: str) -> None:
    body = f"<p><code class='docutils literal'>{literal}</code></p>"
    body += "<pre>ΔW = s · G ×_0 U_0  # a comment in a code block</pre>"
    assert site_checks.check_page("page.html", _page(body)) == []


def test_arxiv_ids_in_text_become_links() -> None:
    from docutils.core import publish_doctree

    doctree = publish_doctree(
        "FLoRA (arXiv:2405.14739, ICLR 2025); ``arXiv:2405.14739`` stays code."
    )
    autolinks._arxiv_links(doctree)
    (link,) = doctree.findall(autolinks.nodes.reference)
    assert link["refuri"] == "https://arxiv.org/abs/2405.14739"
    assert link.astext() == "arXiv:2405.14739"
    assert doctree.astext().startswith(
        "FLoRA (arXiv:2405.14739, ICLR 2025); arXiv:2405.14739 stays"
    )


def test_changelog_literals_name_one_documented_object() -> None:
    objects = dict.fromkeys(["flora.merge", "flora.compress", "tuckerlib.compress", "flora.io"])
    assert autolinks._object(objects, "merge") == ("flora.merge", None)
    assert autolinks._object(objects, "merge()") == ("flora.merge", None)
    assert autolinks._object(objects, "flora.io") == ("flora.io", None)
    # Two packages document a compress: the literal stays code, as do non-names.
    for literal in ("compress", "tol", "x = merge(m)", "‖x‖²"):
        assert autolinks._object(objects, literal) is None


def test_details_folds_its_content_under_a_summary() -> None:
    from docutils.core import publish_doctree
    from docutils.parsers.rst import directives

    directives.register_directive("details", details.Details)
    doctree = publish_doctree(".. details:: Every run <all>\n\n   A table.\n")
    (node,) = doctree.findall(details.details)
    assert node["summary"] == "Every run <all>"
    assert node.astext() == "A table."
    translator = types.SimpleNamespace(body=[])
    details._visit_html(translator, node)
    details._depart_html(translator, node)
    assert translator.body == [
        '<details class="folded"><summary>Every run &lt;all&gt;</summary>\n',
        "</details>\n",
    ]


render_check = _load_extension("render_check")
WIDE_CELL = "<td style='white-space: nowrap'>" + "a cell far wider than the column " * 12 + "</td>"


def _article(body: str) -> str:
    return f"<!DOCTYPE html><html><body><article class='bd-article'>{body}</article></body></html>"


def test_render_check_lists_the_site_pages(tmp_path: Path) -> None:
    for page in ["index.html", "api/x.html", "_static/x.html", "_modules/x.html", "search.html"]:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_text("<html></html>")
    assert render_check.site_pages(tmp_path) == ["api/x.html", "index.html"]


def test_render_check_without_a_browser_says_which_binary_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "index.html").write_text(_article("<p>text</p>"))
    monkeypatch.setattr(render_check.shutil, "which", lambda name: None)
    assert render_check.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "render check SKIPPED: no Chromium binary on PATH (looked for chromium" in out
    assert render_check.main([str(tmp_path / "missing")]) == 2
    assert "has no index.html: build the docs first" in capsys.readouterr().out


@pytest.mark.skipif(
    render_check.find_browser() is None,
    reason=f"no Chromium binary on PATH (looked for {', '.join(render_check.BROWSERS)})",
)
def test_render_check_finds_what_does_not_fit_in_a_browser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fits = "<table><tr><td>1</td><td>2</td></tr></table>"
    boxed = f"<table><caption>boxed</caption><tr>{WIDE_CELL}</tr></table>"
    wide = f"<table><caption>Too wide</caption><tr>{WIDE_CELL}</tr></table>"
    folded = f"<details><summary>more</summary><table><tr>{WIDE_CELL}</tr></table></details>"
    pages = {
        "index.html": _article(f"{fits}<div style='overflow-x: auto'>{boxed}</div>"),
        "wide.html": _article(wide + folded),
        "math.html": _article("<p><span class='math'>\\(x\\)</span></p>"),
    }
    for page, html in pages.items():
        (tmp_path / page).write_text(html)
    problems, stats = render_check.render_site(tmp_path, render_check.find_browser())
    # Every page at both widths; the folded table opened and measured.
    assert stats == {"pages": 6, "tables": 8, "formulas": 0}
    assert "index.html" not in problems
    for width in (1280, 390):
        found = [p for p in problems["wide.html"] if p.startswith(f"{width} px: ")]
        assert len(found) == 3
        assert found[0].startswith(f'{width} px: table "Too wide" is 2')
        assert found[1].startswith(f'{width} px: table 2 (first cell "a cell far wider')
        assert all(p.endswith("px column and does not scroll in its box") for p in found[:2])
        assert found[2].startswith(f"{width} px: the page scrolls sideways")
    assert problems["math.html"] == [
        f'{width} px: a formula is not typeset: "\\\\(x\\\\)"' for width in (1280, 390)
    ]
    assert render_check.main([str(tmp_path)]) == 1
    assert "render check: 3 pages at 1280 px and 390 px" in capsys.readouterr().out
