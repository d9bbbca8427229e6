"""Check every page of the built HTML site; each problem is a Sphinx warning.

``make test`` builds the docs with warnings as errors, so a page fails the
build when it

* loads a script, stylesheet, font or image from another site (the docs
  must work offline, math included);
* shows an empty sidebar (a "Section Navigation" title with no links, or an
  "On this page" title with no entries);
* has a table cell that renders as an empty bullet (a lone ``-``; write
  ``n/a``) or a spread of ``± 0.000`` (a single run has no spread);
* has a table that can run wider than the text column: one outside a box
  that scrolls sideways, or one of more than ``WIDE_TABLE_COLUMNS`` columns
  that declares no column widths (see ``wide_tables``);
* shows math as code: an inline code literal that holds LaTeX or math
  notation (``σ^{(n)}_i``, ``prod_{k != n} I_k``, ``ΔW = s · G ×_0 U_0``,
  a Greek letter such as ``ΔW`` or ``η``, ``R_n²``, a formula in index
  notation such as ``U_n = Q_n R_n``; write ``:math:`...```).
  Code blocks and signatures are real code and are not read;
* mentions development leftovers, text that only makes sense to the people
  who wrote it: a reference to a planning document that does not ship with
  these docs (the word ``DESIGN``; a page states its rule itself instead),
  an issue number (``issue 12``), internal labels (``T1``, ``Table 1c``), a
  private module path or name (``_cost.py``, ``flora._cost``, ``_ops``), or
  an example that cannot be copied out of the page (``getfixture(...)``,
  ``sys.path.insert(...)``).

The search index is checked too: every object is documented once (a module
page does not document ``flora.io.save_adapter`` beside ``flora.save_adapter``),
no page is found twice (an indexed page whose prose another indexed page
repeats, such as a page that includes another: leave one out of the search,
``not_searched`` in ``conf.py``), and each query of ``site_checks_search`` in
``conf.py`` ranks its public name first, ranked as the site's search ranks it
(``search_ranking``).

The source listings of ``sphinx.ext.viewcode`` (``_modules/``) show the code
itself, private modules included, and are only checked for external assets.

``site_checks_allow`` in ``conf.py`` maps a page to text that may stay on it
for now; an entry whose text is no longer on its page is itself reported, so
an allowance ends as soon as the page is fixed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from bs4 import BeautifulSoup
from sphinx.util import logging

logger = logging.getLogger(__name__)

LEFTOVERS: dict[str, re.Pattern[str]] = {
    "mentions DESIGN": re.compile(r"\bDESIGN\b"),
    "mentions an issue number": re.compile(r"\bissues?\s*#?\d", re.IGNORECASE),
    "uses an internal label": re.compile(r"\bT[1-9]\b|\bTable \d+[a-z]\b"),
    "names a private module file": re.compile(r"(?<![\w.])_[a-z]\w*\.py\b"),
    "names a private module or attribute": re.compile(r"\b[a-z]\w*(?:\.[a-z]\w*)*\._[a-z]\w*\b"),
    "has an example that only runs in the test suite": re.compile(
        r"getfixture\(|sys\.path\.insert\("
    ),
}
# A table of more columns than this must declare its column widths.
WIDE_TABLE_COLUMNS = 4
# LaTeX or math notation, which in an inline code literal is math set in code
# font: LaTeX commands, sub- and superscript groups, ASCII spellings of
# operators, Greek letters (``ΔW``, ``η``), Unicode sub- and superscripts
# (``R_n²``, ``Q₁``) and accents (``x̂``), and the symbols of formulas
# (``−``, ``·``, ``←``, ``≤``). Names in real code do not contain these (a
# Python subscript is written ``x[i]``, a product ``math.prod``, a minus
# ``-``; an f-string's ``{a}_{b}`` has a brace before the underscore).
MATH_IN_CODE = re.compile(
    r"(?<!\})[_^]\{|\\(?:sum|prod|sigma|cdot|times|frac|sqrt|top|mathbf|le|ge|neq)\b"
    r"|\b(?:prod|sum)_|\bsigma\b|\^T\b"
    r"|[\u0391-\u03a9\u03b1-\u03c9]"  # Greek
    r"|[\u00b2\u00b3\u00b9\u2070-\u209c\u1d40-\u1d6a\u0302]"  # sub-, superscripts, hat
    r"|[∏∑√‖×−·←→↦≤≥≠≈∈⊗]"
)
# A name with a one-letter index (``R_n``, ``U_0``, ``G_(n)``), not part of a
# longer identifier (``lora_B``, ``n_iter``) or a call.
INDEXED = r"\b[A-Za-z]_(?:[A-Za-z0-9]|\([a-z0-9]\))(?![\w(])"
# A formula in index notation: an indexed name in an equation, comparison or
# arithmetic (``U_n = Q_n R_n``, ``R_n <= I_n``, ``C / c_n``), or beside
# another factor (``R_0 R_1``, ``2 I_n``). An indexed name alone (``R_n``) or
# a shape tuple (``(I_n, R_n)``) may stay code.
INDEX_FORMULA = re.compile(
    rf"{INDEXED}.*(?: (?:=|==|<=|>=|<|>|\+|/|\*) )|(?: (?:=|<=|>=|<|>|\+|/|\*) ).*{INDEXED}"
    rf"|{INDEXED} {INDEXED}|\d {INDEXED}|{INDEXED} [A-Za-z]\b(?![(\[])"
)
# A code literal that is a private name on its own, such as ``_ops``.
PRIVATE_LITERAL = re.compile(r"_[a-z][a-z0-9_]*")
EXTERNAL_CSS = re.compile(r"(?:url\(|@import\s+)[\"']?(?:https?:)?//[^\s\"')]+", re.IGNORECASE)
ZERO_SPREAD = re.compile(r"±\s*0(?:\.0+)?(?![.\d])")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)
# Generated pages with no prose of their own.
SKIPPED_PAGES = ("genindex.html", "search.html", "py-modindex.html")


@dataclass(frozen=True)
class Problem:
    """One problem found on one page."""

    page: str
    message: str


def external_assets(soup: BeautifulSoup) -> list[str]:
    """Scripts, stylesheets and images the page loads from another site."""
    found = []
    for tag, attribute in (("script", "src"), ("link", "href"), ("img", "src")):
        for element in soup.find_all(tag):
            url = element.get(attribute) or ""
            if tag == "link" and "canonical" in (element.get("rel") or []):
                continue
            if EXTERNAL.match(url):
                found.append(f"<{tag}> loads {url}")
    return found


def empty_sidebars(soup: BeautifulSoup) -> list[str]:
    """Sidebar titles that head no links."""
    found = []
    primary = soup.find(id="pst-primary-sidebar")
    hidden = primary is None or "hide-on-wide" in (primary.get("class") or [])
    for nav in [] if hidden else primary.find_all("nav", class_="bd-docs-nav"):
        if nav.find("a", href=True) is None:
            found.append('empty primary sidebar ("Section Navigation" without links)')
    for nav in soup.find_all("nav", class_="page-toc"):
        if nav.find("a", href=True) is None:
            found.append('empty secondary sidebar ("On this page" without entries)')
    return found


def table_cells(soup: BeautifulSoup) -> list[str]:
    """Table cells that render wrongly: a lone "-" (a bullet) or "± 0.000"."""
    found = []
    for cell in soup.find_all(["td", "th"]):
        if any(not item.get_text(strip=True) for item in cell.find_all("li")):
            found.append("a table cell renders as an empty bullet (a lone '-': write n/a)")
        if ZERO_SPREAD.search(cell.get_text(" ")):
            found.append(f"a table cell shows a zero spread: {cell.get_text(' ').strip()!r}")
    return list(dict.fromkeys(found))


def leftovers(soup: BeautifulSoup) -> list[str]:
    """Development leftovers in the article's text and code literals."""
    article = soup.find("article") or soup
    # Highlighted code splits its tokens into elements: read it without separators.
    texts = [article.get_text(" ")] + [pre.get_text("") for pre in article.find_all("pre")]
    found = []
    for message, pattern in LEFTOVERS.items():
        for text in texts:
            found += [f"{message}: {m.group(0)!r}" for m in pattern.finditer(text)]
    for code in article.find_all("code", class_="literal"):
        literal = code.get_text("").strip()
        if PRIVATE_LITERAL.fullmatch(literal):
            found.append(f"names a private name: {literal!r}")
    return list(dict.fromkeys(found))


