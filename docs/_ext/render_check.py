"""Render every built page in headless Chromium and report what does not fit.

``make docs`` runs it after the build (``python docs/_ext/render_check.py
docs/_build/html``). The static table check of ``site_checks`` reads the
HTML; this one lays each page out as a browser does, at a laptop's width
(1280 px) and a phone's (390 px), every ``.. details::`` block opened, after
MathJax has typeset the page, and reports

* a table whose box is wider than the text column and that does not scroll
  sideways inside a box of its own (an ancestor with ``overflow-x: auto`` or
  ``scroll`` no wider than the column): its last columns are cut or run
  under the sidebar;
* a page that scrolls sideways as a whole (something wider than the screen);
* a formula that MathJax could not typeset (an ``mjx-merror``).

One browser runs all pages: a checker page, served with the site by a local
HTTP server, loads them one after another into two iframes (one per width)
and posts its findings back. Without a Chromium binary the check says so and
reports nothing.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from functools import partial
from pathlib import Path
from typing import NamedTuple

# The screens the pages are laid out on: (width, height) in CSS pixels.
SCREENS = ((1280, 900), (390, 844))
# Binaries tried in this order; the first one on PATH runs the check.
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Pages without prose of their own, and files that are not pages.
SKIPPED_PAGES = ("genindex.html", "search.html", "py-modindex.html")
SKIPPED_DIRS = ("_static/", "_sources/", "_modules/", "_images/", "_downloads/")
CHECKER = "/__render_check.html"
RESULTS = "/__render_check_results"
# Seconds one page may take to load and typeset before it is reported.
PAGE_TIMEOUT_S = 30

CHECKER_SCRIPT = r"""
const PAGES = __PAGES__;
const SCREENS = __SCREENS__;
const PAGE_TIMEOUT_MS = __TIMEOUT__;
const STATS = {pages: 0, tables: 0, formulas: 0};

function load(frame, url) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), PAGE_TIMEOUT_MS);
    frame.onload = () => { clearTimeout(timer); resolve(true); };
    frame.src = url;
  });
}

async function settle(win) {
  const mathjax = win.MathJax && win.MathJax.startup && win.MathJax.startup.promise;
  if (mathjax) await Promise.race([mathjax, new Promise((r) => setTimeout(r, PAGE_TIMEOUT_MS))]);
  if (win.document.fonts) await win.document.fonts.ready;
  await new Promise((r) => win.requestAnimationFrame(() => win.requestAnimationFrame(r)));
}

function scrollsInOwnBox(table, article, column) {
  for (let box = table.parentElement; box && box !== article; box = box.parentElement) {
    const overflow = box.ownerDocument.defaultView.getComputedStyle(box).overflowX;
    if ((overflow === "auto" || overflow === "scroll")
        && box.getBoundingClientRect().width <= column + 1) return true;
  }
  return false;
}

function describe(table, index) {
  const caption = table.querySelector("caption");
  if (caption) return "table " + JSON.stringify(caption.textContent.trim().replace(/\s+/g, " "));
  const cell = table.querySelector("th, td");
  const first = cell ? cell.textContent.trim().replace(/\s+/g, " ").slice(0, 40) : "";
  return "table " + (index + 1) + " (first cell " + JSON.stringify(first) + ")";
}

function check(doc, width) {
  const win = doc.defaultView;
  const found = [];
  const article = doc.querySelector("article.bd-article") || doc.querySelector("article");
  if (!article) return found;
  const style = win.getComputedStyle(article);
  const column = article.clientWidth - parseFloat(style.paddingLeft)
    - parseFloat(style.paddingRight);
  article.querySelectorAll("table").forEach((table, index) => {
    const wide = table.getBoundingClientRect().width;
    if (wide > column + 1 && !scrollsInOwnBox(table, article, column)) {
      found.push(width + " px: " + describe(table, index) + " is " + Math.round(wide)
        + " px wide in a " + Math.round(column) + " px column and does not scroll in its box");
    }
  });
  const page = doc.documentElement.scrollWidth;
  if (page > win.innerWidth + 1) {
    found.push(width + " px: the page scrolls sideways (" + page + " px wide)");
  }
  // An error box, or an undefined command that MathJax shows in red.
  doc.querySelectorAll("mjx-merror, mjx-container [style*='color: red']").forEach((error) => {
    const formula = error.closest("mjx-container").querySelector("mjx-assistive-mml");
    found.push(width + " px: MathJax cannot typeset " + JSON.stringify(
      error.getAttribute("data-mjx-error") || (formula ? formula.textContent : "")));
  });
  article.querySelectorAll("span.math, div.math").forEach((formula) => {
    if (!formula.querySelector("mjx-container")) {
      found.push(width + " px: a formula is not typeset: "
        + JSON.stringify(formula.textContent.trim().slice(0, 60)));
    }
  });
  STATS.tables += article.querySelectorAll("table").length;
  STATS.formulas += article.querySelectorAll("mjx-container").length;
  return found;
}

