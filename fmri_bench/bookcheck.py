"""The built book, checked in a real browser (headless Chromium through selenium).

In: an HTML folder (``book/_build/html``) and the chapter pages the table of contents lists.
Out: ``Problem`` rows (page, what), empty when the book is fine. Each page is served over a
local HTTP server (as GitHub Pages serves it; ``file://`` would block the search index) and
loaded in Chromium; a page fails on

- a console error (``SEVERE`` in the browser log); an external asset that cannot be reached
  because this machine has no network (e.g. MathJax from its CDN) is kept as an offline note,
- an image or animation that did not load (``naturalWidth`` 0),
- a cell that shows a traceback (``Traceback (most recent call last)`` or an ``...Error:`` line
  in an output block),
- a chapter page without a rendered table (every chapter ends with its results table),
- navigation that does not list every chapter,
- an internal link to a page that does not exist.

The browser is Debian's ``chromium`` with its ``chromedriver`` (``apt-get install chromium
chromium-driver``); ``find_browser()`` says where they are, or None when they are missing (the
caller says clearly that the check was skipped).
"""

from __future__ import annotations

import functools
import re
import http.server
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

from fmri_bench.errors import InputError

_CANDIDATES = {"chromium": ("chromium", "chromium-browser", "google-chrome"), "driver": ("chromedriver",)}
_ERROR_OUTPUT_JS = """
const outs = Array.from(document.querySelectorAll('.cell_output, .output'));
return outs.map(o => o.innerText).filter(t => /Traceback \\(most recent call last\\)|^\\w*Error: /m.test(t))
           .map(t => t.slice(0, 200));
"""
_IMAGES_JS = """
return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))
            .map(i => i.getAttribute('src'));
"""


@dataclass(frozen=True)
class Problem:
    page: str
    what: str
    offline: bool = False  # an external resource this machine cannot reach (no network): a note

    def line(self) -> str:
        return f"{self.page}: {'(offline) ' if self.offline else ''}{self.what}"


_UNREACHABLE = ("net::ERR_NAME_NOT_RESOLVED", "net::ERR_INTERNET_DISCONNECTED", "net::ERR_ADDRESS_UNREACHABLE")


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths on this machine, or None if either is missing."""
    found = {}
    for role, names in _CANDIDATES.items():
        path = next((p for p in map(shutil.which, names) if p), None)
        if path is None:
            return None
        found[role] = path
    return found["chromium"], found["driver"]


@contextmanager
def serve(folder: Path):
    """A local HTTP server for ``folder`` on a free port -> its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request log on stderr
        pass


def _driver(browser: tuple[str, str]):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=browser[1]), options=opts)


def _internal_links(html: Path, page: Path, hrefs: list[str]) -> list[str]:
    """Links from ``page`` to files under ``html`` that do not exist."""
    broken = []
    for href in hrefs:
        parsed = urlparse(href)
        if parsed.scheme or parsed.netloc or not parsed.path:
            continue  # external, mailto:, or a pure #fragment
        target = (page.parent / unquote(parsed.path)).resolve()
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            broken.append(href)
    return broken


def check_site(html: str | Path, chapters: list[str], browser: tuple[str, str] | None = None,
               timeout: float = 30.0, screenshots: str | Path | None = None) -> list[Problem]:
    """Load every page of ``chapters`` (paths relative to ``html``, e.g. ``notebooks/02_pretraining.html``)
    in headless Chromium -> the problems found (empty: all good). ``screenshots``: a folder for a
    PNG of the top of each page as the browser drew it."""
    html = Path(html)
    if not (html / "index.html").is_file():
        raise InputError("no index.html: build the book first (fmri-bench book)", html)
    browser = browser or find_browser()
    if browser is None:
        raise InputError("no chromium / chromedriver on PATH (apt-get install chromium chromium-driver)")
    problems: list[Problem] = []
    root = "index.html"
    redirect = re.search(r'http-equiv="Refresh" content="0; url=([^"]+)"', (html / root).read_text(), re.I)
    if redirect:  # jupyter-book's index.html only forwards to the root page
        root = redirect.group(1)
    pages = [root] + [c for c in chapters if c != root]
    with serve(html) as base:
        driver = _driver(browser)
        driver.set_page_load_timeout(timeout)
        try:
            for rel in pages:
                if not (html / rel).is_file():
                    problems.append(Problem(rel, "page missing from the build"))
                    continue
                driver.get(urljoin(base, rel))
                driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")  # lazy images
                driver.execute_async_script(
                    "const done = arguments[arguments.length - 1];"
                    "Promise.all(Array.from(document.images).map(i => i.complete ? 0 :"
                    " new Promise(r => { i.onload = i.onerror = r; }))).then(done);")
                for entry in driver.get_log("browser"):
                    # the browser asks for /favicon.ico by itself; that is not the page's request
                    msg = entry.get("message", "")
                    if entry.get("level") == "SEVERE" and "/favicon.ico" not in msg:
                        # a CDN asset (MathJax) that does not resolve offline is noted, not failed:
                        # the published book loads it; any other console error fails the page
                        external = not msg.startswith(base) and any(e in msg for e in _UNREACHABLE)
                        problems.append(Problem(rel, f"console error: {msg[:200]}", offline=external))
                if screenshots is not None:
                    Path(screenshots).mkdir(parents=True, exist_ok=True)
                    driver.execute_script("window.scrollTo(0, 0)")
                    driver.save_screenshot(str(Path(screenshots) / (rel.replace("/", "_") + ".png")))
                for src in driver.execute_script(_IMAGES_JS):
                    problems.append(Problem(rel, f"image did not load: {src}"))
                for text in driver.execute_script(_ERROR_OUTPUT_JS):
                    problems.append(Problem(rel, f"a cell shows an error: {' '.join(text.split())[:160]}"))
                if rel != root and not driver.execute_script("return document.querySelectorAll('table').length"):
                    problems.append(Problem(rel, "no table rendered (a chapter ends with its results table)"))
                nav = driver.execute_script(
                    "return Array.from(document.querySelectorAll('nav a, .bd-sidebar a')).map(a => a.href)")
                listed = {urlparse(h).path.lstrip("/") for h in nav}
                for c in chapters:
                    if c not in listed:
                        problems.append(Problem(rel, f"navigation does not list {c}"))
                hrefs = driver.execute_script(
                    "return Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))")
                for href in _internal_links(html, html / rel, hrefs):
                    problems.append(Problem(rel, f"broken internal link: {href}"))
        finally:
            driver.quit()
    return problems


def chapter_pages(book: str | Path) -> list[str]:
    """The chapter pages the book must have: one per executed notebook in ``book/notebooks``
    (the table of contents globs ``notebooks/*``) -> ``notebooks/<name>.html``."""
    return [f"notebooks/{p.stem}.html" for p in sorted((Path(book) / "notebooks").glob("*.ipynb"))]