def _columns(table) -> int:
    return max(
        (
            sum(int(c.get("colspan", 1)) for c in row.find_all(["td", "th"]))
            for row in table.find_all("tr")
        ),
        default=0,
    )


def wide_tables(soup: BeautifulSoup) -> list[str]:
    """Tables that can run wider than the text column, and off a phone's screen.

    The theme puts each table in a box that scrolls sideways
    (``div.pst-scrollable-table-container``), so a wide table scrolls
    instead of running under the sidebar: a table outside one is reported.
    Whether a table fits its column depends on the browser's layout, which
    a static check cannot run (``render_check.py`` runs it in headless
    Chromium after the build); its proxy is the column count. A table of
    more than ``WIDE_TABLE_COLUMNS`` columns sized by its content takes the
    longest line of every column and overflows the column at 1280 px; one
    that declares its widths (``:widths:``, ``<col style="width: ..">``)
    gets shares of the column and wraps its cells to them (custom.css lets
    code in a cell break), so it fits on a laptop and scrolls in its box on
    a phone.
    """
    article = soup.find("article") or soup
    found = []
    for table in article.find_all("table"):
        caption = table.find("caption")
        name = repr(caption.get_text(" ", strip=True)) if caption else "without a caption"
        if table.find_parent("div", class_="pst-scrollable-table-container") is None:
            found.append(f"table {name} is not in a box that scrolls sideways")
        columns = _columns(table)
        widths = [col for col in table.find_all("col") if "width" in (col.get("style") or "")]
        if columns > WIDE_TABLE_COLUMNS and not widths:
            found.append(f"table {name} has {columns} columns and no widths (give :widths:)")
    return found