async function run(frame, width) {
  const found = {};
  for (const page of PAGES) {
    const problems = [];
    if (!(await load(frame, "/" + page))) {
      problems.push(width + " px: the page did not load in " + PAGE_TIMEOUT_MS / 1000 + " s");
    } else {
      const doc = frame.contentDocument;
      doc.querySelectorAll("details").forEach((details) => { details.open = true; });
      await settle(doc.defaultView);
      problems.push(...check(doc, width));
      STATS.pages += 1;
    }
    if (problems.length) found[page] = problems;
  }
  return found;
}

async function main() {
  const frames = SCREENS.map(([width, height], index) => {
    const frame = document.createElement("iframe");
    frame.style.cssText = "position:absolute;top:0;border:0;left:" + index * 1290 + "px;"
      + "width:" + width + "px;height:" + height + "px";
    document.body.appendChild(frame);
    return frame;
  });
  let results;
  try {
    results = await Promise.all(frames.map((frame, i) => run(frame, SCREENS[i][0])));
  } catch (error) {
    results = [{"(checker)": ["the checker failed: " + error]}];
  }
  const merged = {};
  for (const found of results) {
    for (const [page, problems] of Object.entries(found)) {
      merged[page] = (merged[page] || []).concat(problems);
    }
  }
  const body = JSON.stringify({problems: merged, stats: STATS});
  await fetch("__RESULTS__", {method: "POST", body: body});
}
main();
"""


def find_browser() -> str | None:
    """The path of the first Chromium binary of ``BROWSERS`` on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def site_pages(outdir: Path) -> list[str]:
    """The built pages to render, as paths relative to ``outdir``."""
    pages = []
    for path in sorted(outdir.rglob("*.html")):
        page = path.relative_to(outdir).as_posix()
        if not page.startswith(SKIPPED_DIRS) and not page.endswith(SKIPPED_PAGES):
            pages.append(page)
    return pages


def checker_html(pages: list[str]) -> str:
    """The checker page: it renders ``pages`` and posts the problems to ``RESULTS``."""
    script = (
        CHECKER_SCRIPT.replace("__PAGES__", json.dumps(pages))
        .replace("__SCREENS__", json.dumps(SCREENS))
        .replace("__TIMEOUT__", str(PAGE_TIMEOUT_S * 1000))
        .replace("__RESULTS__", RESULTS)
    )
    return f"<!DOCTYPE html><html><body><script>{script}</script></body></html>"


class Rendering(NamedTuple):
    """What the browser reported: problems by page, and what it measured."""

    problems: dict[str, list[str]]
    # Page loads (one per page and screen), tables measured, formulas typeset.
    stats: dict[str, int]


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site and the checker page; receives the checker's results."""

    def __init__(self, *args, checker: str, results: dict, done: threading.Event, **kwargs):
        self.checker, self.results, self.done = checker, results, done
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        if self.path != CHECKER:
            super().do_GET()
            return
        body = self.checker.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.results.update(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()
        self.done.set()

    def log_message(self, format: str, *args) -> None:
        """Quiet: a line per request would bury the report."""


def render_site(
    outdir: Path, browser: str, pages: list[str] | None = None, timeout_s: float = 600
) -> Rendering:
    """Render ``pages`` (default: every page under ``outdir``) in ``browser``.

    Raises
    ------
    TimeoutError
        When the browser has not reported within ``timeout_s`` seconds.
    """
    pages = site_pages(outdir) if pages is None else pages
    results: dict = {}
    done = threading.Event()
    handler = partial(
        _Handler, directory=str(outdir), checker=checker_html(pages), results=results, done=done
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}{CHECKER}"
    with tempfile.TemporaryDirectory() as profile:
        command = [
            browser,
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1700,1000",
            url,
        ]
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            finished = done.wait(timeout_s)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            server.shutdown()
            server.server_close()
    if not finished:
        raise TimeoutError(f"{browser} did not report on {len(pages)} pages in {timeout_s:.0f} s")
    return Rendering(results["problems"], results["stats"])


def main(argv: list[str] | None = None) -> int:
    """Check a built site; exit status 1 when a page has a problem."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path, help="the built HTML site (docs/_build/html)")
    args = parser.parse_args(argv)
    if not (args.outdir / "index.html").is_file():
        print(f"render check: {args.outdir} has no index.html: build the docs first")
        return 2
    browser = find_browser()
    if browser is None:
        print(
            f"render check SKIPPED: no Chromium binary on PATH (looked for {', '.join(BROWSERS)})"
        )
        return 0
    pages = site_pages(args.outdir)
    problems, stats = render_site(args.outdir, browser, pages)
    for page, found in sorted(problems.items()):
        for problem in found:
            print(f"{page}: {problem}")
    widths = " and ".join(f"{width} px" for width, _ in SCREENS)
    print(
        f"render check: {len(pages)} pages at {widths} ({stats['pages']} loads, "
        f"{stats['tables']} tables, {stats['formulas']} formulas): "
        f"{sum(map(len, problems.values()))} problems"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
