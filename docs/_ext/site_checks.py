"""Check every page of the built HTML site; each problem is a Sphinx warning.

``make test`` builds the docs with warnings as errors, so a page fails the
build when it

* loads a script, stylesheet, font or image from another site (the docs
  must work offline, math included);
* shows an empty sidebar (a "Section Navigation" title with no links, or an
  "On this page" title with no entries);
* has a table cell that renders as an empty bullet (a lone ``-``; write
  ``n/a``) or a spread of ``± 0.000`` (a single run has no spread);
* mentions development leftovers, text that only makes sense to the people
  who wrote it: a reference to a planning document that does not ship with
  these docs (the word ``DESIGN``; a page states its rule itself instead),
  an issue number (``issue 12``), internal labels (``T1``, ``Table 1c``), a
  private module path or name (``_cost.py``, ``flora._cost``, ``_ops``), or
  an example that cannot be copied out of the page (``getfixture(...)``,
  ``sys.path.insert(...)``).

The source listings of ``sphinx.ext.viewcode`` (``_modules/``) show the code
itself, private modules included, and are only checked for external assets.

``site_checks_allow`` in ``conf.py`` maps a page to text that may stay on it
for now; an entry whose text is no longer on its page is itself reported, so
an allowance ends as soon as the page is fixed.
"""

from __future__ import annotations

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


def check_page(page: str, html: str) -> list[str]:
    """Every problem of one built page, as messages."""
    soup = BeautifulSoup(html, "html.parser")
    problems = external_assets(soup)
    if page.startswith("_modules/") or page.endswith(SKIPPED_PAGES):
        return problems
    return problems + empty_sidebars(soup) + table_cells(soup) + leftovers(soup)


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


def _on_build_finished(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    for problem in check_site(Path(app.outdir), app.config.site_checks_allow):
        logger.warning("%s: %s", problem.page, problem.message, type="site_checks")


def setup(app):
    """Register the check and its ``site_checks_allow`` setting."""
    app.add_config_value("site_checks_allow", {}, "html", types=frozenset({dict}))
    app.connect("build-finished", _on_build_finished)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