def math_in_code(soup: BeautifulSoup) -> list[str]:
    """Inline code literals of the article that hold math (``MATH_IN_CODE``)."""
    article = soup.find("article") or soup
    found = []
    for code in article.find_all("code", class_="literal"):
        text = code.get_text("")
        if MATH_IN_CODE.search(text) or INDEX_FORMULA.search(text):
            found.append(f"math set as code (write :math:`...`): {text!r}")
    return list(dict.fromkeys(found))


def check_page(page: str, html: str) -> list[str]:
    """Every problem of one built page, as messages."""
    soup = BeautifulSoup(html, "html.parser")
    problems = external_assets(soup)
    if page.startswith("_modules/") or page.endswith(SKIPPED_PAGES):
        return problems
    return (
        problems
        + empty_sidebars(soup)
        + table_cells(soup)
        + wide_tables(soup)
        + leftovers(soup)
        + math_in_code(soup)
    )


def check_site(outdir: Path, allow: dict[str, list[str]]) -> list[Problem]:
    """Check every page under ``outdir``; ``allow`` maps a page to text that may stay."""
    problems = []
    pages = set()
    for path in sorted(outdir.rglob("*.html")):
        page = path.relative_to(outdir).as_posix()
        if page.startswith(("_static/", "_sources/", "_images/")):
            continue
        pages.add(page.removesuffix(".html"))
        allowed = allow.get(page.removesuffix(".html"), [])
        found = check_page(page, path.read_text(encoding="utf-8"))
        problems += [Problem(page, m) for m in found if not any(text in m for text in allowed)]
        problems += [
            Problem(
                page, f"allowed text {text!r} no longer appears: remove it from site_checks_allow"
            )
            for text in allowed
            if not any(text in m for m in found)
        ]
    for path in sorted(outdir.rglob("*.css")):
        for match in EXTERNAL_CSS.finditer(path.read_text(encoding="utf-8", errors="replace")):
            page = path.relative_to(outdir).as_posix()
            problems.append(Problem(page, f"stylesheet loads {match.group(0)}"))
    problems += [
        Problem(f"{page}.html", "no such page: remove it from site_checks_allow")
        for page in sorted(set(allow) - pages)
    ]
    return problems


# Sphinx's default search scores (sphinx/themes/basic/static/searchtools.js),
# which docs/_ext/search_scorer.js keeps, and that file's PUBLIC_BOOST.
SCORER = {"objNameMatch": 11, "objPartialMatch": 6, "title": 15}
OBJECT_PRIORITY = {0: 15, 1: 5, 2: -5}
PUBLIC_BOOST = 20


def read_search_index(path: Path) -> dict:
    """The data of a built ``searchindex.js`` (``Search.setIndex({...})``)."""
    text = path.read_text(encoding="utf-8")
    return json.loads(text[text.index("(") + 1 : text.rindex(")")])


def _round(value: float) -> int:
    """JavaScript's ``Math.round``: halves round up."""
    return math.floor(value + 0.5)


def _object_results(index: dict, term: str, terms: set[str]) -> list[tuple[str, int]]:
    """``Search.performObjectSearch`` of searchtools.js: (full name, score) pairs."""
    results = []
    for prefix, entries in index["objects"].items():
        for file, kind, priority, _anchor, name in entries:
            fullname = f"{prefix}.{name}" if prefix else name
            lower = fullname.lower()
            if term not in lower:
                continue
            last = lower.split(".")[-1]
            score = SCORER["objNameMatch"] if term in (lower, last) else 0
            if not score and term in last:
                score = SCORER["objPartialMatch"]
            haystack = f"{prefix} {name} {index['objnames'][str(kind)][2]} {index['titles'][file]}"
            if any(other not in haystack.lower() for other in terms - {term}):
                continue
            score += OBJECT_PRIORITY.get(priority, 0)
            # search_scorer.js: package-level names first, nested ones lower.
            depth = fullname.count(".") + 1
            results.append((fullname, score + (PUBLIC_BOOST if depth <= 2 else 2 - depth)))
    return results


def search_ranking(index: dict, query: str) -> list[str]:
    """The object and page-title results of a search, best first, as the site ranks them.

    Ports the object search and the title search of Sphinx's searchtools.js
    (with the ``Scorer.score`` of ``search_scorer.js``). Full-text matches
    are left out: they score at most ``Scorer.title`` (15), below every
    object result that the public-name boost lifts, so they never decide
    which object comes first.
    """
    lower = query.lower().strip()
    results = []
    for title, found in index["alltitles"].items():
        if lower in title.lower().strip() and len(lower) >= len(title) / 2:
            score = _round(SCORER["title"] * len(lower) / len(title))
            for file, _anchor in found:
                results.append((title, score + (index["titles"][file] == title)))
    terms = set(re.split(r"\W+", lower)) - {""}
    for term in terms:
        results += _object_results(index, term, terms)
    # Score first, then the name alphabetically; one entry per name.
    ordered = sorted(results, key=lambda result: (-result[1], result[0].lower()))
    return list(dict.fromkeys(name for name, _score in ordered))


def search_problems(index: dict, expected: dict[str, str]) -> list[str]:
    """Objects documented twice, and queries whose public name is not found first.

    An object is documented twice when a module page documents
    ``package.module.name`` and ``package.name`` has its own entry.
    """
    names = {
        f"{prefix}.{e[4]}" if prefix else e[4]
        for prefix, es in index["objects"].items()
        for e in es
    }
    modules = {
        f"{prefix}.{e[4]}" if prefix else e[4]
        for prefix, entries in index["objects"].items()
        for e in entries
        if index["objtypes"][str(e[1])] == "py:module"
    }
    found = [
        f"{name} is documented twice: also as {name.split('.')[0]}.{name.rsplit('.', 1)[1]}"
        for name in sorted(names)
        if name.rsplit(".", 1)[0] in modules - {name.split(".")[0]}
        and f"{name.split('.')[0]}.{name.rsplit('.', 1)[1]}" in names
    ]
    for query, public in expected.items():
        ranking = search_ranking(index, query)
        if not ranking or ranking[0] != public:
            first = ranking[:3] or ["nothing"]
            found.append(f"a search for {query!r} ranks {', '.join(first)} before {public}")
    return found


# An indexed page repeats another in search when at least this share of its
# prose, and at least ``DUPLICATE_MIN_PARAGRAPHS`` paragraphs, are also on
# another indexed page. Prose: paragraphs and code blocks of at least
# ``PROSE_MIN_CHARS`` characters outside tables and object descriptions (the
# API pages of related classes legitimately repeat inherited docstrings).
DUPLICATE_SHARE = 0.5
DUPLICATE_MIN_PARAGRAPHS = 4
PROSE_MIN_CHARS = 60


def page_prose(html: str) -> set[str]:
    """The paragraphs and code blocks of a page's article, whitespace normalized."""
    soup = BeautifulSoup(html, "html.parser")
    article = soup.find("article") or soup
    found = set()
    for block in article.find_all(["p", "pre"]):
        if block.find_parent("dl", class_="py") or block.find_parent("table"):
            continue
        text = " ".join(block.get_text(" ").split())
        if len(text) >= PROSE_MIN_CHARS:
            found.add(text)
    return found


def searched_pages(index: dict) -> list[str]:
    """The pages the search finds: those indexed with a title (``nosearch`` pages have none)."""
    return [doc for doc, title in zip(index["docnames"], index["titles"], strict=True) if title]


def duplicated_pages(prose: dict[str, set[str]]) -> list[str]:
    """Pairs of indexed pages of which one repeats the other's prose (``page_prose``)."""
    found = []
    pages = sorted(prose)
    for i, first in enumerate(pages):
        for second in pages[i + 1 :]:
            shared = len(prose[first] & prose[second])
            smaller = min(len(prose[first]), len(prose[second]))
            if shared >= DUPLICATE_MIN_PARAGRAPHS and shared >= DUPLICATE_SHARE * smaller:
                found.append(
                    f"{first} and {second} are both searched and share {shared} paragraphs: "
                    "leave one out of the search (not_searched in conf.py)"
                )
    return found


def _on_build_finished(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    outdir = Path(app.outdir)
    for problem in check_site(outdir, app.config.site_checks_allow):
        logger.warning("%s: %s", problem.page, problem.message, type="site_checks")
    index = read_search_index(outdir / "searchindex.js")
    prose = {
        page: page_prose((outdir / f"{page}.html").read_text(encoding="utf-8"))
        for page in searched_pages(index)
    }
    problems = search_problems(index, app.config.site_checks_search) + duplicated_pages(prose)
    for message in problems:
        logger.warning("searchindex.js: %s", message, type="site_checks")


def setup(app):
    """Register the check and its ``site_checks_allow`` setting."""
    app.add_config_value("site_checks_allow", {}, "html", types=frozenset({dict}))
    app.add_config_value("site_checks_search", {}, "html", types=frozenset({dict}))
    app.connect("build-finished", _on_build_finished)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
